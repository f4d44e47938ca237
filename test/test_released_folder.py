"""A GGUF folder as downloaded: several language models and mmproj files side by side, the default and
explicit choices, the OCR variant, BOS from the vocabulary, and the checks that run before torch."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.export.make_test_model import FILE_NAMES, write_test_model
from omnivision_ros.model import gguf_names
from omnivision_ros.model.config import PRESETS
from omnivision_ros.model.gguf_files import read_name
from omnivision_ros.model.gguf_loader import GGUFFile, load_gguf_model, model_tensor, select_gguf_files
from omnivision_ros.model.prompt import PromptBuilder
from omnivision_ros.model.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "omnivision_ros" / "data" / "sample.jpg"

# The tiny architecture with a narrower language model: the 151936-row embedding makes the file size.
MICRO = dataclasses.replace(PRESETS["tiny"], name="micro", lm_hidden=16, lm_heads=2, lm_kv_heads=1, lm_head_dim=8,
                            lm_ffn=32, mp_hidden=16)

# What the Hugging Face repo NexaAIDev/OmniVLM-968M holds (release, dtype of the writer, role kept).
DOWNLOADED = {
    "Nano-Vlm-Processor-494M-F16.gguf": ("omnivision", "f16"),
    "Nano-Vlm-Processor-494M-Q8_0.gguf": ("omnivision", "q8_0"),
    "mmproj-omni-vlm-f16.gguf": ("omnivision", "f16"),
    "omnivision-text-optimized-llm-f16.gguf": ("text-optimized", "f16"),
    "omnivision-text-optimized-llm-Q8_0.gguf": ("text-optimized", "q8_0"),
    "omnivision-text-optimized-mmproj-f16.gguf": ("text-optimized", "f16"),
    "omnivision-text-optimized-mmproj-f32.gguf": ("text-optimized", "f32"),
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Every (release, dtype) pair written once, each with its own seed, in a store of content-named files."""
    store = tmp_path_factory.mktemp("blobs")
    written = {}
    for seed, (release, dtype) in enumerate(sorted(set(DOWNLOADED.values()) | {("ocr", "f16")}), start=1):
        for path in write_test_model(store / f"{release}-{dtype}", MICRO, dtype, seed=seed, release=release):
            written[path.name] = path
    return written


