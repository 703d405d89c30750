"""Tasks: prompts, reference answers and a 0/1 reward.

A task hands out training problems by integer index, deterministically in (seed, index), so K
actors can take disjoint shards (`index = rank + K * j`) without coordinating, and a restarted
actor regenerates exactly the problems it had. Each task also has a fixed held-out set that never
appears in its training stream.

- `ArithmeticTask`: an unbounded stream of generated problems such as `"347+589="` -> `"936"`;
  with `worked=True` the completion writes out its working before the answer (`worked()`), so
  completions run from about 8 to about 110 tokens, and the reward looks at the final answer.
- `FileTask`: a user's JSONL or Parquet file with string columns `prompt` and `answer`, cycled
  in epochs, reshuffled (seeded) every epoch.

Randomness comes from `random.Random` seeded with strings like `"arith:0:train:17:0"`; string
seeds are hashed with SHA-512, so unlike Python's salted `hash()` they agree across processes.
"""

from __future__ import annotations

import inspect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from async_rl.by_name import resolve
from async_rl.rewards import BUILTIN as REWARDS
from async_rl.rewards import math_verify_reward, require_math_verify, score_named

ARITH_OPS = ("+", "-", "*")
# The second operand of `*` has at most this many digits, so products stay short to generate.
MUL_MAX_DIGITS = 2
TASK_KINDS = ("arithmetic", "file")
FILE_SUFFIXES = (".jsonl", ".parquet")


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


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: must be an integer >= 0, got {index!r}")


# --------------------------------------------------------------------------------------------
# Arithmetic


def _count_numbers(min_digits: int, max_digits: int) -> int:
    """How many non-negative integers have between min_digits and max_digits digits (0 has 1)."""
    return 10**max_digits - (10 ** (min_digits - 1) if min_digits > 1 else 0)


def _random_operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


