"""`async-rl train`: Ray places and supervises the run's processes; the driver watches.

    driver (this process)                     Ray actors
    ├─ writes runs/<name>/config.toml         BufferWorker   zmq PULL/ROUTER, Arrow segments
    ├─ starts ──────────────────────────────► LearnerWorker  global steps, publishes v+1
    ├─ starts K (elastic) ──────────────────► ActorWorker×K  lease → generate → push groups
    ├─ tails metrics.jsonl → progress bar, wandb
    ├─ polls control/fleet.json (async-rl scale) and the autoscaler; replaces dead actors
    └─ moves the buffer's K with the staleness autopilot (buffer.autopilot, run/autopilot.py)

    data plane (zmq):  actors ──groups──► buffer ◄──sample(v)── learner ──"v ready"──► actors
    weights:           learner ──WeightStore──► actors, newest complete version

The driver's parts, in `async_rl/run/`: `workers.py` (the Ray actors' bodies), `cluster.py` (Ray
start-up, placement), `supervisor.py` (starting, pinging and restarting the processes: its
docstring has the restart rules), `fleet.py` (the fleet size: `async-rl scale`, the autoscaler);
this module runs the loop and tails the metrics. Ctrl-C or SIGTERM to the driver stops everything in
order (actors, learner with a final checkpoint, buffer closing its segment) and leaves a
resumable run directory.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from async_rl.config import Config, ConfigError
from async_rl.run.autopilot import Autopilot
from async_rl.run.cluster import check_placement, init_ray, wait_for_resources
from async_rl.run.fleet import Fleet
from async_rl.run.supervisor import Supervisor


def _interrupt(signum, frame) -> None:
    """SIGTERM to the driver is Ctrl-C: stop in order, leave a resumable run (once)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


class _Metrics:
    """What the driver keeps of `metrics.jsonl`: only what the summary and the autoscaler need
    (a run of days must not grow the driver)."""

    def __init__(self, path: Path):
        from async_rl.metrics import MetricsTail

        self.tail = MetricsTail(path)
        self.tail.read()  # a resumed run's earlier steps are already logged
        self.rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.accuracy: list[float] = []  # held-out accuracy of this session's evaluations

    def new_rows(self) -> list[dict[str, Any]]:
        """Rows written since the last call."""
        new = self.tail.read()
        for row in new:
            self.keep(row)
        return new

    def keep(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if "eval/accuracy" in row:
            self.accuracy.append(row["eval/accuracy"])


def _supervise(run: Supervisor, metrics: _Metrics, wandb, display) -> None:
    """The driver's loop until the learner is done: metrics to wandb and the terminal, the
    heartbeat of every process, the fleet's size."""
    fleet = Fleet(run.cfg, run.paths)
    pilot = Autopilot(run.cfg) if run.cfg.buffer.autopilot else None
    while True:
        for row in metrics.new_rows():
            wandb.log(row)
            display.update(row, len(run.actors))
            decision = pilot.observe(row) if pilot else None
            if decision and (said := run.steer(decision)):
                display.print(said)
        for event in run.poll():
            display.print(event)
        if run.learner_done():
            return
        wanted = fleet.wanted(list(metrics.rows), len(run.actors))
        if wanted != len(run.actors):
            display.print(f"fleet: {len(run.actors)} -> {wanted} actors")
            run.scale(wanted)
            fleet.scaled()
        time.sleep(0.5)


def train(cfg: Config, start: Path, ray_address: str | None = None) -> dict[str, Any]:
    """Run (or continue) a run to `run.num_steps`; returns a summary."""
    from async_rl.metrics import ProgressDisplay, WandbLogger

    check_placement(cfg, ray_address)
    init_ray(cfg, ray_address)
    try:
        wait_for_resources(cfg)
    except ConfigError:
        ray.shutdown()
        raise
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    run = Supervisor(cfg, start)
    began, interrupted = time.monotonic(), False
    metrics = _Metrics(run.paths.metrics)
    wandb = WandbLogger(cfg, cfg.run_dir)
    try:
        with ProgressDisplay(cfg.run.num_steps, cfg.logging.progress) as display:
            run.launch()
            display.print(f"run directory {run.run_dir}; {len(run.actors)} actor(s)")
            _supervise(run, metrics, wandb, display)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        actors = run.actor_stats()
        run.shutdown()
        wandb.close()
        ray.shutdown()
    for row in metrics.tail.read():
        metrics.keep(row)
    rows = metrics.rows
    return {
        "steps": rows[-1]["version"] if rows else 0,
        "wall_time_s": time.monotonic() - began,
        "run_dir": str(run.run_dir),
        "interrupted": interrupted,
        "last": rows[-1] if rows else {},
        "accuracy": metrics.accuracy,  # held-out accuracy of this session's evaluations
        "actors": actors,
    }
