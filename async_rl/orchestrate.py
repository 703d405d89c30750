"""`async-rl train`: Ray places and supervises the run's processes; the driver watches.

    driver (this process)                     Ray actors
    ├─ writes runs/<name>/config.toml         BufferWorker   zmq PULL/ROUTER, Arrow segments
    ├─ starts ──────────────────────────────► LearnerWorker  global steps, publishes v+1
    ├─ starts K (elastic) ──────────────────► ActorWorker×K  lease → generate → push groups
    ├─ tails metrics.jsonl → progress bar, wandb
    └─ polls control/fleet.json (async-rl scale) and the autoscaler; replaces dead actors

    data plane (zmq):  actors ──groups──► buffer ◄──sample(v)── learner ──"v ready"──► actors
    weights:           learner ──WeightStore (fs | ray)──► actors, newest complete version

Ray restarts a crashed actor or buffer process (`max_restarts`); a restarted buffer recovers
its directory, a restarted actor says hello and its old leases are released, a restarted
learner resumes from its newest checkpoint. Ctrl-C stops everything in order (actors, learner
with a final checkpoint, buffer closing its segment) and leaves a resumable run directory.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

from async_rl.config import Config, is_loopback, to_toml
from async_rl.transport import write_json_atomic


def _setup_process(run_dir: str, name: str) -> Config:
    """Config, threads, and `control/pids/<name>.pid` (for operators and fault-injection tests)."""
    from async_rl.config import load_config

    pids = Path(run_dir) / "control" / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"{name}.pid").write_text(str(os.getpid()))
    cfg = load_config(Path(run_dir) / "config.toml")
    import torch

    torch.set_num_threads(cfg.run.num_threads)
    return cfg


class _Threaded:
    """A Ray actor body that runs `self.loop()` in a thread and reports how it ended."""

    def _start(self, target) -> None:
        self.error: str | None = None
        self.finished = False

        def run():
            try:
                target()
            except Exception as e:  # reported to the driver, which stops the run
                self.error = f"{type(e).__name__}: {e}"
            finally:
                self.finished = True

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        return {"finished": self.finished, "error": self.error, "pid": os.getpid()}


class BufferWorker(_Threaded):
    def __init__(self, run_dir: str):
        from async_rl.buffer_service import BufferService

        cfg = _setup_process(run_dir, "buffer")
        self.service = BufferService(cfg, Path(run_dir))
        self._start(self.service.run)

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(30)


class LearnerWorker(_Threaded):
    def __init__(self, run_dir: str, start: str):
        from learner.run import Learner

        cfg = _setup_process(run_dir, "learner")
        self.learner = Learner(cfg, Path(run_dir), Path(start))
        self._start(self.learner.run)

    def stop(self) -> None:
        self.learner.stopping.set()
        self.thread.join(120)
        if self.learner.step.updates:
            self.learner.checkpoint()
        self.learner.close()


class ActorWorker(_Threaded):
    def __init__(self, run_dir: str, actor_id: str, start: str):
        from actors.loop import Actor

        cfg = _setup_process(run_dir, actor_id)
        self.actor = Actor(cfg, Path(run_dir), actor_id, start=Path(start))
        self._start(self.actor.run)

    def stats(self) -> dict[str, Any]:
        return {**self.actor.stats, "version": self.actor.engine.version}

    def stop(self) -> None:
        self.actor.stop()
        self.thread.join(120)
        self.actor.close()


def init_ray(cfg: Config, address: str | None) -> None:
    """Join `address`, or start a local Ray instance that listens on loopback only.

    On Linux Ray turns a loopback node address into the machine's reachable one and its GCS,
    raylet and worker servers listen on every interface; with
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (its single-machine mode) they use 127.0.0.1. The
    variable is read by this process at import and by every Ray process it starts, so it is set
    in both places.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    if is_loopback(cfg.run.bind_host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 2 + cfg.actor.max_actors),
        include_dashboard=False,
        _node_ip_address=cfg.run.bind_host,
        log_to_driver=False,
    )


def fleet_file(run_dir: Path) -> Path:
    return run_dir / "control" / "fleet.json"


def request_fleet(run_dir: Path, actors: int) -> None:
    """What `async-rl scale` does: ask the running driver for `actors` actors."""
    write_json_atomic(fleet_file(run_dir), {"actors": actors, "requested_at": time.time()})


def autoscale(rows: list[dict[str, Any]], cfg: Config, current: int) -> int:
    """The fleet size the autoscaler wants after these metric rows (one decision per call).

    Grow while the learner spends over a fifth of its loop waiting for data; shrink while the
    buffer holds a full (K + 1) x B budget of fresh groups (actors are pausing); always within
    actor.min_actors..actor.max_actors.
    """
    rows = [r for r in rows if "learner/wait_time_s" in r][-5:]
    if not rows:
        return current
    wait = sum(r["learner/wait_time_s"] for r in rows)
    busy = sum(r["learner/step_time_s"] + r.get("learner/publish_time_s", 0.0) for r in rows)
    budget = (cfg.buffer.max_staleness + 1) * cfg.global_batch_groups
    if wait > 0.2 * (wait + busy):
        return min(current + 1, cfg.actor.max_actors)
    if rows[-1].get("buffer/groups", 0) >= budget:
        return max(current - 1, cfg.actor.min_actors)
    return current


