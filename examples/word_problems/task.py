"""A task class of the user's own, named in the config as
`task.type = "examples/word_problems/task.py:WordProblems"` (README, "Tasks of your own").

The problems come from a JSONL file (`problems.jsonl`: prompt, answer, solution, kind); the
last `heldout` rows of a seeded shuffle are held out. Training problem `index` is a pure
function of (seed, index), so actors shard the stream without talking to each other. The
`solution` is the cold start's completion; `kind` rides along as metadata into the buffer's
rows and the reward's `metadata`.
"""

import json
import random
from pathlib import Path

from async_rl.tasks import Problem

HERE = Path(__file__).resolve().parent


class WordProblems:
    def __init__(self, seed, path=str(HERE / "problems.jsonl"), heldout=64):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        order = list(range(len(rows)))
        random.Random(f"word-problems:{seed}").shuffle(order)
        self.problems = [
            Problem(f"wp-{i}", rows[i]["prompt"], rows[i]["answer"], {"kind": rows[i]["kind"]})
            for i in order
        ]
        self.solutions = {f"wp-{i}": rows[i]["solution"] for i in order}
        self.train, self.held = self.problems[:-heldout], self.problems[-heldout:]
        self.seed = seed

    def train_problem(self, index):
        epoch, position = divmod(index, len(self.train))
        order = list(range(len(self.train)))
        random.Random(f"word-problems:{self.seed}:epoch:{epoch}").shuffle(order)
        return self.train[order[position]]

    def num_train(self):
        return len(self.train)

    def heldout(self):
        return list(self.held)

    def sft_completion(self, problem):
        return self.solutions[problem.prompt_id]
