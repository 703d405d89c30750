"""The embedded engine: Qwen3-MoE inference in plain PyTorch, with a KV cache, FP8 W8A8 and
routing traces. The CPU actor's engine (vLLM has its own model code; so does this).

Shape legend: B = rows (prompts x samples), T = positions in this forward, S = cached positions,
D = hidden size, V = vocabulary, H = query heads, J = key/value heads, Dh = head size,
E = experts, K = experts per token, F = expert hidden size, L = MoE layers, N = tokens in this
forward (B * T), R = routed (token, expert) pairs (N * K).

The model is Hugging Face's `Qwen3MoeForCausalLM`, read from the checkpoint directory the
learner exports (config.json, read by `async_rl.hf_config`, and safetensors with per-expert
keys): RMSNorm, q/k norm, RoPE, grouped-query attention (SDPA), every layer a sparse MoE with a
softmax router, top-k, renormalised top-k weights (`norm_topk_prob`), SiLU-gated experts,
untied lm_head.

- Batching: prompts are left-padded; padding is masked out of attention and every row's RoPE
  positions count from its own first token, so a row's result does not depend on the other
  rows. The G samples of a prompt share its prefill (the KV cache is repeated G times), and a
  row that finished leaves the batch (the caches are compacted).
- Precision (`quantization`): `fp32`; `bf16` (weights and activations, as vLLM's
  `dtype="bfloat16"`); `fp8` = W8A8 as vLLM's `quantization="fp8"`: the attention projections
  (q, k, v, o) and the experts hold float8 e4m3 weights with one scale per output channel
  (amax / 448), and activations are quantized to e4m3 per token before each of those matmuls.
  The router gate, embeddings, norms, attention itself and lm_head stay in high precision, as in
  vLLM, whose Qwen3-MoE builds the gate with `quant_config=None` and whose `Fp8Config` quantizes
  only `LinearBase` layers and `FusedMoE` (the lm_head is a `ParallelLMHead`). Unlike vLLM, the
  high-precision part computes in fp32, not bf16: CPUs without bf16 units run bf16 matmuls about
  10x slower. So `fp8` here is the quantization error alone; vLLM's adds bf16's (about half as
  large again in KL on the tiny model, `benchmarks/fp8_mismatch.py`).
- FP8 matmuls are emulated: e4m3 values dequantized and multiplied in fp32, which is what
  `torch._scaled_mm` computes with row-wise scales (it runs on CPU in torch 2.13 and agrees to
  the last bit on these shapes, but is 1.2-4x slower, the most on decode-sized batches).
- Weights: `load_weights` takes a checkpoint directory, or (for the model already served)
  tensors by Hugging Face name, as the Ray weight store fetches them.
- Routing: the top-k expert ids (the router's sorted order) of every MoE layer for every position
  run forward: the prompt and every sampled token but the last, `[P + C - 1, L, K]`.
- Behaviour log-probs are those of the distribution sampled from: softmax(logits / T),
  restricted to the top-p nucleus and renormalised. Temperature 0 is greedy (evaluation and
  tests); its log-probs are then those of softmax(logits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from actors.engine import Generation, SamplingParams, capabilities_of
from async_rl.hf_config import ModelSpec, check_tensors, read_model_spec
from async_rl.weights import WeightsSource

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float32}
# ---------------------------------------------------------------------------------------------
# Checkpoint


def read_tensors(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (single or sharded safetensors), checked against `spec`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors |= load_file(path / name)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path / name}: cannot read safetensors weights ({e})") from None
    return check_tensors(tensors, spec, str(path))


# ---------------------------------------------------------------------------------------------
# Numerics


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (amax / 448) along the last dim: per row / output channel."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quant_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic e4m3 quantization of activations, returned dequantized (fp32)."""
    q, scale = quantize_fp8(x_ND)
    return q.float() * scale


class Weight:
    """A matmul weight `[..., O, I]` in the engine's precision.

    In fp8, `data` holds the e4m3 values and `scale` `[..., O, 1]` one float32 scale per output
    channel; `matrix` is their product in fp32, the operand of the emulated W8A8 matmul.
    """

    def __init__(self, weight: torch.Tensor, quantization: str, device: torch.device):
        self.fp8 = quantization == "fp8"
        if self.fp8:
            self.data, self.scale = quantize_fp8(weight.to(device))
            self.matrix = self.data.float() * self.scale
        else:
            self.data, self.scale = weight.to(device, DTYPES[quantization]), None
            self.matrix = self.data


