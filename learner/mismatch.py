"""The train-inference mismatch token by token, and the routing flips behind it.

    mismatch = Mismatch()
    mismatch.add(logp_BT, mu_BT, mask_BT, flipped_BT)    each forward at the rollout policy
    mismatch.metrics(dp)                                 the step's numbers (all ranks)

For every completion token, `log rho = log pi_prox - log mu`: the learner's rollout-policy
log-prob against the actor's. Its spread is split by whether the token's routing flipped (its
top-k expert set differs between the actor's trace and the learner's forward in any MoE layer,
`flipped_BTL`): `abs_log_rho_p99_flipped` and `abs_log_rho_p99_steady` (the 99th percentile of
|log rho| over those tokens; 0 where there are none) next to `flipped_token_frac`, and
`abs_log_rho_p99` over all of them. `is_ess` is the effective sample size of the IS weights
`w = rho` (untruncated), `(sum w)^2 / (n sum w^2)`: 1 when actor and learner agree, falling
toward 1/n as a few tokens dominate. Percentiles are over every rank's tokens (gathered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from learner.parallel import DataParallel, gather_over_ranks, mean_over_ranks

QUANTILE = 0.99


def flipped_BTL(a_BTLK: torch.Tensor, b_BTLK: torch.Tensor) -> torch.Tensor:
    """`[B, T, L]`: whether the top-k expert set of each (position, layer) differs between
    two routings (the order within a top-k does not count)."""
    return (a_BTLK.long().sort(-1).values != b_BTLK.long().sort(-1).values).any(-1)


def _quantile(values: torch.Tensor) -> float:
    return float(torch.quantile(values, QUANTILE)) if values.numel() else 0.0


@dataclass
class Mismatch:
    """Token values of one global step (module docstring), added forward by forward."""

    flipped: list[torch.Tensor] = field(default_factory=list)  # |log rho|, routing flipped
    steady: list[torch.Tensor] = field(default_factory=list)  # |log rho|, routing kept
    routed: bool = True  # every forward's routing was compared with the actor's
    w_sum: float = 0.0
    w2_sum: float = 0.0
    n: int = 0

    def add(
        self,
        logp_BT: torch.Tensor,
        mu_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        flipped_BT: torch.Tensor | None = None,
    ) -> None:
        """A forward's completion tokens (`mask_BT`); `flipped_BT` None: no actor routing
        to compare with (the flip split is then left out)."""
        log_rho = (logp_BT.detach() - mu_BT).double()[mask_BT].cpu()
        if flipped_BT is None:
            self.routed, flip = False, torch.zeros_like(log_rho, dtype=torch.bool)
        else:
            flip = flipped_BT[mask_BT].cpu()
        self.flipped.append(log_rho[flip].abs())
        self.steady.append(log_rho[~flip].abs())
        w = log_rho.exp()
        self.w_sum += float(w.sum())
        self.w2_sum += float((w * w).sum())
        self.n += int(w.numel())

    def metrics(self, dp: DataParallel | None = None) -> dict[str, float]:
        dp = dp or DataParallel()
        empty = torch.zeros(0, dtype=torch.float64)
        flipped = gather_over_ranks(torch.cat(self.flipped or [empty]), dp)
        steady = gather_over_ranks(torch.cat(self.steady or [empty]), dp)
        n = max(self.n, 1)
        means = mean_over_ranks({"w": self.w_sum / n, "w2": self.w2_sum / n}, self.n, dp)
        out = {
            "abs_log_rho_p99": _quantile(torch.cat([flipped, steady])),
            "is_ess": means["w"] ** 2 / means["w2"] if means["w2"] > 0 else 0.0,
        }
        if self.routed:
            tokens = max(flipped.numel() + steady.numel(), 1)
            out["flipped_token_frac"] = flipped.numel() / tokens
            out["abs_log_rho_p99_flipped"] = _quantile(flipped)
            out["abs_log_rho_p99_steady"] = _quantile(steady)
        return out
