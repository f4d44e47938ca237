"""Image + question -> answer, yes/no decision or choice on one backend, reusing work across questions
about the same frame.

Two bounded LRU caches, both keyed by the frame (a caller key such as (camera, stamp), or a hash of
the pixels): image embeddings, and decoder sessions prefilled with system + user header + image, so
a second question about a frame only prefills its own tokens. Yes/no checks of several frames
(`check_frames`) encode the frames missing from the cache in one batched vision call.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Sequence, Union

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.preprocess import preprocess
from omnivision_ros.model.prompt import PromptBuilder, clean_answer, visible_answer
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.runtime.backend import Backend, DecoderSession
from omnivision_ros.runtime.decisions import (
    AnswerTokens,
    header_ids,
    option_probabilities,
    option_token_ids,
    score_options,
    yes_no_probability,
)
from omnivision_ros.runtime.generator import GenerationConfig, decode


@dataclass
class Timing:
    """Milliseconds unless named otherwise; ttft is measured from the call (image in) to the first token."""

    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0  # tokens prefilled for this answer (question only on a prefix-cache hit)
    new_tokens: int = 0
    tokens_per_second: float = 0.0  # decode rate after the first token
    vision_cache_hit: bool = False
    prefix_cache_hit: bool = False

    def message_fields(self, queue_ms: float = 0.0) -> dict:
        """The fields of omnivision_interfaces/Timing for a request that waited `queue_ms` in a queue:
        the time to first token then counts from the request's arrival."""
        return {"queue_ms": queue_ms, "encode_ms": self.encode_ms, "prefill_ms": self.prefill_ms,
                "ttft_ms": queue_ms + self.ttft_ms, "decode_ms": self.decode_ms, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "tokens_per_second": self.tokens_per_second,
                "vision_cache_hit": self.vision_cache_hit, "prefix_cache_hit": self.prefix_cache_hit}

    def summary(self) -> str:
        return (
            f"encode {self.encode_ms:.1f} ms{' (cached)' if self.vision_cache_hit else ''} | "
            f"prefill {self.prefill_ms:.1f} ms ({self.prompt_tokens} tok{', prefix cached' if self.prefix_cache_hit else ''}) | "
            f"first token {self.ttft_ms:.1f} ms | {self.new_tokens} tokens | {self.tokens_per_second:.1f} tok/s"
        )


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stop_reason: str  # "stop" | "length" | "cancelled"
    timing: Timing


@dataclass
class Decision:
    """A yes/no check: answer = probability >= the threshold asked for. timing.ttft_ms is the time to the
    decision (no token is generated)."""

    answer: bool
    probability: float  # P(yes) / (P(yes) + P(no)) at the first answer position
    yes_no_mass: float  # P(yes) + P(no): low when the model was not answering yes or no
    timing: Timing


@dataclass
class Choice:
    """A choice among options: index of the most probable one (-1 when scoring was stopped before every option
    was scored). timing.decode_ms is the scoring of the options' tokens, ttft_ms the time to the choice."""

    index: int
    option: str
    scores: list[float]  # mean log-probability per option token (NaN where not scored)
    log_probs: list[float]  # summed log-probability of each option's tokens
    probabilities: list[float]  # softmax of log_probs over the options
    timing: Timing


@dataclass(frozen=True)
class FrameQuestion:
    """One yes/no question about one picture (see Pipeline.ask for `image` and `frame_key`)."""

    image: "ImageSource"
    question: str
    frame_key: Hashable | None = None
    color_order: str = "bgr"


class LRUCache:
    """A small thread-safe LRU map; `on_evict` releases evicted values."""

    def __init__(self, capacity: int, on_evict: Callable[[object], None] | None = None):
        self.capacity = capacity
        self.on_evict = on_evict
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            if self.on_evict:
                self.on_evict(value)
            return
        evicted = []
        with self._lock:
            if key in self._items and self._items[key] is not value:
                evicted.append(self._items[key])
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False)[1])
        if self.on_evict:
            for value in evicted:
                self.on_evict(value)

    def clear(self) -> None:
        with self._lock:
            values = list(self._items.values())
            self._items.clear()
        if self.on_evict:
            for value in values:
                self.on_evict(value)

    def __len__(self) -> int:
        return len(self._items)


