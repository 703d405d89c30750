"""A checkpoint's Hugging Face `config.json`: written once, read and checked once.

Every checkpoint between the learner, the actors and users is a Hugging Face Qwen3-MoE
directory (docs/design.md section 3). `hf_config()` writes its config.json from a `ModelConfig`;
`read_model_spec()` is the one reader of config.json for all its users (the learner imports a
checkpoint, the embedded engine builds its model, the vLLM engine checks a reload), and refuses
with a `ValueError` naming the file anything but a Qwen3-MoE this project can run: every layer
sparse, SiLU experts, no attention bias, default RoPE. `check_tensors()` checks a state dict in
Hugging Face names (per-expert keys) against it.

    spec = read_model_spec("runs/tiny/weights/v000012")
    spec.num_experts, spec.routing          # 8, RoutingSpec(num_layers=2, top_k=2, ...)
    spec.model_config()                     # the learner's ModelConfig (tokenizer = the dir)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from async_rl.choices import Dtype
from async_rl.config import ModelConfig
from async_rl.types import RoutingSpec

CONFIG = "config.json"

# config.json key -> ModelConfig field, for the numbers both describe
HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "moe_intermediate_size": "moe_hidden_dim",
    "num_experts": "num_experts",
    "num_experts_per_tok": "top_k",
    "max_position_embeddings": "max_seq_len",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
}
_REQUIRED = [k for k in HF_KEYS if k not in ("head_dim", "rope_theta")]
DEFAULT_ROPE_THETA = 10000.0  # transformers' Qwen3MoeConfig default
DTYPES = get_args(Dtype)


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int, pad_id: int) -> dict[str, Any]:
    """config.json for `cfg`: every layer sparse, top-k weights renormalised, untied head."""
    out: dict[str, Any] = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    out.update({hf: getattr(cfg, ours) for hf, ours in HF_KEYS.items()})
    out.update(
        intermediate_size=cfg.moe_hidden_dim,  # dense FFN size; unused when every layer is MoE
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
        rope_scaling=None,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        torch_dtype=cfg.dtype,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return out


@dataclass(frozen=True)
class ModelSpec:
    """What config.json says about the model. Example: the CPU default has `dim = 128`,
    `num_layers = 2`, `num_experts = 8`, `top_k = 2`, `eos_ids = (1,)`."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_hidden_dim: int
    num_experts: int
    top_k: int
    max_positions: int
    rope_theta: float
    norm_eps: float
    norm_topk_prob: bool
    tie_embeddings: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    dtype: str  # the learner's parameter dtype: "float32" or "bfloat16"

    @property
    def routing(self) -> RoutingSpec:
        return RoutingSpec(self.num_layers, self.top_k, self.num_experts)

    def model_config(self, tokenizer: str) -> ModelConfig:
        """The learner's `ModelConfig` of this checkpoint."""
        return ModelConfig(
            tokenizer=tokenizer,
            vocab_size=self.vocab_size,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            moe_hidden_dim=self.moe_hidden_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
            max_seq_len=self.max_positions,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
        )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise ValueError(f"{file}: cannot read checkpoint config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def _check_architecture(c: dict[str, Any], file: Path) -> None:
    if c.get("model_type") != "qwen3_moe":
        raise ValueError(f"{file}: model_type must be 'qwen3_moe', got {c.get('model_type')!r}")
    missing = [k for k in _REQUIRED if not _number(c.get(k))]
    if missing:
        raise ValueError(f"{file}: missing or non-numeric {', '.join(missing)}")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or scaling:
        raise ValueError(f"{file}: only default RoPE is supported, got rope scaling {scaling}")
    if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{file}: only checkpoints whose every layer is MoE are supported")
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias", False):
        raise ValueError(f"{file}: needs hidden_act 'silu' and no attention bias")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def has_weights(path: str | Path) -> bool:
    """Whether a checkpoint directory holds its tensors, or only what describes the model
    (config.json, tokenizer files: what an actor on another node gets, `async_rl.run.workers`)."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def read_model_spec(path: str | Path) -> ModelSpec:
    """Parse and check `path/config.json` (module docstring)."""
    file = Path(path) / CONFIG
    c = _read_json(file)
    _check_architecture(c, file)
    eos_ids = eos_id_list(c.get("eos_token_id"), file)
    if not eos_ids:
        raise ValueError(f"{file}: eos_token_id must be an id or a list of ids, got None")
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():  # where Qwen lists its stop tokens (<|im_end|>, <|endoftext|>)
        gen_eos = _read_json(gen_file).get("eos_token_id")
        if gen_eos is not None:
            eos_ids = tuple(dict.fromkeys((*eos_ids, *eos_id_list(gen_eos, gen_file))))
    rope = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))
    num_heads = int(c["num_attention_heads"])
    dtype = c.get("torch_dtype") or c.get("dtype") or "float32"
    return ModelSpec(
        vocab_size=int(c["vocab_size"]),
        dim=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // num_heads),
        moe_hidden_dim=int(c["moe_intermediate_size"]),
        num_experts=int(c["num_experts"]),
        top_k=int(c["num_experts_per_tok"]),
        max_positions=int(c["max_position_embeddings"]),
        rope_theta=float(theta),
        norm_eps=float(c["rms_norm_eps"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        eos_ids=eos_ids,
        pad_id=int(c.get("pad_token_id") or 0),
        dtype=dtype if dtype in DTYPES else "float32",
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, in Hugging Face names, with its shape."""
    s = spec
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    out = {"model.embed_tokens.weight": (s.vocab_size, s.dim), "model.norm.weight": (s.dim,)}
    if not s.tie_embeddings:
        out["lm_head.weight"] = (s.vocab_size, s.dim)
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (s.dim,),
            p + "post_attention_layernorm.weight": (s.dim,),
            p + "self_attn.q_proj.weight": (q, s.dim),
            p + "self_attn.k_proj.weight": (kv, s.dim),
            p + "self_attn.v_proj.weight": (kv, s.dim),
            p + "self_attn.o_proj.weight": (s.dim, q),
            p + "self_attn.q_norm.weight": (s.head_dim,),
            p + "self_attn.k_norm.weight": (s.head_dim,),
            p + "mlp.gate.weight": (s.num_experts, s.dim),
        }
        for e in range(s.num_experts):
            out |= {
                f"{p}mlp.experts.{e}.gate_proj.weight": (s.moe_hidden_dim, s.dim),
                f"{p}mlp.experts.{e}.up_proj.weight": (s.moe_hidden_dim, s.dim),
                f"{p}mlp.experts.{e}.down_proj.weight": (s.dim, s.moe_hidden_dim),
            }
    return out


def check_tensors(tensors: dict[str, Any], spec: ModelSpec, where: str) -> dict[str, Any]:
    """`tensors` if they are exactly the weights `spec` describes, else a ValueError."""
    expected = expected_shapes(spec)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the model config: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{where}: {key} has shape {list(tensors[key].shape)}, the model config gives "
                f"{list(shape)}"
            )
    return tensors


def eos_id_list(value: Any, where: str | Path) -> tuple[int, ...]:
    """An `eos_token_id` of config.json or generation_config.json: an id, a list of ids, or
    absent (`()`); `ValueError` naming `where` otherwise."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(ids)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
