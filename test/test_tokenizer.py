import json

from omnivision_ros.model.tokenizer import TextTokenizer, synthetic_tokenizer_json
from omnivision_ros.model.tokens import ADDED_TOKENS, FIRST_ADDED_ID, STOP_TOKEN_IDS


def test_added_tokens_have_the_released_ids(tokenizer):
    for text, (tid, control) in ADDED_TOKENS.items():
        assert tokenizer.token_id(text) == tid
        assert tokenizer.decode([tid]) == text
        # Control tokens never come out of user text; plain added tokens do (as in Qwen2.5's tokenizer).
        assert (tokenizer.encode(text) == [tid]) is not control, text
    assert tokenizer.token_id("<|image_pad|>") == 151655


def test_stop_set_holds_the_end_markers_of_qwen25():
    # <|im_end|>, <|endoftext|>, and the fill-in-the-middle markers llama.cpp also ends generation on.
    assert STOP_TOKEN_IDS == (151645, 151643, 151662, 151663, 151664)


def test_regular_vocabulary_fills_ids_below_the_specials(tokenizer):
    data = json.loads(synthetic_tokenizer_json())
    ids = sorted(data["model"]["vocab"].values())
    assert ids == list(range(FIRST_ADDED_ID)) and FIRST_ADDED_ID == 151643


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
