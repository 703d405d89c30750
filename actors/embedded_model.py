"""The embedded engine's model: Qwen3-MoE in plain PyTorch, FP8 W8A8 emulation, a KV cache.

Shape legend: B = rows, T = positions in this forward, S = cache positions, D = hidden size,
V = vocabulary, H = query heads, J = key/value heads, A = query and key heads (H + J),
Dh = head size, E = experts, K = experts per token, F = expert hidden size, L = MoE layers,
N = tokens in this forward (B * T), R = routed (token, expert) pairs (N * K).

The model is Hugging Face's `Qwen3MoeForCausalLM`, read from the checkpoint directory the
learner exports (config.json, read by `async_rl.hf_config`, and safetensors with per-expert
keys): RMSNorm, q/k norm, RoPE, grouped-query attention (SDPA), every layer a sparse MoE with a
softmax router, top-k, renormalised top-k weights (`norm_topk_prob`), SiLU-gated experts,
untied lm_head.

- KV cache: per layer, keys and values `[B, J, S, Dh]`, one row per sequence; a token at
  position p (its RoPE position, counted from the row's first token) is cached at index p and
  attends to indices 0..p of its row. Rows are therefore independent: each has its own length,
  a row can join or leave a batch between forwards (continuous batching, `actors.embedded`),
  and right padding never reaches a real token.
- Precision (`quantization`): `fp32`; `bf16` (weights and activations, as vLLM's
  `dtype="bfloat16"`); `fp8` = W8A8 as vLLM's `quantization="fp8_per_channel"` (what the vLLM
  engine runs on CUDA: the project's one FP8 scheme): the attention projections (q, k, v, o)
  and the experts hold float8 e4m3 weights with one scale per output channel (amax / 448), and
  activations are quantized to e4m3 per token (dynamically) before each of those matmuls.
  The router gate, embeddings, norms, attention itself and lm_head stay in high precision, as in
  vLLM, whose Qwen3-MoE builds the gate with `quant_config=None` and whose `Fp8Config` quantizes
  only `LinearBase` layers and `FusedMoE` (the lm_head is a `ParallelLMHead`). Unlike vLLM, the
  high-precision part computes in fp32, not bf16: CPUs without bf16 units run bf16 matmuls about
  10x slower. So `fp8` here is the quantization error alone; vLLM's adds bf16's (about half as
  large again in KL on the tiny model, `benchmarks/fp8_mismatch.py`).
- FP8 matmuls are emulated: e4m3 values dequantized and multiplied in fp32, which is what
  `torch._scaled_mm` computes with row-wise scales (it runs on CPU in torch 2.13 and agrees to
  the last bit on these shapes, but is 1.2-4x slower, the most on decode-sized batches).
- Routing: the top-k expert ids (the router's sorted order) of every MoE layer for every
  position run forward.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from async_rl.choices import Quantization
from async_rl.hf_config import ModelSpec, check_tensors

Cache = list[tuple[torch.Tensor, torch.Tensor]]

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


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """The float32 value of each of the 256 e4m3 bit patterns."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values times their scales, in float32. A table lookup: exactly `q.float()`, which
    converts element by element on CPU (3x slower here, a fifth of a decode step)."""
    values = _e4m3_values(q.device).index_select(0, q.view(torch.uint8).flatten().int())
    return values.view(q.shape) * scale


def fake_quant_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic e4m3 quantization of activations, returned dequantized (fp32)."""
    return dequantize_fp8(*quantize_fp8(x_ND))


class Weight:
    """A matmul weight `[..., O, I]` in the engine's precision.

    In fp8, `data` holds the e4m3 values and `scale` `[..., O, 1]` one float32 scale per output
    channel; `matrix` is their product in fp32, the operand of the emulated W8A8 matmul.
    """

    def __init__(self, weight: torch.Tensor, quantization: Quantization, device: torch.device):
        self.fp8 = quantization == "fp8"
        if self.fp8:
            self.data, self.scale = quantize_fp8(weight.to(device))
            self.matrix = dequantize_fp8(self.data, self.scale)
        else:
            self.data, self.scale = weight.to(device, DTYPES[quantization]), None
            self.matrix = self.data


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x W^T; W8A8 when `w` is fp8."""
    return F.linear(fake_quant_rows(x) if w.fp8 else x, w.matrix)


def grouped_linear(x_RI: torch.Tensor, w: Weight, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (expert e's rows end at `ends_E[e]`) times their expert's W^T, in
    one call (activations already quantized for fp8)."""
    return torch._grouped_mm(x_RI, w.matrix.transpose(-2, -1), offs=ends_E)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Qwen3 RMSNorm: normalise in fp32, cast back, scale."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


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
    qk_norm: torch.Tensor  # [A, Dh]: q_norm's weight for each query head, k_norm's for each key
    gate: torch.Tensor  # [E, D] router, never quantized
    gate_up: Weight  # [E, 2F, D], gate_proj and up_proj stacked
    down: Weight  # [E, D, F]


