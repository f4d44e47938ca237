"""Token generation on any backend session: greedy by default, optional seeded temperature/top-p,
stop tokens, max new tokens, a per-token callback and cooperative cancellation."""
from __future__ import annotations

import math
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
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
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


def sample_exact(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The reference method: float64 softmax over the whole vocabulary, a full stable sort for top-p, and
    numpy's weighted choice. ~2 ms (temperature) and ~40 ms (top-p) per token over 151,936 tokens, so
    `Sampler` does the same draw faster; tests and the sampling benchmark compare the two."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))


class Sampler:
    """Greedy, or the draw of `sample_exact` at decode speed (well under a millisecond per token).

    The distribution is the same: softmax(logits / T) over the whole vocabulary, restricted for top-p to
    the most probable tokens whose mass reaches top_p (ties taken in id order, as a stable sort takes
    them). The arithmetic differs: float32 probabilities, a draw by block sums instead of a cumulative sum
    over every token, and for top-p no sort of the vocabulary:
    - when the head (tokens at least e^-6 as probable as the most probable one) holds the top_p mass in at
      most SORT_LIMIT tokens, only the head is sorted: one masked sum finds it, and it holds a trained
      model's usual top-p set. The draw walks the set by falling probability as `sample_exact` does, with
      one uniform number, so for a given seed the two mostly pick the very same token;
    - a larger set (a flat distribution, as random weights give) is sampled by rejection: draw from the
      whole distribution, keep the token if the mass of the tokens ranked above it is below the target
      (one masked sum per try, ~1/top_p tries on average). Same distribution, another sequence of draws;
    - for top_p < 0.5 over a flat distribution, thresholds bracket the set (`_bracket`) instead.
    """

    BLOCK = 256  # tokens per block of the two-level draw
    HEAD = float(np.exp(-6))  # tokens at least this probable relative to the most probable one: the head
    SORT_LIMIT = 2048  # most tokens a draw sorts
    MAX_TRIES = 16  # rejection tries before the bracketing search (`_bracket`) takes over
    # Probability thresholds (relative to the most probable token) tried from the top: e^-1 ... e^-64, all.
    PROBES = tuple(float(np.exp(-d)) for d in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)) + (0.0,)

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self._buffer = np.zeros(0, np.float32)  # [blocks * BLOCK]: probabilities, zero past the vocabulary
        self._masked = np.zeros(0, np.float32)
        self._mask = np.zeros(0, bool)

    def __call__(self, logits: np.ndarray) -> int:
        if self.config.temperature == 0:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        if self.config.top_p < 1.0:
            return self._draw_nucleus(p)
        return self._draw_blocks(self._buffer, self.rng.random())

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """exp((logits - max) / T) in float32, unnormalized (the most probable token has 1)."""
        n = logits.shape[-1]
        size = -(-n // self.BLOCK) * self.BLOCK
        if self._buffer.size != size:
            self._buffer = np.zeros(size, np.float32)
            self._masked = np.zeros(size, np.float32)
            self._mask = np.zeros(size, bool)
        p = self._buffer[:n]
        np.multiply(logits, np.float32(1.0 / self.config.temperature), out=p, casting="unsafe")
        p -= p.max()
        np.exp(p, out=p)
        return p

    def nucleus(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, cumulative float64 mass along them) of the top-p set of p, most probable first and
        ties by id: the set and order of `sample_exact`. Sorts the whole set (tests use it; draws do not)."""
        hi, _, boundary, boundary_cumulative = self._bracket(p)
        return self._sorted(p, hi, boundary, boundary_cumulative)

    # -- top-p --------------------------------------------------------------------------------------

    def _probe(self, p: np.ndarray, threshold: float) -> tuple[float, int]:
        """Mass and count of {p >= threshold}. A dot product with the mask: np.sum(where=...) runs ~25x
        slower on masks that are not mostly one value."""
        mask = np.greater_equal(p, threshold, out=self._mask[:p.size])
        return float(np.dot(p, mask)), int(np.count_nonzero(mask))

    def _scan(self, p: np.ndarray, target: float):
        """Thresholds from the top until {p >= lo} holds the target mass. Returns (hi, its mass, its count,
        lo, its mass, its count); {p >= hi} holds less than the target, so all of it is in the top-p set."""
        hi, hi_mass, hi_count = np.inf, 0.0, 0
        for lo in self.PROBES:
            lo_mass, lo_count = self._probe(p, lo)
            if lo_mass >= target:
                break
            hi, hi_mass, hi_count = lo, lo_mass, lo_count
        return hi, hi_mass, hi_count, lo, lo_mass, lo_count

    def _draw_nucleus(self, p: np.ndarray) -> int:
        target = self.config.top_p * float(p.sum())
        head_mass, head_count = self._probe(p, self.HEAD)
        if head_mass >= target and head_count <= self.SORT_LIMIT:  # the set lies in the head: sort those few
            ids, cumulative = self._prefix(np.flatnonzero(p >= self.HEAD), p, target)
            return int(ids[_position(cumulative, self.rng.random())])
        if self.config.top_p >= 0.5:  # a large set: rejection from the whole distribution, ~1/top_p tries
            whole_head = head_mass < target  # then every head token is in the set
            for _ in range(self.MAX_TRIES):
                token = self._draw_blocks(self._buffer, self.rng.random())
                value = p[token]
                if whole_head and value >= self.HEAD:
                    return token
                above = float(np.dot(p, np.greater(p, value, out=self._mask[:p.size])))
                above += float(value) * np.count_nonzero(p[:token] == value)  # ties rank by id
                if above < target:
                    return token
        # A small top_p over a flat distribution (rejection would take many tries): bracket the set.
        hi, hi_mass, boundary, boundary_cumulative = self._bracket(p)
        u = self.rng.random() * (hi_mass + boundary_cumulative[-1])
        if u >= hi_mass:
            return int(boundary[_position(boundary_cumulative, (u - hi_mass) / boundary_cumulative[-1])])
        np.multiply(self._buffer, self._buffer >= hi, out=self._masked)
        return self._draw_blocks(self._masked, u / hi_mass)

    def _bracket(self, p: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        """The top-p set of p as (hi, mass of {p >= hi}, boundary ids, their cumulative mass): every token
        with p >= hi is in the set, and so are the boundary ids (sorted by falling p, ties by id), no others.

        Thresholds bracket the set's smallest probability in [lo, hi); the bracket narrows around where the
        mass is interpolated to reach the target until at most SORT_LIMIT tokens lie in it; only those are
        sorted. Masses are float32 sums of float32 probabilities (relative error ~1e-6): the set can differ
        from `sample_exact`'s only where a prefix's mass lies that close to top_p.
        """
        target = self.config.top_p * float(p.sum())
        hi, hi_mass, hi_count, lo, lo_mass, lo_count = self._scan(p, target)
        while lo_count - hi_count > self.SORT_LIMIT:
            # Probe a window around the interpolated crossing (over log-probability), sized to hold about
            # SORT_LIMIT / 2 tokens if they spread evenly: usually one round suffices.
            x_lo, x_hi = (np.log(lo) if lo > 0 else -104.0), (np.log(hi) if hi < np.inf else 0.0)
            share = (target - hi_mass) / (lo_mass - hi_mass)
            half = 0.25 * self.SORT_LIMIT / (lo_count - hi_count)
            narrowed = False
            for x in (x_hi - min(share - half, 0.9) * (x_hi - x_lo), x_hi - max(share + half, 0.1) * (x_hi - x_lo)):
                threshold = float(np.exp(x))
                if not lo < threshold < hi:
                    continue
                mass, count = self._probe(p, threshold)
                if mass >= target:
                    lo, lo_mass, lo_count = threshold, mass, count
                else:
                    hi, hi_mass, hi_count = threshold, mass, count
                narrowed = True
            if not narrowed:
                break  # the bracket holds ties only: sort it
        ids, cumulative = self._prefix(np.flatnonzero((p >= lo) & (p < hi)), p, target - hi_mass)
        return hi, hi_mass, ids, cumulative

    @staticmethod
    def _prefix(ids: np.ndarray, p: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
        """The shortest run of `ids` (ascending) by falling p, ties by id, whose mass reaches `target`."""
        values = p[ids]
        order = np.argsort(-values, kind="stable")
        cumulative = np.cumsum(values[order], dtype=np.float64)
        n = min(int(np.searchsorted(cumulative, target)) + 1, len(order))
        return ids[order[:n]], cumulative[:n]

    @staticmethod
    def _sorted(p: np.ndarray, hi: float, boundary: np.ndarray, boundary_cumulative: np.ndarray):
        sure = np.flatnonzero(p >= hi)
        sure = sure[np.argsort(-p[sure], kind="stable")]
        cumulative = np.cumsum(p[sure], dtype=np.float64)
        offset = cumulative[-1] if len(sure) else 0.0
        return np.concatenate([sure, boundary]), np.concatenate([cumulative, boundary_cumulative + offset])

    # -- drawing ------------------------------------------------------------------------------------

    def _draw_blocks(self, weights: np.ndarray, fraction: float) -> int:
        """The id at `fraction` of the cumulative weight in id order (inverse CDF): block sums, then one block."""
        blocks = np.cumsum(weights.reshape(-1, self.BLOCK).sum(axis=1, dtype=np.float64))
        u = fraction * blocks[-1]
        k = min(int(np.searchsorted(blocks, u, side="right")), len(blocks) - 1)
        start = k * self.BLOCK
        block = weights[start:start + self.BLOCK]
        inner = np.cumsum(block, dtype=np.float64)
        j = int(np.searchsorted(inner, u - (blocks[k - 1] if k else 0.0), side="right"))
        if j >= len(inner) or block[j] == 0:  # rounding ran past the block's last weighted token
            j = int(np.flatnonzero(block)[-1])
        return start + j


def _position(cumulative: np.ndarray, fraction: float) -> int:
    """Where `fraction` of the total falls in a cumulative mass (as numpy's weighted choice finds it)."""
    return min(int(np.searchsorted(cumulative, fraction * cumulative[-1], side="right")), len(cumulative) - 1)


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
