"""Tasks: the interface every task implements, and how a run gets its task.

A task hands out training problems by integer index, deterministically in (seed, index): the
buffer's admission hands each lease its prompt indices, so actors never draw the same problem,
and a problem leased again is exactly the one leased before. Each task also has a fixed
held-out set that never appears in its training stream, a reward, and the cold start's
completion of a problem.

Every task is a class built by name as `Class(seed=run.seed, **options)`: the user's
(`task.type = "pkg.module:Class"` or `"path/file.py:Class"`, options from `task.options`,
wrapped in `UserTask`, which checks what it returns), or one of the two built-in ones, written
on the same interface in modules of their own that nothing in the core imports
(`tests/unit/test_layout.py` keeps it so):

- `arithmetic` (`async_rl.tasks.arithmetic:ArithmeticTask`): an unbounded stream of generated
  problems such as `"347+589="` -> `"936"`, optionally with worked solutions;
- `file` (`async_rl.tasks.files:FileTask`): a user's JSONL or Parquet file with `prompt` and
  `answer` columns, cycled in epochs.

Their options come from the `[task]` keys they read (`builtin_options`). A reward by name
(`task.reward`) replaces the task's own (`NamedReward`).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from async_rl.by_name import resolve
from async_rl.rewards import BUILTIN as REWARDS
from async_rl.rewards import score_named

# the built-in tasks, by the name `task.type` gives them
BUILTIN = {
    "arithmetic": "async_rl.tasks.arithmetic:ArithmeticTask",
    "file": "async_rl.tasks.files:FileTask",
}
TASK_KINDS = tuple(BUILTIN)


@dataclass(frozen=True)
class Problem:
    """One prompt and what scores it. Example: `Problem("arith-train-17", "347+589=", "936")`,
    or with metadata `Problem("wp-3", "Ann has ...", "\\frac{3}{4}", {"level": 2})`."""

    prompt_id: str  # stable unique id, e.g. "arith-train-17" / "file-row-42"
    prompt: str  # text fed to the model (after bos), e.g. "347+589="
    answer: str  # reference answer, e.g. "936"
    # JSON values the task attaches (difficulty, source, test cases ...): stored with each of
    # its completions (the buffer's `problem_metadata`) and given to the reward as `metadata`
    metadata: dict = field(default_factory=dict)


class Task(Protocol):
    def train_problem(self, index: int) -> Problem:
        """Training problem `index` (>= 0), deterministic in (seed, index)."""
        ...

    def num_train(self) -> int | None:
        """Distinct training problems per epoch; None for an unbounded stream."""
        ...

    def heldout(self) -> list[Problem]:
        """The fixed held-out set; none of its prompts is ever a training prompt."""
        ...

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 if `completion` answers `problem` correctly, else 0.0."""
        ...

    def sft_completion(self, problem: Problem) -> str:
        """The correct completion text (without eos) for the supervised cold start."""
        ...


def check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: must be an integer >= 0, got {index!r}")


# --------------------------------------------------------------------------------------------
# A run's task


def build_task(kind: str, *, seed: int, **options: Any) -> Task:
    """The built-in task `kind` ("arithmetic" or "file"), built by name as a user's class is:
    `Class(seed=seed, **options)`."""
    if kind not in BUILTIN:
        raise ValueError(f"kind: must be one of {list(TASK_KINDS)}, got {kind!r}")
    return resolve(BUILTIN[kind])(seed=seed, **options)


def builtin_options(t: Any) -> dict[str, Any]:
    """A built-in task's constructor options from the `[task]` keys it reads."""
    if t.type == "arithmetic":
        return dict(
            ops=t.ops,
            min_digits=t.min_digits,
            max_digits=t.max_digits,
            heldout_size=t.heldout_size,
            worked=t.worked,
        )
    reward = t.reward if t.reward in REWARDS else "exact_match"
    return dict(path=t.path, heldout_size=t.heldout_size, reward=reward)


