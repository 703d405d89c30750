"""The policy: torchtitan's Qwen3-MoE built from `ModelConfig`, and log-prob helpers.

Shape legend: B = batch, T = tokens per sequence, V = vocabulary, D = hidden size,
L = MoE layers, K = experts per token (top-k), E = experts, R = routed tokens.

Two changes to torchtitan's stock Qwen3-MoE, both needed for an RL learner:
- experts compute in the dtype of their weights (stock `GroupedExperts` always casts to
  bf16, which in an fp32 model alone costs a train-inference KL as large as FP8's);
- no load-balancing bias (`load_balance_coeff = None`): the Hugging Face layout that actors load
  has no place for it, so the learner and the actors would route differently.
Attention is SDPA with a causal mask: batches are right-padded, so every real token sees
exactly its own prefix and padding never changes a real token's logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.models.common import Embedding, Linear
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.models.common.rope import CosSinRoPE
from torchtitan.models.qwen3 import (
    _EMBEDDING_INIT,
    _LINEAR_INIT,
    _build_qwen3_moe_layers,
    _qwen3_norm,
)
from torchtitan.models.qwen3.model import Qwen3Model
from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

from async_rl.config import ModelConfig

# torchtitan's router asks for fp32 autocast, which CPU autocast does not offer; on CPU the
# router then runs in the model's dtype, fp32 for the CPU default, which is what it wants anyway.
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PrecisionGroupedExperts(GroupedExperts):
    """`GroupedExperts` that computes in its weights' dtype instead of always in bf16."""

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1_EFD, w2_EDF, w3_EFD = (
            w.to_local() if isinstance(w, DTensor) else w
            for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD)
        )
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        x_RD_w = x_RD.to(w1_EFD.dtype)
        h_RF = F.silu(self._grouped_mm(A=x_RD_w, B_t=w1_EFD.transpose(-2, -1), offs=offsets_E))
        h_RF = h_RF * self._grouped_mm(A=x_RD_w, B_t=w3_EFD.transpose(-2, -1), offs=offsets_E)
        out_RD = self._grouped_mm(A=h_RF, B_t=w2_EDF.transpose(-2, -1), offs=offsets_E)
        return out_RD.type_as(x_RD)


def titan_config(cfg: ModelConfig) -> Qwen3Model.Config:
    """torchtitan's Qwen3-MoE config for our flavour (every layer MoE, untied embeddings)."""
    layers = _build_qwen3_moe_layers(
        n_layers=cfg.num_layers,
        dim=cfg.dim,
        n_heads=cfg.num_heads,
        n_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        moe_hidden_dim=cfg.moe_hidden_dim,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        attn_backend="flex",  # replaced below for sdpa, which torchtitan no longer offers here
        moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=cfg.head_dim, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta),
    )
    for layer in layers:
        layer.attention_norm.eps = layer.ffn_norm.eps = cfg.norm_eps
        layer.attention.qk_norm.eps = cfg.norm_eps
        if cfg.attn_backend == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        moe = layer.moe
        moe.load_balance_coeff = None
        stock = moe.routed_experts.inner_experts
        moe.routed_experts.inner_experts = PrecisionGroupedExperts.Config(
            dim=stock.dim,
            hidden_dim=stock.hidden_dim,
            num_experts=stock.num_experts,
            param_init=stock.param_init,
        )
    norm = _qwen3_norm(cfg.dim)
    norm.eps = cfg.norm_eps
    config = Qwen3Model.Config(
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        norm=norm,
        tok_embeddings=Embedding.Config(
            num_embeddings=cfg.vocab_size, embedding_dim=cfg.dim, param_init=_EMBEDDING_INIT
        ),
        lm_head=Linear.Config(
            in_features=cfg.dim, out_features=cfg.vocab_size, param_init=_LINEAR_INIT
        ),
        layers=layers,
    )
    # how expert parallelism splits the model (`learner.parallel.apply_fsdp`); inert unless
    # the model is parallelized
    set_qwen3_sharding_config(config, enable_sp=False, enable_ep=True)
    return config


def build_model(
    cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu"
) -> Qwen3Model:
    """A freshly initialised model (seeded), in `cfg.dtype`, in train mode."""
    with torch.device(device):
        model = titan_config(cfg).build()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_states(buffer_device=torch.device(device))
    else:
        model.init_states(buffer_device=torch.device(device))
    return model.to(DTYPES[cfg.dtype])


def apply_activation_checkpointing(model: Qwen3Model, mode: str) -> Qwen3Model:
    """Wrap every transformer block in torchtitan's activation checkpointing, in place:
    "full" recomputes a block's activations in the backward pass, "selective" keeps the
    expensive ops' outputs (torchtitan's op list); "none" leaves the model as it is. Parameter
    and state-dict names do not change. Apply before FSDP and before building the optimizer.

    Routing replay stays right under recomputation: `TrainStep` keeps a forward's replayed
    experts in place until its backward has run.
    """
    if mode == "none":
        return model
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    policies = {"full": FullAC, "selective": SelectiveAC}
    if mode not in policies:
        raise ValueError(f"activation_checkpointing: {mode!r} is not none, full or selective")
    policy = policies[mode]
    policy(policy.Config()).apply(model)
    return model


def moe_routers(model: Qwen3Model) -> list[torch.nn.Module]:
    """The router of every MoE layer, in layer order (the L axis of routing traces)."""
    return [layer.moe.router for layer in model.layers.values() if layer.moe_enabled]


def token_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(targets) under softmax(logits / temperature), in float32: `[B, T]`."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return logp_BTV.gather(-1, targets_BT.long().unsqueeze(-1)).squeeze(-1)


def entropy(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(logits / temperature), in float32: `[B, T]`."""
    logp_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)
