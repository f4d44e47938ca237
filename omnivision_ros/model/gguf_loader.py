"""Load the released OmniVision-968M weights from their two GGUF files into the model (OmniVisionModel).

A model is one language-model file (arch `qwen2`, e.g. `Nano-Vlm-Processor-494M-F16.gguf`, which also
carries the tokenizer) and one mmproj file (arch `siglip`, `mmproj-omni-vlm-f16.gguf`: SigLIP tower +
compressed projector). Files are told apart by `general.architecture`, not by name; a folder holding
several of a role (the Hugging Face repo as downloaded) is resolved by gguf_files.py. The config comes
from the files' metadata, the tokenizer from `tokenizer.ggml.*`, and every tensor's name, shape and type
is checked against the tables of gguf_names.py before the tokenizer, torch or the model are touched.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, TokenType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model import gguf_names
from omnivision_ros.model.config import PRESETS, OmniVisionConfig
from omnivision_ros.model.gguf_files import Choice, choose
from omnivision_ros.model.tokenizer import TextTokenizer, bytes_to_unicode, tokenizer_json
from omnivision_ros.model.tokens import REQUIRED_TOKENS, STOP_TOKEN_IDS

LM_ARCH = "qwen2"
MMPROJ_ARCHS = ("siglip", "clip")  # Nexa's converter writes "siglip"; "clip" is llama.cpp's generic mmproj
RELEASED_LM = "Nano-Vlm-Processor-494M-F16.gguf"
RELEASED_MMPROJ = "mmproj-omni-vlm-f16.gguf"

# OmniVisionConfig field -> metadata key; {arch} is the file's general.architecture.
LM_CONFIG_KEYS = {
    "lm_layers":      "{arch}.block_count",
    "lm_hidden":      "{arch}.embedding_length",
    "lm_ffn":         "{arch}.feed_forward_length",
    "lm_heads":       "{arch}.attention.head_count",
    "lm_kv_heads":    "{arch}.attention.head_count_kv",
    "lm_rope_theta":  "{arch}.rope.freq_base",
    "lm_rms_eps":     "{arch}.attention.layer_norm_rms_epsilon",
}
VISION_CONFIG_KEYS = {
    "vit_image_size": "{arch}.vision.image_size",
    "vit_patch_size": "{arch}.vision.patch_size",
    "vit_hidden":     "{arch}.vision.embedding_length",
    "vit_layers":     "{arch}.vision.block_count",
    "vit_heads":      "{arch}.vision.attention.head_count",
    "vit_mlp":        "{arch}.vision.feed_forward_length",
    "mp_hidden":      "{arch}.vision.projection_dim",
}
# Keys Nexa's converter does not write; clip.cpp hard-codes eps 1e-6, mean = std = 0.5.
VISION_OPTIONAL_KEYS = {
    "vit_ln_eps":     ("{arch}.vision.attention.layer_norm_epsilon", 1e-6),
    "vit_image_mean": ("{arch}.vision.image_mean", (0.5, 0.5, 0.5)),
    "vit_image_std":  ("{arch}.vision.image_std", (0.5, 0.5, 0.5)),
}

_REQUIRED = object()


_Q = GGMLQuantizationType
# What llama.cpp's usual F16/BF16/Q8_0/Q4_0/Q4_K_M/... files contain (Q4_K_M mixes in Q5_0, Q6_K and Q8_0
# for rows whose width, like 896, is not a multiple of 256); gguf.quants dequantizes all of them.
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
                   _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)


# GGUF metadata value types (gguf spec): type id -> struct format; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _HeaderReader:
    """Metadata fields of a GGUF header in a buffer; positions are byte offsets. Raises ValueError/struct.error."""

    def __init__(self, buf):
        self.buf = buf

    def counts(self) -> tuple[int, int]:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.buf, 4)
        if version & 0xFFFF == 0:
            raise ValueError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        return n_tensors, n_kv

    def string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.buf, pos)
        end = pos + 8 + n
        if end > len(self.buf):
            raise ValueError("string runs past the end of the file")
        return self.buf[pos + 8:end].decode("utf-8"), end

    def value(self, kind: int, pos: int):
        if kind == _STRING:
            return self.string(pos)
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", self.buf, pos)
            pos += 12
            if item_kind in _SCALARS:
                item = struct.calcsize(_SCALARS[item_kind])
                if pos + count * item > len(self.buf):
                    raise ValueError("array runs past the end of the file")
                values = np.frombuffer(self.buf, "<" + _SCALARS[item_kind], count, pos).tolist()
                return values, pos + count * item
            values = []
            for _ in range(count):
                v, pos = self.value(item_kind, pos)
                values.append(v)
            return values, pos
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, self.buf, pos)[0], pos + struct.calcsize(fmt)

    def field(self, pos: int):
        """(key, value, position after it)."""
        key, pos = self.string(pos)
        (kind,) = struct.unpack_from("<I", self.buf, pos)
        value, pos = self.value(kind, pos + 4)
        return key, value, pos


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise OmniVisionError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise OmniVisionError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")


def read_architecture(path: str | Path) -> str:
    """`general.architecture` of a GGUF file ("" if absent). Writers put it first, so choosing among a
    folder's files reads a few bytes of each instead of every header (a vocabulary is ~0.07 s)."""
    path = Path(path)
    _check_magic(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _HeaderReader(buf)
            _, n_kv = reader.counts()
            pos = 24
            for _ in range(n_kv):
                key, value, pos = reader.field(pos)
                if key == "general.architecture":
                    return str(value)
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise OmniVisionError(
            f"{path}: cannot read the GGUF header, the file is truncated or corrupt ({exc})"
        ) from exc
    return ""


class GGUFFile:
    """One GGUF file: metadata values, tensor infos by name, tensors as arrays. Errors name the file.

    The header is parsed here rather than with gguf.GGUFReader, which builds NumPy views per array
    element and needs ~5 s for the 151936 tokens of the Qwen2 vocabulary (twice that with its merges);
    this parser takes a fraction of a second. Dequantization stays with gguf.quants.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_magic(self.path)
        self.size = self.path.stat().st_size
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise OmniVisionError(
                f"{self.path}: cannot read the GGUF header, the file is truncated or corrupt ({exc})"
            ) from exc
        for t in self.tensors.values():
            if self.data_offset + t.offset + t.n_bytes > self.size:
                raise OmniVisionError(f"{self.path}: truncated, tensor '{t.name}' ends past the end of the file")
        self.architecture = self.value("general.architecture", "")
        self._data = None

    def _parse(self) -> None:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _HeaderReader(buf)
            n_tensors, n_kv = reader.counts()
            pos = 24
            self.fields = {}
            for _ in range(n_kv):
                key, value, pos = reader.field(pos)
                self.fields[key] = value
            self.tensors = {}
            for _ in range(n_tensors):
                name, pos = reader.string(pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                raw_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                try:
                    ggml_type = GGMLQuantizationType(raw_type)
                except ValueError:
                    raise ValueError(f"tensor '{name}' has unknown type id {raw_type}") from None
                block, type_size = GGML_QUANT_SIZES[ggml_type]
                if dims and dims[0] % block:
                    raise ValueError(f"tensor '{name}' rows of {dims[0]} do not split into {ggml_type.name} blocks")
                n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
                # GGUF lists dims fastest-first (ne0 = row length); NumPy/torch order is the reverse.
                self.tensors[name] = TensorInfo(name, ggml_type, tuple(reversed(dims)), offset, n_bytes)
            align = int(self.fields.get("general.alignment", 32))
            self.data_offset = -(-pos // align) * align

    def value(self, key: str, default=_REQUIRED):
        if key not in self.fields:
            if default is _REQUIRED:
                raise OmniVisionError(f"{self.path}: metadata key '{key}' is missing")
            return default
        return self.fields[key]

    def tensor(self, name: str) -> "TensorInfo":
        try:
            return self.tensors[name]
        except KeyError:
            raise OmniVisionError(f"{self.path}: tensor '{name}' is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensor(name).shape

    def check_type(self, name: str) -> "TensorInfo":
        t = self.tensor(name)
        if t.ggml_type not in SUPPORTED_TYPES:
            raise OmniVisionError(
                f"{self.path}: tensor '{name}' has unsupported type {t.ggml_type.name}; supported: "
                + ", ".join(q.name for q in SUPPORTED_TYPES)
            )
        return t

    def array(self, name: str) -> np.ndarray:
        """The tensor in NumPy order as float32/float16: a view of the file for F32/F16, dequantized otherwise."""
        t = self.check_type(name)
        if self._data is None:
            # Copy-on-write map: writable arrays torch can wrap without a copy; the file is never written.
            self._data = np.memmap(self.path, np.uint8, mode="c")
        start = self.data_offset + t.offset
        raw = self._data[start:start + t.n_bytes]
        if t.ggml_type == _Q.F32:
            return raw.view(np.float32).reshape(t.shape)
        if t.ggml_type == _Q.F16:
            return raw.view(np.float16).reshape(t.shape)
        return dequantize(raw.reshape(quant_shape_to_byte_shape(t.shape, t.ggml_type)), t.ggml_type)

    def close(self) -> None:
        self._data = None  # unmaps once the last array view is gone


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order
    offset: int  # from the start of the data section
    n_bytes: int


def select_gguf_files(folder: str | Path, lm_file: str | None = None, mmproj_file: str | None = None) -> Choice:
    """The language model and mmproj to load from `folder` (gguf_files.py: roles by header, choice by name)."""
    folder = Path(folder)
    if not folder.exists():
        raise OmniVisionError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise OmniVisionError(f"{folder} is not a folder; pass the folder that holds the two GGUF files")
    paths = sorted(folder.glob("*.gguf"))
    if not paths:
        raise OmniVisionError(f"{folder} holds no .gguf files (expected {RELEASED_LM} and {RELEASED_MMPROJ})")
    lms, mmprojs = [], []
    for path in paths:
        arch = read_architecture(path)
        if arch == LM_ARCH:
            lms.append(path)
        elif arch in MMPROJ_ARCHS:
            mmprojs.append(path)
        else:
            raise OmniVisionError(
                f"{path}: a GGUF of architecture '{arch or '(none)'}'; OmniVision needs a '{LM_ARCH}' "
                f"language model ({RELEASED_LM}) and a 'siglip' mmproj ({RELEASED_MMPROJ})"
            )
    for found, what, example in ((lms, "language-model", RELEASED_LM), (mmprojs, "mmproj", RELEASED_MMPROJ)):
        if not found:
            others = ", ".join(p.name for p in lms + mmprojs)
            raise OmniVisionError(f"{folder} has no {what} GGUF (e.g. {example}); found only {others}")
    return choose(folder, lms, mmprojs, lm_file, mmproj_file)


def _check_omni_projector(f: GGUFFile) -> None:
    """An mmproj must carry OmniVLM's compressed projector, not a LLaVA-style per-token MLP."""
    arch = f.architecture
    for name in ("v.class_embd", "v.pre_ln.weight"):
        if name in f.tensors:
            raise OmniVisionError(
                f"{f.path}: has '{name}', a CLIP vision tower; OmniVLM's mmproj is a SigLIP tower without it"
            )
    flagged = bool(f.value(f"{arch}.has_omni_vlm_projector", False))
    hidden = f.value(f"{arch}.vision.embedding_length", None)
    mm0_in = f.shape("mm.0.weight")[-1] if "mm.0.weight" in f.tensors else None
    grouped = hidden is not None and mm0_in is not None and mm0_in > hidden and mm0_in % hidden == 0
    if not (flagged or grouped):
        kind = f.value(f"{arch}.projector_type", None) or ("llava mlp" if mm0_in else "none")
        raise OmniVisionError(
            f"{f.path}: an mmproj without the OmniVLM projector (projector: {kind}); "
            f"OmniVision needs {RELEASED_MMPROJ} (siglip.has_omni_vlm_projector, mm.0 over 9 grouped tokens)"
        )


def find_gguf_files(folder: str | Path, lm_file: str | None = None, mmproj_file: str | None = None) -> tuple[Path, Path]:
    """(language-model path, mmproj path) to load from `folder`."""
    choice = select_gguf_files(folder, lm_file, mmproj_file)
    return choice.lm, choice.mmproj


def config_from_gguf(lm_path: str | Path, mmproj_path: str | Path) -> OmniVisionConfig:
    """Model dimensions read from the files' metadata (not from a preset)."""
    return _config(GGUFFile(lm_path), GGUFFile(mmproj_path))


def _config(lm: GGUFFile, mmproj: GGUFFile) -> OmniVisionConfig:
    both = f"{lm.path.name} + {mmproj.path.name}"
    if lm.architecture != LM_ARCH:
        raise OmniVisionError(f"{lm.path}: architecture '{lm.architecture}', expected '{LM_ARCH}'")
    if mmproj.architecture not in MMPROJ_ARCHS:
        raise OmniVisionError(f"{mmproj.path}: architecture '{mmproj.architecture}', expected 'siglip'")
    _check_omni_projector(mmproj)

    values = {}
    for field, key in LM_CONFIG_KEYS.items():
        values[field] = lm.value(key.format(arch=lm.architecture))
    for field, key in VISION_CONFIG_KEYS.items():
        values[field] = mmproj.value(key.format(arch=mmproj.architecture))
    for field, (key, default) in VISION_OPTIONAL_KEYS.items():
        values[field] = mmproj.value(key.format(arch=mmproj.architecture), default)
    for field in ("vit_image_mean", "vit_image_std"):
        values[field] = tuple(_f32(v) for v in values[field])
    for field in ("lm_rope_theta", "lm_rms_eps", "vit_ln_eps"):
        values[field] = _f32(values[field])

    values["lm_head_dim"] = lm.value(f"{LM_ARCH}.attention.key_length", values["lm_hidden"] // values["lm_heads"])
    values["lm_vocab"] = lm.shape("token_embd.weight")[0]
    values["lm_tie_embeddings"] = "output.weight" not in lm.tensors
    mm0_in = mmproj.shape("mm.0.weight")[-1]
    if mm0_in % values["vit_hidden"]:
        raise OmniVisionError(
            f"{mmproj.path}: projector input width {mm0_in} is not a whole number of "
            f"{values['vit_hidden']}-wide vision tokens"
        )
    values["mp_group"] = mm0_in // values["vit_hidden"]

    unsupported = []
    scaling = lm.value(f"{LM_ARCH}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        unsupported.append(f"{lm.path.name}: RoPE scaling '{scaling}'")
    if lm.value(f"{LM_ARCH}.attention.value_length", values["lm_head_dim"]) != values["lm_head_dim"]:
        unsupported.append(f"{lm.path.name}: attention value length differs from key length")
    if not mmproj.value(f"{mmproj.architecture}.use_gelu", True):
        unsupported.append(f"{mmproj.path.name}: quick-GELU vision MLP (SigLIP uses tanh-GELU)")
    projected = mmproj.shape("mm.2.weight")[0]
    if projected != values["lm_hidden"]:
        unsupported.append(
            f"the mmproj projects to width {projected} but the language model is {values['lm_hidden']} wide "
            "(the two files are from different models)"
        )
    if unsupported:
        raise OmniVisionError(f"{both}: not supported by this project: " + "; ".join(unsupported))

    context = int(lm.value(f"{LM_ARCH}.context_length", 32768))
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in values.items()):
            base = preset  # the file matches a preset exactly: keep its name and runtime defaults
            break
    else:
        base = dataclasses.replace(OmniVisionConfig(), name=lm.path.stem)
    config = dataclasses.replace(base, lm_max_context=min(base.lm_max_context, context), **values)
    try:
        return config.validate()
    except OmniVisionError as exc:
        raise OmniVisionError(f"{both}: dimensions not supported by this project: {exc}") from None


def _f32(value) -> float:
    # Metadata floats are float32: 1e-6 reads back as 9.99999997e-07. The shortest float32 repr restores 1e-06.
    return float(str(np.float32(value)))


def tokenizer_from_gguf(lm_path: str | Path) -> TextTokenizer:
    """The byte-level BPE tokenizer stored in the language-model file (`tokenizer.ggml.*`)."""
    return _tokenizer(GGUFFile(lm_path))


def _tokenizer(lm: GGUFFile) -> TextTokenizer:
    model = lm.value("tokenizer.ggml.model", None)
    if model is None:
        raise OmniVisionError(f"{lm.path}: holds no tokenizer (no tokenizer.ggml.model)")
    pre = lm.value("tokenizer.ggml.pre", "qwen2")  # converters before mid-2024 did not write it
    if model != "gpt2" or pre != "qwen2":
        raise OmniVisionError(
            f"{lm.path}: tokenizer '{model}' with pre-tokenizer '{pre}'; "
            "expected Qwen2's byte-level BPE ('gpt2', 'qwen2')"
        )
    tokens = lm.value("tokenizer.ggml.tokens")
    types = lm.value("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * len(tokens))
    merges = lm.value("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise OmniVisionError(f"{lm.path}: {len(tokens)} tokens but {len(types)} token types")

    regular, specials, added = [], {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (TokenType.NORMAL, TokenType.BYTE, TokenType.UNKNOWN):
            if len(regular) != i:
                raise OmniVisionError(f"{lm.path}: regular token '{tok}' at id {i} comes after added tokens")
            regular.append(tok)
        elif kind == TokenType.CONTROL:
            specials[tok] = i
        elif kind == TokenType.USER_DEFINED:
            added[tok] = i
        # UNUSED: llama.cpp's [PAD{i}] fillers up to the embedding rows; they decode to nothing, as in HF.

    missing_bytes = set(bytes_to_unicode().values()) - set(regular)
    if missing_bytes:
        raise OmniVisionError(f"{lm.path}: the vocabulary lacks {len(missing_bytes)} byte tokens; not a byte-level BPE")
    for name, expected in REQUIRED_TOKENS.items():
        found = specials.get(name)
        if found != expected:
            where = f"at id {found}" if found is not None else "not as a control token"
            raise OmniVisionError(
                f"{lm.path}: special token {name} is {where}, expected id {expected} "
                "(the Qwen2.5 vocabulary of OmniVLM)"
            )
    eos = lm.value("tokenizer.ggml.eos_token_id", None)
    if eos is not None and eos not in STOP_TOKEN_IDS:
        raise OmniVisionError(f"{lm.path}: eos token id {eos} is not one of the stop tokens {list(STOP_TOKEN_IDS)}")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
        tid = lm.value(key, None)
        if tid is not None and not 0 <= tid < len(tokens):
            raise OmniVisionError(f"{lm.path}: {key} {tid} is outside the {len(tokens)}-token vocabulary")

    # llama.cpp starts a prompt with BOS only when the file asks for it: add_bos_token is false when absent
    # for gpt2-type vocabularies, and Qwen2.5's (bos_token null) never sets it. The tokenizer carries the
    # choice (TextTokenizer.bos_ids), so a bundle exported from this file keeps it.
    bos = None
    if lm.value("tokenizer.ggml.add_bos_token", False):
        bos_id = lm.value("tokenizer.ggml.bos_token_id", None)
        if bos_id is None:
            raise OmniVisionError(f"{lm.path}: tokenizer.ggml.add_bos_token is set but bos_token_id is missing")
        bos = (tokens[bos_id], bos_id)
    data = tokenizer_json(regular, merges, specials, added, bos=bos)
    try:
        tokenizer = TextTokenizer.from_json(json.dumps(data, ensure_ascii=False))
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad merges
        raise OmniVisionError(f"{lm.path}: cannot build the tokenizer from its metadata ({exc})") from exc
    for name, expected in REQUIRED_TOKENS.items():
        if tokenizer.token_id(name) != expected:
            raise OmniVisionError(
                f"{lm.path}: tokenizer maps {name} to {tokenizer.token_id(name)}, expected {expected}"
            )
    return tokenizer


def model_tensor(model, target: str):
    """The tensor a name-table target stands for: a parameter, or a slice of a fused one ("...qkv.weight[k]")."""
    name, part = gguf_names.split_part(target)
    tensor = model.get_parameter(name)
    if part is None:
        return tensor
    return tensor[model.get_submodule(name.rsplit(".", 1)[0]).part(part)]


def _plan(f: GGUFFile, names: dict[str, str], shapes: dict[str, tuple[int, ...]], unused=()) -> None:
    """Check names, shapes and types of a whole file against the tables, before anything is built or copied."""
    for gguf_name, target in names.items():
        shape = f.shape(gguf_name)  # raises if missing
        expected = shapes[gguf_name]
        if shape != expected:
            raise OmniVisionError(
                f"{f.path}: tensor '{gguf_name}' has shape {list(shape)}, expected {list(expected)} ({target})"
            )
        f.check_type(gguf_name)
    for name in f.tensors:
        if name not in names and name not in unused:
            raise OmniVisionError(
                f"{f.path}: unexpected tensor '{name}' (not in the OmniVLM layout; a different model?)"
            )


def _copy(f: GGUFFile, names: dict[str, str], model) -> None:
    """One tensor at a time: dequantize (or view) it, copy into the parameter (or its slice), drop it."""
    import torch
    from tqdm import tqdm

    total = sum(f.tensor(n).n_bytes for n in names)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}",
               disable=None if total > 256 << 20 else True)
    with torch.no_grad(), bar:
        for gguf_name, target in names.items():
            model_tensor(model, target).copy_(torch.from_numpy(f.array(gguf_name)))
            bar.update(f.tensor(gguf_name).n_bytes)
    f.close()


def covered_parameters(names: dict[str, str]) -> dict[str, set]:
    """{parameter: parts named} over name tables (None stands for the whole parameter)."""
    covered: dict[str, set] = {}
    for target in names.values():
        name, part = gguf_names.split_part(target)
        covered.setdefault(name, set()).add(part)
    return covered


def check_gguf_files(lm: GGUFFile, mmproj: GGUFFile) -> OmniVisionConfig:
    """The config of a pair of files whose every tensor name, shape and type has been checked (no torch)."""
    config = _config(lm, mmproj)
    shapes = gguf_names.expected_shapes(config)
    _plan(lm, gguf_names.lm_names(config.lm_layers, config.lm_tie_embeddings), shapes)
    _plan(mmproj, gguf_names.mmproj_names(config.vit_layers), shapes, unused=gguf_names.MMPROJ_UNUSED)
    n_tokens = len(lm.value("tokenizer.ggml.tokens", []))
    if n_tokens > config.lm_vocab:
        raise OmniVisionError(
            f"{lm.path}: {n_tokens} tokens but token_embd has rows for {config.lm_vocab}: ids past it have no embedding"
        )
    return config


def load_gguf_model(folder: str | Path, lm_file: str | None = None, mmproj_file: str | None = None,
                    log: Callable[[str], None] | None = None):
    """(OmniVisionModel, TextTokenizer) from a folder holding the language-model and mmproj GGUF files.

    lm_file / mmproj_file choose among several files of a role (names in the folder); `log` receives the
    line saying which files were used and why. Every tensor's name, shape and type is checked against
    the tables before the tokenizer and the model are built, so a wrong file fails in a fraction of a
    second instead of after the model's allocation."""
    choice = select_gguf_files(folder, lm_file, mmproj_file)
    if log is not None:
        log(choice.describe())
    lm, mmproj = GGUFFile(choice.lm), GGUFFile(choice.mmproj)
    config = check_gguf_files(lm, mmproj)
    tokenizer = _tokenizer(lm)

    from omnivision_ros.model.vision_language_model import OmniVisionModel  # torch: once the files are known good

    model = OmniVisionModel.empty(config)  # every parameter is overwritten from the files
    lm_names = gguf_names.lm_names(config.lm_layers, config.lm_tie_embeddings)
    mm_names = gguf_names.mmproj_names(config.vit_layers)
    _check_coverage(model, {**lm_names, **mm_names}, gguf_names.expected_shapes(config))
    _copy(lm, lm_names, model)
    _copy(mmproj, mm_names, model)
    return model.eval(), tokenizer


def _check_coverage(model, names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter is written whole or by all of its parts, each with the shape the files were held to."""
    covered = covered_parameters(names)
    problems = sorted(set(covered) ^ {name for name, _ in model.named_parameters()})
    for name, parts in covered.items():
        if None not in parts and name not in problems:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if parts != set(owner.parts):
                problems.append(f"{name} parts {sorted(parts)}")
    for gguf_name, target in names.items():
        if tuple(model_tensor(model, target).shape) != shapes[gguf_name]:
            problems.append(f"{gguf_name} shape {shapes[gguf_name]} vs {target} {tuple(model_tensor(model, target).shape)}")
    if problems:
        raise RuntimeError(f"GGUF name tables and model parameters disagree: {problems[:5]}")
