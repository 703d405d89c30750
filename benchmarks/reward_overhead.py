"""What a slow reward costs generation: tokens/s of an actor's loop with math-verify scoring
every completion inline, on the reward pool's threads, and on its processes, against a reward
that costs nothing.

    python benchmarks/reward_overhead.py [--checkpoint DIR] [--groups 96] [--workers 2]

The loop is the continuous actor's (`actors.loop`): the embedded engine keeps up to
`--rows` rows running, a finished group is scored, the next prompt joins. "inline" scores in
the loop itself (what the actor did before the pool); "thread" and "process" hand the group to
`actors.scoring.Scorer` and take back what is ready after every decode step. The reward is
`async_rl.rewards:math_verify` (parse and verify with sympy) on the arithmetic task's answers,
so every completion pays math-verify's real cost; "free" returns 0 at once. One thread for the
engine, as in a run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free(completion: str) -> float:
    return 0.0


def run(engine, task, tokenizer, mode: str, groups: int, g: int, workers: int, seed: int):
    """Generate `groups` groups of `g` through the loop, scoring them as `mode` says."""
    from actors.engine import GroupRequest, SamplingParams
    from actors.scoring import Scorer
    from async_rl.rewards import score_named

    free_name = f"{Path(__file__).resolve()}:free"  # a file: the pool's processes import it
    name = free_name if mode == "free" else "async_rl.rewards:math_verify"
    score = functools.partial(score_named, name, "arithmetic")
    pool = "process" if mode == "process" else "thread"
    scorer = Scorer(score, per_completion=True, workers=workers, pool=pool, timeout_s=60)
    if pool == "process":  # start the workers before the clock: a run starts them once
        scorer.submit("warm", task.train_problem(0), ["1"])
        scorer.drain(60)
    params = SamplingParams(1.0, 1.0, 8, seed)
    began, tokens, done, submitted = time.perf_counter(), 0, 0, 0
    problems = {}
    while done < groups:
        while submitted < groups and engine.num_running + engine.num_waiting * g < 4 * g:
            problem = task.train_problem(seed * 10_000 + submitted)
            problems[str(submitted)] = problem
            prompt = tokenizer.encode_prompt(problem.prompt)
            engine.submit(GroupRequest(str(submitted), prompt, g, params))
            submitted += 1
        for rid, group in engine.step() if engine.num_running or engine.num_waiting else []:
            texts = [tokenizer.decode_completion(x.tokens) for x in group]
            tokens += sum(len(x.tokens) for x in group)
            if mode == "inline":
                score(problems[rid], texts)
                done += 1
            else:
                scorer.submit(rid, problems[rid], texts)
        if mode != "inline":
            busy = engine.num_running or engine.num_waiting
            done += len(scorer.ready(wait_s=0.0 if busy else 0.05))
    seconds = time.perf_counter() - began
    scorer.close()
    return tokens / seconds, seconds


def main() -> None:
    import torch

    from actors.embedded import EmbeddedEngine
    from async_rl.config import ModelConfig
    from async_rl.rewards import math_verify
    from async_rl.tasks.arithmetic import ArithmeticTask
    from async_rl.tokenizer import Tokenizer
    from learner.hf import export_hf
    from learner.model import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a Hugging Face checkpoint (default: a random init)")
    parser.add_argument("--groups", type=int, default=96)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, task = Tokenizer.arithmetic(), ArithmeticTask(seed=0)
    path = args.checkpoint
    if path is None:
        path = tempfile.mkdtemp(prefix="reward-overhead-")
        export_hf(build_model(ModelConfig(), seed=0), ModelConfig(), tokenizer, path)
    engine = EmbeddedEngine(path, quantization="fp8", max_running_rows=4 * args.group_size)
    problems = [task.train_problem(i) for i in range(200)]
    began = time.perf_counter()
    for p in problems:
        math_verify(p.answer + "0", p.answer)
    per_call = (time.perf_counter() - began) / len(problems)
    print(f"math-verify: {per_call * 1000:.2f} ms a completion on one thread")
    modes = ("free", "inline", "thread", "process")
    results: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):  # the modes alternate, so a noisy minute hits them alike
        for mode in modes:
            g, workers = args.group_size, args.workers
            rate, _ = run(engine, task, tokenizer, mode, args.groups, g, workers, r)
            results[mode].append(rate)
    base = statistics.median(results["free"])
    print(f"\n{args.groups} groups of {args.group_size}, {args.workers} reward workers, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'reward':<10}{'tokens/s':>10}{'vs free':>9}")
    for mode in modes:
        rate = statistics.median(results[mode])
        print(f"{mode:<10}{rate:>10,.0f}{rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
