"""Image + question -> answer on one backend, reusing work across questions about the same frame.

Two bounded LRU caches, both keyed by the frame (a caller key such as (camera, stamp), or a hash of
the pixels): image embeddings, and decoder sessions prefilled with system + user header + image, so
a second question about a frame only prefills its own tokens.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Union

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.preprocess import preprocess
from omnivision_ros.model.prompt import PromptBuilder, clean_answer, visible_answer
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.runtime.backend import Backend, DecoderSession
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
    ):
        """task: "vqa" (answer the question) or "ocr" (the OCR variant's prompt, which has no question)."""
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, self.config, task)
        self.generation = (generation or GenerationConfig()).validate()
        self.vision_cache = LRUCache(vision_cache_size)
        self.prefix_cache = LRUCache(prefix_cache_size, on_evict=lambda s: s.close())

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
        if frame_key is None and callable(image):
            raise OmniVisionError("a picture given as a function needs a frame_key")
        key = (frame_key, color_order) if frame_key is not None else (frame_digest(image), color_order)
        timing = Timing()

        t0 = time.perf_counter()
        embeds, timing.vision_cache_hit = self.image_embeddings(image, key, color_order)
        t1 = time.perf_counter()
        session, timing.prefix_cache_hit = self._prefix_session(key, embeds)
        try:
            logits = session.prefill(question_ids)
            t2 = time.perf_counter()
            generated: list[int] = []

            def on_token(token: int) -> None:
                generated.append(token)
                if on_text is not None:
                    on_text(visible_answer(self.tokenizer.decode(generated)))

            result = decode(session, logits, gen, on_token, should_stop)
        finally:
            session.close()

        timing.encode_ms = (t1 - t0) * 1e3
        timing.prefill_ms = (t2 - t1) * 1e3
        timing.prompt_tokens = len(question_ids) + (0 if timing.prefix_cache_hit else len(self.prompts.prefix_ids))
        timing.ttft_ms = (result.first_token_time - start) * 1e3
        timing.decode_ms = result.decode_s * 1e3
        timing.new_tokens = len(result.token_ids)
        if result.decode_s > 0 and timing.new_tokens > 1:
            timing.tokens_per_second = (timing.new_tokens - 1) / result.decode_s
        text = clean_answer(self.tokenizer.decode(result.token_ids))
        return Answer(text, result.token_ids, result.stop_reason, timing)

    def clear_caches(self) -> None:
        self.vision_cache.clear()
        self.prefix_cache.clear()
