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


def test_yes_no_words_are_single_tokens_that_change_no_other_text(tokenizer):
    from omnivision_ros.model.config import SYSTEM_PROMPT
    from omnivision_ros.model.tokenizer import WHOLE_WORDS

    ids = [tokenizer.encode(word) for word in WHOLE_WORDS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(WHOLE_WORDS)
    assert [tokenizer.decode(i) for i in ids] == list(WHOLE_WORDS)
    # Without the merges that make them (the last ones), other text splits exactly as it does with them.
    data = json.loads(synthetic_tokenizer_json())
    merges = data["model"]["merges"]
    # The words and the pieces they are made of hold the last ids of the regular vocabulary.
    first = min(i[0] for i in ids)
    cut = len(merges) - (FIRST_ADDED_ID - first)
    vocab = data["model"]["vocab"]
    assert cut > 50 and all(vocab["".join(m.split(" "))] >= first for m in merges[cut:])
    data["model"]["merges"] = merges[:cut]
    without = TextTokenizer.from_json(json.dumps(data))
    for text in ("system\n" + SYSTEM_PROMPT, "Is the door open?", "Describe this image.", "nobody knows, not now."):
        assert tokenizer.encode(text) == without.encode(text), text
    assert without.encode("Yes") != tokenizer.encode("Yes")
