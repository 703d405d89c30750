"""The learner's objective: the MiniRL loss and group advantages, as pure functions of tensors.

Zheng et al. 2025, "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices",
eq. (7) with truncated importance sampling (TIS, Yao et al. 2025) on the token IS weight, as
docs/design.md section 2 states it:

    L = -(1/B) sum_i sum_t M_t * sg[w_t] * A_i * log pi_theta(y_{i,t})

Shape legend: B = responses in the mini-batch, T = completion token positions (right-padded),
N = groups, G = responses per group.

Switches (`async_rl.config.AlgoConfig`):
- advantage (`adv_std_norm`): A_i = R_i - mean_{j in group} R_j, the paper's printed form; with
  `adv_std_norm` divided by the group's *sample* standard deviation (unbiased, N - 1, as
  `torch.std` and verl's GRPO estimator) + 1e-6.
- IS weight w_t, stop-gradient, truncated above at C = `tis_cap` (`tis_mode`). Eq. (5) splits
  pi_theta/mu into train-inference discrepancy pi_prox/mu times staleness pi_theta/pi_prox:
    "full"      w_t = min(pi_theta / mu, C)                      the paper's literal reading
    "decoupled" w_t = min(pi_prox / mu, C) * pi_theta / pi_prox   caps only the discrepancy (verl)
    "none"      w_t = 1                                          "w/o train-infer-IS" ablation
  Both readings agree on-policy (pi_theta = pi_prox) and whenever no weight reaches C.
- correction (`is_correction`): how the IS ratio rho_t that `tis_mode` names (pi_theta/mu for
  "full", pi_prox/mu for "decoupled", whose weight then keeps its factor pi_theta/pi_prox) becomes
  a weight; S_i = sum_t log rho_t over response i's |y_i| tokens:
    "token_tis"    w_t = min(rho_t, C)                            truncated per token (above)
    "icepop"       w_t = rho_t if 1/C <= rho_t <= C, else 0      token mask (IcePop, NeMo-RL)
    "seq_mask_tis" w_t = min(rho_t, C) * 1[|S_i| / |y_i| <= log C_geo]
                   the whole response masked when the geometric mean of its ratios,
                   exp(S_i / |y_i|), leaves [1/C_geo, C_geo] (verl's geometric rejection,
                   NeMo-RL's seq-mask-tis); C_geo = `geo_mask_cap`
    "seq_tis"      w_t = min(exp(S_i), C)                         one truncated weight per response
  For "none" there is no ratio and no correction (config.validate refuses the combination).
- clipping mask M_t of decoupled PPO with r_t = pi_theta / pi_prox (`clip`, `eps_low`,
  `eps_high`): M_t = 0 if A_i > 0 and r_t > 1 + eps_high, M_t = 0 if A_i < 0 and
  r_t < 1 - eps_low, else 1. `clip = false` sets M_t = 1 (the "no clipping" ablation).
- aggregation (`length_norm`): token terms are summed per response and averaged over the B
  responses (verl's "seq-mean-token-sum"); `length_norm` divides each response's sum by its
  length |y_i| first (the paper's sec. 1.8 ablation). An empty response contributes 0 but counts
  in B.

Simplifications: no KL penalty, no entropy bonus, no value model. The value carries
log pi_theta itself (not a ratio), so the gradient is -(1/B) sum M_t w_t A_i grad log pi_theta,
eq. (7)'s. pi_prox is the learner's recomputation at the start of the global step (the paper's
pi_theta_old); mu is the actor's sampling log-prob.

Metrics (docs/design.md section 8), means over completion tokens (mask = 1) only, with
log rho = log pi_prox - log mu:
- `train_infer_kl`: k1 estimate of KL(mu || pi_prox) from tokens sampled from mu, mean(-log rho).
- `train_infer_kl_k3`: k3 estimate (Schulman 2020) of the same KL, mean((rho - 1) - log rho),
  unbiased and never negative.
- `extreme_token_frac`: share of tokens with max(rho, 1/rho) > 2.
- `clip_frac`: share of tokens with M_t = 0; `tis_trunc_frac`: share whose weight was truncated
  at C (rho_t > C per token, exp(S_i) > C for every token of response i under "seq_tis"; 0 for
  "icepop" and "none"); `is_mask_frac`: share whose weight the correction set to 0 ("icepop",
  "seq_mask_tis"; else 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from async_rl.choices import IsCorrection, TisMode, check
from async_rl.config import AlgoConfig


def group_advantages(
    rewards_G_or_NG: torch.Tensor, group_size: int, std_norm: bool
) -> torch.Tensor:
    """Advantages `[N * G]` of flat rewards `[N * G]` whose groups of G are contiguous.

    A `[N, G]` input gives `[N, G]`. Float64 stays float64; anything else computes in float32.
    """
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    if rewards_G_or_NG.dim() not in (1, 2) or rewards_G_or_NG.numel() % group_size:
        raise ValueError(
            f"rewards_G_or_NG: expected [num_groups * {group_size}] or [num_groups, "
            f"{group_size}], got {list(rewards_G_or_NG.shape)}"
        )
    if rewards_G_or_NG.dim() == 2 and rewards_G_or_NG.shape[1] != group_size:
        raise ValueError(
            f"rewards_G_or_NG: expected [num_groups, {group_size}], "
            f"got {list(rewards_G_or_NG.shape)}"
        )
    if std_norm and group_size < 2:
        raise ValueError("group_size: std_norm needs groups of at least 2 responses")
    dtype = torch.float64 if rewards_G_or_NG.dtype == torch.float64 else torch.float32
    r_NG = rewards_G_or_NG.to(dtype).reshape(-1, group_size)
    adv_NG = r_NG - r_NG.mean(dim=1, keepdim=True)
    if std_norm:
        adv_NG = adv_NG / (r_NG.std(dim=1, keepdim=True) + 1e-6)
    return adv_NG.reshape(rewards_G_or_NG.shape)


def _check_shape(name: str, t: torch.Tensor, shape: torch.Size | tuple) -> None:
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _check_inputs(logprobs_BT, prox_logprobs_BT, behavior_logprobs_BT, advantages_B, mask_BT, cfg):
    shape = logprobs_BT.shape
    if logprobs_BT.dim() != 2:
        raise ValueError(f"logprobs_BT: expected [B, T], got {list(shape)}")
    _check_shape("prox_logprobs_BT", prox_logprobs_BT, shape)
    _check_shape("behavior_logprobs_BT", behavior_logprobs_BT, shape)
    _check_shape("mask_BT", mask_BT, shape)
    _check_shape("advantages_B", advantages_B, shape[:1])


def minirl_loss(
    logprobs_BT: torch.Tensor,
    prox_logprobs_BT: torch.Tensor,
    behavior_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: AlgoConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniRL loss of a mini-batch (module docstring) and its metrics.

    logprobs_BT: log pi_theta of the completion tokens, with grad. prox_logprobs_BT: log pi_prox.
    behavior_logprobs_BT: log mu. advantages_B: A_i. mask_BT: 1 (or True) on completion tokens,
    0 on padding; padded positions may hold anything, even -inf or nan.
    Ratios come from log differences in float32 (float64 if `logprobs_BT` is float64).
    """
    _check_inputs(logprobs_BT, prox_logprobs_BT, behavior_logprobs_BT, advantages_B, mask_BT, cfg)
    dtype = torch.float64 if logprobs_BT.dtype == torch.float64 else torch.float32
    valid = mask_BT.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs_BT.device)
    # Zero the padding first, so nothing non-finite there reaches the value or the gradient.
    logp = torch.where(valid, logprobs_BT.to(dtype), zero)
    prox = torch.where(valid, prox_logprobs_BT.detach().to(dtype), zero)
    mu = torch.where(valid, behavior_logprobs_BT.detach().to(dtype), zero)
    adv_B1 = advantages_B.detach().to(dtype)[:, None]

    with torch.no_grad():
        log_r = logp - prox  # log r_t = log pi_theta / pi_prox
        if cfg.tis_mode == "none":
            w = torch.ones_like(logp)
            truncated = masked = torch.zeros_like(valid)
        else:
            log_is = (logp if cfg.tis_mode == "full" else prox) - mu  # log rho_t; 0 on padding
            log_w, truncated, masked = _correction(log_is, valid, cfg)
            if cfg.tis_mode == "decoupled":
                log_w = log_w + log_r
            w = torch.exp(log_w)  # capped in log space: no overflow below C
        clipped = torch.zeros_like(valid)
        if cfg.clip:
            clipped = ((adv_B1 > 0) & (log_r > math.log1p(cfg.eps_high))) | (
                (adv_B1 < 0) & (log_r < math.log1p(-cfg.eps_low))
            )
        # where, not a product: an unbounded decoupled weight may be inf on a masked token.
        coef = torch.where(valid & ~clipped & ~masked, w * adv_B1, zero)

    per_response_B = (coef * logp).sum(dim=1)
    if cfg.length_norm:
        per_response_B = per_response_B / valid.sum(dim=1).clamp(min=1).to(dtype)
    loss = -per_response_B.mean()
    return loss, _metrics(prox, mu, valid, clipped, truncated, masked)


