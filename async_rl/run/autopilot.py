"""The staleness autopilot (`buffer.autopilot`): the driver moves the buffer's K as the run goes.

The paper's first-order condition (`learner.loss`) holds while the token weight
pi_theta / mu stays near 1; it is the train-inference factor pi_old / mu times the staleness
factor pi_theta / pi_old. A group trained s versions after the weights that generated it has a
staleness factor of about s * drift away from 1 (first order), where the learner measures

    drift = mean over a sampled group's completion tokens of |pi_{v+1} / pi_v - 1|

each step (`learner/drift`: the group before and after the step's updates). The worst
staleness K allows gives the bound B = K * drift. The learner's idle share is its time waiting
for a batch over its time in the loop, as the autoscaler (`async_rl/run/fleet.py`) reads it. Every
`buffer.autopilot_every` versions, on the rows of that window:

    B > autopilot_max_drift and K > autopilot_min_k                    K -> K - 1
    idle > autopilot_idle_high and K < autopilot_max_k
        and (K + 1) * drift <= autopilot_max_drift                     K -> K + 1
    otherwise                                                          K stays

Raising K lets actors run further ahead of the learner (admission grants more leases), which
is what a learner waiting for data lacks; lowering it when the policy moves fast keeps the
staleness factor within the bound. K is the buffer's (`ReplayBuffer.set_max_staleness`, which
keeps admission's promise when it falls); each change is a line of its consumption log with
its reason, a line on the terminal, and the `autopilot/*` metrics of the next rows:
`autopilot/k`, `autopilot/idle_share`, `autopilot/drift`, `autopilot/stale_bound`
(K * drift of the window), `autopilot/decisions` (changes so far).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from async_rl.config import Config


@dataclass
class Decision:
    """K after a window, why, and the signals it was decided on (`autopilot/*`)."""

    k: int
    changed: bool
    reason: str
    signals: dict[str, float]


class Autopilot:
    """Feed it the run's metric rows in order (`observe`); it decides once per window."""

    def __init__(self, cfg: Config):
        self.buf = cfg.buffer
        self.k = self.buf.max_staleness
        self.window: list[dict[str, Any]] = []
        self.decisions = 0
        self.synced = False

    def observe(self, row: dict[str, Any]) -> Decision | None:
        """A learner row; the decision when it completes a window, else None."""
        if "learner/wait_time_s" not in row:
            return None
        if not self.synced:  # a resumed run's buffer has the K of its last change
            self.k = int(row.get("buffer/max_staleness", self.k))
            self.decisions = int(row.get("autopilot/decisions", self.decisions))
            self.synced = True
            return None  # its wait is the start-up's (weights to the actors, a first batch)
        self.window.append(row)
        if len(self.window) < self.buf.autopilot_every:
            return None
        window, self.window = self.window, []
        return self.decide(window)

    def decide(self, rows: list[dict[str, Any]]) -> Decision:
        """The rule of the module docstring on the rows of one window."""
        b = self.buf
        wait = sum(r["learner/wait_time_s"] for r in rows)
        busy = sum(r["learner/step_time_s"] + r.get("learner/publish_time_s", 0.0) for r in rows)
        idle = wait / max(wait + busy, 1e-9)
        drifts = [r["learner/drift"] for r in rows if "learner/drift" in r]
        drift = sum(drifts) / len(drifts) if drifts else 0.0
        k, bound = self.k, self.k * drift
        if bound > b.autopilot_max_drift and k > b.autopilot_min_k:
            k, reason = k - 1, f"K x drift = {bound:.3g} > autopilot_max_drift"
        elif (
            idle > b.autopilot_idle_high
            and k < b.autopilot_max_k
            and (k + 1) * drift <= b.autopilot_max_drift
        ):
            k, reason = k + 1, f"learner idle {idle:.0%} > autopilot_idle_high"
        else:
            reason = f"idle {idle:.0%}, K x drift = {bound:.3g}: K stays"
        changed = k != self.k
        self.decisions += changed
        self.k = k
        signals = {
            "autopilot/k": float(k),
            "autopilot/idle_share": idle,
            "autopilot/drift": drift,
            "autopilot/stale_bound": bound,
            "autopilot/decisions": float(self.decisions),
        }
        return Decision(k, changed, reason, signals)
