import json

from omnivision_ros.model.config import SPECIAL_TOKENS
from omnivision_ros.model.tokenizer import QWEN2_SPECIAL_TOKENS, TextTokenizer, synthetic_tokenizer_json


def test_special_tokens_have_the_released_ids(tokenizer):
    for text, tid in SPECIAL_TOKENS.items():
        assert tokenizer.token_id(text) == tid
        assert tokenizer.decode([tid]) == text
    assert QWEN2_SPECIAL_TOKENS["<|image_pad|>"] == 151655


def test_regular_vocabulary_fills_ids_below_the_specials(tokenizer):
    data = json.loads(synthetic_tokenizer_json())
    ids = sorted(data["model"]["vocab"].values())
    assert ids == list(range(151643))


def test_round_trip(tokenizer):
    for text in ["Is the door open?", "  two  spaces\nnew line", "Émile's café: 3.5 €", "数字 123"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_merges_shorten_english(tokenizer):
    text = "What do you see in this picture?"
    assert len(tokenizer.encode(text)) < len(text.encode()) * 0.8


def test_deterministic():
    synthetic_tokenizer_json.cache_clear()
    first = synthetic_tokenizer_json()
    synthetic_tokenizer_json.cache_clear()
    assert synthetic_tokenizer_json() == first


def test_save_and_load(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    again = TextTokenizer.from_file(path)
    assert again.encode("hello robot") == tokenizer.encode("hello robot")
