"""Byte-level BPE tokenizer in the Qwen2 layout, loaded with HF `tokenizers` (no transformers, no downloads).

Until real weights are loaded, presets use a synthetic tokenizer: a small BPE learnt from an embedded
English text, filler tokens up to the regular vocabulary size, and the special tokens at their real ids.
"""
from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

from tokenizers import Tokenizer

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.tokens import ADDED_TOKENS, CONTROL_TOKENS, FIRST_ADDED_ID

# The Qwen2 pre-tokenizer split (same regex as the released tokenizer).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TRAINING_TEXT = """
You are a helpful assistant. Describe the image in detail. What do you see in this picture?
The robot is in a kitchen. There is a red cup on the table next to a white plate. A person is
standing near the open door, holding a blue box. The hallway is clear and the floor is grey.
Is the door open or closed? The door is open. How many people are in the room? There are two
people in the room. What color is the car? The car is black and parked on the street in front
of a building with large windows. A dog sits on the grass under a tree, and the sky is bright.
Describe the scene: a warehouse with shelves, boxes, a forklift and a yellow line on the floor.
Where is the ball? The ball is under the chair on the left side of the image. Answer yes or no.
""".strip()


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_json(tokens: list[str], merges: list[str], specials: dict[str, int],
                   added: dict[str, int] | None = None, bos: tuple[str, int] | None = None) -> dict:
    """HF `tokenizers` JSON for a Qwen2-style byte-level BPE. tokens[i] is the string of regular id i;
    `specials` are control tokens (never produced from user text), `added` plain added tokens; `bos`
    (text, id), when given, is prepended to every encoding with special tokens (TextTokenizer.bos_ids)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    post_processor = byte_level
    if bos is not None:
        text, tid = bos
        single = [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        post_processor = {
            "type": "TemplateProcessing", "single": single,
            "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [tid], "tokens": [text]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": sorted(
            [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special}
             for table, special in ((specials, True), (added or {}, False)) for s, i in table.items()],
            key=lambda entry: entry["id"],
        ),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": post_processor,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }


def _learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on pre-split byte-level words; ties broken by the pair itself (deterministic)."""
    import regex

    table = bytes_to_unicode()
    words = collections.Counter(
        tuple(table[b] for b in piece.encode("utf-8")) for piece in regex.findall(QWEN2_SPLIT_PATTERN, text)
    )
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


# Words Qwen2.5's vocabulary holds as single tokens and the runtime reads: yes/no answers for Check
# (runtime/decisions.py). Each becomes one token through merges appended after the learnt ones. The
# lowercase forms are left out on both sides: a merge "n o" would split the system prompt's "Nano"
# differently and so change every answer of the test models (Check skips forms a vocabulary lacks).
WHOLE_WORDS = ("Yes", "YES", " Yes", " YES", "No", "NO", " No", " NO")


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level pieces of one pre-split word under merges `ranks` (lowest rank merges first)."""
    pieces = list(word)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _word_tokens(merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append to `merges` what makes each of WHOLE_WORDS one token (joining its pieces from the right, so
    the new merges touch few other words); return the appended merges, whose results are the new tokens."""
    table = bytes_to_unicode()
    ranks = {pair: i for i, pair in enumerate(merges)}
    added = []
    for text in WHOLE_WORDS:
        pieces = _bpe(tuple(table[b] for b in text.encode("utf-8")), ranks)
        while len(pieces) > 1:
            pair = (pieces[-2], pieces[-1])
            ranks[pair] = len(ranks)
            merges.append(pair)
            added.append(pair)
            pieces[-2:] = [pair[0] + pair[1]]
    return added


def _filler_token(index: int) -> str:
    # Readable pseudo-words, so random-weight output is legible; reachable only by decoding.
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    parts = []
    index += 1
    while index:
        index, r = divmod(index, len(syllables))
        parts.append(syllables[r])
    return "Ġ" + "".join(parts)


@functools.lru_cache(maxsize=1)
def synthetic_tokenizer_json() -> str:
    """The synthetic tokenizer (deterministic), as JSON text."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merges = _learn_merges(_TRAINING_TEXT, 400)
    tokens = list(alphabet)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    words = _word_tokens(merges)
    filler = 0
    while len(tokens) < FIRST_ADDED_ID - len(words):
        candidate = _filler_token(filler)
        filler += 1
        if candidate not in seen:
            tokens.append(candidate)
            seen.add(candidate)
    # Whole words last, so the ids of the tokens before them stay what they were before the words came.
    for a, b in merges[len(merges) - len(words):]:
        tokens.append(a + b)
    plain = {text: i for text, (i, control) in ADDED_TOKENS.items() if not control}
    data = tokenizer_json(tokens, [f"{a} {b}" for a, b in merges], CONTROL_TOKENS, plain)
    return json.dumps(data, ensure_ascii=False)


class TextTokenizer:
    """Encode user text (special-token strings in it stay plain text) and decode generated ids."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # a question cannot inject <|im_end|> and friends
        self.special_ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise OmniVisionError(f"cannot load tokenizer {path}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text))

    @classmethod
    def synthetic(cls) -> "TextTokenizer":
        return cls.from_json(synthetic_tokenizer_json())

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @property
    def bos_ids(self) -> list[int]:
        """What starts every prompt: [BOS] when the vocabulary asks for it (tokenizer.ggml.add_bos_token), else []."""
        return self._tok.encode("", add_special_tokens=True).ids

    def find(self, token: str) -> int | None:
        """The id of `token` as one vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise OmniVisionError(f"tokenizer has no token '{token}'")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
