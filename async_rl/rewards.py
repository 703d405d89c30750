"""Rewards: how a completion is scored, the built-in ways and the user's function, by name.

    task.reward = "exact_match"                 the task's own check (the default)
    task.reward = "math_verify"                 math-verify's equivalence of the final answer
    task.reward = "my_pkg.rewards:score"        a function of an importable module
    task.reward = "rewards/format.py:score"     a function of a Python file (made absolute)

A user's function scores one completion at a time; its parameters' names say what it gets:

    def score(prompt: str, completion: str, answer: str, metadata: dict) -> float | dict

or the G completions of a group at once (a verifier that shares work across them):

    def score(prompts: list[str], completions: list[str], answers: list[str],
              metadatas: list[dict]) -> list[float | dict]

It may take any of those parameters (`**kwargs` takes them all), and verl's
`compute_score(data_source, solution_str, ground_truth, extra_info)` works as it is
(`solution_str` is the completion, `ground_truth` the answer, `extra_info` the metadata,
`data_source` the task's type). `metadata` holds the problem's `prompt_id` and the task's
metadata of it (`Problem.metadata`). A dict result
holds the reward under `reward` (or verl's `score`) and any other numbers, which the learner
reports as `rollout/reward/<name>` (their mean over the global batch). A function that raises,
returns something other than a finite number, or runs past `task.reward_timeout_s` scores 0
for that completion, and the run goes on: `score_group` says which failed and why (the actor
counts them, `rollout/reward_errors`, and logs the first traceback).

`load_reward` resolves a name and checks the function's signature; config validation calls it,
so a bad name, a missing function or a wrong signature stops the run at start-up, naming
`task.reward`. Nothing here is unpickled; a file is imported as Python code, as `import` would.
"""

from __future__ import annotations

import inspect
import math
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from async_rl.by_name import resolve

BUILTIN = ("exact_match", "math_verify")
SINGLE = ("prompt", "completion", "answer", "metadata")
BATCHED = ("prompts", "completions", "answers", "metadatas")
VERL = ("data_source", "solution_str", "ground_truth", "extra_info")  # verl's compute_score
RESULT_KEYS = ("reward", "score")  # where a dict result holds the reward
_MATH_INSTALL_HINT = "pip install 'async-rl[math]'"


@dataclass(frozen=True)
class UserReward:
    """A resolved reward function. Example: `load_reward("rewards.py:score")`."""

    name: str  # as configured: "pkg.module:function" or "/abs/path/file.py:function"
    fn: Callable
    batched: bool  # takes the plural parameters: a group at once
    params: tuple[str, ...]  # the parameters it is called with, by keyword


@dataclass
class GroupScores:
    """The scores of one group's completions. Example: rewards `[1.0, 0.0]`, extras
    `[{"format": 1.0}, {"format": 0.0}]`, errors `["completion 1: ZeroDivisionError ..."]`."""

    rewards: list[float]  # [G], 0 where the function failed
    extras: list[dict[str, float]]  # [G], the other numbers of a dict result ({} if none)
    errors: list[str] = field(default_factory=list)  # what failed, with its traceback
    failed: int = 0  # completions scored 0 because the function failed on them


def load_reward(name: str) -> UserReward:
    """The user's reward function `name` ("pkg.module:function" or "path/file.py:function"),
    checked; `ValueError` saying what is wrong."""
    fn = resolve(name, "function", BUILTIN, "reward")
    if not callable(fn):
        raise ValueError(f"{name}: {type(fn).__name__} is not callable")
    batched, params = _signature(name, fn)
    return UserReward(name, fn, batched, params)


