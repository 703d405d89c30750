"""One global step of the learner: proximal pass, N mini-batch updates, metric reduction.

Shape legend: B = completions, T = positions, L = MoE layers, K = experts per token.

    advantages                     the objective's, of the whole global batch (whole groups)
    proximal pass (no grad)        log pi_prox of mini-batches 2..N and their routing (which R2
                                   replays); entropy and routing agreement at these weights
    for each of N mini-batches     log pi under the routing `replayed_routing` picks, then
                                   loss = objective.loss(log pi, log pi_prox, log mu, A, mask);
                                   one optimizer step, gradient clipping, learning-rate schedule
    metric reduction               token means over the global batch, means over mini-batches

Every forward is bounded by `learner.max_tokens_per_microbatch` positions (padding included;
0: one forward per mini-batch, and per proximal pass): the rows are bucketed by length into
micro-batches of whole rows (`learner.batch.microbatches`), the proximal pass runs them one by
one, and an update accumulates its gradient over them, each micro-batch back-propagating its
share `m / M` of the mini-batch mean, so that the step equals the one-shot step. A forward's
replayed routing stays in place until its backward has run, so activation checkpointing
(`learner.activation_checkpointing`) recomputes exactly the experts the forward used.
Log-probs and entropy come from the final hidden states `learner.logprob_chunk` positions at
a time (`learner.model.policy_logprobs`): no forward holds its micro-batch's whole
`[positions x vocab]` logits, and the output layer's backward recomputes them chunk by chunk.

The step knows nothing of the loss formula: its objective (`learner.loss.MiniRL`) computes the
advantages and returns the loss and its metrics. Mini-batches are consecutive groups of the
global batch, in the buffer's order. Mini-batch 1 is trained at the weights of the start of the
step, so its own forward gives its pi_prox (and its routing): only the rows of mini-batches
2..N need the separate no-grad pass.

Data parallelism (`dp`, see `learner.parallel`): every rank is given the same global batch and
trains on its contiguous share of every mini-batch (`group_size` rows per group, whole groups per
rank); the loss it back-propagates is scaled by its share of the mini-batch so that the summed
gradient is the whole mini-batch's, and metrics are reduced over ranks. With one process
(`dp=None`) none of this runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from async_rl.choices import RoutingReplay, check
from async_rl.config import Config
from learner.batch import PackedBatch, microbatches, split_to
from learner.loss import MiniRL, Objective
from learner.mismatch import Mismatch, flipped_BTL
from learner.model import policy_logprobs
from learner.optim import lr_multiplier
from learner.parallel import (
    DataParallel,
    check_sharded,
    clip_gradients,
    local_batch,
    max_over_ranks,
    mean_over_ranks,
)
from learner.routing import RoutingHooks


def replayed_routing(
    mode: str, minibatch: int, actor_BTLK: torch.Tensor | None, recorded_BTLK: torch.Tensor | None
) -> torch.Tensor | None:
    """The experts a forward of mini-batch `minibatch` (0-based) replays; None: its own routing.

    `actor_BTLK` is the actor's trace of the mini-batch's rows (e^mu_old); `recorded_BTLK` the
    learner's routing of those rows, recorded by the proximal pass (e^pi_old; None for
    mini-batch 0, whose own forward is its proximal pass). The proximal pass runs at the
    starting weights, as mini-batch 0 does, and replays what mini-batch 0 replays.
    Zheng et al. 2025, Table 1:

        mode   first mini-batch                        later mini-batches
        none   e^pi, its own                           e^pi, its own (drifting)
        r2     e^pi_old = e^pi: not altered, no-op      e^pi_old, recorded: target altered
        r3     e^mu_old, the actor's: target altered    e^mu_old: target altered

    On-policy (N = 1) R2 is therefore a no-op.
    """
    if mode == "r3":
        return actor_BTLK
    if mode == "r2" and minibatch > 0:
        return recorded_BTLK
    return None


@dataclass
class Proximal:
    """What the proximal pass leaves for the updates, and the token sums of its metrics."""

    logprobs_BT: torch.Tensor | None = None  # log pi_prox of the rows of mini-batches 2..N
    routing_BTLK: torch.Tensor | None = None  # the learner's routing of those rows
    entropy_sum: float = 0.0  # over completion tokens, at the proximal weights
    agree_sum: float = 0.0  # routing agreement with the actor, over real input positions
    first_BT: torch.Tensor | None = None  # log pi_prox of mini-batch 1's rows (drift only)
    mismatch: Mismatch = dataclasses.field(default_factory=Mismatch)  # log rho, token by token
    update_flips: float = 0.0  # (position, layer) pairs of mini-batches 2..N whose update
    update_pairs: float = 0.0  # forward routed otherwise than their proximal forward


class TrainStep:
    """A global step (module docstring), configured by `[algo]`, `[learner]`, the actors'
    sampling temperature and `run.num_steps` (the length of the learning-rate schedule)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        dp: DataParallel | None = None,
        objective: Objective | None = None,
    ):
        algo, learner = cfg.algo, cfg.learner
        check("algo.routing_replay", algo.routing_replay, RoutingReplay)
        self.model, self.optimizer = model, optimizer
        self.objective = objective or MiniRL(algo)
        self.hooks = RoutingHooks(model)
        self.num_minibatches, self.routing_replay = algo.num_minibatches, algo.routing_replay
        self.group_size, self.temperature = algo.group_size, cfg.actor.temperature
        self.lr, self.grad_clip = learner.lr, learner.grad_clip
        self.warmup, self.schedule = learner.warmup_steps, learner.lr_schedule
        self.total_updates = cfg.run.num_steps * algo.num_minibatches
        self.updates = 0  # optimizer steps taken (restored from checkpoints)
        self.max_tokens, self.chunk = learner.max_tokens_per_microbatch, learner.logprob_chunk
        self.dp = dp or DataParallel()
        self.device = next(model.parameters()).device
        self.measure_drift = cfg.buffer.autopilot  # `drift`, the staleness autopilot's signal
        check_sharded(model, self.dp)

    def __call__(self, batch: PackedBatch) -> dict[str, float]:
        start = time.monotonic()
        batch = batch.to(self.device)
        full = dataclasses.replace(batch, advantages_B=self.objective.advantages(batch.rewards_B))
        local = self._local_rows(full)
        prox = self._proximal_pass(local)
        per_mb = [self._update(local, i, prox) for i in range(self.num_minibatches)]
        metrics = self._reduce(full, local, prox, per_mb)
        if self.measure_drift:
            metrics["drift"] = self._drift(local, prox.first_BT)
        metrics["step_time_s"] = time.monotonic() - start
        metrics["policy_version_min"] = int(full.policy_versions_B.min())
        return metrics

    def _replaying(self, replay: torch.Tensor | None):
        """The context a forward (and its backward, which activation checkpointing may
        recompute) runs in: `replay`'s experts, or the model's own routing."""
        return contextlib.nullcontext() if replay is None else self.hooks.replay(replay)

    def _pieces(self, batch: PackedBatch) -> list[tuple[torch.Tensor | None, PackedBatch]]:
        """The micro-batches of `batch` as (row indices, rows); one piece is (None, batch).
        Every rank runs as many as the rank that needs the most (`split_to`): its forwards
        and backwards are collectives of all of them."""
        parts = microbatches(batch, self.max_tokens)
        if self.dp.enabled:
            parts = split_to(parts, max_over_ranks(len(parts), self.dp))
        if len(parts) == 1:
            return [(None, batch)]
        return [(index, batch.take(index)) for index in parts]

    def _local_rows(self, batch: PackedBatch) -> PackedBatch:
        """This rank's rows (all of them in one process), checked for the step."""
        if self.dp.enabled:
            batch = local_batch(batch, self.num_minibatches, self.dp, self.group_size)
        if self.routing_replay == "r3" and batch.routing_BTLK is None:
            raise ValueError("routing_replay r3 needs actor routing traces; this batch has none")
        if batch.num_rows % self.num_minibatches:
            raise ValueError(
                f"{batch.num_rows} rows do not split into {self.num_minibatches} mini-batches"
            )
        return batch

    # ---------------------------------------------------------------- 0. the drift sample
    def _drift(self, batch: PackedBatch, first_BT: torch.Tensor) -> float:
        """mean |pi_{v+1} / pi_v - 1| over the completion tokens of the drift sample, the
        first group of this rank's rows (all ranks): how far one step moved the policy
        (`async_rl.run.autopilot`). pi_v is mini-batch 1's own forward (`first_BT`); pi_{v+1} one
        no-grad forward at the new weights, routed as mini-batch 1 was."""
        rows = min(self.group_size, batch.num_rows // self.num_minibatches)
        sample = batch.rows(0, rows)
        after_BT = torch.zeros(sample.num_rows, sample.width, device=self.device)
        self.model.eval()
        for index, m in self._pieces(sample):
            replay = replayed_routing(self.routing_replay, 0, m.routing_BTLK, None)
            with torch.no_grad(), self._replaying(replay):
                after_BT[slice(None) if index is None else index, : m.width] = self._logprobs(m)[0]
        mask_BT = sample.mask_BT
        before_BT = first_BT[:rows, : sample.width]
        ratio_BT = torch.expm1((after_BT - before_BT).double()).abs()
        value = float(ratio_BT[mask_BT].sum()) / max(float(mask_BT.sum()), 1.0)
        return self._dp_mean(value, mask_BT.sum()) if self.dp.enabled else value

    # ---------------------------------------------------------------- 1. the proximal pass
    def _proximal_pass(self, batch: PackedBatch) -> Proximal:
        """log pi_prox and routing of mini-batches 2..N's rows, at the starting weights, one
        micro-batch at a time."""
        prox, size = Proximal(), batch.num_rows // self.num_minibatches
        if self.num_minibatches == 1:
            return prox
        rest = batch.rows(size, batch.num_rows)
        self.model.eval()  # no dropout in Qwen3-MoE; eval only marks the pass as inference
        for index, m in self._pieces(rest):
            replay = replayed_routing(self.routing_replay, 0, m.routing_BTLK, None)
            with torch.no_grad(), self._replaying(replay), self.hooks.record() as trace:
                logprobs_BT, entropy_BT = self._logprobs(m, with_entropy=True)
            self._prox_metrics(m, logprobs_BT, entropy_BT, trace.experts, prox)
            if index is None:
                prox.logprobs_BT, prox.routing_BTLK = logprobs_BT, trace.experts
                continue
            if prox.logprobs_BT is None:
                prox.logprobs_BT = torch.zeros(rest.num_rows, rest.width, device=self.device)
                # padding replays experts 0..K-1, distinct ids (as `learner.batch` pads)
                prox.routing_BTLK = torch.empty(
                    (rest.num_rows, rest.width, *trace.experts.shape[2:]),
                    dtype=trace.experts.dtype,
                    device=self.device,
                )
                prox.routing_BTLK[:] = torch.arange(self.hooks.top_k, device=self.device)
            prox.logprobs_BT[index, : m.width] = logprobs_BT
            prox.routing_BTLK[index, : m.width] = trace.experts
        return prox

    def _logprobs(self, m: PackedBatch, with_entropy: bool = False):
        """log pi of the micro-batch's targets `[B, T]` (and the entropy `[B, T]`), the
        vocabulary `learner.logprob_chunk` positions at a time."""
        return policy_logprobs(
            self.model, m.inputs_BT, m.targets_BT, self.temperature, self.chunk, with_entropy
        )[:2]

    def _prox_metrics(self, mb: PackedBatch, logp_BT, entropy_BT, experts_BTLK, prox: Proximal):
        """Add the token sums of entropy and routing agreement at the proximal weights, and
        the tokens' log rho split by routing flips (`learner.mismatch`)."""
        prox.entropy_sum += float(entropy_BT[mb.mask_BT].sum())
        flipped_BT = None
        if mb.routing_BTLK is not None:  # one comparison: agreement and the flipped tokens
            flip_BTL = flipped_BTL(mb.routing_BTLK, experts_BTLK)
            same = (~flip_BTL)[mb.valid_BT].float().mean().item()  # as `routing_agreement`
            prox.agree_sum += same * float(mb.valid_BT.sum())
            flipped_BT = flip_BTL.any(-1)
        prox.mismatch.add(logp_BT, mb.behavior_logprobs_BT, mb.mask_BT, flipped_BT)

    # ---------------------------------------------------------------- 2. the updates
    def _update(self, batch: PackedBatch, i: int, prox: Proximal) -> dict[str, float]:
        """One optimizer step on mini-batch `i`, its gradient accumulated over micro-batches
        (each back-propagates its share of the mini-batch mean): loss, gradient norm, metrics."""
        size = batch.num_rows // self.num_minibatches
        mb = batch.rows(i * size, (i + 1) * size)
        recorded = _rows_of(prox.routing_BTLK, (i - 1) * size, i * size, mb.width) if i else None
        prox_BT = prox.logprobs_BT[(i - 1) * size : i * size, : mb.width] if i else None
        self.optimizer.zero_grad(set_to_none=True)
        if i == 0:
            self.model.train()
            if self.measure_drift:
                prox.first_BT = torch.zeros(mb.num_rows, mb.width, device=self.device)
        parts = []
        for index, m in self._pieces(mb):
            rows = slice(None) if index is None else index
            rec = None if recorded is None else recorded[rows, : m.width]
            replay = replayed_routing(self.routing_replay, i, m.routing_BTLK, rec)
            with self._replaying(replay):
                own = None if i == 0 else prox_BT[rows, : m.width]
                loss, metrics = self._loss(m, i, prox, own, rows, rec)
                share = m.num_rows / mb.num_rows
                scaled = loss if index is None else loss * share
                # Ranks' gradients are summed; equal shares make each rank's weight 1/world_size.
                (scaled / self.dp.world_size if self.dp.enabled else scaled).backward()
            parts.append((loss.item() * share, metrics, float(m.mask_BT.sum())))
        if len(parts) == 1:
            return self._optimize(loss.item(), metrics, mb)
        tokens = max(sum(p[2] for p in parts), 1.0)
        metrics = {k: sum(p[1][k] * p[2] for p in parts) / tokens for k in parts[0][1]}
        return self._optimize(sum(p[0] for p in parts), metrics, mb)

    def _loss(self, m: PackedBatch, i: int, prox: Proximal, prox_BT, rows, recorded_BTLK=None):
        """The objective's loss of micro-batch `m` (`rows` of mini-batch `i`); mini-batch 0
        is at the proximal weights, so its own forward gives its pi_prox (`prox_BT` None).
        A later one counts the routing flips since its proximal forward (`recorded_BTLK`)."""
        if i:
            with self.hooks.record() as trace:
                logp_BT, _ = self._logprobs(m)
            flips = flipped_BTL(recorded_BTLK, trace.experts)[m.valid_BT]
            prox.update_flips += float(flips.sum())
            prox.update_pairs += flips.numel()
        else:
            with self.hooks.record() as trace:
                logp_BT, entropy_BT = self._logprobs(m, with_entropy=True)
            prox_BT = logp_BT.detach()
            self._prox_metrics(m, prox_BT, entropy_BT, trace.experts, prox)
            if prox.first_BT is not None:
                prox.first_BT[rows, : m.width] = prox_BT
        return self.objective.loss(
            logp_BT, prox_BT, m.behavior_logprobs_BT, m.advantages_B, m.mask_BT
        )

    def _optimize(self, loss_value: float, metrics: dict, mb: PackedBatch) -> dict[str, float]:
        """Clip, schedule and step on the accumulated gradient (reduced over ranks by FSDP)."""
        if self.dp.enabled:
            loss_value = self._dp_mean(loss_value, mb.num_rows)
            metrics = mean_over_ranks(metrics, float(mb.mask_BT.sum()), self.dp)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(self.model, clip)
        factor = lr_multiplier(self.updates, self.warmup, self.total_updates, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor
        self.optimizer.step()
        self.updates += 1
        return {"loss": loss_value, "grad_norm": grad_norm.item(), **metrics}

    # ---------------------------------------------------------------- 3. metric reduction
    def _reduce(self, full, local, prox: Proximal, per_mb: list[dict]) -> dict[str, float]:
        """Token means over the global batch (all ranks), means over the mini-batches."""
        metrics = {"entropy": prox.entropy_sum / max(float(local.mask_BT.sum()), 1.0)}
        if local.routing_BTLK is not None:
            metrics["routing_agreement"] = prox.agree_sum / max(float(local.valid_BT.sum()), 1.0)
        if self.dp.enabled:
            metrics["entropy"] = self._dp_mean(metrics["entropy"], local.mask_BT.sum())
            if "routing_agreement" in metrics:
                agreement = metrics["routing_agreement"]
                metrics["routing_agreement"] = self._dp_mean(agreement, local.valid_BT.sum())
        metrics |= self._routing_metrics(local, prox, metrics.get("routing_agreement"))
        for key in per_mb[0]:
            metrics[key] = sum(m[key] for m in per_mb) / len(per_mb)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["reward_mean"] = full.rewards_B.mean().item()
        metrics["response_len_mean"] = full.mask_BT.sum(1).float().mean().item()
        metrics["num_tokens"] = int(full.mask_BT.sum())
        return metrics

    def _routing_metrics(self, local, prox: Proximal, agreement: float | None) -> dict:
        """The mechanism of routing replay, per step: `routing_flip_infer`, the share of
        (real position, layer) pairs whose top-k set differs between the actor and the
        rollout-policy forward (1 - routing_agreement; 0 under R3); `routing_flip_update`
        (N > 1), the share of mini-batches 2..N's pairs that the updates before them routed
        otherwise than their proximal forward (0 under R2 and R3); and `learner.mismatch`'s."""
        out = {} if agreement is None else {"routing_flip_infer": 1.0 - agreement}
        if self.num_minibatches > 1:
            pairs = prox.update_pairs
            share = prox.update_flips / max(pairs, 1.0)
            out["routing_flip_update"] = self._dp_mean(share, pairs) if self.dp.enabled else share
        return out | prox.mismatch.metrics(self.dp)

    def _dp_mean(self, value: float, weight: float | torch.Tensor) -> float:
        return mean_over_ranks({"v": value}, float(weight), self.dp)["v"]


def _rows_of(routing_BTLK: torch.Tensor | None, lo: int, hi: int, width: int):
    return None if routing_BTLK is None else routing_BTLK[lo:hi, :width]


def routing_agreement(a_BTLK: torch.Tensor, b_BTLK: torch.Tensor, valid_BT: torch.Tensor) -> float:
    """Share of (real token, layer) pairs whose top-k expert sets are equal."""
    return (~flipped_BTL(a_BTLK, b_BTLK))[valid_BT].float().mean().item()