def linear(x: torch.Tensor, w: Weight, index: int | None = None) -> torch.Tensor:
    """x W^T (W = `w.matrix[index]` for stacked expert weights); W8A8 when `w` is fp8."""
    matrix = w.matrix if index is None else w.matrix[index]
    return F.linear(fake_quant_rows(x) if w.fp8 else x, matrix)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Qwen3 RMSNorm: normalise in fp32, cast back, scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x_BHTD: torch.Tensor, cos_B1TD: torch.Tensor, sin_B1TD: torch.Tensor) -> torch.Tensor:
    """RoPE, Hugging Face's rotate-half layout."""
    half = x_BHTD.shape[-1] // 2
    rotated = torch.cat((-x_BHTD[..., half:], x_BHTD[..., :half]), dim=-1)
    return x_BHTD * cos_B1TD + rotated * sin_B1TD


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [D]
    ffn_norm: torch.Tensor  # [D]
    qkv: Weight  # [(H + 2J) Dh, D], q, k and v stacked (per-channel scales are unaffected)
    o: Weight  # [D, H Dh]
    q_norm: torch.Tensor  # [Dh]
    k_norm: torch.Tensor  # [Dh]
    gate: torch.Tensor  # [E, D] router, never quantized
    gate_up: Weight  # [E, 2F, D], gate_proj and up_proj stacked
    down: Weight  # [E, D, F]


