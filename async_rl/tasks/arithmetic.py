"""The built-in `arithmetic` task (`task.type = "arithmetic"`): generated problems such as
`"347+589="` -> `"936"`; with `worked=True` the completion writes out its working before the
answer (`worked()`), so completions run from about 8 to about 110 tokens, and the reward looks
at the final answer.

Randomness comes from `random.Random` seeded with strings like `"arith:0:train:17:0"`; string
seeds are hashed with SHA-512, so unlike Python's salted `hash()` they agree across processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import get_args

from async_rl.choices import ArithmeticOp
from async_rl.tasks import Problem, check_index

ARITH_OPS = get_args(ArithmeticOp)
# The second operand of `*` has at most this many digits, so products stay short to generate.
MUL_MAX_DIGITS = 2


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
        ops: Sequence[ArithmeticOp] = ("+", "*"),
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
        check_index(index)
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