class ArithmeticTask:
    """Generated problems `"{a}{op}{b}="` with answer `str(result)`.

    Problem i draws the operator uniformly from `ops`, each operand's digit count uniformly from
    [min_digits, max_digits] and the operand uniformly among numbers with that many digits (0
    counts as 1-digit). For `-` the operands are swapped when needed so results are never
    negative. For `*` the second operand has at most `MUL_MAX_DIGITS` (2) digits, even when
    min_digits is larger, so that products stay short.

    The held-out set has `heldout_size` distinct problems from a separate stream; a training
    draw that collides with it is re-drawn (deterministically, with an attempt counter).

    `worked`: the cold start's completion is `worked(prompt)` (the column-by-column working,
    then ` =` and the answer), and a completion scores 1 when the text after its last `=` is
    the answer.
    """

    def __init__(
        self,
        seed: int,
        ops: Sequence[str] = ("+", "*"),
        min_digits: int = 1,
        max_digits: int = 3,
        heldout_size: int = 256,
        worked: bool = False,
    ):
        ops = tuple(ops)
        if not ops:
            raise ValueError(f"ops: must name at least one of {list(ARITH_OPS)}")
        if worked and "-" in ops:
            raise ValueError("ops: worked solutions are written for '+' and '*' only")
        bad = [op for op in ops if op not in ARITH_OPS]
        if bad:
            raise ValueError(f"ops: unknown operator(s) {bad}; allowed: {list(ARITH_OPS)}")
        if not 1 <= min_digits <= 9:
            raise ValueError(f"min_digits: must be in 1..9, got {min_digits}")
        if not 1 <= max_digits <= 9:
            raise ValueError(f"max_digits: must be in 1..9, got {max_digits}")
        if min_digits > max_digits:
            raise ValueError(
                f"min_digits: must be <= max_digits, got min_digits={min_digits}, "
                f"max_digits={max_digits}"
            )
        if heldout_size < 0:
            raise ValueError(f"heldout_size: must be >= 0, got {heldout_size}")
        distinct = self._distinct_problems(ops, min_digits, max_digits)
        # Leaving at least half the problems to training keeps re-draws on collision cheap.
        if heldout_size > distinct // 2:
            raise ValueError(
                f"heldout_size: {heldout_size} is too large; ops={list(ops)} with "
                f"{min_digits}..{max_digits} digits give only {distinct} distinct problems "
                f"(at most half may be held out)"
            )
        self.seed, self.worked = seed, worked
        self.ops = ops
        self.min_digits = min_digits
        self.max_digits = max_digits
        self._heldout = self._make_heldout(heldout_size)
        self._heldout_prompts = frozenset(p.prompt for p in self._heldout)

    @staticmethod
    def _distinct_problems(ops: tuple[str, ...], min_digits: int, max_digits: int) -> int:
        n = _count_numbers(min_digits, max_digits)
        counts = {
            "+": n * n,
            "-": n * (n + 1) // 2,  # ordered so that a >= b
            "*": n
            * _count_numbers(min(min_digits, MUL_MAX_DIGITS), min(max_digits, MUL_MAX_DIGITS)),
        }
        return sum(counts[op] for op in set(ops))

    def _draw(self, stream: str, index: int, attempt: int) -> tuple[str, str]:
        rng = random.Random(f"arith:{self.seed}:{stream}:{index}:{attempt}")
        op = rng.choice(self.ops)
        a = _random_operand(rng, rng.randint(self.min_digits, self.max_digits))
        b_digits = rng.randint(self.min_digits, self.max_digits)
        if op == "*":
            b_digits = min(b_digits, MUL_MAX_DIGITS)
        b = _random_operand(rng, b_digits)
        if op == "+":
            result = a + b
        elif op == "-":
            a, b = max(a, b), min(a, b)
            result = a - b
        else:
            result = a * b
        return f"{a}{op}{b}=", str(result)

    def _make_heldout(self, size: int) -> list[Problem]:
        problems: list[Problem] = []
        seen: set[str] = set()
        for j in range(size):
            attempt = 0
            prompt, answer = self._draw("heldout", j, attempt)
            while prompt in seen:
                attempt += 1
                prompt, answer = self._draw("heldout", j, attempt)
            seen.add(prompt)
            problems.append(Problem(f"arith-heldout-{j}", prompt, answer))
        return problems

    def train_problem(self, index: int) -> Problem:
        _check_index(index)
        attempt = 0
        prompt, answer = self._draw("train", index, attempt)
        while prompt in self._heldout_prompts:
            attempt += 1
            prompt, answer = self._draw("train", index, attempt)
        return Problem(f"arith-train-{index}", prompt, answer)

    def num_train(self) -> int | None:
        return None

    def heldout(self) -> list[Problem]:
        return list(self._heldout)

    def reward(self, problem: Problem, completion: str) -> float:
        final = completion.rsplit("=", 1)[-1] if self.worked else completion
        return 1.0 if final.strip() == problem.answer else 0.0

    def sft_completion(self, problem: Problem) -> str:
        return worked(problem.prompt) if self.worked else problem.answer


def _columns(a: str, b: str) -> tuple[list[str], str]:
    """Column addition of two digit strings, right to left: the steps and the sum."""
    width = max(len(a), len(b))
    a, b = a.rjust(width, "0"), b.rjust(width, "0")
    steps, digits, carry = [], [], 0
    for x, y in zip(reversed(a), reversed(b), strict=True):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        digits.append(str(total % 10))
        carry = total // 10
    result = (str(carry) if carry else "") + "".join(reversed(digits))
    return steps, result


def _times_digit(a: str, d: str) -> tuple[list[str], str]:
    """`a` times one digit `d`, right to left: the steps and the partial product."""
    steps, digits, carry = [], [], 0
    for x in reversed(a):
        total = int(x) * int(d) + carry
        steps.append(f"{x}*{d}" + (f"+{carry}" if carry else "") + f"={total}")
        digits.append(str(total % 10))
        carry = total // 10
    result = (str(carry) if carry else "") + "".join(reversed(digits))
    return steps, str(int(result))


