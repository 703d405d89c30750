"""Task classes by name (`task.type = "module:Class"` or a file): checked at start-up, their
problems checked as they come, defaults for what they leave out. A run on one, its metadata in
the buffer's rows and in the reward's hands: `tests/integration/test_example.py`."""

import textwrap

import pytest

from async_rl.config import ConfigError, load_config
from async_rl.tasks import Problem, UserTask, task_from_config

# What a user writes: prompts in the tiny model's arithmetic vocabulary (doubling numbers),
# with metadata the reward reads.
TASKS = """
    import random

    from async_rl.tasks import Problem

    class Doubling:
        def __init__(self, seed, largest=9):
            self.seed, self.largest = seed, largest

        def _problem(self, kind, index):
            n = random.Random(f"{self.seed}:{kind}:{index}").randint(0, self.largest)
            return Problem(f"double-{kind}-{index}", f"{n}+{n}=", str(2 * n), {"n": n})

        def train_problem(self, index):
            return self._problem("train", index)

        def heldout(self):
            return [self._problem("heldout", i) for i in range(8)]

    class AsDicts(Doubling):
        def train_problem(self, index):
            p = super().train_problem(index)
            return {"prompt_id": p.prompt_id, "prompt": p.prompt, "answer": p.answer}

    class Broken(Doubling):
        def train_problem(self, index):
            return ("not", "a", "problem")

    class NoHeldout:
        def __init__(self, seed):
            pass

        def train_problem(self, index):
            return None

    class Unseeded:
        def __init__(self):
            pass

        def train_problem(self, index):
            return None

        def heldout(self):
            return []

    def score(completion, metadata):
        return float(completion.strip() == str(2 * metadata["n"]))
"""


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "user_tasks.py"
    path.write_text(textwrap.dedent(TASKS))
    return path


def test_a_task_class_by_name_is_built_seeded_with_its_options(tasks_file):
    cfg = load_config(None, [f"task.type={tasks_file}:Doubling", "task.options={largest = 3}"])
    task = task_from_config(cfg)
    assert isinstance(task, UserTask)
    first = task.train_problem(5)
    assert first == task_from_config(cfg).train_problem(5)  # deterministic in (seed, index)
    n = first.metadata["n"]
    assert first.prompt == f"{n}+{n}=" and 0 <= n <= 3
    assert len(task.heldout()) == 8 and task.num_train() is None  # defaults
    assert task.reward(first, f" {2 * n}") == 1.0 and task.reward(first, "x") == 0.0
    assert task.sft_completion(first) == first.answer
    as_dicts = [f"task.type={tasks_file}:AsDicts", "task.options={largest = 3}"]
    dicts = task_from_config(load_config(None, as_dicts))
    assert dicts.train_problem(5) == Problem(first.prompt_id, first.prompt, first.answer)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["task.type=nope"], "task.type", "neither a built-in task"),
        (["task.type={file}:Missing"], "task.type", "has no attribute 'Missing'"),
        (["task.type={file}:NoHeldout"], "task.type", "no method(s) heldout"),
        (["task.type={file}:Unseeded"], "task.type", "takes no `seed`"),
        (["task.options={{largest = 3}}"], "task.options", "for a task class by name"),
        (["task.options=3"], "task.options", "expected a table"),
    ],
)
def test_a_bad_task_stops_the_run_at_start_naming_the_key(tasks_file, overrides, key, message):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(None, [o.format(file=tasks_file) for o in overrides])
    assert message in str(e.value)


def test_what_a_task_returns_is_checked(tasks_file):
    broken = task_from_config(load_config(None, [f"task.type={tasks_file}:Broken"]))
    with pytest.raises(ValueError, match="Broken.train_problem.0.: returned tuple"):
        broken.train_problem(0)
    cfg = load_config(None, [f"task.type={tasks_file}:Doubling", "task.options={colour = 1}"])
    with pytest.raises(ValueError, match="task.type: .*Doubling.*colour"):
        task_from_config(cfg)  # the options the class does not take: when it is built
