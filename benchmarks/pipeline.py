"""How actors generate: static batches vs continuous batching vs in-flight weight updates.

    python benchmarks/pipeline.py --config configs/tiny_cot.toml [--steps 40] [--staleness 1 2]
        [--modes static continuous in-flight] [--repeats 1] [--start CHECKPOINT] [key=value ...]

Each mode is a real `async-rl train` run (Ray, the buffer, the learner, one actor) of the same
global steps from the same starting checkpoint, at each staleness K:
- `static`: `actor.batching = static`: a step's prompts are generated together, the batch waits
  for its longest row, weights are swapped between batches (between groups);
- `continuous`: `actor.batching = continuous`, `actor.weight_update = between_groups`: rows join
  and leave one at a time; for new weights the actor admits nothing new until its rows finish;
- `in-flight`: `continuous` with `actor.weight_update = in_flight`: weights are swapped between
  two decode steps while the rows go on.
With `--staleness 0` and `--modes static` this is the synchronous loop (generate a batch, train
on it, publish, repeat) against which `--staleness 1` measures asynchrony.

First, the actor's engine alone (`actor.*` of the config, one thread, nothing else running):
`--engine-batches` global batches of training prompts, generated as static batches (each waits
for its longest row) and continuously (the next batch's groups join as rows free up, up to
`actor.max_running_rows`): completion tokens/s, and each batch's latency from its first group's
submission to its last group's end. In the runs below a global step cannot start before its
batch is complete, and at staleness K the actors may have at most K + 1 batches out: when a
batch's latency exceeds K learner steps, the loop waits on it whatever the engine's tokens/s.

Printed per run, in the steady state (from the end of the first step to the end of the last, by
the wall-clock `time` of the metric rows): the loop time, completion tokens generated (accepted
by the buffer) and trained per second, the mean length of the trained completions (a continuous
actor's short completions arrive first), the share of generated groups dropped as stale, the
learner's idle share (waiting for data / loop time), the actor's idle share (back-pressure and
weights, over its whole run), the learner's step time and the slowest group's latency from lease
to arrival among each step's last batch of groups (means of `learner/step_time_s` and
`rollout/group_latency_max_s`: above K steps, the learner waits), and from the buffer
(`async-rl buffer inspect`): the staleness of the trained groups and the weights versions per
completion. Then each mode's rates over `static`'s at the same K.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import get_args

from async_rl.choices import Batching

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

from actors.build import build_engine  # noqa: E402
from actors.engine import GroupRequest, SamplingParams  # noqa: E402
from async_rl.buffer.segments import inspect  # noqa: E402
from async_rl.config import load_config  # noqa: E402
from async_rl.metrics import read_rows  # noqa: E402
from async_rl.run.driver import train  # noqa: E402
from async_rl.tasks import task_from_config  # noqa: E402
from async_rl.tokenizer import load_tokenizer  # noqa: E402

MODES = {
    "static": ["actor.batching=static", "actor.weight_update=between_groups"],
    "continuous": ["actor.batching=continuous", "actor.weight_update=between_groups"],
    "in-flight": ["actor.batching=continuous", "actor.weight_update=in_flight"],
}


def run(args, mode: str, k: int, start: Path, out: Path, rep: int) -> dict:
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"run.output_dir={out}",
            f"run.name={mode}-k{k}-{rep}",
            f"run.num_steps={args.steps}",
            "run.eval_every=0",
            f"buffer.max_staleness={k}",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
            *MODES[mode],
        ],
    )
    summary = train(cfg, start)
    # steady state: the steps after the first (whose wait includes the actors' start-up)
    rows = [r for r in read_rows(cfg.run_dir) if "learner/step_time_s" in r]
    first, rows = rows[0], rows[1:]
    loop = rows[-1]["time"] - first["time"]
    actors = list(summary["actors"].values())
    gen = sum(a.generate_s for a in actors)
    idle = sum(a.paused_s + a.weights_s for a in actors)
    buffer = inspect(cfg.run_dir / "buffer")
    generated = rows[-1]["buffer/completion_tokens"] - first["buffer/completion_tokens"]
    return {
        "mode": mode,
        "k": k,
        "loop": loop,
        "tokens_per_s": sum(r["learner/num_tokens"] for r in rows) / loop,
        "generated_per_s": generated / loop,
        "trained_len": statistics.mean(r["rollout/response_len_mean"] for r in rows),
        "learner_idle": sum(r["learner/wait_time_s"] for r in rows) / loop,
        "step_s": statistics.mean(r["learner/step_time_s"] for r in rows),
        "latency_s": statistics.mean(r.get("rollout/group_latency_max_s", 0.0) for r in rows),
        "actor_idle": idle / max(gen + idle, 1e-9),
        "dropped": buffer["dropped_stale"] / max(buffer["groups"], 1),
        "staleness": buffer["staleness_histogram"],
        "versions": buffer["versions_per_completion"],
    }


def engine_alone(args, start: Path) -> list[dict]:
    """Static batches vs continuous batching in the engine alone (module docstring)."""
    import torch

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.run.num_threads)
    engine = build_engine(cfg.actor, start)
    task, tokenizer = task_from_config(cfg), load_tokenizer(cfg.model.tokenizer)
    per_batch, g = cfg.algo.prompts_per_minibatch * cfg.algo.num_minibatches, cfg.algo.group_size
    batches, max_rows = args.engine_batches, cfg.actor.max_running_rows

    def request(i: int) -> GroupRequest:
        prompt = tokenizer.encode_prompt(task.train_problem(i).prompt)
        params = SamplingParams(cfg.actor.temperature, cfg.actor.top_p, cfg.actor.max_new_tokens, i)
        return GroupRequest(str(i), prompt, g, params)

    results = []
    for mode in get_args(Batching):
        engine.generate([request(0).prompt], request(0).params, g)  # warm-up
        queue, submitted, ended, tokens = deque(range(batches * per_batch)), {}, {}, 0
        t0 = time.perf_counter()
        while queue or engine.num_running or engine.num_waiting:
            if mode == "static":  # a batch at a time
                ready = not (engine.num_running or engine.num_waiting)
                new = [queue.popleft() for _ in range(per_batch)] if ready else []
            else:  # a group whenever its rows fit
                rows = engine.num_running + g * engine.num_waiting
                new = [queue.popleft()] if queue and rows + g <= max_rows else []
            for i in new:
                engine.submit(request(i))
                submitted[i] = time.perf_counter()
            for request_id, group in engine.step():
                ended[int(request_id)] = time.perf_counter()
                tokens += sum(len(c.tokens) for c in group)
        loop = time.perf_counter() - t0
        latency = [
            max(ended[i] for i in range(b, b + per_batch))
            - min(submitted[i] for i in range(b, b + per_batch))
            for b in range(0, len(ended), per_batch)
        ]
        results.append({"mode": mode, "tokens_per_s": tokens / loop, "latency": latency})
    engine.close()
    return results


def _start(args, out: Path) -> Path:
    if args.start is not None:
        return args.start
    from async_rl.cli import cmd_sft

    cfg = load_config(args.config, [*args.overrides, f"run.output_dir={out}", "run.name=sft"])
    return cmd_sft(cfg)  # the config's own cold start


def _share(counts: dict[int, int]) -> str:
    total = sum(counts.values()) or 1
    return " ".join(f"{k}:{v / total:.0%}" for k, v in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--start", type=Path, default=None, help="HF checkpoint (default: cold start)")
    p.add_argument("--engine-batches", type=int, default=12, help="0: skip the engine alone")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as for async-rl train")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="pipeline-"))
    start = _start(args, out)
    alone = engine_alone(args, start) if args.engine_batches else []
    results = [  # the modes alternate, so that a slow spell of the machine hits them all
        run(args, mode, k, start, out, rep)
        for rep in range(args.repeats)
        for k in args.staleness
        for mode in args.modes
    ]
    if alone:
        print(f"\n{args.config.name}: the engine alone, {args.engine_batches} global batches")
        print(f"{'mode':<12}{'tokens/s':>10}{'batch latency s (median, max)':>32}")
        for r in alone:
            lat = r["latency"]
            print(
                f"{r['mode']:<12}{r['tokens_per_s']:>10.0f}"
                f"{statistics.median(lat):>20.3f}{max(lat):>12.3f}"
            )
        ratio = alone[1]["tokens_per_s"] / alone[0]["tokens_per_s"]
        print(f"continuous / static tokens/s = {ratio:.2f}x")
    print(f"\n{args.config.name}: {args.steps} global steps, 1 actor, {args.repeats} repeat(s)")
    print(
        f"{'mode':<12}{'K':>3}{'loop s':>8}{'generated/s':>13}{'trained/s':>11}{'trained len':>13}"
        f"{'dropped':>9}{'learner idle':>14}{'actor idle':>12}{'step s':>8}{'latency s':>11}"
        f"  {'staleness':<20}"
        "versions per completion"
    )
    for r in results:
        print(
            f"{r['mode']:<12}{r['k']:>3}{r['loop']:>8.1f}{r['generated_per_s']:>13.0f}"
            f"{r['tokens_per_s']:>11.0f}{r['trained_len']:>13.1f}{r['dropped']:>9.0%}"
            f"{r['learner_idle']:>14.0%}{r['actor_idle']:>12.0%}{r['step_s']:>8.3f}"
            f"{r['latency_s']:>11.3f}  {_share(r['staleness']):<20}{_share(r['versions'])}"
        )
    for k in args.staleness:
        for key in ("generated_per_s", "tokens_per_s"):
            base = [r[key] for r in results if r["k"] == k and r["mode"] == "static"]
            for mode in args.modes:
                if mode == "static" or not base:
                    continue
                rate = [r[key] for r in results if r["k"] == k and r["mode"] == mode]
                print(f"K = {k}: {mode} / static {key} = {sum(rate) / sum(base):.2f}x")


if __name__ == "__main__":
    main()