def worked(prompt: str) -> str:
    """The working of `"a+b="` or `"a*b="`, then ` =` and the answer (what the cold start learns).

    A sum is added column by column from the right, each column `x+y(+carry)=total`; a product
    multiplies by each digit of b the same way (`x*d(+carry)=total`, then ` =partial`), and two
    partial products are then summed by columns. Examples:
        worked("347+589=") == "7+9=16 4+8+1=13 3+5+1=9 =936"
        worked("47*25=") == ("7*5=35 4*5+3=23 =235 7*2=14 4*2+1=9 =94 "
                             "235+940 5+0=5 3+4=7 2+9=11 =1175")
    """
    expr = prompt.rstrip("=")
    op = "+" if "+" in expr else "*"
    a, _, b = expr.partition(op)
    if op == "+":
        steps, result = _columns(a, b)
        return " ".join(steps) + f" ={result}"
    parts, partials = [], []
    for shift, d in enumerate(reversed(b)):
        steps, partial = _times_digit(a, d)
        parts.append(" ".join(steps) + f" ={partial}")
        partials.append(partial + "0" * shift if partial != "0" else "0")
    if len(partials) == 1:
        return parts[0]
    steps, result = _columns(*partials)
    addition = f"{partials[0]}+{partials[1]} " + " ".join(steps)
    return " ".join(parts) + f" {addition} ={int(result)}"


# --------------------------------------------------------------------------------------------
# Prompt files


def _field(record: dict[str, Any], key: str, where: str) -> str:
    """`record[key]` as a non-empty string; answers may also be numbers (converted with str)."""
    if key not in record:
        raise ValueError(f"{where}: missing '{key}'")
    value = record[key]
    if value is None:
        raise ValueError(f"{where}: '{key}' is null")
    if key == "answer" and isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: 'answer' must be a finite number, got {value}")
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or a number" if key == "answer" else "a string"
        raise ValueError(f"{where}: '{key}' must be {kind}, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{where}: '{key}' is empty")
    return value


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not valid UTF-8") from None
    rows = []
    # Split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        where = f"{path}: line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, column {e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append((_field(record, "prompt", where), _field(record, "answer", where)))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # pyarrow's errors do not name the file.
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot be read as Parquet: {e}") from None
    missing = [c for c in ("prompt", "answer") if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has columns {names}")
    try:
        table = pq.read_table(path, columns=["prompt", "answer"])
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot be read as Parquet: {e}") from None
    prompts = table.column("prompt").to_pylist()
    answers = table.column("answer").to_pylist()
    rows = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        record = {"prompt": prompt, "answer": answer}
        where = f"{path}: row {row}"
        rows.append((_field(record, "prompt", where), _field(record, "answer", where)))
    return rows


def load_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, answer) rows of a `.jsonl` or `.parquet` file; ValueError names line or row.

    JSONL lines are numbered from 1 and blank lines are skipped; Parquet rows from 0. Columns
    other than `prompt` and `answer` are ignored. `answer` may be a number, converted with
    `str()` (so `3.0` stays `"3.0"`; write answers as strings to control their exact text).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {FILE_SUFFIXES}")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    rows = _read_jsonl(path) if suffix == ".jsonl" else _read_parquet(path)
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    return rows


