"""Builds this example's data and tokenizer (their outputs are in the repository already):

    python examples/word_problems/build.py        # writes problems.jsonl and tokenizer/

- `problems.jsonl`: word problems whose answers are fractions and integers written in LaTeX
  (`\\frac{3}{4}`), each with a worked `solution` ending in `\\boxed{...}`. A solution need not
  write the answer the way the reference does (`\\frac{6}{8}` for `\\frac{3}{4}`): that is
  what math-verify is for, and why exact match would score it 0.
- `tokenizer/`: a byte-level BPE tokenizer trained on that text with the `tokenizers` library
  (nothing is downloaded), with Qwen's special tokens (`<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`), Qwen's pre-tokenizer (digits one by one), a Qwen-style chat template, no bos
  token, eos `<|im_end|>`, and `generation_config.json` stopping at `<|im_end|>` and
  `<|endoftext|>` as Qwen's does. Any Hugging Face tokenizer directory is used the same way.

Deterministic: the same files every time.
"""

from __future__ import annotations

import json
import random
from math import gcd
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's, in Qwen's order
# Qwen3's chat template without tools and thinking: a system message only when one is given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2/3's pre-tokenizer split: letters in words, every digit alone, punctuation runs.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def frac(a: int, b: int) -> str:
    """`a/b` in lowest terms, in LaTeX: "\\frac{3}{4}", or "2" when it is whole."""
    g = gcd(a, b)
    a, b = a // g, b // g
    return str(a) if b == 1 else f"\\frac{{{a}}}{{{b}}}"


def problem(rng: random.Random) -> dict:
    """One word problem: prompt, reference answer, worked solution, kind."""
    name = rng.choice(NAMES)
    kind = rng.choice(("pizza", "rope", "half", "juice", "apples"))
    if kind == "pizza":
        n = rng.randint(2, 9)
        k = rng.randint(1, n - 1)
        prompt = f"A pizza has {n} equal slices. {name} eats {k}. What fraction is eaten?"
        return _row(prompt, frac(k, n), f"{k} of {n} slices: \\boxed{{\\frac{{{k}}}{{{n}}}}}", kind)
    if kind == "rope":
        a, n = rng.randint(1, 9), rng.randint(2, 9)
        prompt = f"{name} cuts a {a} m rope into {n} equal pieces. How long is each piece?"
        return _row(prompt, frac(a, n), f"{a} m / {n}: \\boxed{{\\frac{{{a}}}{{{n}}}}}", kind)
    if kind == "half":
        a = rng.randint(1, 19)
        prompt = f"{name} has {a} cups of flour and uses half. How many cups are used?"
        return _row(prompt, frac(a, 2), f"half of {a}: \\boxed{{\\frac{{{a}}}{{2}}}}", kind)
    if kind == "juice":
        n = rng.randint(2, 9)
        k = rng.randint(1, n - 1)
        prompt = f"A jug holds {n} cups. {name} drinks {k} cups. What fraction is left?"
        left = f"{n} - {k} = {n - k} of {n}: \\boxed{{\\frac{{{n - k}}}{{{n}}}}}"
        return _row(prompt, frac(n - k, n), left, kind)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    prompt = f"{name} has {a} apples and buys {b} more. How many apples now?"
    return _row(prompt, str(a + b), f"{a} + {b} = \\boxed{{{a + b}}}", kind)


def _row(prompt: str, answer: str, solution: str, kind: str) -> dict:
    return {"prompt": prompt, "answer": answer, "solution": solution, "kind": kind}


def make_problems(count: int = 1500, seed: int = 0) -> list[dict]:
    """`count` distinct problems, in a seeded order."""
    rng, rows, seen = random.Random(f"word-problems:{seed}"), [], set()
    while len(rows) < count:
        row = problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer of `vocab_size` ids trained on `texts`, written to `out` in
    Hugging Face form with Qwen's special tokens, chat template and stops (module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation = {
        "bos_token_id": None,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    for name, data in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main(out: Path = HERE) -> None:
    rows = make_problems()
    with open(out / "problems.jsonl", "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    # the chat template's words are text the model reads too
    chat = ["<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n"]
    texts = [text for row in rows for text in (row["prompt"], row["solution"])] + chat
    train_tokenizer(texts, out / "tokenizer")
    size = len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    print(f"wrote {len(rows)} problems and a {size}-id tokenizer to {out}")


if __name__ == "__main__":
    main()
