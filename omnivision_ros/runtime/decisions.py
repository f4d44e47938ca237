"""Decisions read from the decoder's next-token distribution, without generating: yes/no with a
probability (Check) and a scored choice among options (Choose).

Both continue the released prompt with the assistant header the model writes itself
(`<|im_start|>assistant\\n`, teacher-forced) and read the distribution at the first answer position:

- Check: p_yes = P(yes) / (P(yes) + P(no)), where P(yes) sums the probabilities of the single-token
  spellings of "yes" the vocabulary holds ("Yes", " yes", "YES", ...) and P(no) those of "no". Their
  sum, the yes/no mass, says how much the model was answering yes or no at all.
- Choose: each option's tokens teacher-forced after the header; the decoder returns the logits of
  its last position only, so an option of k tokens costs the header's logits (shared by all options)
  and k - 1 one-token steps on a fork of the prefilled session.

Plain NumPy on logits and `DecoderSession`s: every backend runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.model.tokens import IM_START_ID
from omnivision_ros.runtime.backend import DecoderSession

# Spellings of the answers as an assistant turn starts them (no space) and as they follow text (space).
YES_WORDS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_WORDS = ("No", "no", "NO", " No", " no", " NO")


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the yes and no spellings one vocabulary holds as single tokens."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    skipped: tuple[str, ...]  # spellings the vocabulary lacks as one token (a missing or multi-token word)

    @classmethod
    def resolve(cls, tokenizer: TextTokenizer) -> "AnswerTokens":
        """Look every spelling up; OmniVisionError when no spelling of yes or none of no is a single token."""
        found: dict[str, list[int]] = {"yes": [], "no": []}
        skipped = []
        for side, words in (("yes", YES_WORDS), ("no", NO_WORDS)):
            for word in words:
                ids = tokenizer.encode(word)
                if len(ids) == 1 and tokenizer.decode(ids) == word:
                    if ids[0] not in found[side]:
                        found[side].append(ids[0])
                else:
                    skipped.append(word)
        for side, ids in found.items():
            if not ids:
                raise OmniVisionError(
                    f"the model's vocabulary holds no spelling of '{side}' as one token (tried "
                    f"{', '.join(repr(w) for w in (YES_WORDS if side == 'yes' else NO_WORDS))}): Check cannot "
                    "read a yes/no probability from this model")
        return cls(tuple(found["yes"]), tuple(found["no"]), tuple(skipped))


def header_ids(tokenizer: TextTokenizer) -> np.ndarray:
    """`<|im_start|>assistant\\n`: the assistant header the model writes itself after the prompt."""
    return np.asarray([IM_START_ID, *tokenizer.encode("assistant\n")], dtype=np.int64)


def log_partition(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) over the vocabulary: a token's log-probability is its logit minus this.
    float32 exponentials summed in float64: a sixth of the time of float64 throughout, ~1e-7 relative."""
    x = np.asarray(logits, dtype=np.float32)
    top = float(x.max())
    return top + float(np.log(np.exp(x - top).sum(dtype=np.float64)))


def log_probs(logits: np.ndarray, ids) -> np.ndarray:
    """float64 log-probabilities of the tokens `ids` under next-token logits [vocab]."""
    return np.asarray(logits, dtype=np.float64)[np.asarray(ids)] - log_partition(logits)


def yes_no_probability(logits: np.ndarray, tokens: AnswerTokens) -> tuple[float, float]:
    """(p_yes, yes/no mass) of next-token logits [vocab]. p_yes is computed relative to the larger of the
    yes/no logits, so it stays exact when their mass underflows."""
    yes, no = log_probs(logits, tokens.yes_ids), log_probs(logits, tokens.no_ids)
    top = max(yes.max(), no.max())
    p_yes, p_no = np.exp(yes - top).sum(), np.exp(no - top).sum()
    return float(p_yes / (p_yes + p_no)), float(np.exp(top) * (p_yes + p_no))


def check_options(options: Sequence[str], max_options: int) -> list[str]:
    """The options of a Choose request, stripped; OmniVisionError saying what is wrong with the list."""
    if len(options) == 0:
        raise OmniVisionError("no options given")
    if len(options) > max_options:
        raise OmniVisionError(f"too many options: {len(options)}, the limit is {max_options} (choose_max_options)")
    stripped = [str(o).strip() for o in options]
    empty = [i for i, o in enumerate(stripped) if not o]
    if empty:
        raise OmniVisionError(f"option {empty[0]} is empty")
    seen: dict[str, int] = {}
    for i, option in enumerate(stripped):
        if option in seen:
            raise OmniVisionError(f"option {i} '{option}' repeats option {seen[option]}")
        seen[option] = i
    return stripped


def option_token_ids(tokenizer: TextTokenizer, options: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    """Each option as the model would write it at the start of its answer; OmniVisionError past max_tokens."""
    out = []
    for i, option in enumerate(options):
        ids = np.asarray(tokenizer.encode(option), dtype=np.int64)
        if ids.size == 0:
            raise OmniVisionError(f"option {i} is empty")
        if ids.size > max_tokens:
            raise OmniVisionError(f"option {i} '{option[:40]}' is {ids.size} tokens long, the limit is {max_tokens} "
                                  "(choose_max_option_tokens)")
        out.append(ids)
    return out


def score_options(session: DecoderSession, logits: np.ndarray, options: Sequence[np.ndarray],
                  should_stop: Callable[[], bool] | None = None) -> list[float | None]:
    """Summed log-probability of each option's tokens teacher-forced after `session`, whose next-token
    logits are `logits`. Each option runs on its own fork (at most one fork alive: device memory stays
    bounded on backends that give each session a full-size cache). None for options left unscored
    because `should_stop()` turned true."""
    first = log_probs(logits, [ids[0] for ids in options])
    scores: list[float | None] = []
    for i, ids in enumerate(options):
        if should_stop is not None and should_stop():
            scores.append(None)
            continue
        total = float(first[i])
        if ids.size > 1:
            fork = session.fork()
            try:
                for token, following in zip(ids[:-1], ids[1:]):
                    total += float(log_probs(fork.step(int(token)), [following])[0])
            finally:
                fork.close()
        scores.append(total)
    return scores


def option_probabilities(log_probs: Sequence[float]) -> np.ndarray:
    """Softmax of the options' summed log-probabilities: how the model splits its belief among them."""
    x = np.asarray(log_probs, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()
