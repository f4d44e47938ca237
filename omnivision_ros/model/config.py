"""Model configuration: one dataclass, stage-prefixed fields (vit_*, mp_*, lm_*)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.tokens import LAST_ADDED_ID

SYSTEM_PROMPT = "You are Nano-Omni-VLM, created by Nexa AI. You are a helpful assistant."


@dataclass(frozen=True)
class OmniVisionConfig:
    name: str = "omnivision-968m"

    # SigLIP vision tower
    vit_image_size: int = 384
    vit_patch_size: int = 14
    vit_hidden: int = 1152
    vit_layers: int = 27
    vit_heads: int = 16
    vit_mlp: int = 4304
    vit_ln_eps: float = 1e-6
    vit_image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vit_image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    # Compressed projector: groups of mp_group consecutive vision tokens -> one LM token
    mp_group: int = 9
    mp_hidden: int = 4096

    # Qwen2 decoder
    lm_hidden: int = 896
    lm_layers: int = 24
    lm_heads: int = 14
    lm_kv_heads: int = 2
    lm_head_dim: int = 64
    lm_ffn: int = 4864
    lm_vocab: int = 151936
    lm_rope_theta: float = 1_000_000.0
    lm_rms_eps: float = 1e-6
    lm_max_context: int = 4096
    lm_tie_embeddings: bool = True

    @property
    def vit_grid(self) -> int:
        return self.vit_image_size // self.vit_patch_size  # 27: the stride-14 conv drops the last 6 px

    @property
    def vit_tokens(self) -> int:
        return self.vit_grid ** 2  # 729 at 384/14

    @property
    def mp_tokens(self) -> int:
        return self.vit_tokens // self.mp_group  # 81

    @property
    def mp_in(self) -> int:
        return self.vit_hidden * self.mp_group  # 10368

    def validate(self) -> "OmniVisionConfig":
        problems = []
        if self.lm_hidden != self.lm_heads * self.lm_head_dim:
            problems.append("lm_hidden must equal lm_heads * lm_head_dim")
        if self.vit_tokens % self.mp_group:
            problems.append(f"{self.vit_tokens} vision tokens do not split into groups of {self.mp_group}")
        if self.vit_hidden % self.vit_heads:
            problems.append("vit_hidden must be divisible by vit_heads")
        if self.lm_heads % self.lm_kv_heads:
            problems.append("lm_heads must be a multiple of lm_kv_heads")
        if self.lm_vocab <= LAST_ADDED_ID:
            problems.append(f"lm_vocab {self.lm_vocab} cannot hold the special token ids (up to {LAST_ADDED_ID})")
        if problems:
            raise OmniVisionError(f"invalid model config '{self.name}': " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OmniVisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OmniVisionError(f"unknown model config fields: {', '.join(unknown)}")
        values = dict(data)
        for key in ("vit_image_mean", "vit_image_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "OmniVisionConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise OmniVisionError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(data)


PRESETS: dict[str, OmniVisionConfig] = {
    "omnivision-968m": OmniVisionConfig(),
    # Same structure (384 px, 729 -> 81 tokens, GQA, real vocabulary ids), tiny widths.
    "tiny": OmniVisionConfig(
        name="tiny",
        vit_hidden=32,
        vit_layers=2,
        vit_heads=4,
        vit_mlp=64,
        mp_hidden=64,
        lm_hidden=64,
        lm_layers=2,
        lm_heads=4,
        lm_kv_heads=2,
        lm_head_dim=16,
        lm_ffn=128,
        lm_max_context=512,
    ),
}


def get_preset(name: str) -> OmniVisionConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise OmniVisionError(
            f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
