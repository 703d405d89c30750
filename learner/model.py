"""The policy: torchtitan's Qwen3-MoE built from `ModelConfig`, and log-prob helpers.

Shape legend: B = batch, T = tokens per sequence, V = vocabulary, D = hidden size,
L = MoE layers, K = experts per token (top-k), E = experts, R = routed tokens.

Two changes to torchtitan's stock Qwen3-MoE, both needed for an RL learner:
- experts compute in the dtype of their weights (stock `GroupedExperts` always casts to
  bf16, which in an fp32 model alone costs a train-inference KL as large as FP8's);
- no load-balancing bias (`load_balance_coeff = None`): the Hugging Face layout that actors load
  has no place for it, so the learner and the actors would route differently.
Attention is SDPA with a causal mask (`model.attn_backend = "sdpa"`), or torchtitan's flex
attention (`"flex"`, CUDA: no CPU backward), which needs a `BlockMask` with every forward:
`build_model` gives the model a forward pre-hook that builds it the way torchtitan's trainer
does (`get_attention_masks(positions)`: causal, and per document where positions restart), so
every caller's plain `model(tokens_BT)` works with either. Batches are right-padded, one
sequence per row, so every real token sees exactly its own prefix and padding never changes a
real token's logits.

The learner never holds `[positions x vocab]` logits for a whole micro-batch: `policy_logprobs`
runs the model to its final norm and computes the sampled token's log-prob (and the entropy)
`chunk` positions at a time (`VocabChunks`), recomputing a chunk's logits in the backward.
At Qwen3's 151,936 tokens a float32 log-softmax is 0.6 MB per position: 20 GB for a row of
32k positions, where a chunk of 512 positions holds about 1 GB at its peak.
"""

from __future__ import annotations

import contextlib
import threading
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
    cfg: ModelConfig,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Qwen3Model:
    """A freshly initialised model (seeded), in `dtype` (default `cfg.dtype`), in train mode.

    The learner builds it in its master dtype (`learner.master_dtype`) and computes in
    `cfg.dtype` through FSDP2's mixed precision (`learner.parallel.apply_fsdp`)."""
    with torch.device(device):
        model = titan_config(cfg).build()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_states(buffer_device=torch.device(device))
    else:
        model.init_states(buffer_device=torch.device(device))
    if cfg.attn_backend == "flex":
        model.register_forward_pre_hook(FlexMasks(), with_kwargs=True)
    return model.to(dtype or DTYPES[cfg.dtype])