def frame_digest(image: np.ndarray) -> str:
    """Content key for a frame when the caller has none."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


# A picture, or a function producing it: called only when the frame's embeddings are not cached,
# so a second question about a frame skips converting it (the caller then passes a frame_key).
ImageSource = Union[np.ndarray, Callable[[], np.ndarray]]


class Pipeline:
    """Answers questions about images. One call at a time (the node runs it on a single worker)."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TextTokenizer,
        generation: GenerationConfig | None = None,
        vision_cache_size: int = 8,
        prefix_cache_size: int = 4,
        task: str = "vqa",
        log: Callable[[str], None] | None = None,
    ):
        """task: "vqa" (answer the question) or "ocr" (the OCR variant's prompt, which has no question).
        `log` receives a note on the yes/no spellings the vocabulary lacks; when it holds none of yes or of
        no, `check_error` says so and checks raise it."""
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, self.config, task)
        self.generation = (generation or GenerationConfig()).validate()
        self.vision_cache = LRUCache(vision_cache_size)
        self.prefix_cache = LRUCache(prefix_cache_size, on_evict=lambda s: s.close())
        self.header_ids = header_ids(tokenizer)
        self.answer_tokens: AnswerTokens | None = None
        self.check_error = ""  # why yes/no checks cannot run on this model, when they cannot
        try:
            self.answer_tokens = AnswerTokens.resolve(tokenizer)
        except OmniVisionError as exc:
            self.check_error = str(exc)
        if log is not None and self.answer_tokens is not None and self.answer_tokens.skipped:
            log(f"yes/no checks read {len(self.answer_tokens.yes_ids)} yes and {len(self.answer_tokens.no_ids)} "
                f"no tokens; not single tokens in this vocabulary, skipped: "
                f"{', '.join(repr(w) for w in self.answer_tokens.skipped)}")

    def image_embeddings(self, image: ImageSource, key: Hashable, color_order: str = "bgr") -> tuple[np.ndarray, bool]:
        """[mp_tokens, lm_hidden] embeddings of a frame, from the cache when possible."""
        cached = self.vision_cache.get(key)
        if cached is not None:
            return cached, True
        if callable(image):
            image = image()
        pixels = preprocess(image, self.config, color_order)[None]  # [1, 3, S, S]
        embeds = self.backend.encode_images(pixels)[0]  # [81, H]
        self.vision_cache.put(key, embeds)
        return embeds, False

    def _frame_embeddings(self, frames: dict) -> tuple[dict, float]:
        """{key: (image, color_order)} -> ({key: (embeddings or the OmniVisionError of that frame, cache hit)},
        milliseconds spent converting and encoding). Frames missing from the cache go through the vision
        graph in one batched call."""
        t0 = time.perf_counter()
        out, misses, pixels = {}, [], []
        for key, (image, color_order) in frames.items():
            cached = self.vision_cache.get(key)
            if cached is not None:
                out[key] = (cached, True)
                continue
            try:
                picture = image() if callable(image) else image
                pixels.append(preprocess(picture, self.config, color_order))
                misses.append(key)
            except OmniVisionError as exc:  # a bad frame fails its own questions only
                out[key] = (exc, False)
        if pixels:
            embeds = self.backend.encode_images(np.stack(pixels))  # [B, mp_tokens, H]
            for key, frame_embeds in zip(misses, embeds):
                self.vision_cache.put(key, frame_embeds)
                out[key] = (frame_embeds, False)
        return out, (time.perf_counter() - t0) * 1e3

    @contextlib.contextmanager
    def _prefilled(self, image: ImageSource, key: Hashable, color_order: str,
                   prompt: np.ndarray) -> Iterator[tuple[DecoderSession, np.ndarray, Timing]]:
        """The frame's prompt-prefix session (cached, or prefilled with its image now) with `prompt`
        prefilled after it: (session, next-token logits, Timing with encode, prefill, prompt tokens and
        cache hits). The session is closed when the block ends."""
        timing = Timing()
        t0 = time.perf_counter()
        embeds, timing.vision_cache_hit = self.image_embeddings(image, key, color_order)
        t1 = time.perf_counter()
        session, timing.prefix_cache_hit = self._prefix_session(key, embeds)
        try:
            logits = session.prefill(prompt)
            timing.encode_ms, timing.prefill_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
            timing.prompt_tokens = len(prompt) + (0 if timing.prefix_cache_hit else len(self.prompts.prefix_ids))
            yield session, logits, timing
        finally:
            session.close()

    def _prefix_session(self, key: Hashable, embeds: np.ndarray) -> tuple[DecoderSession, bool]:
        cached = self.prefix_cache.get(key)
        if cached is not None:
            return cached.fork(), True
        session = self.backend.new_session()
        session.prefill(self.prompts.prefix_ids, embeds)
        self.prefix_cache.put(key, session)
        return session.fork(), False

    def ask(
        self,
        image: ImageSource,
        question: str,
        *,
        frame_key: Hashable | None = None,
        color_order: str = "bgr",
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Answer:
        """Answer a question about one image (task ocr: read its text; `question` is not used).
        `on_text` receives the answer so far after each token.

        `image` may be a function returning the picture (in `color_order`), called only on a
        vision-cache miss; it needs a `frame_key`."""
        start = time.perf_counter()
        gen = generation or self.generation
        if max_new_tokens:
            gen = GenerationConfig(max_new_tokens, gen.temperature, gen.top_p, gen.seed, gen.stop_token_ids)
        gen.validate()
        question_ids = self.prompts.question_ids(question, gen.max_new_tokens)
        key = self._key(image, frame_key, color_order)
        generated: list[int] = []

        def on_token(token: int) -> None:
            generated.append(token)
            if on_text is not None:
                on_text(visible_answer(self.tokenizer.decode(generated)))

        with self._prefilled(image, key, color_order, question_ids) as (session, logits, timing):
            result = decode(session, logits, gen, on_token, should_stop)
        timing.ttft_ms = (result.first_token_time - start) * 1e3
        timing.decode_ms = result.decode_s * 1e3
        timing.new_tokens = len(result.token_ids)
        if result.decode_s > 0 and timing.new_tokens > 1:
            timing.tokens_per_second = (timing.new_tokens - 1) / result.decode_s
        text = clean_answer(self.tokenizer.decode(result.token_ids))
        return Answer(text, result.token_ids, result.stop_reason, timing)

    @staticmethod
    def _key(image: ImageSource, frame_key: Hashable | None, color_order: str) -> tuple:
        if frame_key is None and callable(image):
            raise OmniVisionError("a picture given as a function needs a frame_key")
        return (frame_key, color_order) if frame_key is not None else (frame_digest(image), color_order)

    def _answer_prompt(self, question: str, answer_tokens: int) -> np.ndarray:
        """Question + <|im_end|> + the assistant header, checked to leave room for `answer_tokens` more."""
        if self.prompts.task != "vqa":
            raise OmniVisionError(f"yes/no checks and choices need task vqa; this model runs task {self.prompts.task}, "
                                  "whose prompt takes no question")
        ids = self.prompts.question_ids(question, len(self.header_ids) + answer_tokens)
        return np.concatenate([ids, self.header_ids])

    def check(self, image: ImageSource, question: str, *, frame_key: Hashable | None = None,
              color_order: str = "bgr", threshold: float = 0.5) -> Decision:
        """Yes or no about one image: one prefill of the question and the assistant header (plus the
        image and prompt prefix when the frame is not cached), no decoding."""
        (result,) = self.check_frames([FrameQuestion(image, question, frame_key, color_order)], threshold)
        if isinstance(result, OmniVisionError):
            raise result
        return result

    def check_frames(self, items: Sequence[FrameQuestion], threshold: float = 0.5,
                     should_stop: Callable[[], bool] | None = None) -> list[Decision | OmniVisionError | None]:
        """Yes/no checks of several questions about several frames: one batched vision call for the frames
        not cached, then one prefill per question on its frame's cached prefix. Each item gets its Decision,
        the OmniVisionError of its frame or question, or None when `should_stop()` turned true first.
        timing.encode_ms of an item is the batch's conversion and encoding when its frame was not cached."""
        if self.answer_tokens is None:
            raise OmniVisionError(self.check_error)
        start = time.perf_counter()
        results: list[Decision | OmniVisionError | None] = [None] * len(items)
        keys = [self._key(item.image, item.frame_key, item.color_order) for item in items]
        prompts = {}
        for i, item in enumerate(items):
            try:
                prompts[i] = self._answer_prompt(item.question, 0)
            except OmniVisionError as exc:
                results[i] = exc
        frames = {keys[i]: (items[i].image, items[i].color_order) for i in prompts}
        embeddings, encode_ms = self._frame_embeddings(frames)
        for i, prompt in prompts.items():
            if should_stop is not None and should_stop():
                break
            embeds, vision_hit = embeddings[keys[i]]
            if isinstance(embeds, OmniVisionError):
                results[i] = embeds
                continue
            t1 = time.perf_counter()
            session, prefix_hit = self._prefix_session(keys[i], embeds)
            try:
                logits = session.prefill(prompt)
            finally:
                session.close()
            t2 = time.perf_counter()
            probability, mass = yes_no_probability(logits, self.answer_tokens)
            timing = Timing(encode_ms=0.0 if vision_hit else encode_ms, prefill_ms=(t2 - t1) * 1e3,
                            ttft_ms=(t2 - start) * 1e3, vision_cache_hit=vision_hit, prefix_cache_hit=prefix_hit,
                            prompt_tokens=len(prompt) + (0 if prefix_hit else len(self.prompts.prefix_ids)))
            results[i] = Decision(probability >= threshold, probability, mass, timing)
        return results

    def choose(self, image: ImageSource, question: str, options: Sequence[str], *, frame_key: Hashable | None = None,
               color_order: str = "bgr", max_option_tokens: int = 64,
               should_stop: Callable[[], bool] | None = None) -> Choice:
        """Score each option as the answer to `question` about one image: one prefill of the question and
        the assistant header, then each option's tokens teacher-forced on a fork of that session."""
        start = time.perf_counter()
        if not options:
            raise OmniVisionError("no options given")
        option_ids = option_token_ids(self.tokenizer, options, max_option_tokens)
        prompt = self._answer_prompt(question, max(ids.size for ids in option_ids))
        key = self._key(image, frame_key, color_order)
        with self._prefilled(image, key, color_order, prompt) as (session, logits, timing):
            t2 = time.perf_counter()
            sums = score_options(session, logits, option_ids, should_stop)
        t3 = time.perf_counter()
        timing.decode_ms, timing.ttft_ms = (t3 - t2) * 1e3, (t3 - start) * 1e3
        nan = float("nan")
        means = [nan if s is None else s / ids.size for s, ids in zip(sums, option_ids)]
        if any(s is None for s in sums):
            return Choice(-1, "", means, [nan if s is None else s for s in sums], [nan] * len(sums), timing)
        probabilities = option_probabilities(sums)
        index = int(np.argmax(probabilities))
        return Choice(index, options[index], means, list(sums), probabilities.tolist(), timing)

    def clear_caches(self) -> None:
        self.vision_cache.clear()
        self.prefix_cache.clear()
