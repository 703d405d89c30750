"""The arithmetic tokenizer: fixed ids, lossless round trips, and Hugging Face compatibility."""

import json

import pytest

from async_rl.tokenizer import (
    ARITH_VOCAB_SIZE,
    Tokenizer,
    arithmetic_vocab,
    load_tokenizer,
    save_arithmetic_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.arithmetic()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_arithmetic_tokenizer(path)
    return path


def test_special_ids_and_vocab_are_fixed(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == ARITH_VOCAB_SIZE == len(arithmetic_vocab()) == 32
    assert tok.encode("0123456789+-*= ") == list(range(4, 19))
    assert arithmetic_vocab()[-1] == "<reserved_12>"


@pytest.mark.parametrize("text", ["12+345=", "347+589=936", "0*0=0", "9-3 = 6", "  1 ", ""])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, spaces included
    assert tok.decode(ids) == text


def test_decode_skips_special_and_reserved_tokens(tok):
    ids = [tok.bos_id, *tok.encode("12"), tok.eos_id, tok.pad_id, 31]
    assert tok.decode(ids) == "12"


def test_unknown_characters_become_unk(tok):
    assert tok.encode("1a2") == [5, tok.unk_id, 6]


def test_saved_files_and_reload(tok, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<bos>",
        "<eos>",
        "<pad>",
    )
    assert json.loads((saved / "special_tokens_map.json").read_text())["unk_token"] == "<unk>"
    again = load_tokenizer(saved)
    assert (again.pad_id, again.eos_id, again.bos_id, again.vocab_size) == (0, 1, 2, 32)
    assert again.encode("12+345=") == tok.encode("12+345=")
    assert load_tokenizer("arithmetic").encode("7") == [11]


def test_transformers_loads_saved_tokenizer(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    ids = hf("12+345=")["input_ids"]
    assert ids == tok.encode_prompt("12+345=") == [2, 5, 6, 14, 7, 8, 9, 17]  # bos added
    assert hf.decode(ids, skip_special_tokens=True) == "12+345="
    assert hf.decode([2, *ids, 1, 0], skip_special_tokens=True) == "12+345="
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (0, 1, 2)


def test_from_dir_missing_dir_or_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        Tokenizer.from_dir(missing)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_qwen_style_without_bos(tmp_path):
    # Qwen's config: bos explicitly null, eos stored as an AddedToken dict, no pad here.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|unk|>": 2, "x": 3}
    HFTokenizer(WordLevel(vocab, unk_token="<|unk|>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": {"content": "<|im_end|>"}})
    )
    qwen = Tokenizer.from_dir(tmp_path)
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.vocab_size) == (None, 1, 1, 4)
    qwen.save(tmp_path / "copy")
    copy = Tokenizer.from_dir(tmp_path / "copy")
    assert (copy.bos_id, copy.eos_id, copy.pad_id) == (None, 1, 1)


def test_from_dir_bare_tokenizer_json_uses_conventional_names(tok, tmp_path):
    tok._tok.save(str(tmp_path / "tokenizer.json"))
    bare = Tokenizer.from_dir(tmp_path)
    assert (bare.pad_id, bare.eos_id, bare.bos_id) == (0, 1, 2)


def test_from_dir_bad_config(tok, tmp_path):
    tok._tok.save(str(tmp_path / "tokenizer.json"))
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"eos_token": "<eos>",\n "bos_token": }')
    with pytest.raises(ValueError, match=r"tokenizer_config.json:2:15"):
        Tokenizer.from_dir(tmp_path)
    config.write_text(json.dumps({"eos_token": "<end>"}))
    with pytest.raises(ValueError, match="'<end>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
