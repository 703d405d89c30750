"""Routing record and replay for the MoE layers (R2 and R3 of Zheng et al. 2025, section 3.2).

Shape legend: B = batch, T = tokens, L = MoE layers, K = experts per token, E = experts.

    hooks = RoutingHooks(model)
    with hooks.record() as trace:          # R2: the proximal pass records the learner's routing
        logits = model(tokens)
    trace.experts                          # [B, T, L, K], `RoutingSpec.torch_dtype`
    with hooks.replay(trace.experts):      # every update forward then reuses those experts
        logits = model(tokens)

Replay fixes only the discrete top-k choice. The gate weights are recomputed from the current
router scores at the replayed experts (`scores.gather(-1, replayed)`, then the router's usual
normalisation), so the router keeps receiving gradients. Record and replay can be combined
(`record()` inside `replay()`): the recorded ids are then the replayed ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from async_rl.types import RoutingSpec
from learner.model import moe_routers


@dataclass
class RoutingTrace:
    """Filled by `RoutingHooks.record()`: `experts` is `[B, T, L, K]` once the forward ran."""

    per_layer: list[torch.Tensor | None] = field(default_factory=list)
    dtype: torch.dtype = torch.uint8

    @property
    def experts(self) -> torch.Tensor:
        if any(t is None for t in self.per_layer):
            raise RuntimeError("no forward pass ran inside RoutingHooks.record()")
        return torch.stack(self.per_layer, dim=2).to(self.dtype)


class RoutingHooks:
    """Forward hooks on every MoE router of a model; off unless `record()`/`replay()` is active."""

    def __init__(self, model: torch.nn.Module):
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError("the model has no MoE layers to record or replay")
        self.num_experts = self.routers[0].num_experts
        self.top_k = self.routers[0].top_k
        self._trace: RoutingTrace | None = None
        self._replay_BTLK: torch.Tensor | None = None
        self._handles = [
            router.register_forward_hook(self._make_hook(layer))
            for layer, router in enumerate(self.routers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    @property
    def spec(self) -> RoutingSpec:
        return RoutingSpec(self.num_layers, self.top_k, self.num_experts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def record(self) -> Iterator[RoutingTrace]:
        trace = RoutingTrace([None] * self.num_layers, self.spec.torch_dtype)
        self._trace = trace
        try:
            yield trace
        finally:
            self._trace = None

    @contextlib.contextmanager
    def replay(self, experts_BTLK: torch.Tensor) -> Iterator[None]:
        if experts_BTLK.dim() != 4 or experts_BTLK.shape[2:] != (self.num_layers, self.top_k):
            raise ValueError(
                f"routing to replay must be [B, T, {self.num_layers}, {self.top_k}],"
                f" got {list(experts_BTLK.shape)}"
            )
        if experts_BTLK.dtype.is_floating_point:
            raise ValueError(f"routing to replay must hold integer ids, got {experts_BTLK.dtype}")
        ids = experts_BTLK.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"replayed expert ids must lie in 0..{self.num_experts - 1}")
        if self.top_k > 1 and (ids.sort(-1).values.diff(dim=-1) == 0).any():
            # torchtitan counts tokens per expert from a one-hot map: a repeated id would be
            # counted once but fill two slots, shifting every later token to a wrong expert.
            raise ValueError("replayed routing repeats an expert within a token's top-k")
        self._replay_BTLK = ids
        try:
            yield
        finally:
            self._replay_BTLK = None

    def _make_hook(self, layer: int):
        def hook(router, inputs, outputs):
            topk_scores_BTK, topk_ids_BTK, scores_BTE = outputs
            if self._replay_BTLK is not None:
                replay_BTK = self._replay_BTLK[:, :, layer, :].to(topk_ids_BTK.device)
                if replay_BTK.shape != topk_ids_BTK.shape:
                    raise ValueError(
                        f"replayed routing covers {list(replay_BTK.shape[:2])} "
                        f"tokens, the forward has {list(topk_ids_BTK.shape[:2])}"
                    )
                # MoE views the ids as [B*T, K]; a slice of [B, T, L, K] is not contiguous.
                topk_ids_BTK = replay_BTK.contiguous()
                topk_scores_BTK = scores_BTE.gather(-1, topk_ids_BTK)
                if router.route_norm:
                    topk_scores_BTK = topk_scores_BTK / (
                        topk_scores_BTK.sum(dim=-1, keepdim=True) + 1e-20
                    )
                topk_scores_BTK = topk_scores_BTK * router.route_scale
            if self._trace is not None:
                self._trace.per_layer[layer] = topk_ids_BTK.detach()
            return topk_scores_BTK, topk_ids_BTK, scores_BTE

        return hook
