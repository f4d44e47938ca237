"""Which two GGUF files of a folder make the model: released file names, and the default among several.

The Hugging Face repo NexaAIDev/OmniVLM-968M, downloaded whole, holds several files of each role:

    Nano-Vlm-Processor-494M-F16.gguf          Nano-Vlm-Processor-494M-Q8_0.gguf         language models
    omnivision-text-optimized-llm-f16.gguf    omnivision-text-optimized-llm-Q8_0.gguf   (+ tokenizer)
    mmproj-omni-vlm-f16.gguf                                                            vision tower +
    omnivision-text-optimized-mmproj-f16.gguf omnivision-text-optimized-mmproj-f32.gguf projector

A file's role comes from its header (`general.architecture`), never from its name; names only choose
among files of one role. A name says its release and its dtype: the release is the name without the
dtype suffix and the role words (llm, lm, model, mmproj, projector), so the two files of
`omnivision-text-optimized` share it; the first release's files do not share a stem and are tabled.

The default, when a role has several files:
- language model: the first release's (`Nano-Vlm-Processor-494M-*`) when the folder holds several
  releases, then its F16 file;
- mmproj: one of the chosen language model's release, then its f16 file.
Anything else that leaves more than one candidate is ambiguous and fails with the candidates listed;
an explicit file name (omnivision-ask/omnivision-export `--lm-file`/`--mmproj-file`, node parameters
`lm_file`/`mmproj_file`) always wins. A language model whose file or folder name has the word `ocr` is
the OCR variant (how Nexa's SDK tells it apart); it wants the OCR prompt (task `ocr`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omnivision_ros.errors import OmniVisionError

FIRST_RELEASE = "omnivision"
# Stems (lower case, dtype removed) of the first release's two files, which do not share a stem.
RELEASE_STEMS = {"nano-vlm-processor-494m": FIRST_RELEASE, "mmproj-omni-vlm": FIRST_RELEASE}
ROLE_WORDS = frozenset({"llm", "lm", "model", "mmproj", "projector"})
DEFAULT_DTYPE = "f16"
_DTYPE = re.compile(r"[-_.](?P<dtype>f32|f16|bf16|fp32|fp16|q\d+(?:_[a-z0-9]+)*)$")
CHOICE_HINT = "choose one with --lm-file / --mmproj-file (node parameters lm_file / mmproj_file)"


@dataclass(frozen=True)
class GGUFName:
    """What a file name says about the file."""

    release: str  # e.g. "omnivision", "omnivision-text-optimized"; "" when the name has nothing but role words
    dtype: str | None  # "f16", "q8_0", ... (lower case; fp16 -> f16); None when the name has no dtype suffix


def read_name(name: str) -> GGUFName:
    """Release and dtype from a file name such as `omnivision-text-optimized-llm-Q8_0.gguf`."""
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    stem = stem.lower()
    dtype = None
    match = _DTYPE.search(stem)
    if match:
        dtype = {"fp16": "f16", "fp32": "f32"}.get(match["dtype"], match["dtype"])
        stem = stem[:match.start()]
    release = RELEASE_STEMS.get(stem)
    if release is None:
        release = "-".join(w for w in re.split(r"[-_.]+", stem) if w and w not in ROLE_WORDS)
    return GGUFName(release, dtype)


def names_ocr(path: Path) -> bool:
    """Whether a language model's file name or folder name has the word `ocr` (`omnivision-ocr`, `vlm-81-ocr`)."""
    words = re.split(r"[^a-z0-9]+", f"{path.parent.name} {path.name}".lower())
    return "ocr" in words


@dataclass(frozen=True)
class Choice:
    """The two files chosen in a folder, and why: one line for the log."""

    lm: Path
    mmproj: Path
    why: str

    def describe(self) -> str:
        line = f"GGUF files in {self.lm.parent}: language model {self.lm.name}, mmproj {self.mmproj.name} ({self.why})"
        if names_ocr(self.lm):
            line += "; the language model is the OCR variant by its name: run it with task ocr"
        return line


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def _given(folder: Path, given: str, candidates: list[Path], others: list[Path], role: str) -> Path:
    """The file a user named: a file name in the folder (a path is accepted if it points into the folder)."""
    path = Path(given)
    if path.parent != Path(".") and path.parent.resolve() != folder.resolve():
        raise OmniVisionError(f"{given} is not in the model folder {folder}; give the name of one of its {role} "
                              f"files: {_names(candidates)}")
    by_name = {p.name: p for p in candidates}
    if path.name in by_name:
        return by_name[path.name]
    if path.name in {p.name for p in others}:
        raise OmniVisionError(f"{path.name} is not a {role} GGUF; the {role} files in {folder}: {_names(candidates)}")
    raise OmniVisionError(f"{folder} has no {role} file {path.name}; the {role} files there: {_names(candidates)}")


def _narrow(paths: list[Path], keep) -> list[Path]:
    """The paths `keep` accepts, or all of them when it accepts none (a preference, not a rule)."""
    kept = [p for p in paths if keep(read_name(p.name))]
    return kept or paths


def choose(folder: Path, lms: list[Path], mmprojs: list[Path], lm_file: str | None = None,
           mmproj_file: str | None = None) -> Choice:
    """The language model and mmproj to load among a folder's files of each role (see the module docstring)."""
    reasons = []
    if lm_file:
        lm = _given(folder, lm_file, lms, mmprojs, "language-model")
        reasons.append("language model as given")
    elif len(lms) == 1:
        lm = lms[0]
    else:
        releases = {read_name(p.name).release for p in lms}
        candidates = [p for p in lms if read_name(p.name).release == FIRST_RELEASE] if len(releases) > 1 else lms
        if not candidates:
            raise OmniVisionError(f"{folder} holds language models of several releases ({_names(lms)}) and none of "
                                  f"the first release (Nano-Vlm-Processor-494M-*); {CHOICE_HINT}")
        candidates = _narrow(candidates, lambda n: n.dtype == DEFAULT_DTYPE)
        if len(candidates) > 1:
            raise OmniVisionError(f"{folder} holds several language models ({_names(lms)}) and no single default "
                                  f"among {_names(candidates)}; {CHOICE_HINT}")
        lm = candidates[0]
        reasons.append(f"default language model: F16 of release '{read_name(lm.name).release}'")

    release = read_name(lm.name).release
    if mmproj_file:
        mmproj = _given(folder, mmproj_file, mmprojs, lms, "mmproj")
        reasons.append("mmproj as given")
    elif len(mmprojs) == 1:
        mmproj = mmprojs[0]
    else:
        same = [p for p in mmprojs if read_name(p.name).release == release]
        if not same:
            raise OmniVisionError(f"{folder} holds several mmproj files ({_names(mmprojs)}) and none of the language "
                                  f"model's release '{release}' ({lm.name}); {CHOICE_HINT}")
        candidates = _narrow(same, lambda n: n.dtype == DEFAULT_DTYPE)
        if len(candidates) > 1:
            raise OmniVisionError(f"{folder} holds several mmproj files of release '{release}' "
                                  f"({_names(candidates)}); {CHOICE_HINT}")
        mmproj = candidates[0]
        reasons.append(f"default mmproj: {read_name(mmproj.name).dtype or 'the one'} of the same release")
    rest = [p for p in lms + mmprojs if p not in (lm, mmproj)]
    if rest:
        reasons.append(f"also there: {_names(rest)}")
    return Choice(lm, mmproj, "; ".join(reasons) or "the only pair in the folder")
