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
learner resumes from its newest checkpoint. Heartbeat: the driver pings every process; one
that answers nothing for `run.heartbeat_timeout_s` (stopped, hung) is killed and Ray starts it
again, and an actor whose loop failed is replaced the same way. A SIGTERMed process stops
cleanly (buffer closes its segment, learner checkpoints, actor finishes its step) and Ray
restarts it. Ctrl-C or SIGTERM to the driver stops everything in order (actors, learner with a
final checkpoint, buffer closing its segment) and leaves a resumable run directory.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from async_rl.config import Config, ConfigError, is_loopback, load_config, to_toml
from async_rl.messages import ActorStats, ProcessStatus
from async_rl.paths import RunPaths, read_fleet_request, write_fleet_size, write_pid
from async_rl.runtime import configure_torch


def _setup_process(run_dir: str, name: str) -> Config:
    """Config, threads, and the process's pid file (for operators and fault-injection tests)."""
    paths = RunPaths(run_dir)
    write_pid(paths, name)
    cfg = load_config(paths.config)
    configure_torch(cfg.run.num_threads)
    return cfg


# How long a process that is starting or restarting may take to answer its first ping.
START_TIMEOUT_S = 300.0
# How many times the learner (all its ranks) is started again after a failure, in one session.
LEARNER_RESTARTS = 3