def requested_fleet(run_dir: Path, cfg: Config, seen: float) -> tuple[int | None, float]:
    """A fleet size asked for with `async-rl scale` after time `seen`, clamped to the bounds."""
    try:
        data = json.loads(fleet_file(run_dir).read_text())
        wanted, at = data["actors"], float(data["requested_at"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None, seen
    if not isinstance(wanted, int) or at <= seen:
        return None, seen
    return min(max(wanted, cfg.actor.min_actors), cfg.actor.max_actors), at


class Run:
    """The driver's handles on one run's processes."""

    def __init__(self, cfg: Config, start: Path):
        self.cfg, self.run_dir, self.start = cfg, cfg.run_dir.resolve(), start
        self.actors: dict[str, Any] = {}
        self.down_since: dict[str, float] = {}
        self.next_actor = 0
        self.buffer = self.learner = None

    def launch(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        opts = {"max_restarts": -1, "max_task_retries": 0}
        self.buffer = ray.remote(BufferWorker).options(num_cpus=0, **opts).remote(str(self.run_dir))
        ray.get(self.buffer.status.remote())
        self.learner = (
            ray.remote(LearnerWorker)
            .options(num_cpus=1, max_restarts=3, max_task_retries=0)
            .remote(str(self.run_dir), str(self.start))
        )
        ray.get(self.learner.status.remote())
        self.scale(self.cfg.actor.num_actors)

    def scale(self, n: int) -> None:
        while len(self.actors) < n:
            actor_id = f"a{self.next_actor}"
            self.next_actor += 1
            self.actors[actor_id] = (
                ray.remote(ActorWorker)
                .options(num_cpus=1, max_restarts=-1, max_task_retries=0)
                .remote(str(self.run_dir), actor_id, str(self.start))
            )
        while len(self.actors) > n:
            actor_id, handle = self.actors.popitem()
            ray.get(handle.stop.remote())
            ray.kill(handle)

    def _status(self, name: str, handle) -> dict[str, Any]:
        """A process's status; while Ray restarts it, "restarting" (for at most 5 minutes)."""
        try:
            status = ray.get(handle.status.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            since = self.down_since.setdefault(name, time.monotonic())
            if time.monotonic() - since > 300:
                raise RuntimeError(f"the {name} is gone and was not restarted: {e}") from None
            return {"finished": False, "error": None, "restarting": True}
        self.down_since.pop(name, None)
        return status

    def check(self) -> None:
        """Raise if the learner or the buffer failed (crashed processes are restarted by Ray)."""
        for name, handle in (("learner", self.learner), ("buffer", self.buffer)):
            status = self._status(name, handle)
            if status["error"]:
                raise RuntimeError(f"the {name} stopped: {status['error']}")

    def learner_done(self) -> bool:
        return self._status("learner", self.learner)["finished"]

    def actor_stats(self) -> dict[str, dict[str, Any]]:
        stats = {}
        for actor_id, handle in self.actors.items():
            try:
                stats[actor_id] = ray.get(handle.stats.remote(), timeout=30)
            except Exception:  # restarting: its counters started over
                continue
        return stats

    def shutdown(self) -> None:
        for handle in self.actors.values():
            try:
                ray.get(handle.stop.remote(), timeout=120)
            except Exception:  # a dead actor has nothing to stop
                pass
        self.actors.clear()
        for handle in (self.learner, self.buffer):
            if handle is not None:
                try:
                    ray.get(handle.stop.remote(), timeout=180)
                except Exception:
                    pass


def train(cfg: Config, start: Path, ray_address: str | None = None) -> dict[str, Any]:
    """Run (or continue) a run to `run.num_steps`; returns a summary."""
    from async_rl.metrics import MetricsTail, ProgressDisplay, WandbLogger

    init_ray(cfg, ray_address)
    run = Run(cfg, start)
    began, rows, interrupted = time.monotonic(), [], False
    tail = MetricsTail(cfg.run_dir / "metrics.jsonl")
    tail.read()  # a resumed run's earlier steps are already logged
    wandb = WandbLogger(cfg, cfg.run_dir)
    try:
        with ProgressDisplay(cfg.run.num_steps, cfg.logging.progress) as display:
            run.launch()
            display.print(f"run directory {run.run_dir}; {len(run.actors)} actor(s)")
            last_tokens, last_time = 0, time.monotonic()
            last_scaled, fleet_seen = time.monotonic(), time.time()
            while True:
                new = tail.read()
                if new:  # actor throughput since the previous rows
                    tokens = sum(s["tokens"] for s in run.actor_stats().values())
                    now = time.monotonic()
                    rate = max(tokens - last_tokens, 0) / max(now - last_time, 1e-9)
                    last_tokens, last_time = tokens, now
                for row in new:
                    row["rollout/actors"] = len(run.actors)
                    row["rollout/tokens_per_s"] = rate
                    rows.append(row)
                    wandb.log(row)
                    display.update(row, len(run.actors))
                if run.learner_done():
                    break
                run.check()
                wanted, fleet_seen = requested_fleet(run.run_dir, cfg, fleet_seen)
                wanted = len(run.actors) if wanted is None else wanted
                now = time.monotonic()
                if cfg.actor.autoscale and now - last_scaled > cfg.actor.autoscale_interval_s:
                    wanted, last_scaled = autoscale(rows, cfg, len(run.actors)), now
                if wanted != len(run.actors):
                    display.print(f"fleet: {len(run.actors)} -> {wanted} actors")
                    run.scale(wanted)
                time.sleep(0.5)
            run.check()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        actors = run.actor_stats()
        run.shutdown()
        wandb.close()
        ray.shutdown()
    for row in tail.read():
        rows.append(row)
    return {
        "steps": rows[-1]["version"] if rows else 0,
        "wall_time_s": time.monotonic() - began,
        "run_dir": str(run.run_dir),
        "interrupted": interrupted,
        "last": rows[-1] if rows else {},
        "accuracy": [r["eval/accuracy"] for r in rows if "eval/accuracy" in r],
        "rows": rows,
        "actors": actors,
    }
