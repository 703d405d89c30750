"""Scoring finished groups off the generation path: a pool, a timeout, the groups in order.

    scorer = Scorer(score, per_completion=True, workers=2, pool="thread", timeout_s=30)
    scorer.submit("lease-7", problem, ["12", "13"])          # returns at once
    for key, scores in scorer.ready(wait_s=0.0):            # finished groups, in submit order
        push(key, scores.rewards, scores.extras)

`score(problem, completions, first)` scores some completions of a problem (labels counted from
`first`) and never raises (`async_rl.rewards.score_group`). A reward that scores one completion
at a time is run as G tasks, so a slow verifier uses every worker; a batched one as one task.

The actor's loop keeps generating while the pool scores: it pushes whatever `ready()` hands back
after every step, and waits on it only when it has nothing to generate. Groups come back in the
order they were submitted, so a slow group holds back the ones after it (the buffer sees the
same order as without a pool; K = 0 stays sample for sample).

- `pool = "thread"`: the rewards run on threads of the actor's process (cheap to start, share
  its memory; Python code holds the GIL, so a CPU-bound verifier slows generation's Python).
- `pool = "process"`: on processes of their own (spawned: no fork of a process holding torch
  and zmq state), for CPU-bound verifiers; the reward must be named (`task.reward =
  "module:function"` or a file), and each worker imports it once.
- A task that runs past `timeout_s` scores 0 with an error. A process pool is then replaced
  (its processes killed: a hung verifier is gone) and the tasks it had not finished are
  submitted again; a thread cannot be killed, so a thread pool is replaced and the hung thread
  left to finish on its own: rewards that can hang belong in a process pool.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

from async_rl.choices import RewardPool, check
from async_rl.rewards import BUILTIN, GroupScores, load_reward, score_named, score_task
from async_rl.tasks import Problem

log = logging.getLogger(__name__)


@dataclass
class _Task:
    """Some completions of a group, scored by one call of `score`."""

    first: int  # index of the first completion in the group
    completions: list[str]
    future: Future | None = None
    started: float | None = None  # when it was first seen running (the clock's seconds)
    scores: GroupScores | None = None


@dataclass
class _Entry:
    key: str
    problem: Problem
    tasks: list[_Task] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(t.scores is not None for t in self.tasks)

    def merged(self) -> GroupScores:
        scores = GroupScores([], [])
        for t in self.tasks:
            scores.rewards += t.scores.rewards
            scores.extras += t.scores.extras
            scores.errors += t.scores.errors
            scores.failed += t.scores.failed
        return scores


class Scorer:
    """The actor's reward pool (module docstring)."""

    def __init__(
        self,
        score: Callable[[Problem, list[str], int], GroupScores],
        *,
        per_completion: bool,
        workers: int,
        pool: RewardPool,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        check("task.reward_pool", pool, RewardPool)
        self.score, self.per_completion = score, per_completion
        self.workers, self.kind, self.timeout_s, self.clock = workers, pool, timeout_s, clock
        self.pending: deque[_Entry] = deque()
        self.errors = 0  # completions scored 0 because their reward failed
        self.restarts = 0  # pools replaced after a timeout
        self._pool: Executor | None = None

    def submit(self, key: str, problem: Problem, completions: list[str]) -> None:
        """Score a group in the background; `ready()` hands it back."""
        entry = _Entry(key, problem)
        if self.per_completion:
            entry.tasks = [_Task(i, [c]) for i, c in enumerate(completions)]
        else:
            entry.tasks = [_Task(0, list(completions))]
        for task in entry.tasks:
            self._start(entry, task)
        self.pending.append(entry)

    def ready(self, wait_s: float = 0.0) -> list[tuple[str, GroupScores]]:
        """The scored groups at the head of the queue, in submit order; waits up to `wait_s`
        for the first one if none is ready."""
        deadline = time.monotonic() + wait_s
        self._poll()
        while self.pending and not self.pending[0].done and time.monotonic() < deadline:
            running = [t.future for t in self.pending[0].tasks if t.scores is None]
            wait_futures(running, timeout=min(0.05, max(deadline - time.monotonic(), 0)))
            self._poll()
        out = []
        while self.pending and self.pending[0].done:
            entry = self.pending.popleft()
            scores = entry.merged()
            if scores.errors and not self.errors:  # the run's first failure, whole
                log.warning("a reward failed (scored 0, counted): %s", scores.errors[0])
            self.errors += scores.failed
            out.append((entry.key, scores))
        return out

    def drain(self, timeout_s: float) -> list[tuple[str, GroupScores]]:
        """Every group still pending, waiting at most about `timeout_s` more than the
        reward timeout already allows."""
        out, deadline = [], time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            out += self.ready(wait_s=0.1)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._shutdown(self._pool)
            self._pool = None

    # ------------------------------------------------------------------ the pool
    def _executor(self) -> Executor:
        if self._pool is None:
            if self.kind == "thread":
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="reward")
            else:
                spawn = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.workers, mp_context=spawn)
        return self._pool

    def _start(self, entry: _Entry, task: _Task) -> None:
        task.started = None
        task.future = self._executor().submit(
            self.score, entry.problem, task.completions, task.first
        )

    def _poll(self) -> None:
        """Collect finished tasks; time out the ones running too long (module docstring)."""
        now, replace = self.clock(), False
        for entry in self.pending:
            for task in entry.tasks:
                if task.scores is not None:
                    continue
                if task.future.done():
                    try:
                        task.scores = task.future.result()
                    except BrokenExecutor as e:  # a worker died: the pool is no more
                        task.scores = _failed(task, f"its worker died ({e})")
                        replace = True
                    except Exception as e:  # what `score` could not keep to itself
                        task.scores = _failed(task, f"{type(e).__name__}: {e}")
                elif task.future.running():
                    task.started = now if task.started is None else task.started
                    if now - task.started > self.timeout_s:
                        why = f"timed out after {self.timeout_s:g} s (task.reward_timeout_s)"
                        task.scores, replace = _failed(task, why), True
        if replace:
            self._replace_pool()

    def _replace_pool(self) -> None:
        """A new pool for the tasks not yet scored; the old one's hung work is abandoned
        (processes killed, threads left to finish)."""
        old, self._pool = self._pool, None
        self.restarts += 1
        for entry in self.pending:
            for task in entry.tasks:
                if task.scores is None:
                    task.future.cancel()
                    if self.kind == "process" or not task.future.running():
                        self._start(entry, task)
        self._shutdown(old)

    def _shutdown(self, pool: Executor) -> None:
        if isinstance(pool, ProcessPoolExecutor):
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()  # a hung reward: nothing else ends it
        pool.shutdown(wait=False, cancel_futures=True)


def _failed(task: _Task, why: str) -> GroupScores:
    n, first = len(task.completions), task.first
    where = f"completion {first}" if n == 1 else f"completions {first}..{first + n - 1}"
    return GroupScores([0.0] * n, [{} for _ in range(n)], [f"{where}: {why}"], failed=n)


def scorer_for(cfg, task) -> Scorer:
    """The scorer of a run's `[task]`: the task's own reward (`exact_match`, `math_verify`)
    on threads, or the user's function by name, one completion per call unless batched."""
    t = cfg.task
    if t.reward in BUILTIN:
        score, per_completion = functools.partial(score_task, task), False
    else:
        per_completion = not load_reward(t.reward).batched
        score = functools.partial(score_named, t.reward, t.type)
    return Scorer(
        score,
        per_completion=per_completion,
        workers=t.reward_workers,
        pool=t.reward_pool,
        timeout_s=t.reward_timeout_s,
    )
