"""Tasks: deterministic problem streams, disjoint held-out sets, rewards and prompt files."""

import json
import math
import operator
import re
from collections import Counter
from pathlib import Path

import pytest

from async_rl.tasks import Problem, build_task
from async_rl.tasks.arithmetic import ArithmeticTask, worked
from async_rl.tasks.files import FileTask, load_prompt_file

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PROMPT = re.compile(r"^(\d+)([+*-])(\d+)=$")


def digits(n: int) -> int:
    return len(str(n))


def test_same_seed_same_problems_different_seed_different():
    a, b, c = ArithmeticTask(seed=3), ArithmeticTask(seed=3), ArithmeticTask(seed=4)
    first = [a.train_problem(i) for i in range(50)]
    assert first == [b.train_problem(i) for i in range(50)]
    assert a.heldout() == b.heldout()
    assert [p.prompt for p in first] != [c.train_problem(i).prompt for i in range(50)]
    assert a.heldout() != c.heldout()
    # Index-addressed: asking out of order gives the same problem.
    assert a.train_problem(40) == first[40]
    assert first[17].prompt_id == "arith-train-17"


def test_heldout_is_disjoint_from_training_stream():
    task = ArithmeticTask(seed=0, ops=["+", "-", "*"], heldout_size=256)
    heldout = {p.prompt for p in task.heldout()}
    assert len(heldout) == 256
    assert [p.prompt_id for p in task.heldout()[:2]] == ["arith-heldout-0", "arith-heldout-1"]
    assert not heldout & {task.train_problem(i).prompt for i in range(20000)}


def test_heldout_disjoint_when_problem_space_is_small():
    # 100 distinct problems, half held out: many training draws must be re-drawn.
    task = ArithmeticTask(seed=1, ops=["+"], min_digits=1, max_digits=1, heldout_size=50)
    heldout = {p.prompt for p in task.heldout()}
    train = {task.train_problem(i).prompt for i in range(2000)}
    assert len(heldout) == 50 and not heldout & train and len(train) == 50


@pytest.mark.parametrize("ops", [["+"], ["-"], ["*"], ["+", "-", "*"]])
@pytest.mark.parametrize("min_digits,max_digits", [(1, 1), (1, 3), (2, 4)])
def test_answers_and_digit_ranges(ops, min_digits, max_digits):
    task = ArithmeticTask(
        seed=5, ops=ops, min_digits=min_digits, max_digits=max_digits, heldout_size=20
    )
    seen_ops = Counter()
    for p in [task.train_problem(i) for i in range(300)] + task.heldout():
        a, op, b = PROMPT.match(p.prompt).groups()
        a, b = int(a), int(b)
        seen_ops[op] += 1
        assert p.answer == str(OPS[op](a, b))
        assert task.sft_completion(p) == p.answer and task.reward(p, p.answer) == 1.0
        assert min_digits <= digits(a) <= max_digits
        if op == "*":
            assert digits(b) <= 2  # the documented cap on the second factor
        else:
            assert min_digits <= digits(b) <= max_digits
        if op == "-":
            assert a >= b
    assert set(seen_ops) == set(ops)


def test_one_digit_operands_include_zero():
    task = ArithmeticTask(seed=0, ops=["+"], max_digits=1, heldout_size=0)
    operands = {int(x) for i in range(2000) for x in task.train_problem(i).prompt[:-1].split("+")}
    assert operands == set(range(10))


def test_arithmetic_reward():
    task = ArithmeticTask(seed=0)
    p = Problem("x", "347+589=", "936")
    assert task.reward(p, "936") == 1.0
    assert task.reward(p, " 936\n") == 1.0
    assert task.reward(p, "937") == 0.0
    assert task.reward(p, "9 36") == 0.0
    assert task.reward(p, "") == 0.0
    assert task.num_train() is None


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"ops": []}, "ops"),
        ({"ops": ["/"]}, "ops"),
        ({"min_digits": 0}, "min_digits"),
        ({"max_digits": 10}, "max_digits"),
        ({"min_digits": 3, "max_digits": 2}, "min_digits"),
        ({"heldout_size": -1}, "heldout_size"),
        ({"ops": ["+"], "max_digits": 1, "heldout_size": 51}, "heldout_size"),
    ],
)
def test_arithmetic_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ArithmeticTask(seed=0, **kwargs)


def test_negative_index_rejected():
    with pytest.raises(ValueError, match="index"):
        ArithmeticTask(seed=0).train_problem(-1)


# --------------------------------------------------------------------------------------------
# Files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