class FlexMasks:
    """The forward pre-hook of a flex-attention model: `attention_masks` for `model(tokens_BT)`
    when the caller gave none, as torchtitan's trainer builds them (`post_dataloading_process`:
    `model.get_attention_masks(positions)`, causal and per packed document). Our rows hold one
    sequence each (positions `0..T-1`), so a mask depends on `(B, T)` alone: the masks of the
    last `KEEP` shapes are kept (a global step's forwards repeat its micro-batches' shapes;
    `create_block_mask` costs milliseconds even compiled)."""

    KEEP = 16

    def __init__(self):
        self.masks: dict[tuple[int, int, torch.device], object] = {}

    def __call__(self, model: Qwen3Model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("attention_masks") is not None:
            return args, kwargs
        tokens_BT = args[0] if args else kwargs["tokens"]
        B, T = tokens_BT.shape
        key = (B, T, tokens_BT.device)
        if key not in self.masks:
            if len(self.masks) >= self.KEEP:
                del self.masks[next(iter(self.masks))]  # the oldest shape
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
            self.masks[key] = model.get_attention_masks(positions_BT)
        return args, {**kwargs, "attention_masks": self.masks[key]}


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


@contextlib.contextmanager
def hidden_states(model: Qwen3Model):
    """Within it, `model(tokens_BT)` returns the final norm's output `[B, T, D]` instead of the
    logits (torchtitan's `_skip_lm_head`, as its chunked loss uses it)."""
    model._skip_lm_head = True
    try:
        yield
    finally:
        model._skip_lm_head = False


def output_weight(model: Qwen3Model) -> torch.Tensor:
    """The output layer's weight `[V, D]` as the forward that just ran used it: under FSDP the
    unsharded compute-dtype parameter (torchtitan keeps the norm + output unit unsharded from
    its forward to its backward), else the parameter itself."""
    weight = model.lm_head.weight
    assert not isinstance(weight, DTensor), "the output layer is sharded: run a forward first"
    return weight


def policy_logprobs(
    model: Qwen3Model,
    inputs_BT: torch.Tensor,
    targets_BT: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 512,
    with_entropy: bool = False,
    with_mean: bool = False,
    mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p(targets) `[B, T]` under softmax(logits / temperature) in float32, differentiable;
    if asked, the full-vocabulary entropy `[B, T]` (a metric: no gradient) and the mean
    log-prob over the vocabulary `[B, T]` (differentiable: label smoothing's term). The
    logits are computed `chunk` positions at a time (`VocabChunks`), at the positions of
    `mask_BT` only if given (0 elsewhere: prompts and padding cost nothing). The same numbers
    as `token_logprobs(model(inputs_BT), ...)` and `entropy(...)`; bit for bit when the batch
    fits one chunk."""
    with hidden_states(model):
        h_BTD = model(inputs_BT)
    B, T, D = h_BTD.shape
    h_ND, targets_N = h_BTD.reshape(B * T, D), targets_BT.reshape(B * T)
    if mask_BT is not None:
        index_N = mask_BT.reshape(B * T).nonzero().squeeze(-1)
        h_ND, targets_N = h_ND.index_select(0, index_N), targets_N.index_select(0, index_N)
    outputs = VocabChunks.apply(
        h_ND, output_weight(model), targets_N, temperature, chunk, with_entropy, with_mean
    )
    wanted = (True, with_entropy, with_mean)
    out = []
    for x_N, want in zip(outputs, wanted, strict=True):
        if not want:
            out.append(None)
        elif mask_BT is None:
            out.append(x_N.view(B, T))
        else:
            full = x_N.new_zeros(B * T).index_put((index_N,), x_N)
            out.append(full.view(B, T))
    return tuple(out)


class _Scratch(threading.local):
    """The `[chunk, V]` buffers of `VocabChunks`, reused across chunks and calls on the CPU.

    torch's CPU allocator returns a large tensor's memory to the system when it is freed, so
    every fresh chunk of logits is new pages the kernel must fault in and zero: on the
    rehearsal's cold start (624 positions over 151,936 tokens a step) more time went to that
    (2.3 s of system time a step) than to the arithmetic. CUDA's caching allocator already
    reuses memory, so on a GPU these are plain `torch.empty`. One set per thread; a buffer
    is only ever a scratch area within one call, never returned.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        flat = self.buffers.get((name, dtype))
        if flat is None or flat.numel() < numel:
            flat = self.buffers[name, dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


_SCRATCH = _Scratch()


def _chunk_logprobs(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's float32 log-softmax `[n, V]` (a scratch buffer) and the targets'
    log-probs `[n]`, computed as `token_logprobs` computes them: logits in the weights'
    dtype, then float32 (dividing by a temperature of 1 changes no bit and is skipped)."""
    shape, device = (h_ND.shape[0], weight_VD.shape[0]), h_ND.device
    logits_NV = _SCRATCH.get("logits", shape, weight_VD.dtype, device)
    torch.mm(h_ND, weight_VD.t(), out=logits_NV)  # F.linear's kernel
    if logits_NV.dtype != torch.float32:
        logits_NV = _SCRATCH.get("logits32", shape, torch.float32, device).copy_(logits_NV)
    if temperature != 1.0:
        logits_NV = logits_NV.div_(temperature)
    logp_NV = torch.log_softmax(
        logits_NV, -1, out=_SCRATCH.get("logp", shape, torch.float32, device)
    )
    return logp_NV, logp_NV.gather(-1, targets_N.long().unsqueeze(-1)).squeeze(-1)


class VocabChunks(torch.autograd.Function):
    """Targets' log-probs (and the entropy, and the mean log-prob) of `h_ND @ weight_VD.T` a
    chunk of positions at a time. Forward: each chunk's logits and float32 log-softmax live
    only while the chunk is computed (in buffers reused from chunk to chunk, `_Scratch`);
    what is saved for the backward is `h_ND` and the weight (which the output layer keeps
    anyway). Backward: each chunk's log-softmax is recomputed and differentiated by the
    kernels autograd uses for `token_logprobs` (gather, log-softmax, temperature, cast,
    linear), so one chunk gives the full computation's gradients bit for bit; the chunks'
    input gradients are written in place and their weight gradients summed in float32 (cast
    to the weight's dtype once), so that bf16 weight gradients are not rounded once per chunk.

    Cost: one more output-layer matmul and log-softmax (the recomputation); memory: one
    chunk's `[chunk, V]` logits, log-softmax and gradient instead of the whole micro-batch's.
    """

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, temperature, chunk, with_entropy, with_mean):
        if chunk < 1:
            raise ValueError(f"learner.logprob_chunk: must be >= 1, got {chunk}")
        n, kw = h_ND.shape[0], {"dtype": torch.float32, "device": h_ND.device}
        logp_N = torch.empty(n, **kw)
        entropy_N = torch.empty(n if with_entropy else 0, **kw)
        mean_N = torch.empty(n if with_mean else 0, **kw)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logp_cV, logp_N[lo:hi] = _chunk_logprobs(
                h_ND[lo:hi], weight_VD, targets_N[lo:hi], temperature
            )
            if with_mean:
                mean_N[lo:hi] = logp_cV.mean(-1)
            if with_entropy:  # -(sum p log p) as `entropy` computes it
                p_cV = _SCRATCH.get("p", logp_cV.shape, torch.float32, h_ND.device)
                entropy_N[lo:hi] = -(torch.exp(logp_cV, out=p_cV).mul_(logp_cV).sum(-1))
        ctx.save_for_backward(h_ND, weight_VD, targets_N)
        ctx.temperature, ctx.chunk, ctx.with_mean = temperature, chunk, with_mean
        ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N, mean_N

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy, grad_mean_N):
        h_ND, weight_VD, targets_N = ctx.saved_tensors
        n, chunk = h_ND.shape[0], ctx.chunk
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w, grad_w32 = None, None
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            grad_cV = _logits_grad(
                h_ND[lo:hi],
                weight_VD,
                targets_N[lo:hi],
                ctx.temperature,
                grad_logp_N[lo:hi],
                grad_mean_N[lo:hi] if ctx.with_mean else None,
            )
            if need_h:  # the linear's backward, as autograd's mm backward computes it
                torch.mm(grad_cV, weight_VD, out=grad_h[lo:hi])
            if need_w:
                g = h_ND[lo:hi].t().mm(grad_cV).t()
                if lo == 0 and hi == n:
                    grad_w = g  # one chunk: the full computation's own gradient
                elif grad_w32 is None:
                    grad_w32 = g.float()
                else:
                    grad_w32 += g
        if grad_w32 is not None:
            grad_w = grad_w32.to(weight_VD.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _logits_grad(h_ND, weight_VD, targets_N, temperature, grad_logp_N, grad_mean_N):
    """d loss / d logits `[n, V]` of one chunk (a scratch buffer), in the weights' dtype,
    given the gradients of its targets' log-probs (and of its mean log-prob): the recomputed
    log-softmax's backward of a one-hot `g_y` (plus `g_mean / V` everywhere), divided by the
    temperature, by the kernels autograd uses for `token_logprobs`."""
    with torch.no_grad():
        logp_NV, _ = _chunk_logprobs(h_ND, weight_VD, targets_N, temperature)
        shape, device = logp_NV.shape, logp_NV.device
        upstream_NV = _SCRATCH.get("upstream", shape, torch.float32, device).zero_()
        if grad_mean_N is not None:
            upstream_NV += (grad_mean_N.float() / shape[-1]).unsqueeze(-1)
        index_N1 = targets_N.long().unsqueeze(-1)
        upstream_NV.scatter_add_(-1, index_N1, grad_logp_N.float().unsqueeze(-1))
        grad_NV = _SCRATCH.get("grad", shape, torch.float32, device)
        torch._log_softmax_backward_data(upstream_NV, logp_NV, -1, torch.float32, out=grad_NV)
        if temperature != 1.0:
            grad_NV = grad_NV.div_(temperature)
        if weight_VD.dtype == torch.float32:
            return grad_NV
        # the logits buffer is free again: the gradient in the weights' dtype goes there
        return _SCRATCH.get("logits", shape, weight_VD.dtype, device).copy_(grad_NV)
