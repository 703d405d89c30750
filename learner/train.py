"""One global step of the learner: proximal pass, then N mini-batch updates with routing replay.

    prox pass (no grad)            log pi_prox, entropy; R2 records the learner's routing,
                                   R3 replays the actor's trace
    for each of N mini-batches     logits under replay (R2: recorded, R3: actor's), then
                                   loss = loss_fn(log pi, log pi_prox, log mu, A, mask);
                                   one AdamW step, gradient clipping, learning-rate schedule

The step knows nothing of the loss formula: it calls `loss_fn`, which returns the loss and its
metrics. Mini-batches are consecutive groups of the global batch, in the buffer's order.

Data parallelism (`dp`, see `learner.parallel`): every rank is given the same global batch and
trains on its contiguous share of every mini-batch (`group_size` rows per group, whole groups per
rank); the loss it back-propagates is scaled by its share of the mini-batch so that the summed
gradient is the whole mini-batch's, and metrics are reduced over ranks. With one process
(`dp=None`) none of this runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from learner.batch import PackedBatch
from learner.model import entropy, token_logprobs
from learner.parallel import (
    DataParallel,
    check_sharded,
    global_norm,
    local_batch,
    mean_over_ranks,
)
from learner.routing import RoutingHooks

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule: unknown schedule {schedule!r} (constant, linear, cosine)")


def routing_agreement(a_BTLK: torch.Tensor, b_BTLK: torch.Tensor, valid_BT: torch.Tensor) -> float:
    """Share of (real token, layer) pairs whose top-k expert sets are equal."""
    same_BTL = (a_BTLK.long().sort(-1).values == b_BTLK.long().sort(-1).values).all(-1)
    return same_BTL[valid_BT].float().mean().item()


class TrainStep:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        num_minibatches: int,
        routing_replay: str,
        temperature: float,
        grad_clip: float,
        lr: float,
        warmup_steps: int,
        lr_schedule: str,
        total_updates: int,
        dp: DataParallel | None = None,
        group_size: int = 1,
    ):
        if routing_replay not in ("none", "r2", "r3"):
            raise ValueError(f"routing_replay: {routing_replay!r} is not none, r2 or r3")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.hooks = RoutingHooks(model)
        self.num_minibatches, self.routing_replay = num_minibatches, routing_replay
        self.temperature, self.grad_clip = temperature, grad_clip
        self.lr, self.warmup, self.schedule = lr, warmup_steps, lr_schedule
        self.total_updates = total_updates
        self.updates = 0  # optimizer steps taken (restored from checkpoints)
        self.dp, self.group_size = dp or DataParallel(), group_size
        if group_size < 1:
            raise ValueError(f"group_size: must be >= 1, got {group_size}")
        check_sharded(model, self.dp)

    def _forward(self, batch: PackedBatch, replay: torch.Tensor | None) -> torch.Tensor:
        if replay is None:
            return self.model(batch.inputs_BT)
        with self.hooks.replay(replay):
            return self.model(batch.inputs_BT)

    def __call__(self, batch: PackedBatch) -> dict[str, float]:
        start = time.monotonic()
        full = batch
        if self.dp.enabled:  # this rank's rows; the rest of the step is per rank
            batch = local_batch(batch, self.num_minibatches, self.dp, self.group_size)
        if self.routing_replay == "r3" and batch.routing_BTLK is None:
            raise ValueError("routing_replay r3 needs actor routing traces; this batch has none")
        rows = batch.num_rows
        if rows % self.num_minibatches:
            raise ValueError(f"{rows} rows do not split into {self.num_minibatches} mini-batches")
        size = rows // self.num_minibatches
        actor_BTLK = batch.routing_BTLK if self.routing_replay == "r3" else None
        # The proximal pass. Mini-batch 1 is computed with the weights at the start of the step,
        # so its own forward gives pi_prox (and its routing, for R2): only the rows of
        # mini-batches 2..N need a separate no-grad pass before the first update.
        sums = {"entropy": 0.0, "agree": 0.0}
        prox_rest = trace_rest = None
        if self.num_minibatches > 1:
            rest = batch.rows(size, rows)
            self.model.eval()  # no dropout in Qwen3-MoE; eval only marks the pass as inference
            with torch.no_grad(), self.hooks.record() as trace:
                replay = None if actor_BTLK is None else actor_BTLK[size:, : rest.width]
                logits_BTV = self._forward(rest, replay)
            prox_rest = token_logprobs(logits_BTV, rest.targets_BT, self.temperature)
            trace_rest = trace.experts
            self._prox_metrics(rest, logits_BTV, trace_rest, sums)
            del logits_BTV
        replay_rest = {"none": None, "r2": trace_rest, "r3": None}[self.routing_replay]

        self.model.train()
        per_mb: list[dict[str, float]] = []
        for i in range(self.num_minibatches):
            mb = batch.rows(i * size, (i + 1) * size)
            width = mb.width
            if i == 0:
                replay = None if actor_BTLK is None else actor_BTLK[:size, :width]
                with self.hooks.record() as trace:
                    logits_BTV = self._forward(mb, replay)
                logp_BT = token_logprobs(logits_BTV, mb.targets_BT, self.temperature)
                prox_BT = logp_BT.detach()
                with torch.no_grad():
                    self._prox_metrics(mb, logits_BTV.detach(), trace.experts, sums)
                del logits_BTV
            else:
                lo, hi = (i - 1) * size, i * size
                if self.routing_replay == "r3":
                    replay = actor_BTLK[i * size : (i + 1) * size, :width]
                else:
                    replay = None if replay_rest is None else replay_rest[lo:hi, :width]
                logp_BT = token_logprobs(self._forward(mb, replay), mb.targets_BT, self.temperature)
                prox_BT = prox_rest[lo:hi, :width]
            loss, m = self.loss_fn(
                logp_BT, prox_BT, mb.behavior_logprobs_BT, mb.advantages_B, mb.mask_BT
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if self.dp.enabled:
                # Ranks' gradients are summed; equal shares make each rank's weight 1/world_size.
                (loss / self.dp.world_size).backward()
                loss_value = self._dp_mean(loss_value, mb.num_rows)
                m = mean_over_ranks(m, float(mb.mask_BT.sum()), self.dp)
            else:
                loss.backward()
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            grad_norm = global_norm(grad_norm)
            factor = lr_multiplier(self.updates, self.warmup, self.total_updates, self.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * factor
            self.optimizer.step()
            self.updates += 1
            per_mb.append({"loss": loss_value, "grad_norm": grad_norm.item(), **m})
        metrics = {"entropy": sums["entropy"] / max(float(batch.mask_BT.sum()), 1.0)}
        if batch.routing_BTLK is not None:
            metrics["routing_agreement"] = sums["agree"] / max(float(batch.valid_BT.sum()), 1.0)
        if self.dp.enabled:  # token means over all ranks' rows
            metrics["entropy"] = self._dp_mean(metrics["entropy"], batch.mask_BT.sum())
            if "routing_agreement" in metrics:
                agreement = metrics["routing_agreement"]
                metrics["routing_agreement"] = self._dp_mean(agreement, batch.valid_BT.sum())
        for key in per_mb[0]:
            metrics[key] = sum(m[key] for m in per_mb) / len(per_mb)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        staleness = full.policy_versions_B
        metrics["reward_mean"] = full.rewards_B.mean().item()
        metrics["response_len_mean"] = full.mask_BT.sum(1).float().mean().item()
        metrics["num_tokens"] = int(full.mask_BT.sum())
        metrics["step_time_s"] = time.monotonic() - start
        metrics["policy_version_min"] = int(staleness.min())
        return metrics

    def _prox_metrics(self, mb: PackedBatch, logits_BTV, experts_BTLK, sums: dict) -> None:
        """Accumulate token sums of entropy and routing agreement at the proximal weights."""
        sums["entropy"] += float(entropy(logits_BTV, self.temperature)[mb.mask_BT].sum())
        if mb.routing_BTLK is not None:
            same = routing_agreement(mb.routing_BTLK, experts_BTLK, mb.valid_BT)
            sums["agree"] += same * float(mb.valid_BT.sum())

    def _dp_mean(self, value: float, weight: float | torch.Tensor) -> float:
        return mean_over_ranks({"v": value}, float(weight), self.dp)["v"]
