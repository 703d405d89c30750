"""The actor loop: lease prompts, generate G completions each, score, tag, push groups.

    actor.batching = "static"                           actor.batching = "continuous"
    loop:                                               loop, one decode step at a time:
        swap to the newest weights version                  newer weights? in flight: load now;
        lease <- buffer.lease(prompts per step)                 between groups: admit nothing new
            None = back-pressure: pause                         until the running rows finish
        load weights >= lease.min_version                   lease while rows are free; submit
        generate every leased group together                    what the weights allow
        push each group                                     engine.step(); push finished groups

Either way a group is generated from weights >= its lease's `min_version` (the buffer's
staleness budget), sampled from the seed `group_seed(run, prompt index, version)`, scored on
the reward pool while generation goes on (`actors.scoring`: groups come back in the order they
finished generating), tagged (actor, engine, per-token versions, sampling, quantization) and
pushed as one Arrow batch, one zmq message. With in-flight updates a completion's tokens can
come from several versions: `policy_version` is the oldest, `policy_version_max` the newest
(docs/design.md section 4).

Prompts come from the buffer's leases: each training prompt index is handed out once, in order,
whatever the size of the fleet, so actors can join and leave without re-sharding. A killed actor
leaves no partial group (a group is one message); its leases expire and their prompts are
handed out again. `stop()` ends the loop after the current step.

Run on its own: `python -m actors.loop RUN_DIR --actor-id a0 --start CHECKPOINT`. Which
weights version to load, and loading it, is `actors.versions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import zmq

from actors.engine import (
    Engine,
    Generation,
    GroupRequest,
    SamplingParams,
    run_to_completion,
)
from actors.scoring import scorer_for
from actors.versions import VersionFollower
from async_rl.config import Config, load_config
from async_rl.paths import RunPaths, wait_for_endpoints
from async_rl.rewards import GroupScores
from async_rl.runtime import configure_torch
from async_rl.tasks import Problem, Task, task_from_config
from async_rl.tokenizer import Tokenizer, tokenizer_from_config
from async_rl.types import RoutingSpec, Trajectory, group_to_batch
from async_rl.weights import WeightSubscriber, weight_store
from async_rl.wire.clients import RolloutSink, ZmqRolloutSink
from async_rl.wire.messages import ActorStats
from async_rl.wire.security import curve_for

log = logging.getLogger(__name__)


def group_seed(run_seed: int, prompt_index: int, version: int) -> int:
    """Sampling seed of a generation step: reproducible, independent of the fleet's shape."""
    return zlib.crc32(f"{run_seed}:{prompt_index}:{version}".encode())


def _buffer_sink(cfg: Config, run_dir: Path, ctx: zmq.Context, curve, stopping) -> ZmqRolloutSink:
    """The actor's sink: the run's buffer service, once it published its endpoints (within
    `run.startup_timeout_s`)."""
    timeout, retry_s = cfg.run.startup_timeout_s, cfg.buffer.wait_timeout_s
    return ZmqRolloutSink(
        run_dir, ctx=ctx, timeout_s=timeout, curve=curve, retry_s=retry_s, stopping=stopping
    )


def _follow_learner(
    cfg: Config, run_dir: Path, actor_id: str, ctx: zmq.Context, curve, deadline: float
) -> VersionFollower:
    """The actor's view of the learner's versions, once the learner published its endpoints
    (by `deadline`, a `time.monotonic()` time; else `TimeoutError`)."""
    left = max(deadline - time.monotonic(), 0.0)
    learner = wait_for_endpoints(RunPaths(run_dir), "learner", timeout_s=left)
    store = weight_store(cfg, run_dir, member=actor_id)
    return VersionFollower(cfg, store, WeightSubscriber(ctx, learner["weights"], curve))


