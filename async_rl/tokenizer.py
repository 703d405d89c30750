"""Tokenizers: the built-in character tokenizer for arithmetic, and any Hugging Face tokenizer dir.

The arithmetic tokenizer has fixed ids so checkpoints stay comparable across runs:

    <pad>=0  <eos>=1  <bos>=2  <unk>=3  then "0123456789+-*= "  then <reserved_N> up to 32

It is saved in Hugging Face form (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`), so `transformers.AutoTokenizer` and vLLM load it. `Tokenizer` wraps
either it or a user's `tokenizer.json` directory (e.g. Qwen's) behind the few calls the actors and
the learner need. Encoding never adds special tokens: callers prepend bos and append eos themselves.
A saved tokenizer with a bos token adds it through its post-processor, so that plain
`AutoTokenizer(prompt)` and vLLM given text see the ids the project's prompts are made of.

A run's prompts and stops (`tokenizer_from_config`): with `task.chat_template` a prompt is the
tokenizer's chat template rendered as transformers' `apply_chat_template` renders it (a user
message, an optional system message, `add_generation_prompt=True`; no bos added, the template
writes what it wants); otherwise bos (when the tokenizer has one) + the prompt text. Generation
stops at `stop_ids`: eos, then `generation_config.json`'s `eos_token_id` list (Qwen: `<|im_end|>`
and `<|endoftext|>`), then `actor.stop_tokens`. Every engine, the learner's evaluation and the
exported checkpoint (its `generation_config.json`) use these same ids.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from async_rl.hf_config import eos_id_list

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
ARITH_CHARS = "0123456789+-*= "
ARITH_VOCAB_SIZE = 32
ARITH_MODEL_MAX_LENGTH = 4096

_ROLES = ("bos", "eos", "pad", "unk")
# Used only when a tokenizer dir does not name a role at all (no key in either config file).
_CONVENTIONAL_NAMES = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>"),
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>"),
    "pad": ("<pad>", "<|pad|>"),
    "unk": ("<unk>",),
}


def arithmetic_vocab() -> list[str]:
    """The arithmetic tokenizer's tokens in id order (exactly `ARITH_VOCAB_SIZE` of them)."""
    vocab = [*SPECIAL_TOKENS, *ARITH_CHARS]
    reserved = [f"<reserved_{i}>" for i in range(ARITH_VOCAB_SIZE - len(vocab))]
    return vocab + reserved


