"""The built-in `file` task (`task.type = "file"`): a user's JSONL or Parquet file with string
columns `prompt` and `answer`, cycled in epochs, reshuffled (seeded) every epoch, scored by
exact match or math-verify (`task.reward`). Its other columns are each problem's metadata
(stored with its completions, handed to a reward by name); a `solution` column, where there is
one, is the cold start's completion instead of the answer.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from async_rl.rewards import BUILTIN as REWARDS
from async_rl.rewards import math_verify_reward, require_math_verify
from async_rl.tasks import Problem, check_index

FILE_SUFFIXES = (".jsonl", ".parquet")
Row = tuple[str, str, dict]  # prompt, answer, the other columns


def _row(record: dict[str, Any], where: str) -> Row:
    extras = {k: v for k, v in record.items() if k not in ("prompt", "answer")}
    solution = extras.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"{where}: 'solution' must be a string, got {type(solution).__name__}")
    return _field(record, "prompt", where), _field(record, "answer", where), extras


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


def _read_jsonl(path: Path) -> list[Row]:
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
        rows.append(_row(record, where))
    return rows


def _read_parquet(path: Path) -> list[Row]:
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
        records = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot be read as Parquet: {e}") from None
    # metadata is JSON: dates, decimals and bytes become their text
    as_json = [json.loads(json.dumps(r, default=str)) for r in records]
    return [
        _row({**j, "prompt": r["prompt"], "answer": r["answer"]}, f"{path}: row {i}")
        for i, (r, j) in enumerate(zip(records, as_json, strict=True))
    ]


def load_prompt_file(path: str | Path) -> list[Row]:
    """(prompt, answer, other columns) rows of a `.jsonl` or `.parquet` file; ValueError names
    line or row.

    JSONL lines are numbered from 1 and blank lines are skipped; Parquet rows from 0. `answer`
    may be a number, converted with `str()` (so `3.0` stays `"3.0"`; write answers as strings
    to control their exact text); `solution`, where present, must be a string.
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
        prompt, answer, extras = self._rows[row]
        return Problem(f"file-row-{row}", prompt, answer, extras)

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
        check_index(index)
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
        return problem.metadata.get("solution") or problem.answer