def _correction(log_is, valid, cfg: AlgoConfig):
    """(log w_t, truncated, masked) of `is_correction` (module docstring) from log rho_t."""
    log_cap = math.log(cfg.tis_cap)
    none = torch.zeros_like(valid)
    if cfg.is_correction == "icepop":
        return log_is, none, (log_is.abs() > log_cap) & valid
    if cfg.is_correction == "seq_tis":
        seq_B1 = torch.where(valid, log_is, 0.0).sum(dim=1, keepdim=True)
        log_w = seq_B1.clamp(max=log_cap).expand_as(log_is)
        return log_w, (seq_B1 > log_cap) & valid, none
    log_w, truncated = log_is.clamp(max=log_cap), log_is > log_cap
    if cfg.is_correction == "token_tis":
        return log_w, truncated, none
    geo_B1 = torch.where(valid, log_is, 0.0).sum(dim=1, keepdim=True) / valid.sum(
        dim=1, keepdim=True
    ).clamp(min=1)
    return log_w, truncated, (geo_B1.abs() > math.log(cfg.geo_mask_cap)) & valid


@torch.no_grad()
def _metrics(prox, mu, valid, clipped, truncated, masked) -> dict[str, float]:
    """The loss's metrics (module docstring), token means over the completion tokens."""
    # In float64: k3 of nearby policies is a small difference of O(1) numbers.
    n = valid.sum().clamp(min=1).double()
    log_rho = (prox - mu).double()  # log pi_prox / mu; 0 on padding
    k3 = torch.expm1(log_rho) - log_rho  # (rho - 1) - log rho
    return {
        "clip_frac": ((clipped & valid).sum() / n).item(),
        "tis_trunc_frac": ((truncated & valid).sum() / n).item(),
        "is_mask_frac": ((masked & valid).sum() / n).item(),
        "train_infer_kl": (-log_rho.sum() / n).item(),
        "train_infer_kl_k3": (k3.sum() / n).item(),
        "extreme_token_frac": (((log_rho.abs() > math.log(2)) & valid).sum() / n).item(),
    }