def task_from_config(cfg: Any) -> Task:
    """The task of a run config (`cfg.task.*`, seeded by `cfg.run.seed`): a built-in one or
    the user's class by name (`UserTask`), scored by `task.reward`: the task's own reward, or
    the user's function by name (`NamedReward`)."""
    t = cfg.task
    if t.type in BUILTIN:
        task = build_task(t.type, seed=cfg.run.seed, **builtin_options(t))
    else:
        task = UserTask.build(t.type, cfg.run.seed, t.options)
    return task if t.reward in REWARDS else NamedReward(task, t.reward, t.type)


REQUIRED = ("train_problem", "heldout")  # what a task class must have; the rest has defaults


def load_task_class(name: str):
    """The user's task class `name` ("pkg.module:Class" or "path/file.py:Class"), checked:
    its methods, and a constructor that takes `seed`; `ValueError` saying what is wrong."""
    cls = resolve(name, "Class", TASK_KINDS, "task")
    if not callable(cls):
        raise ValueError(f"{name}: {type(cls).__name__} cannot be constructed")
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{name}: has no method(s) {', '.join(missing)} (the task interface)")
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot read its constructor's signature ({e})") from e
    if not any(p.name == "seed" or p.kind == p.VAR_KEYWORD for p in parameters):
        raise ValueError(f"{name}: its constructor takes no `seed` (problems are seeded)")
    return cls


class UserTask:
    """The user's task object behind the `Task` interface: what it returns is checked (a
    `Problem`, or a dict of its fields), and what it leaves out has a default: an unbounded
    stream (`num_train`), exact match against the answer (`reward`), the answer as the cold
    start's completion (`sft_completion`)."""

    def __init__(self, task, name: str):
        self.task, self.name = task, name

    @classmethod
    def build(cls, name: str, seed: int, options: dict) -> UserTask:
        """`name(seed=seed, **options)`; `ValueError` naming `task.type` if that fails."""
        try:
            return cls(load_task_class(name)(seed=seed, **options), name)
        except Exception as e:
            raise ValueError(f"task.type: {name}(seed={seed}, **{options}) failed: {e}") from e

    def train_problem(self, index: int) -> Problem:
        return self._checked(self.task.train_problem(index), f"train_problem({index})")

    def num_train(self) -> int | None:
        num_train = getattr(self.task, "num_train", None)
        return num_train() if callable(num_train) else None

    def heldout(self) -> list[Problem]:
        return [self._checked(p, f"heldout()[{i}]") for i, p in enumerate(self.task.heldout())]

    def reward(self, problem: Problem, completion: str) -> float:
        reward = getattr(self.task, "reward", None)
        if callable(reward):
            return reward(problem, completion)
        return 1.0 if completion.strip() == problem.answer.strip() else 0.0

    def sft_completion(self, problem: Problem) -> str:
        sft = getattr(self.task, "sft_completion", None)
        return sft(problem) if callable(sft) else problem.answer

    def _checked(self, problem, where: str) -> Problem:
        if isinstance(problem, dict):
            try:
                problem = Problem(**problem)
            except TypeError as e:
                raise ValueError(f"{self.name}.{where}: {e}") from None
        if not isinstance(problem, Problem):
            raise ValueError(
                f"{self.name}.{where}: returned {type(problem).__name__}, not a Problem"
            )
        for key in ("prompt_id", "prompt", "answer"):
            if not isinstance(getattr(problem, key), str):
                raise ValueError(f"{self.name}.{where}: {key} is not a string")
        try:
            json.dumps(problem.metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name}.{where}: metadata is not JSON ({e})") from None
        return problem


class NamedReward:
    """A task scored by the user's reward function `name` (`async_rl.rewards`) instead of its
    own: what held-out evaluation and every other caller of `reward` then use. A failing call
    scores 0 here; the actors score through a pool with a timeout (`actors.scoring`)."""

    def __init__(self, task: Task, name: str, data_source: str):
        self.task, self.name, self.data_source = task, name, data_source

    def train_problem(self, index: int) -> Problem:
        return self.task.train_problem(index)

    def num_train(self) -> int | None:
        return self.task.num_train()

    def heldout(self) -> list[Problem]:
        return self.task.heldout()

    def reward(self, problem: Problem, completion: str) -> float:
        return score_named(self.name, self.data_source, problem, [completion]).rewards[0]

    def sft_completion(self, problem: Problem) -> str:
        return self.task.sft_completion(problem)