def build_arithmetic_tokenizer() -> tokenizers.Tokenizer:
    """The character-level arithmetic tokenizer (no post-processor: bos/eos are the caller's)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = arithmetic_vocab()
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    # One token per character, spaces included (Whitespace-style splitters would drop them).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens with nothing in between; the default decoder would insert spaces.
    tok.decoder = decoders.Fuse()
    # Reserved tokens are special too, so that decoding never turns them into text.
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    return tok


def _arithmetic_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": ARITH_MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }


def save_arithmetic_tokenizer(dir: str | Path) -> None:
    """Write the arithmetic tokenizer to `dir` in Hugging Face form (creating `dir`)."""
    Tokenizer.arithmetic().save(dir)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _adding_bos(tok: tokenizers.Tokenizer, bos: str, bos_id: int) -> tokenizers.Tokenizer:
    """`tok`, or a copy of it whose post-processor starts every sequence with bos (as
    `Tokenizer.encode_prompt` does) where its own post-processor does not already."""
    if tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]:
        return tok
    from tokenizers import processors

    copy = tokenizers.Tokenizer.from_str(tok.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, bos_id)]
    )
    return copy


def _chat_template(config: dict[str, Any], path: Path | None) -> str | None:
    """The tokenizer's chat template: `chat_template.jinja` (transformers 5), else
    tokenizer_config.json's `chat_template` (a string, or named templates: the "default" one)."""
    if path is not None and (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return template


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """A chat template compiled as transformers compiles it (sandboxed, `trim_blocks`,
    `lstrip_blocks`, `loopcontrols`, a `tojson` that keeps non-ASCII text, `raise_exception`)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _token_name(value: Any) -> str | None:
    # Configs store a special token either as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the special-token ids the run needs.

    Special tokens (bos, eos, pad, unk) are taken from `tokenizer_config.json`, then
    `special_tokens_map.json`; a role neither file mentions falls back to a conventional name
    (`<eos>`, `</s>`, `<|endoftext|>`, ...) when the vocabulary has one. Fallbacks:

    - `bos_id` is None when the tokenizer has no bos (Qwen sets `bos_token: null`); prompts then
      start directly with the prompt text, as Qwen models expect.
    - `pad_id` falls back to `eos_id` (padding is always masked out, so any id would do).
    - eos is required: without it generation could not stop, so loading fails.
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        source: str = "<in-memory tokenizer>",
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tok
        self.source = source
        config = dict(config or {})
        special_tokens_map = dict(special_tokens_map or {})
        ids: dict[str, int | None] = {}
        for role in _ROLES:
            key = f"{role}_token"
            if key in config:
                name = _token_name(config[key])
            elif key in special_tokens_map:
                name = _token_name(special_tokens_map[key])
            else:
                name = next(
                    (n for n in _CONVENTIONAL_NAMES[role] if tok.token_to_id(n) is not None), None
                )
            token_id = None if name is None else tok.token_to_id(name)
            if name is not None and token_id is None:
                raise ValueError(f"{source}: {key} {name!r} is not in the vocabulary")
            if name is not None:
                # Written back on save, so a saved dir names every role it resolved.
                config.setdefault(key, name)
                special_tokens_map.setdefault(key, name)
            ids[role] = token_id
        if ids["eos"] is None:
            raise ValueError(
                f"{source}: the tokenizer has no eos token; set eos_token in tokenizer_config.json"
            )
        if ids["pad"] is None:
            ids["pad"] = ids["eos"]
            config.setdefault("pad_token", config["eos_token"])
            special_tokens_map.setdefault("pad_token", config["eos_token"])
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        self._eos: int = ids["eos"]
        self._pad: int = ids["pad"]
        self._bos = ids["bos"]
        self._unk = ids["unk"]
        self._config = config
        self._special_tokens_map = special_tokens_map
        # the template lives in tokenizer_config.json, which every transformers version reads
        self.chat_template = chat_template or _chat_template(config, None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        gen_eos = eos_id_list((generation_config or {}).get("eos_token_id"), source)
        for i in gen_eos:
            if i >= self.vocab_size:
                raise ValueError(f"{source}: generation_config.json eos_token_id {i} is no token")
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys((self._eos, *gen_eos)))
        self.chat = False  # prompts rendered through the chat template (`for_run`)
        self.system_prompt = ""

    @classmethod
    def arithmetic(cls) -> Tokenizer:
        """The built-in character tokenizer for the arithmetic task."""
        return cls(build_arithmetic_tokenizer(), _arithmetic_config(), source="arithmetic")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (it must contain `tokenizer.json`)."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {path} does not exist or is not a directory")
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{file}: not found; a tokenizer directory needs a tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from None
        config_file = path / "tokenizer_config.json"
        map_file = path / "special_tokens_map.json"
        gen_file = path / "generation_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        special_tokens_map = _read_json(map_file) if map_file.is_file() else {}
        generation_config = _read_json(gen_file) if gen_file.is_file() else {}
        return cls(
            tok,
            config,
            special_tokens_map,
            source=str(path),
            generation_config=generation_config,
            chat_template=_chat_template(config, path),
        )

    def for_run(
        self, chat_template: bool = False, system_prompt: str = "", stop_tokens: Sequence[str] = ()
    ) -> Tokenizer:
        """A copy that renders prompts through the chat template (optionally after a system
        message) and stops also at `stop_tokens` (names in the vocabulary); ValueError naming
        the config key otherwise."""
        out = copy.copy(self)
        if chat_template:
            if self.chat_template is None:
                raise ValueError(
                    f"task.chat_template: the tokenizer {self.source} has no chat template "
                    "(tokenizer_config.json's chat_template or chat_template.jinja)"
                )
            out.chat, out.system_prompt = True, system_prompt
        elif system_prompt:
            raise ValueError("task.system_prompt: needs task.chat_template = true")
        extra = []
        for name in stop_tokens:
            token_id = self._tok.token_to_id(name)
            if token_id is None:
                raise ValueError(f"actor.stop_tokens: {name!r} is not a token of {self.source}")
            extra.append(token_id)
        out.stop_ids = tuple(dict.fromkeys((*self.stop_ids, *extra)))
        return out

    def save(self, dir: str | Path) -> None:
        """Write `tokenizer.json` (its post-processor adding bos where there is one),
        `tokenizer_config.json` and `special_tokens_map.json`."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        tok = self._tok
        if self._bos is not None:
            tok = _adding_bos(tok, tok.id_to_token(self._bos), self._bos)
        tok.save(str(dir / "tokenizer.json"))
        for name, data in (
            ("tokenizer_config.json", self._config),
            ("special_tokens_map.json", self._special_tokens_map),
        ):
            (dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's vocab may be padded larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped (the caller cuts at eos first)."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def special_token(self, role: str) -> str | None:
        """The text of the `bos`/`eos`/`pad`/`unk` token (None where there is none)."""
        token_id = {"bos": self._bos, "eos": self._eos, "pad": self._pad, "unk": self._unk}[role]
        return None if token_id is None else self._tok.id_to_token(token_id)

    def render_prompt(self, text: str) -> str:
        """The text a prompt becomes: the chat template's rendering under `for_run`'s
        `chat_template`, else `text` itself."""
        if not self.chat:
            return text
        system = self.system_prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        specials = {f"{r}_token": self.special_token(r) for r in _ROLES}
        return _compile_template(self.chat_template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **{k: v for k, v in specials.items() if v is not None},
        )

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a policy sees for a prompt (module docstring): the rendered chat, or bos
        (when the tokenizer has one) + the text."""
        if self.chat:
            return self.encode(self.render_prompt(text))
        return ([self._bos] if self._bos is not None else []) + self.encode(text)

    def decode_completion(self, ids: list[int]) -> str:
        """A completion's text, cut at the first stop token."""
        ids = list(ids)
        stops = set(self.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.decode(ids[:end])

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json for a checkpoint: its special ids, every stop id as eos."""
        eos = list(self.stop_ids) if len(self.stop_ids) > 1 else self._eos
        return {"bos_token_id": self._bos, "eos_token_id": eos, "pad_token_id": self._pad}


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`"arithmetic"` for the built-in tokenizer, otherwise a Hugging Face tokenizer directory."""
    if str(spec) == "arithmetic":
        return Tokenizer.arithmetic()
    return Tokenizer.from_dir(spec)


def tokenizer_from_config(cfg: Any, path: str | Path | None = None) -> Tokenizer:
    """The run's tokenizer (`model.tokenizer`, or the checkpoint dir `path`), rendering
    prompts as `task.chat_template` and `task.system_prompt` say, stopping also at
    `actor.stop_tokens`; ValueError naming the key that does not fit the tokenizer."""
    tok = load_tokenizer(cfg.model.tokenizer if path is None else path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size: {cfg.model.vocab_size} is below the tokenizer's "
            f"{tok.vocab_size} ids ({tok.source}); set model.vocab_size = {tok.vocab_size} or more"
        )
    return tok.for_run(cfg.task.chat_template, cfg.task.system_prompt, cfg.actor.stop_tokens)