def _signature(name: str, fn: Callable) -> tuple[bool, tuple[str, ...]]:
    """Whether `fn` takes a group, and the parameters to call it with, by keyword (module
    docstring); `ValueError` if it needs a parameter no reward is given."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot read its signature ({e})") from e
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
    batched = any(p.name == "completions" for p in named)
    known = BATCHED if batched else SINGLE + VERL
    needed = [
        p.name
        for p in named
        if p.kind == p.POSITIONAL_ONLY or (p.name not in known and p.default is p.empty)
    ]
    if needed:
        raise ValueError(
            f"{name}: needs {', '.join(needed)}, which a reward is not given by keyword; it "
            f"may take {', '.join(SINGLE)} (one completion), {', '.join(BATCHED)} (a group), "
            f"or verl's {', '.join(VERL)}"
        )
    given = [p.name for p in named if p.name in known]
    if takes_all:
        given += [p for p in (BATCHED if batched else SINGLE) if p not in given]
    if not {"completion", "completions", "solution_str"} & set(given):
        raise ValueError(
            f"{name}: takes neither `completion` (one at a time) nor `completions` (a group): "
            "it would never see what the model wrote"
        )
    return batched, tuple(given)


# ---------------------------------------------------------------------- calling it
def _kwargs(reward: UserReward, prompt, completion, answer, metadata, data_source) -> dict:
    values = {
        "prompt": prompt,
        "completion": completion,
        "answer": answer,
        "metadata": metadata,
        "data_source": data_source,
        "solution_str": completion,
        "ground_truth": answer,
        "extra_info": metadata,
    }
    return {p: values[p] for p in reward.params}


def _batched_kwargs(reward: UserReward, prompt, completions, answer, metadata) -> dict:
    g = len(completions)
    values = {
        "prompts": [prompt] * g,
        "completions": list(completions),
        "answers": [answer] * g,
        "metadatas": [dict(metadata) for _ in range(g)],
    }
    return {p: values[p] for p in reward.params}


def as_score(result) -> tuple[float, dict[str, float]]:
    """A function's result as (reward, extras); `ValueError` if it is not a finite number or a
    dict holding one under `reward` (or `score`) with numbers besides."""
    if isinstance(result, dict):
        key = next((k for k in RESULT_KEYS if k in result), None)
        if key is None:
            raise ValueError(f"a dict result needs a 'reward' key, got keys {sorted(result)}")
        extras = {k: _number(v, k) for k, v in result.items() if k != key}
        return _number(result[key], key), extras
    return _number(result, "reward"), {}


def _number(value, what: str) -> float:
    # Python, numpy and torch numbers (and bools) convert; None, strings and lists do not
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"{what}: {type(value).__name__} {value!r:.80} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what}: {number} is not finite")
    return number


def score_group(
    reward: UserReward,
    prompt: str,
    completions: list[str],
    answer: str,
    metadata: dict,
    data_source: str,
    first: int = 0,
) -> GroupScores:
    """Score completions of one problem with the user's function (errors name them counting
    from `first`); a failure scores 0 and is described in `errors`, never raised."""
    g = len(completions)
    scores = GroupScores([0.0] * g, [{} for _ in range(g)])
    results: list = [None] * g
    if reward.batched:
        try:
            kwargs = _batched_kwargs(reward, prompt, completions, answer, metadata)
            results = list(reward.fn(**kwargs))
            if len(results) != g:
                raise ValueError(f"returned {len(results)} results for {g} completions")
        except Exception:
            scores.errors.append(f"{reward.name} on a group: {traceback.format_exc()}")
            scores.failed = g
            return scores
    for i in range(g):
        try:
            if not reward.batched:
                kwargs = _kwargs(reward, prompt, completions[i], answer, metadata, data_source)
                results[i] = reward.fn(**kwargs)
            scores.rewards[i], scores.extras[i] = as_score(results[i])
        except Exception:
            where = f"completion {first + i}"
            scores.errors.append(f"{reward.name} on {where}: {traceback.format_exc()}")
            scores.failed += 1
    return scores


_LOADED: dict[str, UserReward] = {}
_LOADING = threading.Lock()  # a pool's threads load a reward once


def score_named(name: str, data_source: str, problem, completions: list[str], first: int = 0):
    """`score_group` with the reward function `name`, loaded once per process: what a reward
    pool's workers run (only strings and the problem reach them)."""
    with _LOADING:
        if name not in _LOADED:
            _LOADED[name] = load_reward(name)
    metadata = {"prompt_id": problem.prompt_id, **problem.metadata}
    return score_group(
        _LOADED[name], problem.prompt, completions, problem.answer, metadata, data_source, first
    )


def score_task(task, problem, completions: list[str], first: int = 0) -> GroupScores:
    """Completions scored by the task's own built-in reward (`task.reward`), never raising."""
    scores = GroupScores([0.0] * len(completions), [{} for _ in completions])
    for i, completion in enumerate(completions):
        try:
            scores.rewards[i] = _number(task.reward(problem, completion), "reward")
        except Exception:
            scores.errors.append(f"completion {first + i}: {traceback.format_exc()}")
            scores.failed += 1
    return scores


# ---------------------------------------------------------------------- built-ins, by name
def exact_match(completion: str, answer: str) -> float:
    """1.0 if the completion is the answer (surrounding whitespace aside): a reward by name,
    `async_rl.rewards:exact_match`."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


def math_verify(completion: str, answer: str) -> float:
    """math-verify's judgement of the completion against the answer: a reward by name,
    `async_rl.rewards:math_verify` (for `task.reward_pool = "process"`)."""
    return math_verify_reward(answer, completion)


@lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(answer, parsing_timeout=timeout)


def require_math_verify() -> None:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise ImportError(
            f"reward 'math_verify' needs the math-verify package: {_MATH_INSTALL_HINT}"
        ) from None


def math_verify_reward(answer: str, completion: str) -> float:
    """1.0 if math-verify judges `completion` mathematically equal to the gold `answer`."""
    require_math_verify()
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _parse_gold(answer, timeout)
        pred = parse(completion, parsing_timeout=timeout)
        # The argument order matters: verify is not symmetric and takes the gold first.
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
    except Exception:
        # Whatever a model writes, scoring it must not crash a rollout: unparseable is wrong.
        return 0.0
