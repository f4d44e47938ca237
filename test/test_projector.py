import pytest

torch = pytest.importorskip("torch", reason="the projector is a PyTorch module")

from omnivision_ros.model.config import get_preset  # noqa: E402
from omnivision_ros.model.projector import CompressedProjector  # noqa: E402


def test_grouping_is_contiguous():
    # Token t carries the value t in every channel: output token j must hold tokens 9j..9j+8 in order.
    proj = CompressedProjector(get_preset("tiny"))
    features = torch.arange(729, dtype=torch.float32)[None, :, None].repeat(1, 1, 32)  # [1, 729, 32]
    grouped = proj.group(features)
    assert grouped.shape == (1, 81, 9 * 32)
    for j in (0, 1, 40, 80):
        expected = torch.arange(9 * j, 9 * j + 9, dtype=torch.float32).repeat_interleave(32)
        assert torch.equal(grouped[0, j], expected)
    # A 3x3 spatial grouping would put token 27 (next row) into output token 0; contiguous does not.
    assert 27.0 not in grouped[0, 0]


def test_module_is_the_mlp_over_contiguous_groups():
    config = get_preset("tiny")
    torch.manual_seed(0)
    proj = CompressedProjector(config).eval()
    x = torch.randn(2, config.vit_tokens, config.vit_hidden)
    with torch.no_grad():
        out = proj(x)
        grouped = x.reshape(2, 81, 9 * config.vit_hidden)
        manual = proj.fc2(torch.nn.functional.gelu(proj.fc1(grouped)))  # exact (erf) GELU, no norm
    assert out.shape == (2, 81, config.lm_hidden)
    torch.testing.assert_close(out, manual)


def test_projector_sizes_of_the_released_model():
    config = get_preset("omnivision-968m")
    assert (config.vit_tokens, config.mp_tokens, config.mp_in) == (729, 81, 10368)
    with torch.device("meta"):  # shapes only: no 46M parameters allocated
        proj = CompressedProjector(config)
    assert tuple(proj.fc1.weight.shape) == (4096, 10368)
    assert tuple(proj.fc2.weight.shape) == (896, 4096)
    assert sum(p.numel() for p in proj.parameters()) == 46_142_336  # DESIGN §2: 46M