class Objective(Protocol):
    """What `learner.train.TrainStep` calls: the algorithm, from rewards to a loss."""

    def advantages(self, rewards_B: torch.Tensor) -> torch.Tensor:
        """`[B]` advantages of a global batch's rewards (whole groups of G, contiguous)."""
        ...

    def loss(
        self, logprobs_BT, prox_logprobs_BT, behavior_logprobs_BT, advantages_B, mask_BT
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """A mini-batch's loss (with grad through `logprobs_BT`) and its metrics."""
        ...


@dataclass(frozen=True)
class MiniRL:
    """The MiniRL objective of `[algo]`: group advantages and `minirl_loss`."""

    algo: AlgoConfig

    def __post_init__(self) -> None:  # once, not per call: an AlgoConfig built without a Config
        check("algo.tis_mode", self.algo.tis_mode, TisMode)
        check("algo.is_correction", self.algo.is_correction, IsCorrection)

    def advantages(self, rewards_B: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards_B, self.algo.group_size, self.algo.adv_std_norm)

    def loss(self, logprobs_BT, prox_logprobs_BT, behavior_logprobs_BT, advantages_B, mask_BT):
        return minirl_loss(
            logprobs_BT, prox_logprobs_BT, behavior_logprobs_BT, advantages_B, mask_BT, self.algo
        )