def link_folder(folder: Path, blobs: dict, names) -> Path:
    """A folder of symlinks named as released, as the Hugging Face cache lays out a snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(blobs[name])
    return folder


@pytest.fixture(scope="module")
def downloaded(blobs, tmp_path_factory):
    return link_folder(tmp_path_factory.mktemp("snapshot") / "OmniVLM-968M", blobs, DOWNLOADED)


def assert_loaded_from(model, lm: Path, mmproj: Path):
    np.testing.assert_array_equal(model.language_model.embed.numpy(), GGUFFile(lm).array("token_embd.weight"))
    np.testing.assert_array_equal(model.projector.fc1.weight.numpy(), GGUFFile(mmproj).array("mm.0.weight"))


def test_file_names_say_release_and_dtype():
    released = {name: (read_name(name).release, read_name(name).dtype) for name in DOWNLOADED}
    assert released == {
        "Nano-Vlm-Processor-494M-F16.gguf": ("omnivision", "f16"),
        "Nano-Vlm-Processor-494M-Q8_0.gguf": ("omnivision", "q8_0"),
        "mmproj-omni-vlm-f16.gguf": ("omnivision", "f16"),
        "omnivision-text-optimized-llm-f16.gguf": ("omnivision-text-optimized", "f16"),
        "omnivision-text-optimized-llm-Q8_0.gguf": ("omnivision-text-optimized", "q8_0"),
        "omnivision-text-optimized-mmproj-f16.gguf": ("omnivision-text-optimized", "f16"),
        "omnivision-text-optimized-mmproj-f32.gguf": ("omnivision-text-optimized", "f32"),
    }
    assert read_name("model-fp16.gguf") == read_name("projector-fp16.gguf")  # Nexa's hub: one release, f16
    assert read_name("model-fp16.gguf").dtype == "f16"
    assert read_name("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf").dtype == "q4_k_m"
    assert read_name("my-model.gguf").dtype is None


def test_the_downloaded_repo_loads_the_f16_pair_of_the_first_release(downloaded):
    lines = []
    model, tokenizer = load_gguf_model(downloaded, log=lines.append)
    lm, mmproj = downloaded / "Nano-Vlm-Processor-494M-F16.gguf", downloaded / "mmproj-omni-vlm-f16.gguf"
    assert_loaded_from(model, lm, mmproj)
    assert len(lines) == 1
    assert f"language model {lm.name}, mmproj {mmproj.name}" in lines[0] and "default" in lines[0]
    assert all(name in lines[0] for name in DOWNLOADED)  # the others are listed as left there
    assert "OCR" not in lines[0]


@pytest.mark.parametrize("lm_file, mmproj_file, expected_mmproj", [
    ("omnivision-text-optimized-llm-Q8_0.gguf", None, "omnivision-text-optimized-mmproj-f16.gguf"),
    ("omnivision-text-optimized-llm-f16.gguf", "omnivision-text-optimized-mmproj-f32.gguf",
     "omnivision-text-optimized-mmproj-f32.gguf"),
    ("Nano-Vlm-Processor-494M-Q8_0.gguf", None, "mmproj-omni-vlm-f16.gguf"),
    (None, "omnivision-text-optimized-mmproj-f32.gguf", "omnivision-text-optimized-mmproj-f32.gguf"),
])
def test_explicit_choice(downloaded, lm_file, mmproj_file, expected_mmproj):
    choice = select_gguf_files(downloaded, lm_file, mmproj_file)
    assert choice.lm.name == (lm_file or "Nano-Vlm-Processor-494M-F16.gguf")
    assert choice.mmproj.name == expected_mmproj
    assert "as given" in choice.why


def test_explicit_choice_loads_those_files(downloaded):
    lm, mmproj = "omnivision-text-optimized-llm-Q8_0.gguf", "omnivision-text-optimized-mmproj-f32.gguf"
    model, _ = load_gguf_model(downloaded, lm, mmproj)
    assert_loaded_from(model, downloaded / lm, downloaded / mmproj)


def test_one_later_release_alone_takes_its_f16_pair(blobs, tmp_path):
    folder = link_folder(tmp_path / "text", blobs, [n for n in DOWNLOADED if n.startswith("omnivision-text")])
    choice = select_gguf_files(folder)
    assert (choice.lm.name, choice.mmproj.name) == (
        "omnivision-text-optimized-llm-f16.gguf", "omnivision-text-optimized-mmproj-f16.gguf")


def expect_choice_error(folder, pattern, lm_file=None, mmproj_file=None):
    with pytest.raises(OmniVisionError, match=pattern) as info:
        select_gguf_files(folder, lm_file, mmproj_file)
    return str(info.value)


def test_ambiguous_and_wrong_choices_list_the_candidates(downloaded, blobs, tmp_path):
    ocr_lm, text_lm = FILE_NAMES["ocr"][0]["f16"], "omnivision-text-optimized-llm-f16.gguf"
    two = link_folder(tmp_path / "two", blobs, [ocr_lm, text_lm, "omnivision-text-optimized-mmproj-f16.gguf"])
    message = expect_choice_error(two, r"language models of several releases")
    assert ocr_lm in message and text_lm in message and "--lm-file" in message and "lm_file" in message

    message = expect_choice_error(downloaded, r"has no language-model file Nano-F32\.gguf", lm_file="Nano-F32.gguf")
    assert "Nano-Vlm-Processor-494M-Q8_0.gguf" in message
    expect_choice_error(downloaded, r"mmproj-omni-vlm-f16\.gguf is not a language-model GGUF",
                        lm_file="mmproj-omni-vlm-f16.gguf")
    elsewhere = blobs["Nano-Vlm-Processor-494M-F16.gguf"]
    expect_choice_error(downloaded, r"is not in the model folder", lm_file=str(elsewhere))

    # Several mmproj files, none of the language model's release.
    other = link_folder(tmp_path / "other", blobs, [text_lm, "mmproj-omni-vlm-f16.gguf",
                                                    FILE_NAMES["ocr"][1]["f16"]])
    expect_choice_error(other, r"none of the language model's release 'omnivision-text-optimized'")
    # Two language models of one release and no F16 among them.
    q8 = blobs["omnivision-text-optimized-llm-Q8_0.gguf"]
    nof16 = link_folder(tmp_path / "nof16", blobs, ["omnivision-text-optimized-mmproj-f16.gguf"])
    (nof16 / "omnivision-text-optimized-llm-Q4_0.gguf").symlink_to(q8)
    (nof16 / "omnivision-text-optimized-llm-Q8_0.gguf").symlink_to(q8)
    expect_choice_error(nof16, r"no single default among omnivision-text-optimized-llm-Q4_0\.gguf, "
                               r"omnivision-text-optimized-llm-Q8_0\.gguf")


def test_a_folder_of_one_pair_needs_no_names(blobs, tmp_path):
    # Names that say nothing (renamed files): the only file of each role is taken.
    folder = tmp_path / "renamed"
    folder.mkdir()
    (folder / "language.gguf").symlink_to(blobs["Nano-Vlm-Processor-494M-Q8_0.gguf"])
    (folder / "vision.gguf").symlink_to(blobs["mmproj-omni-vlm-f16.gguf"])
    choice = select_gguf_files(folder)
    assert (choice.lm.name, choice.mmproj.name) == ("language.gguf", "vision.gguf")


# --- checks before the tokenizer, torch and the model ------------------------------------------------

BLOCK_TORCH_AND_LOAD = """
import sys
sys.modules["torch"] = None  # importing torch now raises ImportError
from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.gguf_loader import load_gguf_model
try:
    load_gguf_model(sys.argv[1])
