"""Token generation on any backend session: greedy by default, optional seeded temperature/top-p,
stop tokens, max new tokens, a per-token callback and cooperative cancellation."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.tokens import STOP_TOKEN_IDS
from omnivision_ros.runtime.backend import DecoderSession


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=STOP_TOKEN_IDS)

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise OmniVisionError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise OmniVisionError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OmniVisionError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens, the stop token excluded
    stop_reason: str  # "stop" | "length" | "cancelled"
    first_token_time: float  # time.perf_counter() when the first token was chosen
    decode_s: float  # from the first token to the last


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.config.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.config.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.config.top_p)) + 1]
            kept = probs[keep] / probs[keep].sum()
            return int(keep[self.rng.choice(len(keep), p=kept)])
        return int(self.rng.choice(len(probs), p=probs))


def decode(
    session: DecoderSession,
    logits: np.ndarray,
    config: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate from the logits of a prefilled session until a stop token, max tokens, or cancel."""
    sample = Sampler(config)
    stops = set(config.stop_token_ids)
    tokens: list[int] = []
    first_time = None
    reason = "length"
    while True:
        if should_stop is not None and should_stop():
            reason = "cancelled"
            break
        token = sample(logits)
        now = time.perf_counter()
        if first_time is None:
            first_time = now
        if token in stops:
            reason = "stop"
            break
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) >= config.max_new_tokens:
            break
        logits = session.step(token)
    end = time.perf_counter()
    first_time = first_time if first_time is not None else end
    return GenerationResult(tokens, reason, first_time, end - first_time)