class Model:
    """The weights of one checkpoint and the forward pass over a KV cache."""

    def __init__(
        self,
        spec: ModelSpec,
        t: dict[str, torch.Tensor],
        quantization: Quantization,
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
                    qk_norm=torch.cat(
                        [
                            hp(p + "self_attn.q_norm.weight").expand(spec.num_heads, -1),
                            hp(p + "self_attn.k_norm.weight").expand(spec.num_kv_heads, -1),
                        ]
                    ),
                    gate=hp(p + "mlp.gate.weight"),
                    gate_up=Weight(gate_up, quantization, device),
                    down=Weight(down, quantization, device),
                )
            )
        half = torch.arange(0, spec.head_dim, 2, device=device, dtype=torch.float32)
        self.inv_freq = 1.0 / (spec.rope_theta ** (half / spec.head_dim))

    def new_cache(self, rows: int) -> Cache:
        """Per layer, key and value caches `[B, J, S, Dh]` for `rows` rows of the model's
        whole context (S = max_position_embeddings)."""
        shape = (rows, self.spec.num_kv_heads, self.spec.max_positions, self.spec.head_dim)
        return [
            tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in "kv")
            for _ in self.layers
        ]

    def forward(
        self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, cache: Cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `tokens_BT` at their positions `positions_BT` (each row's own, from 0), caching
        them at those indices of `cache`; hidden states `[B, T, D]` after the final norm, and
        routing `[B, T, L, K]`. A token attends to its row's cache indices 0..its position."""
        s = self.spec
        x_BTD = self.embed[tokens_BT]
        freqs = positions_BT.float()[..., None] * self.inv_freq  # [B, T, Dh / 2]
        angles_B1TD = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = angles_B1TD.cos().to(self.dtype), angles_B1TD.sin().to(self.dtype)
        width = int(positions_BT.max()) + 1  # cache indices any token here attends to
        columns_S = torch.arange(width, device=tokens_BT.device)
        mask_B1TS = (columns_S <= positions_BT[..., None])[:, None]
        rows_BT = torch.arange(tokens_BT.shape[0], device=tokens_BT.device)[:, None]
        where = (rows_BT.expand_as(positions_BT), positions_BT, width)
        routing = []
        for layer, kv_cache in zip(self.layers, cache, strict=True):
            h_BTD = rms_norm(x_BTD, layer.attn_norm, s.norm_eps)
            x_BTD = x_BTD + self._attention(layer, h_BTD, cos, sin, mask_B1TS, kv_cache, where)
            h_BTD = rms_norm(x_BTD, layer.ffn_norm, s.norm_eps)
            moe_ND, ids_NK = self._moe(layer, h_BTD.reshape(-1, s.dim))
            x_BTD = x_BTD + moe_ND.view_as(x_BTD)
            routing.append(ids_NK.view(*tokens_BT.shape, s.top_k))
        return rms_norm(x_BTD, self.norm, s.norm_eps), torch.stack(routing, dim=2)

    def logits(self, h_BD: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[B, V]` (float32) from final hidden states."""
        return F.linear(h_BD, self.lm_head).float()

    def _attention(self, layer, h_BTD, cos, sin, mask_B1TS, kv_cache, where):
        s = self.spec
        B, T, _ = h_BTD.shape
        rows_BT, positions_BT, width = where
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        qk, v = linear(h_BTD, layer.qkv).split([q_dim + kv_dim, kv_dim], dim=-1)
        # the query and key heads normalised and rotated together
        qk_BTAD = rms_norm(qk.view(B, T, -1, s.head_dim), layer.qk_norm, s.norm_eps)
        qk_BATD = rotate(qk_BTAD.transpose(1, 2), cos, sin)
        q_BHTD, k_BJTD = qk_BATD.split([s.num_heads, s.num_kv_heads], dim=1)
        keys, values = kv_cache
        # advanced indices around a slice: the indexed view is [B, T, J, Dh]
        keys[rows_BT, :, positions_BT] = k_BJTD.transpose(1, 2)
        values[rows_BT, :, positions_BT] = v.view(B, T, -1, s.head_dim)
        out_BHTD = F.scaled_dot_product_attention(
            q_BHTD,
            keys[:, :, :width],
            values[:, :, :width],
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
        ends_E = torch.bincount(flat_R, minlength=s.num_experts).cumsum(0).to(torch.int32)
        # Per-token activation scales do not depend on the expert: quantize the input once.
        x_in = fake_quant_rows(x_ND) if layer.gate_up.fp8 else x_ND
        x_RD = x_in.index_select(0, token_R)
        gate_RF, up_RF = grouped_linear(x_RD, layer.gate_up, ends_E).chunk(2, dim=-1)
        h_RF = F.silu(gate_RF) * up_RF
        if layer.down.fp8:
            h_RF = fake_quant_rows(h_RF)
        y_RD = grouped_linear(h_RF, layer.down, ends_E)
        y_RD = y_RD * weights_NK.reshape(-1)[order_R, None].to(y_RD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_R, y_RD), ids_NK


# ---------------------------------------------------------------------- patching in place
def patch_model(model: Model, host: dict[str, torch.Tensor], name: str, indices) -> None:
    """Bring what `model` made of Hugging Face tensor `name` up to `host[name]` (patched
    already) where the flat `indices` changed (None: everywhere): high-precision tensors
    entry by entry, matmul weights row by row (fp8: those rows requantized, each row's scale
    being its own, so the result is what quantizing the whole new tensor gives)."""
    s, source = model.spec, host[name]
    if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        targets = {"model.norm.weight": [model.norm]}.get(name)
        if targets is None:
            embed = name == "model.embed_tokens.weight"
            targets = [model.embed] if embed else [model.lm_head]
            if s.tie_embeddings and embed:
                targets.append(model.lm_head)
        return _copy_entries(targets, source, indices)
    layer_index, _, rest = name.removeprefix("model.layers.").partition(".")
    layer = model.layers[int(layer_index)]
    plain = {
        "input_layernorm.weight": layer.attn_norm,
        "post_attention_layernorm.weight": layer.ffn_norm,
        "mlp.gate.weight": layer.gate,
    }
    if rest in plain:
        return _copy_entries([plain[rest]], source, indices)
    p = f"model.layers.{layer_index}."
    if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        q, k = host[p + "self_attn.q_norm.weight"], host[p + "self_attn.k_norm.weight"]
        layer.qk_norm.copy_(torch.cat([q.expand(s.num_heads, -1), k.expand(s.num_kv_heads, -1)]))
        return None
    rows = _rows(source, indices)
    q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    offsets = {"q_proj": 0, "k_proj": q_rows, "v_proj": q_rows + kv_rows}
    if rest.startswith("self_attn."):
        proj = rest.split(".")[1]
        weight, offset = (layer.o, 0) if proj == "o_proj" else (layer.qkv, offsets[proj])
        return _requantize(weight, (), rows + offset, source[rows])
    expert, proj = rest.removeprefix("mlp.experts.").split(".")[:2]
    weight = layer.down if proj == "down_proj" else layer.gate_up
    offset = s.moe_hidden_dim if proj == "up_proj" else 0
    return _requantize(weight, (int(expert),), rows + offset, source[rows])


def _copy_entries(targets: list[torch.Tensor], source: torch.Tensor, indices) -> None:
    for target in targets:
        if indices is None:
            target.copy_(source)
        else:
            flat = target.view(-1)
            index = indices.to(flat.device)
            flat[index] = source.reshape(-1)[indices].to(flat.device, flat.dtype)


def _rows(source: torch.Tensor, indices) -> torch.Tensor:
    """The output channels (rows) of a `[O, I]` matmul weight the flat `indices` touch."""
    if indices is None:
        return torch.arange(source.shape[0])
    return torch.unique(indices // source.shape[1])


def _requantize(weight: Weight, lead: tuple, rows: torch.Tensor, new_rows: torch.Tensor):
    """Rows `rows` of `weight` (of expert `lead`, if any) set to `new_rows` `[R, I]`."""
    rows = rows.to(weight.data.device)
    if weight.fp8:
        data, scale = quantize_fp8(new_rows.to(weight.data.device))
        weight.data[(*lead, rows)] = data
        weight.scale[(*lead, rows)] = scale
        weight.matrix[(*lead, rows)] = dequantize_fp8(data, scale)
    else:
        weight.data[(*lead, rows)] = new_rows.to(weight.data.device, weight.data.dtype)