except OmniVisionError as exc:
    print("refused:", exc)
except ImportError as exc:
    print("needed torch:", exc)
"""


def load_without_torch(folder: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH_AND_LOAD, str(folder)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_files_are_checked_before_torch_is_imported(blobs, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from test_gguf import rewrite

    good = link_folder(tmp_path / "good", blobs, ["Nano-Vlm-Processor-494M-F16.gguf", "mmproj-omni-vlm-f16.gguf"])
    assert load_without_torch(good).startswith("needed torch")  # a good pair gets as far as building the model
    bad = link_folder(tmp_path / "bad", blobs, ["Nano-Vlm-Processor-494M-F16.gguf"])
    wrong = np.zeros((MICRO.vit_hidden, MICRO.vit_hidden + 1), np.float32)
    rewrite(blobs["mmproj-omni-vlm-f16.gguf"], bad / "mmproj-omni-vlm-f16.gguf",
            replace={"v.blk.1.attn_v.weight": (wrong, Q.F32)})
    assert load_without_torch(bad) == (
        f"refused: {bad / 'mmproj-omni-vlm-f16.gguf'}: tensor 'v.blk.1.attn_v.weight' has shape [32, 33], "
        "expected [32, 32] (vision.blocks.1.qkv.weight[v])")


def test_a_vocabulary_larger_than_the_embedding_is_refused(blobs, tmp_path):
    from test_gguf import rewrite

    folder = link_folder(tmp_path / "vocab", blobs, ["mmproj-omni-vlm-f16.gguf"])
    rewrite(blobs["Nano-Vlm-Processor-494M-Q8_0.gguf"], folder / "Nano-Vlm-Processor-494M-Q8_0.gguf",
            edit_keys={"tokenizer.ggml.tokens": lambda tokens: [*tokens, "<|extra|>"]})
    with pytest.raises(OmniVisionError, match=r"151937 tokens but token_embd has rows for 151936"):
        load_gguf_model(folder)


@pytest.mark.parametrize("preset", ["tiny", "omnivision-968m"])
def test_shape_tables_match_the_model(preset):
    import torch
    from torch import nn

    from omnivision_ros.model.language_model import LanguageModel
    from omnivision_ros.model.projector import CompressedProjector
    from omnivision_ros.model.vision import VisionTower

    config = PRESETS[preset]

    class Stages(nn.Module):  # the model's parameter names, on the meta device (no memory)
        def __init__(self):
            super().__init__()
            self.vision = VisionTower(config)
            self.projector = CompressedProjector(config)
            self.language_model = LanguageModel(config)

    with torch.device("meta"):
        model = Stages()
    shapes = gguf_names.expected_shapes(config)
    names = {**gguf_names.lm_names(config.lm_layers, tied=False), **gguf_names.mmproj_names(config.vit_layers)}
    untied = {"output.weight"}  # the model is tied; the table's untied head has the embedding's shape
    for name, target in names.items():
        parameter = "language_model.embed" if name in untied else target
        assert shapes[name] == tuple(model_tensor(model, parameter).shape), name
    assert set(shapes) == set(names)


# --- BOS and the OCR variant -----------------------------------------------------------------------------

@pytest.mark.parametrize("add_bos, expected", [(None, []), (False, []), (True, [151643])])
def test_bos_follows_add_bos_token(tmp_path, add_bos, expected):
    lm, mmproj = write_test_model(tmp_path, MICRO, "q8_0", seed=9, add_bos=add_bos)
    _, tokenizer = load_gguf_model(tmp_path)
    assert tokenizer.bos_ids == expected
    for task in ("vqa", "ocr"):
        ids = PromptBuilder(tokenizer, MICRO, task).prefix_ids.tolist()
        assert ids[:len(expected) + 1] == [*expected, 151644]  # BOS (if any), then <|im_start|>
    tokenizer.save(tmp_path / "tokenizer.json")  # as a bundle stores it
    assert TextTokenizer.from_file(tmp_path / "tokenizer.json").bos_ids == expected
    assert tokenizer.encode("Is the door open?") == TextTokenizer.synthetic().encode("Is the door open?")


def test_ocr_files_and_the_ocr_task_from_the_command_line(blobs, tmp_path):
    ocr_lm, ocr_mmproj = (names["f16"] for names in FILE_NAMES["ocr"])
    folder = link_folder(tmp_path / "omnivision-ocr", blobs, [ocr_lm, ocr_mmproj])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "omnivision_ros.cli.ask", "--model", str(folder), "--task", "ocr",
         "--image", str(SAMPLE), "--max-new-tokens", "3", "What does it say?"],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert f"language model {ocr_lm}, mmproj {ocr_mmproj}" in done.stderr
    assert "OCR variant by its name" in done.stderr
    assert "the OCR prompt has no question" in done.stderr
    assert re.search(r"\| \d+ tokens \|", done.stderr.strip().splitlines()[-1])


def test_export_records_the_chosen_files(downloaded, tmp_path, capsys):
    from omnivision_ros.export.cli import main as export_main
    from omnivision_ros.model.bundle import MANIFEST

    out = tmp_path / "bundle"
    lm = "omnivision-text-optimized-llm-Q8_0.gguf"
    assert export_main(["--model", str(downloaded), "--out", str(out), "--lm-file", lm, "--cpu-variants", "none",
                        "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"].endswith(f"({lm} + omnivision-text-optimized-mmproj-f16.gguf)")
    assert list(manifest["variants"]) == ["fp32"]
    assert f"language model {lm}" in capsys.readouterr().err