ROWS = [{"prompt": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(10)]


@pytest.fixture(params=["jsonl", "parquet"])
def prompt_file(request, tmp_path):
    if request.param == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", ROWS)
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    return write_parquet(tmp_path / "p.parquet", columns)


def test_file_loading(prompt_file):
    rows = [(f"q{i}", f"a{i}", {"extra": i}) for i in range(10)]
    assert load_prompt_file(prompt_file) == rows  # other columns: the problem's metadata
    task = FileTask(prompt_file, seed=0, heldout_size=3)
    heldout = task.heldout()
    assert len(heldout) == 3 and task.num_train() == 7
    for p in heldout:
        row = int(p.prompt_id.removeprefix("file-row-"))
        assert (p.prompt, p.answer, p.metadata) == (f"q{row}", f"a{row}", {"extra": row})
        assert task.sft_completion(p) == p.answer  # no solution column
    assert FileTask(prompt_file, seed=0, heldout_size=3).heldout() == heldout
    assert task.sft_completion(heldout[0]) == heldout[0].answer


def test_epochs_cover_each_train_row_once(prompt_file):
    task = FileTask(prompt_file, seed=7, heldout_size=3)
    n = task.num_train()
    heldout = {p.prompt_id for p in task.heldout()}
    epochs = [[task.train_problem(e * n + j).prompt_id for j in range(n)] for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == n and not set(epoch) & heldout
        assert set(epoch) == set(epochs[0])
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = FileTask(prompt_file, seed=7, heldout_size=3)
    assert [again.train_problem(i).prompt_id for i in range(2 * n)] == epochs[0] + epochs[1]


def test_duplicate_prompts_of_heldout_rows_are_not_trained_on(tmp_path):
    rows = [{"prompt": "same", "answer": "1"}] * 5 + [{"prompt": "other", "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for seed in range(5):
        task = FileTask(path, seed=seed, heldout_size=1)
        held = task.heldout()[0].prompt
        train = {task.train_problem(i).prompt for i in range(task.num_train())}
        assert held not in train and train


def test_numeric_answers_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "1+1=", "answer": 2}])
    assert load_prompt_file(path) == [("1+1=", "2", {})]
    path = write_parquet(tmp_path / "n.parquet", {"prompt": ["half"], "answer": [0.5]})
    assert load_prompt_file(path) == [("half", "0.5", {})]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('\n{"prompt": "p", "answer": "a"}\n\n')
    assert load_prompt_file(path) == [("p", "a", {})]


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "p", "answer": "a"}\n{"prompt": "p",, "answer": "a"}\n', r"line 2, column"),
        ('{"prompt": "p", "answer": "a"}\n\n[1, 2]\n', r"line 3: expected a JSON object"),
        ('{"prompt": "p", "answer": "a"}\n{"prompt": "p"}\n', r"line 2: missing 'answer'"),
        ('{"answer": "a"}\n', r"line 1: missing 'prompt'"),
        ('{"prompt": 5, "answer": "a"}\n', r"line 1: 'prompt' must be a string"),
        ('{"prompt": "p", "answer": [1]}\n', r"line 1: 'answer' must be a string or a number"),
        ('{"prompt": "p", "answer": true}\n', r"line 1: 'answer' must be"),
        ('{"prompt": "p", "answer": null}\n', r"line 1: 'answer' is null"),
        ('{"prompt": " ", "answer": "a"}\n', r"line 1: 'prompt' is empty"),
        ("\n\n", r"no rows"),
    ],
)
def test_malformed_jsonl(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_prompt_file(path)
    assert str(path) in str(e.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_prompt_file(path)


@pytest.mark.parametrize(
    "columns,message",
    [
        ({"prompt": ["p", None], "answer": ["a", "b"]}, r"row 1: 'prompt' is null"),
        ({"prompt": ["p", "q", "r"], "answer": ["a", "b", ""]}, r"row 2: 'answer' is empty"),
        ({"prompt": [1, 2], "answer": ["a", "b"]}, r"row 0: 'prompt' must be a string"),
        ({"prompt": ["p"], "solution": ["a"]}, r"missing column\(s\) \['answer'\]"),
        ({"prompt": [], "answer": []}, r"no rows"),
    ],
)
def test_malformed_parquet(tmp_path, columns, message):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(ValueError, match=message) as e:
        load_prompt_file(path)
    assert str(path) in str(e.value)


def test_unreadable_or_unknown_files(tmp_path):
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        load_prompt_file(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="file not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match="cannot be read as Parquet"):
        load_prompt_file(junk)


def test_file_task_validation(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS[:3])
    with pytest.raises(ValueError, match="heldout_size"):
        FileTask(path, seed=0, heldout_size=3)
    with pytest.raises(ValueError, match="reward"):
        FileTask(path, seed=0, heldout_size=1, reward="fuzzy")
    assert FileTask(path, seed=0, heldout_size=0).num_train() == 3


def test_exact_match_reward(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "answer": " 42 "}] + ROWS)
    task = FileTask(path, seed=0, heldout_size=1)
    p = Problem("file-row-0", "p", " 42 ")
    assert task.reward(p, "42\n") == 1.0
    assert task.reward(p, "42.0") == 0.0


def test_math_verify_reward(tmp_path):
    pytest.importorskip("math_verify")
    rows = [{"prompt": "half?", "answer": "\\frac{1}{2}"}, {"prompt": "six?", "answer": "6"}]
    task = FileTask(write_jsonl(tmp_path / "m.jsonl", rows), seed=0, heldout_size=0,
                    reward="math_verify")  # fmt: skip
    half, six = (task.train_problem(i) for i in range(2))
    if half.answer != "\\frac{1}{2}":
        half, six = six, half
    for completion in ["0.5", "1/2", "$\\frac{1}{2}$", "The answer is \\boxed{\\frac{2}{4}}"]:
        assert task.reward(half, completion) == 1.0, completion
    for completion in ["0.25", "2", "", "no idea"]:
        assert task.reward(half, completion) == 0.0, completion
    assert task.reward(six, "6") == 1.0 and task.reward(six, "$3 \\cdot 2$") == 1.0
    assert task.reward(six, "7") == 0.0


def test_build_task(tmp_path):
    task = build_task("arithmetic", seed=2, ops=["-"], max_digits=2, heldout_size=10)
    assert isinstance(task, ArithmeticTask) and "-" in task.train_problem(0).prompt
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert build_task("file", seed=0, path=str(path), heldout_size=2).num_train() == 8
    with pytest.raises(ValueError, match=r"kind: must be one of \['arithmetic', 'file'\]"):
        build_task("maths", seed=0)
    with pytest.raises(TypeError, match="path"):
        build_task("file", seed=0)
    with pytest.raises(TypeError, match="reward"):  # its own reward is exact match
        build_task("arithmetic", seed=0, reward="math_verify")


def test_worked_solutions_compute_the_answer_step_by_step():
    assert worked("347+589=") == "7+9=16 4+8+1=13 3+5+1=9 =936"
    assert worked("47*25=") == (
        "7*5=35 4*5+3=23 =235 7*2=14 4*2+1=9 =94 235+940 5+0=5 3+4=7 2+9=11 =1175"
    )
    task = ArithmeticTask(seed=3, ops=("+", "*"), max_digits=3, heldout_size=16, worked=True)
    lengths = []
    for i in range(2000):  # every step of the working is right arithmetic, the end the answer
        problem = task.train_problem(i)
        working = task.sft_completion(problem)
        assert working.rsplit("=", 1)[-1] == problem.answer
        for step in working.split():
            if "=" in step and not step.startswith("="):
                left, right = step.split("=")
                value = sum(math.prod(map(int, t.split("*"))) for t in left.split("+"))
                assert value == int(right), (problem.prompt, step)
        assert task.reward(problem, working) == 1.0
        lengths.append(len(working) + 1)  # eos
    assert min(lengths) < 12 and max(lengths) > 100  # two orders of spread, about
    assert task.reward(problem, working.rsplit("=", 1)[0] + "=0") == (problem.answer == "0")
    assert task.reward(problem, problem.answer) == 1.0  # the answer alone counts too


def test_worked_solutions_refuse_subtraction():
    with pytest.raises(ValueError, match="worked"):
        ArithmeticTask(seed=0, ops=("-",), worked=True)


def test_the_tiny_cot_config_fits_its_longest_worked_answer():
    from async_rl.config import load_config
    from async_rl.tokenizer import Tokenizer

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_cot.toml")
    tok = Tokenizer.arithmetic()
    longest = tok.encode(worked("999*99=")) + [tok.eos_id]
    assert len(longest) <= cfg.actor.max_new_tokens
    assert len(tok.encode_prompt("999*99=")) + len(longest) <= cfg.model.max_seq_len


def test_a_solution_column_is_the_cold_starts_completion(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": "3/4", "solution": f"6/8 by step {i}"} for i in range(4)]
    task = FileTask(write_jsonl(tmp_path / "s.jsonl", rows), seed=0, heldout_size=1)
    p = task.train_problem(0)
    assert task.sft_completion(p) == p.metadata["solution"] and p.metadata["solution"].startswith(
        "6/8"
    )
    with pytest.raises(ValueError, match="line 1: 'solution' must be a string"):
        load_prompt_file(
            write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a", "solution": 3}])
        )
