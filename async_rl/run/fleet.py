"""The fleet size the driver runs: what `async-rl scale` asks for and what the autoscaler decides.

The supervisor (`async_rl/run/supervisor.py`) starts and stops actors to reach it; the driver's loop
asks `Fleet.wanted` each round.
"""

from __future__ import annotations

import time
from typing import Any

from async_rl.config import Config
from async_rl.paths import RunPaths, read_fleet_request


def autoscale(rows: list[dict[str, Any]], cfg: Config, current: int, since: float = 0.0) -> int:
    """The fleet size the autoscaler wants after the metric rows written after `since` (unix s).

    The buffer's fill is the share of time its staleness budget is full, so that admission
    holds an actor back (`buffer/full_s`). Above `actor.autoscale_fill_high` actors wait more
    than they work: shrink. Below `actor.autoscale_fill_low` they never get ahead, and if the
    learner also waits for data more than `actor.autoscale_grow_idle` of its loop, generation
    is what it waits for: grow. In between (the learner may still wait, for fresh weights to
    reach the actors, which more actors do not shorten) the fleet stays. One actor per
    decision, within actor.min_actors..actor.max_actors.
    """
    act = cfg.actor
    rows = [r for r in rows if "learner/wait_time_s" in r and r.get("time", 0.0) > since]
    if len(rows) < 2 or rows[-1]["time"] <= rows[0]["time"]:
        return current
    wait = sum(r["learner/wait_time_s"] for r in rows[1:])
    busy = sum(r["learner/step_time_s"] + r.get("learner/publish_time_s", 0.0) for r in rows[1:])
    full = rows[-1].get("buffer/full_s", 0.0) - rows[0].get("buffer/full_s", 0.0)
    if full < 0:  # a restarted buffer counts from zero again: no signal from this window
        return current
    fill = full / (rows[-1]["time"] - rows[0]["time"])
    if fill > act.autoscale_fill_high:
        return max(current - 1, act.min_actors)
    if fill < act.autoscale_fill_low and wait > act.autoscale_grow_idle * (wait + busy):
        return min(current + 1, act.max_actors)
    return current


def requested_fleet(paths: RunPaths, cfg: Config, seen: float) -> tuple[int | None, float]:
    """A fleet size asked for with `async-rl scale` after time `seen`, clamped to the bounds."""
    request = read_fleet_request(paths)
    if request is None or request[1] <= seen:
        return None, seen
    wanted, at = request
    return min(max(wanted, cfg.actor.min_actors), cfg.actor.max_actors), at


class Fleet:
    """The fleet size wanted: `async-rl scale` requests, and the autoscaler's decisions."""

    def __init__(self, cfg: Config, paths: RunPaths):
        self.cfg, self.paths = cfg, paths
        self.last_scaled = self.seen = time.time()

    def wanted(self, rows: list[dict[str, Any]], current: int) -> int:
        wanted, self.seen = requested_fleet(self.paths, self.cfg, self.seen)
        wanted = current if wanted is None else wanted
        now, act = time.time(), self.cfg.actor
        if act.autoscale and now - self.last_scaled > act.autoscale_interval_s:
            wanted = autoscale(rows, self.cfg, current, since=self.last_scaled)
            self.last_scaled = now  # the next decision sees only rows of this fleet
        return wanted

    def scaled(self) -> None:
        self.last_scaled = time.time()
