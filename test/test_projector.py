import numpy as np
import torch

from omnivision_ros.model.config import get_preset
from omnivision_ros.model.projector import CompressedProjector, group_tokens


def test_grouping_is_contiguous():
    # Token t carries the value t in every channel: output token j must hold tokens 9j..9j+8 in order.
    features = np.repeat(np.arange(729, dtype=np.float32)[None, :, None], 4, axis=2)  # [1, 729, 4]
    grouped = group_tokens(features, 9)
    assert grouped.shape == (1, 81, 36)
    for j in (0, 1, 40, 80):
        expected = np.repeat(np.arange(9 * j, 9 * j + 9, dtype=np.float32), 4)
        np.testing.assert_array_equal(grouped[0, j], expected)
    # A 3x3 spatial grouping would put token 27 (next row) into output token 0; contiguous does not.
    assert 27.0 not in grouped[0, 0]


def test_module_matches_manual_mlp_on_contiguous_groups():
    config = get_preset("tiny")
    torch.manual_seed(0)
    proj = CompressedProjector(config).eval()
    x = torch.randn(2, config.vit_tokens, config.vit_hidden)
    with torch.no_grad():
        out = proj(x)
        grouped = torch.from_numpy(group_tokens(x.numpy(), config.mp_group))
        manual = proj.fc2(torch.nn.functional.gelu(proj.fc1(grouped)))
    assert out.shape == (2, 81, config.lm_hidden)
    torch.testing.assert_close(out, manual)


def test_projector_sizes_of_the_released_model():
    config = get_preset("omnivision-968m")
    assert (config.vit_tokens, config.mp_tokens, config.mp_in) == (729, 81, 10368)
    proj = CompressedProjector(config)
    assert tuple(proj.fc1.weight.shape) == (4096, 10368)
    assert tuple(proj.fc2.weight.shape) == (896, 4096)
    assert sum(p.numel() for p in proj.parameters()) == 46_142_336  # DESIGN §2: 46M
