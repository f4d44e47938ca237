"""The released chat templates (VQA and OCR), the image-placeholder layout, and answer clean-up.

Prompts as Nexa's llama.cpp builds them (examples/omni-vlm/omni-vlm-wrapper.cpp), the single <|image_pad|>
expanded to one position per projected image token:

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>
    vqa  USER = \\n<|vision_start|>[81 x image]<|vision_end|>{question}
    ocr  USER = ␣<|ocr_start|><|vision_start|>[81 x image]<|vision_end|><|ocr_end|>    (␣: one space)

The OCR prompt has no question (the wrapper drops the caller's prompt for the OCR model). <|ocr_start|> and
<|ocr_end|> are not Qwen2.5 tokens: a vocabulary that holds them gets their ids, any other gets their
text tokenized, as llama.cpp does with a special-token string its vocabulary lacks. Nexa's CLI
(omni-vlm-cli.cpp) dropped the two markers in its "fix OCR template error" commit, the wrapper (what
Nexa's SDK runs) kept them; this follows the wrapper.

Image positions carry ids lm_vocab + j (j = 0..80): the decoder looks them up in an image-embedding
table instead of the token embedding (TensorRT-LLM's prompt-table convention). There is no assistant
header: the model writes `<|im_start|>assistant\\n` itself and `clean_answer` strips it. A vocabulary
that asks for BOS (tokenizer.ggml.add_bos_token) gets it first, as llama.cpp evaluates the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.config import SYSTEM_PROMPT, OmniVisionConfig
from omnivision_ros.model.tokenizer import TextTokenizer
from omnivision_ros.model.tokens import IM_END_ID, IM_START_ID, STOP_TOKENS, VISION_END_ID, VISION_START_ID

ROLE_HEADER = "<|im_start|>assistant\n"
TASKS = ("vqa", "ocr")  # visual question answering (the released instruct model); OCR (its OCR variant)
OCR_START, OCR_END = "<|ocr_start|>", "<|ocr_end|>"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise OmniVisionError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    return task


def prompt_text(question: str = "", task: str = "vqa") -> str:
    """The released prompt as text, with the one <|image_pad|> (for display and tests)."""
    head = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    if check_task(task) == "ocr":
        return head + f" {OCR_START}<|vision_start|><|image_pad|><|vision_end|>{OCR_END}<|im_end|>"
    return head + f"\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>"


def image_token_ids(config: OmniVisionConfig) -> np.ndarray:
    """Ids of the image positions: lm_vocab + j for j in 0..mp_tokens-1."""
    return np.arange(config.lm_vocab, config.lm_vocab + config.mp_tokens, dtype=np.int64)


@dataclass(frozen=True)
class Prompt:
    """Token ids split at the point a second question about the same image can reuse."""

    prefix_ids: np.ndarray  # system + user header + image, ends with <|vision_end|>
    question_ids: np.ndarray  # question + <|im_end|>

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([self.prefix_ids, self.question_ids])


class PromptBuilder:
    """Token ids of the prompt of `task` ("vqa" or "ocr") for this tokenizer and model."""

    def __init__(self, tokenizer: TextTokenizer, config: OmniVisionConfig, task: str = "vqa"):
        self.tokenizer = tokenizer
        self.config = config
        self.task = check_task(task)
        enc = tokenizer.encode
        if task == "ocr":
            user = self._marked("user\n ", OCR_START)
            self._suffix = [*self._marked("", OCR_END), IM_END_ID]  # after the image; no question
        else:
            user = enc("user\n\n")
            self._suffix = None
        self._prefix = np.asarray(
            [*tokenizer.bos_ids, IM_START_ID, *enc("system\n" + SYSTEM_PROMPT), IM_END_ID, *enc("\n"),
             IM_START_ID, *user, VISION_START_ID, *image_token_ids(config), VISION_END_ID],
            dtype=np.int64,
        )
        self._prefix.setflags(write=False)

    def _marked(self, text: str, marker: str) -> list[int]:
        """`text` + `marker`: the marker's id where the vocabulary has it as a token, else its text tokenized."""
        marker_id = self.tokenizer.find(marker)
        if marker_id is None:
            return self.tokenizer.encode(text + marker)
        return [*self.tokenizer.encode(text), marker_id]

    @property
    def prefix_ids(self) -> np.ndarray:
        return self._prefix

    def question_ids(self, question: str, max_new_tokens: int = 0) -> np.ndarray:
        """The ids after the image: the question and <|im_end|> (OCR: the fixed end of its prompt, question unused)."""
        if self._suffix is not None:
            ids = np.asarray(self._suffix, dtype=np.int64)
        else:
            question = question.strip() if isinstance(question, str) else question
            if not isinstance(question, str) or not question:
                raise OmniVisionError("the question is empty")
            ids = np.asarray([*self.tokenizer.encode(question), IM_END_ID], dtype=np.int64)
        total = len(self._prefix) + len(ids) + max_new_tokens
        if total > self.config.lm_max_context:
            raise OmniVisionError(
                f"the question is too long: {len(ids)} tokens + {len(self._prefix)} prompt tokens"
                f" + {max_new_tokens} new tokens exceed the context of {self.config.lm_max_context}"
            )
        return ids

    def build(self, question: str, max_new_tokens: int = 0) -> Prompt:
        return Prompt(self._prefix, self.question_ids(question, max_new_tokens))


def clean_answer(text: str) -> str:
    """Strip the role header the model writes itself, anything after a stop token, and outer blanks."""
    for stop in STOP_TOKENS:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    text = text.lstrip()
    if text.startswith(ROLE_HEADER):
        text = text[len(ROLE_HEADER):]
    elif text.startswith("<|im_start|>"):
        # A header with another role or a truncated one: drop up to the end of its line.
        newline = text.find("\n")
        text = "" if newline < 0 else text[newline + 1:]
    return text.strip()


def visible_answer(text: str) -> str:
    """Answer text safe to stream while generating: empty while it could still be the role header."""
    stripped = text.lstrip()
    if ROLE_HEADER.startswith(stripped) or (stripped.startswith("<|im_start|>") and "\n" not in stripped):
        return ""
    return clean_answer(text)
