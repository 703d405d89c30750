"""The bodies of the run's Ray actors: the buffer, each learner rank, each actor.

Each runs its loop in a thread (`_Threaded`) and answers the supervisor's pings with a
`ProcessStatus`; `async_rl/run/supervisor.py` starts them, pings them and restarts them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import ray

from async_rl.config import Config, config_from_toml, is_loopback
from async_rl.hf_config import WEIGHT_FILES
from async_rl.runtime import configure_torch
from async_rl.wire.messages import ActorStats, ProcessStatus
from async_rl.wire.transport import node_ip


def _setup_process(config: str) -> Config:
    """The run's config (TOML text from the driver: no process reads the run directory for
    it) and the process's threads."""
    cfg = config_from_toml(config, "the run's config")
    configure_torch(cfg.run.num_threads)
    return cfg


def start_files(start: Path) -> dict[str, bytes]:
    """What an actor needs of the run's starting checkpoint, by file name: every file but the
    tensors (config.json and the tokenizer's), a few KB to MB; the tensors come from the weight
    store. The driver reads them, so that an actor never reads the run directory."""
    return {
        f.name: f.read_bytes()
        for f in sorted(Path(start).iterdir())
        if f.is_file() and f.name not in WEIGHT_FILES and f.suffix != ".safetensors"
    }


def _write_start(files: dict[str, bytes], run_dir: str, actor_id: str) -> Path:
    """`start_files` written to a directory of this node's temporary space, the same one on a
    restart (the old one is replaced)."""
    tag = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    where = Path(tempfile.gettempdir()) / f"async-rl-{tag}-{actor_id}-start"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for name, data in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"start checkpoint file {name!r}: not a plain file name")
        (where / name).write_bytes(data)
    return where


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
    def __init__(self, run_dir: str, config: str):
        from async_rl.buffer.service import BufferService

        cfg = _setup_process(config)
        self.service = BufferService(cfg, Path(run_dir))
        self._start(self.service.run)

    def steer(self, k: int, reason: str, signals: dict[str, float]) -> None:
        self.service.steer(k, reason, signals)

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(30)


class LearnerWorker(_Threaded):
    """One learner rank. Rank 0 opens the rendezvous (`rendezvous`), then every rank `join`s
    the group, builds its learner, starts it (FSDP2 shards with several ranks) and trains."""

    def __init__(self, run_dir: str, config: str, start: str, rank: int = 0, world_size: int = 1):
        self.cfg = _setup_process(config)
        self.run_dir, self.start, self.rank, self.world_size = run_dir, start, rank, world_size
        self.error, self.finished, self.learner, self.store = None, False, None, None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address and free port the other ranks join at."""
        from learner.parallel import open_rendezvous

        bind = self.cfg.run.bind_host
        host = bind if is_loopback(bind) else node_ip()
        self.store, port = open_rendezvous(host, self.world_size, collective_timeout_s(self.cfg))
        return host, port

    def join(self, host: str | None = None, port: int | None = None) -> None:
        from async_rl.run.evaluation import EngineEvaluator
        from learner.parallel import join_group
        from learner.run import Learner

        cfg, timeout = self.cfg, collective_timeout_s(self.cfg)
        dp = join_group(
            self.rank, self.world_size, host, port, timeout, cfg.learner.device, self.store
        )
        evaluator = EngineEvaluator(cfg, self.start) if cfg.run.eval_every and dp.is_main else None
        learner = Learner(cfg, Path(self.run_dir), Path(self.start), evaluator=evaluator, dp=dp)
        self.learner = learner.start()
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
    """One actor. It reads nothing of the run directory (with `weights.store = ray`, or
    `collective` over `ray`): its config and the starting checkpoint's small files come from
    the driver, the weights from the store, the endpoints from Ray (`async_rl.paths`)."""

    def __init__(self, run_dir: str, config: str, actor_id: str, start: dict[str, bytes]):
        from actors.loop import Actor

        cfg = _setup_process(config)
        self.start = _write_start(start, run_dir, actor_id)
        self.actor = Actor(cfg, Path(run_dir), actor_id, start=self.start).start()
        self._start(self.actor.run)

    def stats(self) -> ActorStats:
        return self.actor.stats

    def stop(self) -> None:
        self.actor.stop()
        self.thread.join(120)
        self.actor.close()
        shutil.rmtree(self.start, ignore_errors=True)