class _Threaded:
    """A Ray actor body that runs `self.loop()` in a thread and reports how it ended.

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
        from async_rl.app.evaluation import EngineEvaluator
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
        num_cpus=max(os.cpu_count() or 1, 1 + cfg.learner.num_ranks + cfg.actor.max_actors),
        include_dashboard=False,
        _node_ip_address=cfg.run.bind_host,
        log_to_driver=False,
    )


def check_placement(cfg: Config, address: str | None) -> None:
    """Refuse, before Ray starts, a learner that this machine cannot place: a rank per core,
    and on CUDA a GPU per rank (a cluster, `--ray-address`, is checked by Ray's placement group
    as the run starts)."""
    if address is not None:
        return
    ranks, cores = cfg.learner.num_ranks, os.cpu_count() or 1
    if ranks > cores:
        raise ConfigError(
            "learner.num_ranks",
            f"{ranks} learner ranks need a CPU core each; this machine has {cores}",
        )
    if cfg.learner.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if ranks > gpus:
            raise ConfigError(
                "learner.device",
                f"cuda: {ranks} learner rank(s) (learner.num_ranks) need a GPU each; this "
                f"machine has {gpus}",
            )


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


def _wait_all(refs: list, timeout_s: float) -> list:
    """The refs that are ready within `timeout_s` (all of them, or fewer)."""
    return ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0] if refs else []


class Run:
    """The driver's handles on one run's processes."""

    def __init__(self, cfg: Config, start: Path):
        self.cfg, self.run_dir, self.start = cfg, cfg.run_dir.resolve(), start
        self.paths = RunPaths(self.run_dir)
        self.actors: dict[str, Any] = {}
        self.pings: dict[str, tuple[Any, float]] = {}  # process -> (status ref, sent at)
        self.statuses: dict[str, ProcessStatus] = {}  # process -> its last answer
        self.up: set[str] = set()  # processes that answered since they last (re)started
        self.down_since: dict[str, float] = {}
        self.next_actor = 0
        self.buffer = None
        self.learners: dict[str, Any] = {}  # learner_name(rank) -> its handle, rank order
        self.learner_group = None  # their placement group
        self.learner_restarts = 0

    def launch(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.paths.config.write_text(to_toml(self.cfg))
        opts = {"max_restarts": -1, "max_task_retries": 0}
        self.buffer = ray.remote(BufferWorker).options(num_cpus=0, **opts).remote(str(self.run_dir))
        ray.get(self.buffer.status.remote())
        self.start_learners()
        self.scale(self.cfg.actor.num_actors)

    def start_learners(self) -> None:
        """Place the learner's ranks (a placement group of a CPU each, and a GPU each on CUDA),
        start rank 0 first for the rendezvous, then have every rank join and start training."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = self.cfg.learner.num_ranks
        bundle = {"CPU": 1, **({"GPU": 1} if self.cfg.learner.device == "cuda" else {})}
        group = self.learner_group = placement_group([bundle] * world, strategy="PACK")
        if not ray.wait([group.ready()], timeout=START_TIMEOUT_S)[0]:
            raise RuntimeError(
                f"learner.num_ranks = {world}: Ray cannot place {world} x {bundle} within "
                f"{START_TIMEOUT_S:.0f}s (cluster: {ray.cluster_resources()})"
            )
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            self.learners[learner_name(rank)] = (
                ray.remote(LearnerWorker)
                .options(
                    num_cpus=1,
                    num_gpus=bundle.get("GPU", 0),
                    max_restarts=0,  # a rank is restarted with its group, by `poll`
                    max_task_retries=0,
                    scheduling_strategy=strategy,
                )
                .remote(str(self.run_dir), str(self.start), rank, world)
            )
        ranks = list(self.learners.values())
        address = ()
        if world > 1:
            address = ray.get(ranks[0].rendezvous.remote(), timeout=START_TIMEOUT_S)
        ray.get([h.join.remote(*address) for h in ranks], timeout=START_TIMEOUT_S)

    def restart_learners(self, why: str) -> str:
        """Stop every rank of the learner (a group trains together or not at all); the next
        `poll` starts the group again: it resumes from its newest checkpoint, and the buffer
        serves it the same global batches again."""
        from ray.util.placement_group import remove_placement_group

        self.learner_restarts += 1
        if self.learner_restarts > LEARNER_RESTARTS:
            raise RuntimeError(f"the learner failed {self.learner_restarts} times; last: {why}")
        for name, handle in self.learners.items():
            ray.kill(handle, no_restart=True)
            self.up.discard(name)
            self.pings.pop(name, None)
            self.statuses.pop(name, None)
        self.learners.clear()
        if self.learner_group is not None:
            remove_placement_group(self.learner_group)
            self.learner_group = None
        return f"{why}: restarting the learner ({self.cfg.learner.num_ranks} rank(s))"

    def scale(self, n: int) -> None:
        while len(self.actors) < n:
            actor_id = f"a{self.next_actor}"
            self.next_actor += 1
            self.actors[actor_id] = (
                ray.remote(ActorWorker)
                .options(num_cpus=1, max_restarts=-1, max_task_retries=0, **self._actor_gpus())
                .remote(str(self.run_dir), actor_id, str(self.start))
            )
        while len(self.actors) > n:
            actor_id, handle = self.actors.popitem()
            try:
                ray.get(handle.stop.remote(), timeout=180)
            except ray.exceptions.RayError:  # dead or hung: it goes anyway
                pass
            ray.kill(handle)
        write_fleet_size(self.paths, len(self.actors))

    def _actor_gpus(self) -> dict[str, int]:
        """The GPUs one actor reserves: its engine's on CUDA (a vLLM engine's tensor-parallel
        group), none on CPU."""
        act = self.cfg.actor
        if act.device != "cuda":
            return {}
        return {"num_gpus": act.tensor_parallel_size if act.engine == "vllm" else 1}

    def poll(self) -> list[str]:
        """Ping every process (without waiting) and act on what the answers say.

        Raises if the buffer failed (or the learner, run on one rank), or if one is gone (not
        answering for START_TIMEOUT_S after a start or crash). A process that answered before
        and now answers nothing for `run.heartbeat_timeout_s` is killed, and an actor whose loop
        failed too; Ray starts them again. A learner rank that crashes, fails (with several
        ranks: a peer's failure looks like that) or stops answering stops the whole group,
        which the next poll starts again. Returns what was done, for the terminal.
        """
        if not self.learners:  # stopped by the previous poll
            self.start_learners()
        now, events = time.monotonic(), []
        processes = {**self.learners, "buffer": self.buffer, **self.actors}
        for name in list(self.pings.keys() - processes.keys()):
            del self.pings[name]  # an actor that left the fleet
        for name, handle in processes.items():
            ref, sent = self.pings.setdefault(name, (handle.status.remote(), now))
            if ray.wait([ref], timeout=0)[0]:
                del self.pings[name]
                event = self._answered(name, handle, ref, now)
            elif name in self.up:
                event = self._silent(name, handle, now - sent, now)
            else:
                down_s = now - self.down_since.setdefault(name, sent)
                event = self._not_started(name, handle, down_s)
            if event:
                events.append(event)
            if not self.learners:  # the group was stopped: the next poll starts it
                break
        return events

    def _answered(self, name: str, handle, ref, now: float) -> str | None:
        try:
            status = self.statuses[name] = ray.get(ref)
        except ray.exceptions.RayActorError:  # crashed; Ray restarts it (not a learner rank)
            if name in self.learners:
                return self.restart_learners(f"{name} crashed")
            self.up.discard(name)
            self.down_since.setdefault(name, now)
            return None
        self.up.add(name)
        self.down_since.pop(name, None)
        if status.error and name in self.learners and len(self.learners) > 1:
            return self.restart_learners(f"{name} failed ({status.error})")
        if status.error and name in ("learner", "buffer"):
            raise RuntimeError(f"the {name} stopped: {status.error}")
        if status.finished and name in self.actors:
            self._restart(name, handle)
            return f"{name} stopped ({status.error}): replacing it"
        return None

    def _silent(self, name: str, handle, silent_s: float, now: float) -> str | None:
        """A process that answered before and has not answered the last ping yet."""
        if self._died(name) and name in self.learners:
            return self.restart_learners(f"{name} died")
        if self._died(name):  # while Ray restarts it, its ping waits for the new one
            self.up.discard(name)
            self.down_since[name] = now
        elif silent_s > self.cfg.run.heartbeat_timeout_s:
            pid = self.statuses[name].pid
            silent = f"{name} (pid {pid}) did not answer for {silent_s:.0f}s (stopped or hung)"
            if name in self.learners:
                return self.restart_learners(silent)
            self._restart(name, handle)
            return f"{silent}: killing it; Ray starts it again"
        return None

    def _not_started(self, name: str, handle, down_s: float) -> str | None:
        """A process that has not answered since it was started or crashed."""
        if down_s <= START_TIMEOUT_S:
            return None
        if name in self.actors:
            self._restart(name, handle)
            return f"{name} did not start in {START_TIMEOUT_S:.0f}s: restarting"
        raise RuntimeError(
            f"the {name} is gone: no answer for {START_TIMEOUT_S:.0f}s since it "
            "was started or crashed, and Ray did not restart it"
        )

    def _died(self, name: str) -> bool:
        """Whether the process that last answered for `name` is gone (known on this node only)."""
        last = self.statuses[name]
        if last.node != ray.get_runtime_context().get_node_id():
            return False
        try:
            os.kill(last.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def _restart(self, name: str, handle) -> None:
        ray.kill(handle, no_restart=False)
        self.up.discard(name)
        self.pings.pop(name, None)
        self.down_since[name] = time.monotonic()

    def learner_done(self) -> bool:
        status = self.statuses.get(learner_name(0))
        return status is not None and status.finished

    def actor_stats(self) -> dict[str, ActorStats]:
        """Counters of the actors that answer within a few seconds (restarting ones start over)."""
        refs = {h.stats.remote(): actor_id for actor_id, h in self.actors.items()}
        stats = {}
        for ref in _wait_all(list(refs), timeout_s=5):
            try:
                stats[refs[ref]] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        return stats

    def shutdown(self) -> None:
        # in parallel; a dead or hung actor has nothing to stop
        _wait_all([handle.stop.remote() for handle in self.actors.values()], timeout_s=150)
        self.actors.clear()
        # the ranks together: rank 0 tells the others to stop, then all checkpoint
        _wait_all([handle.stop.remote() for handle in self.learners.values()], timeout_s=180)
        if self.buffer is not None:
            try:
                ray.get(self.buffer.stop.remote(), timeout=180)
            except Exception:
                pass


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


class _Fleet:
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


def _supervise(run: Run, metrics: _Metrics, wandb, display) -> None:
    """The driver's loop until the learner is done: metrics to wandb and the terminal, the
    heartbeat of every process, the fleet's size."""
    fleet = _Fleet(run.cfg, run.paths)
    while True:
        for row in metrics.new_rows():
            wandb.log(row)
            display.update(row, len(run.actors))
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
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    run = Run(cfg, start)
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
