"""The bodies of the run's Ray actors: the buffer, each learner rank, each actor.

Each runs its loop in a thread (`_Threaded`) and answers the supervisor's pings with a
`ProcessStatus`; `app/supervisor.py` starts them, pings them and restarts them.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import ray

from async_rl.config import Config, is_loopback, load_config
from async_rl.messages import ActorStats, ProcessStatus
from async_rl.paths import RunPaths, write_pid
from async_rl.runtime import configure_torch


def _setup_process(run_dir: str, name: str) -> Config:
    """Config, threads, and the process's pid file (for operators and fault-injection tests)."""
    paths = RunPaths(run_dir)
    write_pid(paths, name)
    cfg = load_config(paths.config)
    configure_torch(cfg.run.num_threads)
    return cfg


class _Threaded:
    """A Ray actor body that runs its `target` in a thread and reports how it ended.

    SIGTERM calls `self.stop()`, then Ray's own handler, which exits the process; Ray then
    restarts it like a crashed one.
    """

    def _start(self, target) -> None:
        self.error: str | None = None
        self.finished = False
        ray_handler = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            signal.signal(signal.SIGTERM, ray_handler)  # a second SIGTERM does not wait
            self.stop()
            if callable(ray_handler):
                ray_handler(signum, frame)
            raise SystemExit(1)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)

        def run():
            try:
                target()
            except Exception as e:  # reported to the driver, which stops the run
                self.error = f"{type(e).__name__}: {e}"
            finally:
                self.finished = True

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def status(self) -> ProcessStatus:
        node = ray.get_runtime_context().get_node_id()
        return ProcessStatus(finished=self.finished, error=self.error, pid=os.getpid(), node=node)


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
    """One learner rank. Rank 0 opens the rendezvous (`rendezvous`), then every rank `join`s
    the group, builds its learner (FSDP2 shards with several ranks) and starts training."""

    def __init__(self, run_dir: str, start: str, rank: int = 0, world_size: int = 1):
        self.cfg = _setup_process(run_dir, learner_name(rank))
        self.run_dir, self.start, self.rank, self.world_size = run_dir, start, rank, world_size
        self.error, self.finished, self.learner, self.store = None, False, None, None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address and free port the other ranks join at."""
        from learner.parallel import open_rendezvous

        host = (
            self.cfg.run.bind_host
            if is_loopback(self.cfg.run.bind_host)
            else (ray.util.get_node_ip_address())
        )
        self.store, port = open_rendezvous(host, self.world_size, collective_timeout_s(self.cfg))
        return host, port

    def join(self, host: str | None = None, port: int | None = None) -> None:
        from app.evaluation import EngineEvaluator
        from learner.parallel import join_group
        from learner.run import Learner

        cfg, timeout = self.cfg, collective_timeout_s(self.cfg)
        dp = join_group(
            self.rank, self.world_size, host, port, timeout, cfg.learner.device, self.store
        )
        evaluator = EngineEvaluator(cfg, self.start) if cfg.run.eval_every and dp.is_main else None
        self.learner = Learner(
            cfg, Path(self.run_dir), Path(self.start), evaluator=evaluator, dp=dp
        )
        self._start(self.learner.run)  # a stopped learner checkpoints where it stopped

    def stop(self) -> None:
        if self.learner is None:
            return
        self.learner.stopping.set()
        # Rank 0 tells the others at its next step and they all checkpoint together; until
        # then the others train on. One that is stopped alone leaves its group, which the
        # driver starts again.
        self.thread.join(120 if self.rank == 0 else 5)
        if not self.thread.is_alive():
            self.learner.close()


def learner_name(rank: int) -> str:
    """The process name of a learner rank: "learner" for rank 0, "learner-<rank>" else."""
    return "learner" if rank == 0 else f"learner-{rank}"


def collective_timeout_s(cfg: Config) -> float:
    """How long a learner rank waits for its peers in a collective: rank 0 may be waiting for a
    global batch (buffer.wait_timeout_s) or evaluating. A rank that is gone is found sooner:
    its peers' sockets close, or the driver's heartbeat restarts the group."""
    return cfg.buffer.wait_timeout_s + 600.0


class ActorWorker(_Threaded):
    def __init__(self, run_dir: str, actor_id: str, start: str):
        from actors.loop import Actor

        cfg = _setup_process(run_dir, actor_id)
        self.actor = Actor(cfg, Path(run_dir), actor_id, start=Path(start))
        self._start(self.actor.run)

    def stats(self) -> ActorStats:
        return self.actor.stats

    def stop(self) -> None:
        self.actor.stop()
        self.thread.join(120)
        self.actor.close()
