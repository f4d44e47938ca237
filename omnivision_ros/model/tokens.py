"""The special tokens of the Qwen2.5 vocabulary and the stop set: the one table of token ids.

Ids are fixed by the released vocabulary (Qwen2.5's tokenizer_config.json; llama.cpp writes the same ids
into the GGUF file). The synthetic tokenizer, the GGUF test-model writer, the GGUF loader's checks, the
prompt builder and the generator all read them from here.
"""
from __future__ import annotations

# Added tokens after the regular vocabulary: text -> (id, control). Control tokens are special to the
# tokenizer (user text cannot produce them; llama.cpp types them CONTROL); the others are plain added
# tokens (USER_DEFINED in llama.cpp's files).
ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    "<|endoftext|>":        (151643, True),
    "<|im_start|>":         (151644, True),
    "<|im_end|>":           (151645, True),
    "<|object_ref_start|>": (151646, True),
    "<|object_ref_end|>":   (151647, True),
    "<|box_start|>":        (151648, True),
    "<|box_end|>":          (151649, True),
    "<|quad_start|>":       (151650, True),
    "<|quad_end|>":         (151651, True),
    "<|vision_start|>":     (151652, True),
    "<|vision_end|>":       (151653, True),
    "<|vision_pad|>":       (151654, True),
    "<|image_pad|>":        (151655, True),
    "<|video_pad|>":        (151656, True),
    "<tool_call>":          (151657, False),
    "</tool_call>":         (151658, False),
    "<|fim_prefix|>":       (151659, True),
    "<|fim_middle|>":       (151660, True),
    "<|fim_suffix|>":       (151661, True),
    "<|fim_pad|>":          (151662, True),
    "<|repo_name|>":        (151663, True),
    "<|file_sep|>":         (151664, True),
}

CONTROL_TOKENS: dict[str, int] = {text: i for text, (i, control) in ADDED_TOKENS.items() if control}

ENDOFTEXT_ID = CONTROL_TOKENS["<|endoftext|>"]
IM_START_ID = CONTROL_TOKENS["<|im_start|>"]
IM_END_ID = CONTROL_TOKENS["<|im_end|>"]
VISION_START_ID = CONTROL_TOKENS["<|vision_start|>"]
VISION_END_ID = CONTROL_TOKENS["<|vision_end|>"]
IMAGE_PAD_ID = CONTROL_TOKENS["<|image_pad|>"]

# Tokens the prompt template and the answer clean-up rely on: a vocabulary must hold them at these ids.
REQUIRED_TOKENS: dict[str, int] = {
    name: CONTROL_TOKENS[name]
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
}

# Generation ends on any of these. <|im_end|> closes the assistant turn and <|endoftext|> the document;
# the last three are the fill-in-the-middle markers llama.cpp also treats as end of generation for
# Qwen2.5 vocabularies (a chat answer that emits one has left the chat format).
STOP_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
STOP_TOKEN_IDS: tuple[int, ...] = tuple(CONTROL_TOKENS[name] for name in STOP_TOKENS)

# The first added token: regular (BPE) ids lie below it.
FIRST_ADDED_ID = min(i for i, _ in ADDED_TOKENS.values())
LAST_ADDED_ID = max(i for i, _ in ADDED_TOKENS.values())
