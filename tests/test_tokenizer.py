from transformers import AutoTokenizer

from compress.data.taskworld import ALPHABET, make_splits
from compress.data.tokenizer import save_tokenizer


def test_one_token_per_char_roundtrip_and_reload(tmp_path):
    tok = save_tokenizer(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    train, _ = make_splits(["rev", "add", "cnt"], 50, 10, seed=0)
    for row in train:
        text = row["prompt"] + row["answer"] + "\n"
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert again.decode(ids) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.unk_token_id not in tok(ALPHABET, add_special_tokens=False)["input_ids"]


def test_no_bos_added(tmp_path):
    tok = save_tokenizer(tmp_path)
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]