class Model:
    """The weights of one checkpoint and the forward pass over a KV cache."""

    def __init__(
        self,
        spec: ModelSpec,
        t: dict[str, torch.Tensor],
        quantization: str,
        device: torch.device,
    ):
        """`t`: checked Hugging Face tensors (`check_tensors`); quantized here in fp8."""
        self.spec = spec
        dtype = DTYPES[quantization]
        self.dtype, self.device = dtype, device

        def hp(key: str) -> torch.Tensor:  # high precision: embeddings, norms, router, lm_head
            return t[key].to(device, dtype)

        self.embed = hp("model.embed_tokens.weight")
        self.lm_head = self.embed if spec.tie_embeddings else hp("lm_head.weight")
        self.norm = hp("model.norm.weight")
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            experts = [f"{p}mlp.experts.{e}." for e in range(spec.num_experts)]
            gate_up = torch.stack(
                [torch.cat([t[e + "gate_proj.weight"], t[e + "up_proj.weight"]]) for e in experts]
            )
            down = torch.stack([t[e + "down_proj.weight"] for e in experts])
            qkv = torch.cat([t[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            self.layers.append(
                Layer(
                    attn_norm=hp(p + "input_layernorm.weight"),
                    ffn_norm=hp(p + "post_attention_layernorm.weight"),
                    qkv=Weight(qkv, quantization, device),
                    o=Weight(t[p + "self_attn.o_proj.weight"], quantization, device),
                    q_norm=hp(p + "self_attn.q_norm.weight"),
                    k_norm=hp(p + "self_attn.k_norm.weight"),
                    gate=hp(p + "mlp.gate.weight"),
                    gate_up=Weight(gate_up, quantization, device),
                    down=Weight(down, quantization, device),
                )
            )
        half = torch.arange(0, spec.head_dim, 2, device=device, dtype=torch.float32)
        self.inv_freq = 1.0 / (spec.rope_theta ** (half / spec.head_dim))

    def new_cache(self, rows: int, positions: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, key and value caches `[B, J, S, Dh]`."""
        shape = (rows, self.spec.num_kv_heads, positions, self.spec.head_dim)
        return [
            tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in "kv")
            for _ in self.layers
        ]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        positions_BT: torch.Tensor,
        mask_B1TS: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `tokens_BT` (cache columns `start:start + T`); hidden states `[B, T, D]` after
        the final norm, and routing `[B, T, L, K]`. `mask_B1TS` says which cached positions
        (S = start + T) each token attends to."""
        s = self.spec
        x_BTD = self.embed[tokens_BT]
        freqs = positions_BT.float()[..., None] * self.inv_freq  # [B, T, Dh / 2]
        angles_B1TD = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = angles_B1TD.cos().to(self.dtype), angles_B1TD.sin().to(self.dtype)
        routing = []
        for layer, kv_cache in zip(self.layers, cache, strict=True):
            h_BTD = rms_norm(x_BTD, layer.attn_norm, s.norm_eps)
            x_BTD = x_BTD + self._attention(layer, h_BTD, cos, sin, mask_B1TS, kv_cache, start)
            h_BTD = rms_norm(x_BTD, layer.ffn_norm, s.norm_eps)
            moe_ND, ids_NK = self._moe(layer, h_BTD.reshape(-1, s.dim))
            x_BTD = x_BTD + moe_ND.view_as(x_BTD)
            routing.append(ids_NK.view(*tokens_BT.shape, s.top_k))
        return rms_norm(x_BTD, self.norm, s.norm_eps), torch.stack(routing, dim=2)

    def logits(self, h_BD: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[B, V]` (float32) from final hidden states."""
        return F.linear(h_BD, self.lm_head).float()

    def _attention(self, layer, h_BTD, cos, sin, mask_B1TS, kv_cache, start):
        s = self.spec
        B, T, _ = h_BTD.shape
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = linear(h_BTD, layer.qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
        q_BHTD = rms_norm(q.view(B, T, -1, s.head_dim), layer.q_norm, s.norm_eps).transpose(1, 2)
        k_BJTD = rms_norm(k.view(B, T, -1, s.head_dim), layer.k_norm, s.norm_eps).transpose(1, 2)
        keys, values = kv_cache
        keys[:, :, start : start + T] = rotate(k_BJTD, cos, sin)
        values[:, :, start : start + T] = v.view(B, T, -1, s.head_dim).transpose(1, 2)
        out_BHTD = F.scaled_dot_product_attention(
            rotate(q_BHTD, cos, sin),
            keys[:, :, : start + T],
            values[:, :, : start + T],
            attn_mask=mask_B1TS,
            enable_gqa=True,
        )
        return linear(out_BHTD.transpose(1, 2).reshape(B, T, q_dim), layer.o)

    def _moe(self, layer: Layer, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse MoE: softmax router, top-k, SiLU-gated experts; output and ids `[N, K]`."""
        s = self.spec
        probs_NE = torch.softmax(F.linear(x_ND, layer.gate).float(), dim=-1)
        weights_NK, ids_NK = probs_NE.topk(s.top_k, dim=-1)  # sorted, as HF and vLLM
        if s.norm_topk_prob:
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        # Group the (token, expert) pairs by expert; each expert runs one matmul on its slice.
        flat_R = ids_NK.reshape(-1)
        order_R = flat_R.argsort(stable=True)
        token_R = order_R // s.top_k
        counts = torch.bincount(flat_R, minlength=s.num_experts).tolist()
        # Per-token activation scales do not depend on the expert: quantize the input once.
        x_in = fake_quant_rows(x_ND) if layer.gate_up.fp8 else x_ND
        x_RD = x_in.index_select(0, token_R)
        h_RF = x_RD.new_empty(len(token_R), s.moe_hidden_dim)
        y_RD = x_RD.new_empty(len(token_R), s.dim)
        spans = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                spans.append((e, start, start + n))
                start += n
        for e, a, b in spans:
            gate_RF, up_RF = F.linear(x_RD[a:b], layer.gate_up.matrix[e]).chunk(2, dim=-1)
            h_RF[a:b] = F.silu(gate_RF) * up_RF
        if layer.down.fp8:
            h_RF = fake_quant_rows(h_RF)
        for e, a, b in spans:
            y_RD[a:b] = F.linear(h_RF[a:b], layer.down.matrix[e])
        y_RD = y_RD * weights_NK.reshape(-1)[order_R, None].to(y_RD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_R, y_RD), ids_NK


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(
    logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ids `[B]` and their log-probs `[B]` under the distribution sampled from."""
    if params.temperature == 0:
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        ids_B = logp_BV.argmax(-1)
        return ids_B, logp_BV.gather(-1, ids_B[:, None]).squeeze(-1)
    logp_BV = torch.log_softmax(logits_BV / params.temperature, dim=-1)
    if params.top_p < 1:
        # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
        sorted_BV, order_BV = logp_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.exp()
        outside = (probs_BV.cumsum(-1) - probs_BV) >= params.top_p
        logp_BV = logp_BV.masked_fill(outside.scatter(-1, order_BV, outside), float("-inf"))
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    ids_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return ids_B, logp_BV.gather(-1, ids_B[:, None]).squeeze(-1)


def check_request(
    prompts: list[list[int]], params: SamplingParams, num_samples: int, spec: ModelSpec
) -> None:
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    for i, p in enumerate(prompts):
        if not 0 < len(p) < spec.max_positions:
            raise ValueError(
                f"prompts[{i}]: length {len(p)}, must be 1..{spec.max_positions - 1} "
                f"(max_position_embeddings = {spec.max_positions})"
            )
        if min(p) < 0 or max(p) >= spec.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in 0..{spec.vocab_size - 1}")
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if not params.temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p: must lie in (0, 1], got {params.top_p}")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {params.max_new_tokens}")


@dataclass
class Outputs:
    """Per-row results of a decode (rows = prompts x samples, prompt-major), on the CPU."""

    tokens: torch.Tensor  # [B, C_max] sampled ids
    logprobs: torch.Tensor  # [B, C_max] behaviour log-probs
    routing: torch.Tensor  # [B, C_max, L, K] routing of each sampled token run forward
    logits: torch.Tensor | None  # [B, C_max, V] the distributions sampled from (before T, top-p)
    num_tokens: torch.Tensor  # [B] completion lengths
    stopped: torch.Tensor  # [B] eos sampled


class EmbeddedEngine:
    """The `Engine` of the CPU actor (it runs on CUDA too): see the module docstring."""

    def __init__(self, checkpoint_dir: str | Path, quantization: str = "fp8", device: str = "cpu"):
        if not isinstance(checkpoint_dir, (str, Path)):
            raise ValueError(
                "checkpoint_dir: the first weights must be a checkpoint directory (config.json "
                f"says what model to build), got {type(checkpoint_dir).__name__}"
            )
        self.capabilities = capabilities_of("embedded", device)
        if quantization not in self.capabilities.quantizations:
            raise ValueError(
                f"quantization: {quantization!r} is not offered; choose from "
                f"{', '.join(map(repr, self.capabilities.quantizations))}"
            )
        self.quantization = quantization
        self.device = torch.device(device)
        self.version = 0
        self.model: Model | None = None
        self.load_weights(checkpoint_dir, 0)

    @property
    def spec(self) -> ModelSpec:
        return self._model().spec

    def load_weights(self, source: WeightsSource, version: int) -> None:
        """Swap to a checkpoint directory, or to Hugging Face tensors of the model already
        served (the Ray weight store's `fetch`), quantized in fp8; on error nothing changes."""
        if isinstance(source, (str, Path)):
            spec = read_model_spec(source)
            tensors = read_tensors(Path(source), spec)
        else:
            spec = self._model().spec
            tensors = check_tensors(dict(source), spec, f"weights of version {version}")
        with torch.inference_mode():
            model = Model(spec, tensors, self.quantization, self.device)
        self.model, self.version = model, version

    def close(self) -> None:
        self.model = None

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample."""
        return self.generate_with_logits(prompts, params, num_samples, keep_logits=False)[0]

    @torch.inference_mode()
    def generate_with_logits(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        num_samples: int,
        keep_logits: bool = True,
    ) -> tuple[list[list[Generation]], list[list[torch.Tensor]] | None]:
        """`generate`, and (if `keep_logits`) each completion's logits `[C, V]` in float32 before
        temperature and top-p: the distributions its tokens were sampled from."""
        model = self._model()
        check_request(prompts, params, num_samples, model.spec)
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        lens_P = torch.tensor([len(p) for p in prompts], device=self.device)
        logits_PV, cache, routing_PTLK = self._prefill(model, prompts, params.max_new_tokens)
        out = self._decode(
            model, logits_PV, cache, lens_P, num_samples, params, generator, keep_logits
        )
        pad_P = (lens_P.max() - lens_P).tolist()
        np_dtype = model.spec.routing.numpy_dtype
        prompt_routing = routing_PTLK.cpu().numpy().astype(np_dtype)
        decode_routing = out.routing.numpy().astype(np_dtype)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        groups, logits = [], []
        for i, pad in enumerate(pad_P):
            rows = range(i * num_samples, (i + 1) * num_samples)
            counts = [int(out.num_tokens[r]) for r in rows]
            groups.append(
                [
                    Generation(
                        tokens=tokens[r][:c],
                        logprobs=logprobs[r][:c],
                        routing=np.concatenate(
                            [prompt_routing[i, pad:], decode_routing[r, : c - 1]]
                        ),
                        finish_reason="stop" if out.stopped[r] else "length",
                    )
                    for r, c in zip(rows, counts, strict=True)
                ]
            )
            if out.logits is not None:
                logits.append([out.logits[r, :c] for r, c in zip(rows, counts, strict=True)])
        return groups, logits if keep_logits else None

    def _prefill(self, model: Model, prompts: list[list[int]], max_new_tokens: int):
        """Run the distinct prompts, left-padded to a common width T: last logits `[P, V]`, the
        KV cache (room for `max_new_tokens` more) and the routing `[P, T, L, K]`."""
        lens_P = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lens_P.max())
        tokens_PT = torch.full((len(prompts), width), model.spec.pad_id, device=self.device)
        for i, p in enumerate(prompts):
            tokens_PT[i, width - len(p) :] = torch.tensor(p, device=self.device)
        columns_T = torch.arange(width, device=self.device)
        pad_P1 = (width - lens_P)[:, None]
        real_PT = columns_T >= pad_P1
        causal_TT = columns_T[None, :] <= columns_T[:, None]
        # A padding position attends to itself only, so that no row of SDPA is fully masked.
        mask_P1TT = (
            causal_TT & real_PT[:, None, :] | torch.eye(width, dtype=torch.bool, device=self.device)
        )[:, None]
        cache = model.new_cache(len(prompts), width + max_new_tokens)
        positions_PT = (columns_T - pad_P1).clamp(min=0)
        hidden_PTD, routing_PTLK = model.forward(tokens_PT, positions_PT, mask_P1TT, cache, 0)
        return model.logits(hidden_PTD[:, -1]), cache, routing_PTLK

    def _decode(
        self, model, logits_PV, cache, lens_P, G, params, generator, keep_logits
    ) -> Outputs:
        """Sample G completions per prompt, one token per step for every live row; a row that
        sampled eos or reached its length limit leaves the batch (caches compacted)."""
        spec, steps = model.spec, params.max_new_tokens
        width, rows = int(lens_P.max()), len(lens_P) * G
        logits_BV = logits_PV.repeat_interleave(G, dim=0)
        cache = [(k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)) for k, v in cache]
        lens_B = lens_P.repeat_interleave(G)
        pad_B = width - lens_B
        limit_B = (spec.max_positions - lens_B).clamp(max=steps)  # the context must not overflow
        out = Outputs(
            tokens=torch.zeros(rows, steps, dtype=torch.long),
            logprobs=torch.zeros(rows, steps),
            routing=torch.zeros(rows, steps, spec.num_layers, spec.top_k, dtype=torch.long),
            logits=torch.zeros(rows, steps, spec.vocab_size) if keep_logits else None,
            num_tokens=torch.zeros(rows, dtype=torch.long),
            stopped=torch.zeros(rows, dtype=torch.bool),
        )
        eos_ids = torch.tensor(spec.eos_ids, device=self.device)
        live_B = torch.arange(rows, device=self.device)
        for step in range(steps):
            ids_B, logp_B = sample_tokens(logits_BV, params, generator)
            live = live_B.cpu()
            out.tokens[live, step], out.logprobs[live, step] = ids_B.cpu(), logp_B.cpu()
            if out.logits is not None:
                out.logits[live, step] = logits_BV.cpu()
            out.num_tokens[live] += 1
            eos_B = torch.isin(ids_B, eos_ids)
            out.stopped[live] = eos_B.cpu()
            keep_B = ~eos_B & (step + 1 < limit_B)
            if not keep_B.any():
                break
            if not keep_B.all():
                live_B, ids_B, lens_B = live_B[keep_B], ids_B[keep_B], lens_B[keep_B]
                pad_B, limit_B = pad_B[keep_B], limit_B[keep_B]
                cache = [(k[keep_B], v[keep_B]) for k, v in cache]
            column = width + step
            mask_B11S = (torch.arange(column + 1, device=self.device) >= pad_B[:, None])[
                :, None, None
            ]
            positions_B1 = (lens_B + step)[:, None]
            hidden_B1D, routing_B1LK = model.forward(
                ids_B[:, None], positions_B1, mask_B11S, cache, column
            )
            out.routing[live_B.cpu(), step] = routing_B1LK[:, 0].cpu()
            logits_BV = model.logits(hidden_B1D[:, 0])
        return out

    def _model(self) -> Model:
        if self.model is None:
            raise RuntimeError("the engine is closed")
        return self.model