class FileTask:
    """Problems from a user's prompt file (see `load_prompt_file`).

    Held out are the last `heldout_size` rows of a seeded shuffle; rows whose prompt text equals
    a held-out prompt are dropped from training too, so duplicated prompts cannot leak. Training
    index i is position `i % n` of epoch `i // n`'s permutation of the n training rows, seeded by
    (seed, epoch): every row once per epoch, in a new order each epoch. `prompt_id` is
    `file-row-{row}` with the 0-based row (the JSONL line order, blank lines not counted).
    """

    def __init__(
        self,
        path: str | Path,
        seed: int,
        heldout_size: int = 256,
        reward: str = "exact_match",
    ):
        if reward not in REWARDS:
            raise ValueError(f"reward: must be one of {list(REWARDS)}, got {reward!r}")
        if heldout_size < 0:
            raise ValueError(f"heldout_size: must be >= 0, got {heldout_size}")
        if reward == "math_verify":
            require_math_verify()  # fail at start-up, not in the middle of a run
        self.path = Path(path)
        self.seed = seed
        self.reward_kind = reward
        self._rows = load_prompt_file(self.path)
        n = len(self._rows)
        order = list(range(n))
        random.Random(f"file:{seed}:heldout").shuffle(order)
        heldout_rows = sorted(order[n - heldout_size :]) if heldout_size else []
        held = set(heldout_rows)
        heldout_prompts = {self._rows[r][0] for r in heldout_rows}
        self._train_rows = [
            r for r in range(n) if r not in held and self._rows[r][0] not in heldout_prompts
        ]
        if not self._train_rows:
            raise ValueError(
                f"heldout_size: {heldout_size} leaves no training rows in {self.path} "
                f"({n} rows); it must be below the number of distinct prompts"
            )
        self._heldout = [self._problem(r) for r in heldout_rows]
        self._epoch_orders: dict[int, list[int]] = {}

    def _problem(self, row: int) -> Problem:
        prompt, answer = self._rows[row]
        return Problem(f"file-row-{row}", prompt, answer)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = list(self._train_rows)
            random.Random(f"file:{self.seed}:epoch:{epoch}").shuffle(order)
            # Actors are at most an epoch or so apart, so a couple of cached epochs suffice.
            if len(self._epoch_orders) >= 4:
                self._epoch_orders.pop(min(self._epoch_orders))
            self._epoch_orders[epoch] = order
        return order

    def train_problem(self, index: int) -> Problem:
        _check_index(index)
        epoch, position = divmod(index, len(self._train_rows))
        return self._problem(self._epoch_order(epoch)[position])

    def num_train(self) -> int | None:
        return len(self._train_rows)

    def heldout(self) -> list[Problem]:
        return list(self._heldout)

    def reward(self, problem: Problem, completion: str) -> float:
        if self.reward_kind == "math_verify":
            return math_verify_reward(problem.answer, completion)
        return 1.0 if completion.strip() == problem.answer.strip() else 0.0

    def sft_completion(self, problem: Problem) -> str:
        return problem.answer


# --------------------------------------------------------------------------------------------
# Factory


def build_task(
    kind: str,
    *,
    seed: int,
    path: str | Path = "",
    reward: str = "exact_match",
    ops: Sequence[str] = ("+", "*"),
    min_digits: int = 1,
    max_digits: int = 3,
    heldout_size: int = 256,
    worked: bool = False,
) -> Task:
    """The task `kind` ("arithmetic" or "file"); arguments the kind does not use are ignored."""
    if kind == "arithmetic":
        if reward != "exact_match":
            raise ValueError(f"reward: arithmetic tasks use 'exact_match', got {reward!r}")
        return ArithmeticTask(seed, ops, min_digits, max_digits, heldout_size, worked)
    if kind == "file":
        if not str(path):
            raise ValueError("path: a prompt file is required for kind 'file'")
        return FileTask(path, seed, heldout_size, reward)
    raise ValueError(f"kind: must be one of {list(TASK_KINDS)}, got {kind!r}")


def task_from_config(cfg: Any) -> Task:
    """The task of a run config (`cfg.task.*`, seeded by `cfg.run.seed`): a built-in one or
    the user's class by name (`UserTask`), scored by `task.reward`: the task's own reward, or
    the user's function by name (`NamedReward`)."""
    t = cfg.task
    builtin = t.reward in REWARDS
    if t.type in TASK_KINDS:
        task = build_task(
            t.type,
            seed=cfg.run.seed,
            path=t.path,
            reward=t.reward if builtin else "exact_match",
            ops=t.ops,
            min_digits=t.min_digits,
            max_digits=t.max_digits,
            heldout_size=t.heldout_size,
            worked=t.worked,
        )
    else:
        task = UserTask.build(t.type, cfg.run.seed, t.options)
    return task if builtin else NamedReward(task, t.reward, t.type)


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