class Actor:
    """One actor of a run (module docstring). Build it, which stores its arguments and opens,
    reads and starts nothing, then `start()` it (it waits for the buffer and the learner, up
    to `run.startup_timeout_s`), then `run()`; `close()` closes what `start()` opened (nothing,
    for an actor never started)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        actor_id: str,
        engine: Engine | None = None,
        ctx: zmq.Context | None = None,
        prompts_per_step: int | None = None,
        start: Path | None = None,
        sink: RolloutSink | None = None,
    ):
        """`engine` defaults to one built from `start` (the run's starting checkpoint) at the
        first version the learner published; `sink` to the run's buffer service
        (`ZmqRolloutSink`); `ctx` to the process's zmq context."""
        self.cfg, self.run_dir, self.actor_id = cfg, Path(run_dir), actor_id
        self.engine, self.ctx, self.sink, self.start_checkpoint = engine, ctx, sink, start
        self.spec = RoutingSpec.of(cfg.model)
        self.prompts_per_step = prompts_per_step or cfg.algo.prompts_per_minibatch
        self.stopping = threading.Event()
        self.started = False
        self.scorer = self.versions = None  # `start()` makes them, the task and the tokenizer
        self.stats = ActorStats()
        self._next_lease = 0.0
        self.held: list[tuple[str, int, int]] = []  # leased, not submitted: (lease, prompt, min v)
        self.submitted: dict[str, tuple[GroupRequest, Problem]] = {}  # by lease, until pushed
        self.scoring: dict[str, list[Generation]] = {}  # by lease: generated, being scored

    def start(self) -> Actor:
        """Load the task and the tokenizer, connect to the buffer, wait for the learner's first
        version and build the engine at it, and say hello to the buffer. The waits together
        take at most `run.startup_timeout_s`, else `TimeoutError`."""
        if self.started:
            raise RuntimeError(f"actor {self.actor_id} is started already")
        self.started, cfg = True, self.cfg
        self.task: Task = task_from_config(cfg)
        self.scorer = scorer_for(cfg, self.task)
        self.tokenizer: Tokenizer = tokenizer_from_config(cfg)
        self.ctx = self.ctx or zmq.Context.instance()
        curve, timeout = curve_for(cfg), cfg.run.startup_timeout_s
        deadline = time.monotonic() + timeout
        try:
            self.sink = self.sink or _buffer_sink(cfg, self.run_dir, self.ctx, curve, self.stopping)
            self.versions = _follow_learner(
                cfg, self.run_dir, self.actor_id, self.ctx, curve, deadline
            )
            if self.engine is None:  # the learner's first version, to build the engine at
                first = self.versions.wait_for(0, self.stopping, deadline)
        except TimeoutError as e:
            raise TimeoutError(f"{e} (run.startup_timeout_s = {timeout:g} s)") from None
        if self.engine is None:
            self.engine = self.versions.build(self.start_checkpoint, first)
        self.sink.hello(self.actor_id)  # releases leases an earlier incarnation left behind
        self.stats = ActorStats(version=self.engine.version)
        return self

    def _load(self, version: int | None) -> None:
        """Swap to `version` (or a newer one, if it was collected meanwhile); None: nothing."""
        if version is None:
            return
        in_flight = self.engine.num_running > 0
        self.versions.load(self.engine, version)
        self.stats.weight_swaps += 1
        self.stats.swaps_in_flight += in_flight
        self.stats.version = self.engine.version

    def sync_weights(self, at_least: int = 0) -> None:
        """Swap to the newest version if a newer one is announced, found, or required."""
        start = time.monotonic()
        self.versions.heard()
        if self.engine.version < at_least:
            self.versions.wait_for(at_least, self.stopping)
        self._load(self.versions.to_load(self.engine.version))
        self.stats.weights_s += time.monotonic() - start

    def step(self) -> int:
        """One step of the loop (module docstring); the number of groups pushed."""
        if self.versions is None:
            raise RuntimeError(f"actor {self.actor_id} is not started: call start() first")
        if self.cfg.actor.batching == "static":
            return self._static_step()
        return self._continuous_step()

    def _static_step(self) -> int:
        pushed = self._push_scored()  # the last batch's groups, as their rewards come in
        self.sync_weights()
        start = time.monotonic()
        grant = self._lease(self.prompts_per_step, wait_s=0.0 if self.scorer.pending else 0.5)
        if grant is None:
            self.stats.paused_s += time.monotonic() - start
            return pushed + self._push_scored(wait_s=0.05)
        self.sync_weights(at_least=grant.min_version)
        start = time.monotonic()
        requests = [self._request(lease, index) for lease, index in grant.leases]
        for request, group in zip(requests, run_to_completion(self.engine, requests), strict=True):
            self._score(request.request_id, group)
        self.stats.generate_s += time.monotonic() - start
        return pushed + self._push_scored()

    def _continuous_step(self) -> int:
        start = time.monotonic()
        if self.versions.heard() is not None:  # a new version: the buffer admits more
            self._next_lease = 0.0
        busy = self.engine.num_running + self.engine.num_waiting > 0
        in_flight = self.cfg.actor.weight_update == "in_flight"
        self._load(self.versions.to_load(self.engine.version, may_swap=in_flight or not busy))
        self.stats.weights_s += time.monotonic() - start
        if self.versions.wanted <= self.engine.version:  # else: the running rows finish first
            self._admit(busy)
        if not (self.engine.num_running or self.engine.num_waiting):
            return self._push_scored(wait_s=0.05)  # nothing to generate: wait for the rewards
        start = time.monotonic()
        for request_id, group in self.engine.step():
            self._score(request_id, group)
        self.stats.running_rows = self.engine.num_running
        self.stats.generate_s += time.monotonic() - start
        return self._push_scored()

    def _admit(self, busy: bool) -> None:
        """Lease groups while rows are free (without waiting while others generate); submit
        those whose `min_version` the engine's weights meet."""
        g, rows = self.cfg.algo.group_size, self.cfg.actor.max_running_rows
        free = (rows - self.engine.num_running) // g - self.engine.num_waiting - len(self.held)
        now = time.monotonic()
        if free > 0 and (not busy or now >= self._next_lease):
            grant = self._lease(free, wait_s=0.0 if busy else 0.5)
            if grant is None:
                self._next_lease = now + 0.05  # the budget is full: ask again in a while
                if not busy:
                    self.stats.paused_s += time.monotonic() - now
            else:
                self.held += [(lease, index, grant.min_version) for lease, index in grant.leases]
        ready = [h for h in self.held if h[2] <= self.engine.version]
        self.held = [h for h in self.held if h[2] > self.engine.version]
        for lease, index, _ in ready:
            self.engine.submit(self._request(lease, index))
        for _, _, min_version in self.held:  # weights this new are needed first
            self.versions.need(min_version)

    def _lease(self, count: int, wait_s: float):
        """Leases for `count` groups (None: pause), saying what this actor is doing."""
        return self.sink.lease(
            self.actor_id,
            count,
            version=self.engine.version,
            wait_s=wait_s,
            running_rows=self.engine.num_running,
            swaps_in_flight=self.stats.swaps_in_flight,
            reward_errors=self.stats.reward_errors,
        )

    def _request(self, lease: str, index: int) -> GroupRequest:
        """The engine's request for the leased prompt `index`, at the current weights."""
        act, version = self.cfg.actor, self.engine.version
        params = SamplingParams(
            temperature=act.temperature,
            top_p=act.top_p,
            max_new_tokens=act.max_new_tokens,
            seed=group_seed(self.cfg.run.seed, index, version),
            stop_ids=self.tokenizer.stop_ids,
        )
        problem = self.task.train_problem(index)
        prompt = self.tokenizer.encode_prompt(problem.prompt)
        request = GroupRequest(lease, prompt, self.cfg.algo.group_size, params)
        self.submitted[lease] = (request, problem)
        return request

    def _score(self, lease: str, group: list[Generation]) -> None:
        """Hand a generated group to the reward pool (`actors.scoring`)."""
        _, problem = self.submitted[lease]
        self.scoring[lease] = group
        texts = [self.tokenizer.decode_completion(g.tokens) for g in group]
        self.scorer.submit(lease, problem, texts)

    def _push_scored(self, wait_s: float = 0.0) -> int:
        """Push the groups whose rewards are in, in the order they were generated; how many."""
        return self._push(self.scorer.ready(wait_s))

    def _push(self, scored: list[tuple[str, GroupScores]]) -> int:
        for lease, scores in scored:
            request, problem = self.submitted.pop(lease)
            group = self.scoring.pop(lease)
            self.sink.push(self._group(problem, request, group, scores), lease)
            self.stats.groups += 1
            self.stats.tokens += sum(len(g.tokens) for g in group)
            self.stats.reward_errors += scores.failed
        return len(scored)

    def _group(
        self, problem: Problem, request: GroupRequest, group: list[Generation], scores: GroupScores
    ):
        group_id = f"{self.actor_id}-{problem.prompt_id}-{uuid.uuid4().hex[:8]}"
        metadata = json.dumps(problem.metadata, sort_keys=True)
        rows = [
            Trajectory(
                sample_id=f"{group_id}-{i}",
                group_id=group_id,
                prompt_id=problem.prompt_id,
                problem_metadata=metadata,
                actor_id=self.actor_id,
                engine=self.cfg.actor.engine,
                policy_version=min(g.versions),
                policy_version_max=max(g.versions),
                prompt_tokens=request.prompt,
                completion_tokens=g.tokens,
                behavior_logprobs=g.logprobs,
                token_versions=g.versions,
                routing=g.routing,
                reward=scores.rewards[i],
                reward_extras=scores.extras[i],
                finish_reason=g.finish_reason,
                temperature=request.params.temperature,
                top_p=request.params.top_p,
                quantization=self.cfg.actor.quantization,
            )
            for i, g in enumerate(group)
        ]
        return group_to_batch(rows, self.spec)

    def run(self) -> None:
        """Generation steps until `stop()`, on whatever thread calls it."""
        import torch

        # OpenMP's thread count is per thread: a thread started after the process set it uses
        # every core until told, and vLLM's CPU attention refuses a count that differs from
        # the one it planned with ("thread_num == thread_num (2 vs. 1)").
        torch.set_num_threads(self.cfg.run.num_threads)
        while not self.stopping.is_set():
            self.step()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        """Close what `start()` opened (as far as it got); nothing for an actor never started."""
        if not self.started:
            return
        if self.scorer is not None:  # groups being scored are still pushed: their rewards
            self._push(self.scorer.drain(self.cfg.task.reward_timeout_s + 5))  # get their time
            self.scorer.close()
        if self.sink is not None:
            self.sink.leave(self.actor_id)  # leases of rows that will not finish: no batch waits
        for part in (self.versions, self.sink, self.engine):  # the sink lingers: queued groups
            if part is not None:  # are still delivered
                part.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one actor of a run directory.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--actor-id", required=True)
    parser.add_argument(
        "--start", type=Path, required=True, help="starting HF checkpoint (the learner's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.actor_id} %(message)s")
    cfg = load_config(RunPaths(args.run_dir).config)
    configure_torch(cfg.run.num_threads)
    actor = Actor(cfg, args.run_dir, args.actor_id, start=args.start)
    signal.signal(signal.SIGTERM, lambda *_: actor.stop())
    signal.signal(signal.SIGINT, lambda *_: actor.stop())
    actor.start()
    actor.run()
    actor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
