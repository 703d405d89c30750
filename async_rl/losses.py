"""The MiniRL objective (Zheng et al. 2025, "Stabilizing Reinforcement Learning with LLMs:
Formulation and Practices", eq. 7) as a pure function of tensors, and group advantages.

Shape legend: B = responses in the mini-batch, T = token positions (padded).

    L = -(1/B) sum_i sum_t M_t * sg[w_t] * A_i * log pi_theta(y_{i,t})

- A_i = R_i - mean_{j in group} R_j (the paper's printed form); `adv_std_norm` divides by the
  group's standard deviation (unbiased, as `torch.std`) + 1e-6, as GRPO does.
- w_t, the train-inference importance weight, truncated at C = `tis_cap` (TIS, Yao et al. 2025):
    "full"      w_t = min(pi_theta / mu, C)                 the paper's literal reading
    "decoupled" w_t = min(pi_prox / mu, C) * pi_theta / pi_prox   (Yao et al.; verl)
    "none"      w_t = 1                                     the "w/o train-infer IS" ablation
- M_t, the clipping mask of decoupled PPO with r_t = pi_theta / pi_prox:
    M_t = 0 if A > 0 and r_t > 1 + eps_high;  M_t = 0 if A < 0 and r_t < 1 - eps_low;  else 1.
  `clip = false` sets M_t = 1 (the "no clipping" ablation).
- `length_norm` divides each response's token sum by its length |y_i| (the ablation the paper
  argues against); by default token losses are summed per response, then averaged over B.
- No KL penalty, no entropy bonus, no value model.

The gradient is -(1/B) sum M_t w_t A_i grad log pi_theta: the value carries log pi_theta and the
weight is detached. On-policy (pi_theta = pi_prox) every M_t is 1 and "full" equals "decoupled".

Metrics (DESIGN.md section 8), token means over completion tokens:
- `train_infer_kl`: k1 estimate of KL(mu || pi_prox), mean of log mu - log pi_prox.
- `train_infer_kl_k3`: k3 estimate, mean of rho - 1 - log rho with rho = pi_prox / mu (>= 0).
- `extreme_token_frac`: share of tokens with max(rho, 1/rho) > 2.
- `clip_frac`: share of tokens with M_t = 0; `tis_trunc_frac`: share whose weight hit C.
"""

from __future__ import annotations

import math

import torch

TIS_MODES = ("full", "decoupled", "none")


def group_advantages(rewards_B: torch.Tensor, group_size: int, std_norm: bool) -> torch.Tensor:
    """Per-response advantages; the G responses of a group are contiguous in `rewards_B`."""
    if rewards_B.dim() != 1 or rewards_B.numel() % group_size:
        raise ValueError(
            f"rewards: expected [num_groups * {group_size}], got {list(rewards_B.shape)}"
        )
    r = rewards_B.view(-1, group_size)
    r = r if r.dtype == torch.float64 else r.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-6)
    return adv.view(-1)


def _check(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def minirl_loss(
    logprobs_BT: torch.Tensor,
    prox_logprobs_BT: torch.Tensor,
    behavior_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniRL loss of a mini-batch and its metrics; `cfg` is an `AlgoConfig`."""
    shape = logprobs_BT.shape
    if logprobs_BT.dim() != 2:
        raise ValueError(f"logprobs: expected [B, T], got {list(shape)}")
    _check("prox_logprobs", prox_logprobs_BT, shape)
    _check("behavior_logprobs", behavior_logprobs_BT, shape)
    _check("mask", mask_BT, shape)
    _check("advantages", advantages_B, shape[:1])
    if cfg.tis_mode not in TIS_MODES:
        raise ValueError(f"tis_mode: {cfg.tis_mode!r} is not one of {TIS_MODES}")

    dtype = torch.float64 if logprobs_BT.dtype == torch.float64 else torch.float32
    logp = logprobs_BT.to(dtype)
    prox, mu = prox_logprobs_BT.to(dtype), behavior_logprobs_BT.to(dtype)
    mask = mask_BT.to(dtype)
    adv_B1 = advantages_B.to(dtype)[:, None]
    log_cap = math.log(cfg.tis_cap)

    with torch.no_grad():
        log_r = logp.detach() - prox  # log pi_theta / pi_prox
        if cfg.tis_mode == "full":
            log_is = logp.detach() - mu
            truncated = log_is > log_cap
            w = torch.exp(torch.clamp(log_is, max=log_cap))
        elif cfg.tis_mode == "decoupled":
            log_is = prox - mu
            truncated = log_is > log_cap
            w = torch.exp(torch.clamp(log_is, max=log_cap) + log_r)
        else:
            truncated = torch.zeros_like(mask, dtype=torch.bool)
            w = torch.ones_like(logp)
        if cfg.clip:
            too_high = (adv_B1 > 0) & (log_r > math.log1p(cfg.eps_high))
            too_low = (adv_B1 < 0) & (log_r < math.log1p(-cfg.eps_low))
            keep = (~(too_high | too_low)).to(dtype)
        else:
            keep = torch.ones_like(logp)

    per_token = keep * w * adv_B1 * logp * mask
    per_response = per_token.sum(dim=1)
    if cfg.length_norm:
        per_response = per_response / mask.sum(dim=1).clamp(min=1)
    loss = -per_response.mean()

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        log_rho = prox - mu  # log pi_prox / mu
        rho = torch.exp(log_rho)
        metrics = {
            "clip_frac": (((1 - keep) * mask).sum() / n).item(),
            "tis_trunc_frac": ((truncated.to(dtype) * mask).sum() / n).item(),
            "train_infer_kl": ((-log_rho * mask).sum() / n).item(),
            "train_infer_kl_k3": (((rho - 1 - log_rho) * mask).sum() / n).item(),
            "extreme_token_frac": (
                ((log_rho.abs() > math.log(2)).to(dtype) * mask).sum() / n
            ).item(),
        }
    return loss, metrics
