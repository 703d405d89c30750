"""The arithmetic tokenizer: fixed ids, lossless round trips, and Hugging Face compatibility."""

import json
import shutil

import pytest

from async_rl.tokenizer import (
    ARITH_VOCAB_SIZE,
    Tokenizer,
    arithmetic_vocab,
    load_tokenizer,
    save_arithmetic_tokenizer,
)
from tests.helpers import ROOT


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


# ------------------------------------------------------------------ a Qwen-style BPE tokenizer
EXAMPLE = ROOT / "examples" / "word_problems"
QWEN_DIR = EXAMPLE / "tokenizer"  # byte-level BPE trained here (examples/word_problems/build.py)


def _example_build():
    from async_rl.by_name import resolve

    return resolve(f"{EXAMPLE / 'build.py'}:main")


def test_the_example_files_are_what_its_build_script_makes(tmp_path):
    _example_build()(tmp_path)
    for name in ("problems.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


@pytest.mark.parametrize("system", ["", "Answer with a boxed fraction."])
def test_chat_prompts_are_transformers_apply_chat_template(system):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(QWEN_DIR)
    ours = load_tokenizer(QWEN_DIR).for_run(chat_template=True, system_prompt=system)
    for text in ("A jug holds 8 cups. Ann drinks 3 cups. What fraction is left?", "½ of 7?  "):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert ours.encode_prompt(text) == want["input_ids"]
        assert ours.render_prompt(text).endswith(f"{text}<|im_end|>\n<|im_start|>assistant\n")
    assert ours.bos_id is None and ours.encode_prompt("x")[0] == ours._tok.token_to_id(
        "<|im_start|>"
    )
    plain = load_tokenizer(QWEN_DIR)  # no chat template asked for: the text alone, no bos
    assert plain.encode_prompt("3 apples") == plain.encode("3 apples")


def test_stop_ids_are_eos_then_generation_config_then_stop_tokens():
    tok = load_tokenizer(QWEN_DIR)
    im_end, text_end, im_start = (tok._tok.token_to_id(t) for t in QWEN_STOPS)
    assert tok.eos_id == im_end and tok.pad_id == text_end
    assert tok.stop_ids == (im_end, text_end)  # generation_config.json: Qwen's two
    run = tok.for_run(stop_tokens=["<|im_start|>"])
    assert run.stop_ids == (im_end, text_end, im_start) and tok.stop_ids == (im_end, text_end)
    ids = tok.encode("12 apples")
    assert run.decode_completion([*ids, text_end, *ids]) == "12 apples"
    assert run.decode_completion([*ids, im_start]) == "12 apples"
    assert run.generation_config()["eos_token_id"] == [im_end, text_end, im_start]
    with pytest.raises(ValueError, match="actor.stop_tokens: '<nope>' is not a token"):
        tok.for_run(stop_tokens=["<nope>"])
    with pytest.raises(ValueError, match="task.chat_template: the tokenizer arithmetic has no"):
        Tokenizer.arithmetic().for_run(chat_template=True)


QWEN_STOPS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def test_a_chat_template_file_is_read_and_saved_where_every_reader_finds_it(tmp_path):
    shutil.copytree(QWEN_DIR, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "t" / "chat_template.jinja").write_text(template)  # transformers 5's file
    tok = load_tokenizer(tmp_path / "t")
    assert tok.chat_template == template
    tok.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == template


def test_the_run_tokenizer_checks_the_model_vocabulary(tmp_path):
    from async_rl.config import load_config
    from async_rl.tokenizer import tokenizer_from_config

    cfg = load_config(None, [f"model.tokenizer={QWEN_DIR}", "task.chat_template=true"])
    with pytest.raises(ValueError, match="model.vocab_size: 32 is below the tokenizer's 434"):
        tokenizer_from_config(cfg)
    cfg = load_config(None, [f"model.tokenizer={QWEN_DIR}", "model.vocab_size=448"])
    assert tokenizer_from_config(cfg).encode_prompt("7") == load_tokenizer(QWEN_DIR).encode("7")
