"""The driver's handles on one run's processes: starting them, pinging them, restarting them.

Ray restarts a crashed actor or buffer process (`max_restarts`); a restarted buffer recovers
its directory, a restarted actor says hello and its old leases are released, a restarted
learner resumes from its newest checkpoint. Heartbeat: the driver pings every process; one
that answers nothing for `run.heartbeat_timeout_s` (stopped, hung) is killed and Ray starts it
again, and an actor whose loop failed is replaced the same way. The learner's ranks train
together or not at all: one that crashes, fails or stops answering stops the whole group,
which the next poll starts again (up to LEARNER_RESTARTS times a session).

The supervisor keeps one `Process` record per process; what it does when one fails depends
on its `Role`.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from async_rl.config import Config, to_toml
from async_rl.paths import RunPaths, write_fleet_size, write_json_atomic, write_pid
from async_rl.run.autopilot import Decision
from async_rl.run.cluster import NodeWatch, place_learner_ranks, ray_options
from async_rl.run.placement import role_resources
from async_rl.run.workers import ActorWorker, BufferWorker, LearnerWorker, learner_name, start_files
from async_rl.weights import prepare_weight_store
from async_rl.wire.messages import ActorStats, ProcessStatus

# How long a process that is starting or restarting may take to answer its first ping.
START_TIMEOUT_S = 300.0
# How many times the learner (all its ranks) is started again after a failure, in one session.
LEARNER_RESTARTS = 3


class Role(enum.Enum):
    """What a process is to the run, which decides what a failure of it does."""

    BUFFER = "buffer"  # one; a failure of its loop stops the run, Ray restarts a crashed one
    LEARNER = "learner"  # one per rank; a rank that crashes or hangs restarts the group
    ACTOR = "actor"  # the elastic fleet; a failed or silent one is replaced


@dataclass
class Process:
    """The supervisor's record of one process of the run.

    Example: `Process("a3", Role.ACTOR, handle, ping=(ref, 812.5), status=ProcessStatus(...),
    up=True)`.
    """

    name: str  # "buffer", learner_name(rank) ("learner", "learner-1", ...), an actor's id ("a3")
    role: Role
    handle: Any  # its Ray actor handle
    ping: tuple[Any, float] | None = None  # the unanswered status ref, and when it was sent
    status: ProcessStatus | None = None  # its last answer
    up: bool = False  # it answered since it last (re)started
    down_since: float | None = None  # while not up: since when it has been starting or gone


def _wait_all(refs: list, timeout_s: float) -> list:
    """The refs that are ready within `timeout_s` (all of them, or fewer)."""
    return ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0] if refs else []


def _died(last: ProcessStatus) -> bool:
    """Whether the process that gave answer `last` is gone (known on this node only)."""
    if last.node != ray.get_runtime_context().get_node_id():
        return False
    try:
        os.kill(last.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class Supervisor:
    """Starts the run's processes, answers for them each `poll`, and stops them in order."""

    def __init__(self, cfg: Config, start: Path):
        self.cfg, self.run_dir, self.start = cfg, cfg.run_dir.resolve(), start
        self.paths = RunPaths(self.run_dir)
        self.buffer: Process | None = None
        self.learners: list[Process] = []  # rank order
        self.learner_group = None  # their placement group
        self.learner_restarts = 0
        self.actors: dict[str, Process] = {}  # by actor id, in the order they were started
        self.next_actor = 0
        self.nodes: NodeWatch | None = None  # from launch on
        self.lost_nodes: list[dict[str, Any]] = []  # {"node", "at", "processes"}
        # where each process last answered from: {"a0": {"role": "actor", "node": "3223.."}};
        # kept for a process the supervisor no longer tracks (a learner group restarted)
        self.placed: dict[str, dict[str, str]] = {}
        self.ran_on: dict[str, set[str]] = {}  # node -> every process that answered from it
        self.config = to_toml(cfg)  # what every process is started with
        self.start_files: dict[str, bytes] | None = None  # an actor's part of `start`
        self.weights_registry = None  # the `ray` store's registry, on the driver's node

    def launch(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.paths.config.write_text(self.config)
        self.start_files = start_files(self.start)
        self.nodes = NodeWatch()
        opts = {"max_restarts": -1, "max_task_retries": 0}
        need = ray_options(role_resources(self.cfg)["buffer"])
        handle = (
            ray.remote(BufferWorker).options(**need, **opts).remote(str(self.run_dir), self.config)
        )
        self.buffer = Process("buffer", Role.BUFFER, handle)
        ray.get(handle.status.remote())
        self.weights_registry = prepare_weight_store(self.cfg)  # held: it lives with the run
        self.start_learners()
        self.scale(self.cfg.actor.num_actors)

    def start_learners(self) -> None:
        """Place the learner's ranks, start rank 0 first for the rendezvous, then have every
        rank join and start training."""
        world = self.cfg.learner.num_ranks
        self.learner_group, placements = place_learner_ranks(self.cfg, START_TIMEOUT_S)
        for rank, placement in enumerate(placements):
            handle = (
                ray.remote(LearnerWorker)
                .options(
                    **placement,
                    max_restarts=0,  # a rank is restarted with its group, by `poll`
                    max_task_retries=0,
                )
                .remote(str(self.run_dir), self.config, str(self.start), rank, world)
            )
            self.learners.append(Process(learner_name(rank), Role.LEARNER, handle))
        ranks = [p.handle for p in self.learners]
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
        for rank in self.learners:
            ray.kill(rank.handle, no_restart=True)
        self.learners.clear()
        if self.learner_group is not None:
            remove_placement_group(self.learner_group)
            self.learner_group = None
        return f"{why}: restarting the learner ({self.cfg.learner.num_ranks} rank(s))"

    def scale(self, n: int) -> None:
        need = role_resources(self.cfg)["actor"]
        while len(self.actors) < n:
            actor_id = f"a{self.next_actor}"
            self.next_actor += 1
            handle = (
                ray.remote(ActorWorker)
                .options(max_restarts=-1, max_task_retries=0, **ray_options(need))
                .remote(str(self.run_dir), self.config, actor_id, self.start_files)
            )
            self.actors[actor_id] = Process(actor_id, Role.ACTOR, handle)
        while len(self.actors) > n:
            _, actor = self.actors.popitem()
            try:
                ray.get(actor.handle.stop.remote(), timeout=180)
            except ray.exceptions.RayError:  # dead or hung: it goes anyway
                pass
            ray.kill(actor.handle)
            if self.placed.pop(actor.name, None):
                self.record_placement()
        write_fleet_size(self.paths, len(self.actors))

    def steer(self, decision: Decision) -> str | None:
        """The autopilot's K and signals to the buffer (a failure: the next window's retry)."""
        ref = self.buffer.handle.steer.remote(decision.k, decision.reason, decision.signals)
        try:
            ray.get(ref, timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:
            return f"autopilot: the buffer did not take K = {decision.k} ({type(e).__name__})"
        return f"autopilot: K -> {decision.k} ({decision.reason})" if decision.changed else None

    def poll(self) -> list[str]:
        """Ping every process (without waiting) and act on what the answers say.

        Raises if the buffer failed (or the learner, run on one rank), or if one is gone (not
        answering for START_TIMEOUT_S after a start or crash). A process that answered before
        and now answers nothing for `run.heartbeat_timeout_s` is killed, and an actor whose loop
        failed too; Ray starts them again. A learner rank that crashes, fails (with several
        ranks: a peer's failure looks like that) or stops answering stops the whole group,
        which the next poll starts again. Returns what was done, for the terminal.
        """
        now, events = time.monotonic(), []
        for node in sorted(self.nodes.lost() if self.nodes else ()):
            events.append(self._node_lost(node, now))
        if not self.learners:  # stopped by the previous poll (or a lost node)
            self.start_learners()
        for process in [*self.learners, self.buffer, *self.actors.values()]:
            if process.ping is None:
                process.ping = (process.handle.status.remote(), now)
            ref, sent = process.ping
            if ray.wait([ref], timeout=0)[0]:
                process.ping = None
                event = self._answered(process, ref, now)
            elif process.up:
                event = self._silent(process, now - sent, now)
            else:
                if process.down_since is None:
                    process.down_since = sent
                event = self._not_started(process, now - process.down_since)
            if event:
                events.append(event)
            if not self.learners:  # the group was stopped: the next poll starts it
                break
        return events

    def _node_lost(self, node: str, now: float) -> str:
        """Ray lost `node`: what ran there is down until Ray starts it again where its
        resources are (actors and the buffer), or the learner group starts again."""
        here = [n for n, p in self.placed.items() if p["node"] == node]  # there still
        learner = any(self.placed.pop(n)["role"] == Role.LEARNER.value for n in here)
        names = sorted(self.ran_on.pop(node, set()))  # a crashed one may be elsewhere by now
        self.lost_nodes.append({"node": node, "at": time.time(), "processes": names})
        for process in [self.buffer, *self.learners, *self.actors.values()]:
            if process.name in here:
                process.up, process.down_since = False, now
        self.record_placement()
        lost = f"node {node[:12]} lost ({', '.join(names) or 'nothing of the run'} ran there)"
        if learner and self.learners:  # not yet restarted for a rank that crashed with it
            return self.restart_learners(lost)
        return f"{lost}: Ray starts them again where their resources are"

    def _answered(self, process: Process, ref, now: float) -> str | None:
        name, role = process.name, process.role
        try:
            status, last = ray.get(ref), process.status
            process.status = status
        except ray.exceptions.RayActorError:  # crashed; Ray restarts it (not a learner rank)
            if role is Role.LEARNER:
                return self.restart_learners(f"{name} crashed")
            process.up = False
            if process.down_since is None:
                process.down_since = now
            return None
        process.up, process.down_since = True, None
        if last is None or last.pid != status.pid:  # started, or started again
            write_pid(self.paths, name, status.pid)
        if self.placed.get(name, {}).get("node") != status.node:
            self.placed[name] = {"role": role.value, "node": status.node}
            self.ran_on.setdefault(status.node, set()).add(name)
            self.record_placement()
        if status.error and role is Role.LEARNER and len(self.learners) > 1:
            return self.restart_learners(f"{name} failed ({status.error})")
        if status.error and role in (Role.LEARNER, Role.BUFFER):  # the learner: one rank
            raise RuntimeError(f"the {name} stopped: {status.error}")
        if status.finished and role is Role.ACTOR:
            self._restart(process)
            return f"{name} stopped ({status.error}): replacing it"
        return None

    def _silent(self, process: Process, silent_s: float, now: float) -> str | None:
        """A process that answered before and has not answered the last ping yet."""
        name, died = process.name, _died(process.status)
        if died and process.role is Role.LEARNER:
            return self.restart_learners(f"{name} died")
        if died:  # while Ray restarts it, its ping waits for the new one
            process.up, process.down_since = False, now
        elif silent_s > self.cfg.run.heartbeat_timeout_s:
            pid = process.status.pid
            silent = f"{name} (pid {pid}) did not answer for {silent_s:.0f}s (stopped or hung)"
            if process.role is Role.LEARNER:
                return self.restart_learners(silent)
            self._restart(process)
            return f"{silent}: killing it; Ray starts it again"
        return None

    def _not_started(self, process: Process, down_s: float) -> str | None:
        """A process that has not answered since it was started or crashed."""
        if down_s <= START_TIMEOUT_S:
            return None
        if process.role is Role.ACTOR:
            self._restart(process)
            return f"{process.name} did not start in {START_TIMEOUT_S:.0f}s: restarting"
        raise RuntimeError(
            f"the {process.name} is gone: no answer for {START_TIMEOUT_S:.0f}s since it "
            "was started or crashed, and Ray did not restart it"
        )

    def _restart(self, process: Process) -> None:
        ray.kill(process.handle, no_restart=False)
        process.up, process.ping, process.down_since = False, None, time.monotonic()

    def record_placement(self) -> None:
        """`control/placement.json`: the node each process last answered from, and the nodes
        the run lost."""
        record = {"processes": self.placed, "lost_nodes": self.lost_nodes}
        write_json_atomic(self.paths.placement, record)

    def learner_done(self) -> bool:
        status = self.learners[0].status if self.learners else None
        return status is not None and status.finished

    def actor_stats(self) -> dict[str, ActorStats]:
        """Counters of the actors that answer within a few seconds (restarting ones start over)."""
        refs = {a.handle.stats.remote(): actor_id for actor_id, a in self.actors.items()}
        stats = {}
        for ref in _wait_all(list(refs), timeout_s=5):
            try:
                stats[refs[ref]] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        return stats

    def shutdown(self) -> None:
        # in parallel; a dead or hung actor has nothing to stop
        _wait_all([a.handle.stop.remote() for a in self.actors.values()], timeout_s=150)
        self.actors.clear()
        # the ranks together: rank 0 tells the others to stop, then all checkpoint
        _wait_all([rank.handle.stop.remote() for rank in self.learners], timeout_s=180)
        if self.buffer is not None:
            try:
                ray.get(self.buffer.handle.stop.remote(), timeout=180)
            except Exception:
                pass
