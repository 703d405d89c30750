"""async-rl vs Hugging Face TRL's GRPOTrainer: the same RL work, alternated in one invocation.

    pip install -e ".[dev,bench]"
    python benchmarks/vs_trl.py [--config configs/tiny.toml] [--rounds 5] [--steps 30]
        [--start CHECKPOINT] [--time-kernels] [key=value ...]

Both tools train the config's model (configs/tiny.toml by default: 2-layer Qwen3-MoE, hidden
128, 8 experts top-2) from the same Hugging Face checkpoint on the same prompts, in the same
order, with the same reward, G completions per prompt, prompts per optimizer step and
completion length (`algo.*`, `actor.max_new_tokens`); `configs/tiny_cot.toml` compares them on
long, uneven completions. Without `--start` the checkpoint is a short supervised cold start
(`--sft-steps`, default 300: a minute or two), so completions end with eos the way a trained
policy's do.

- TRL 1.16 `GRPOTrainer`: CPU, fp32, transformers generation (no vLLM), beta 0 (no reference
  model), router aux loss off, `experts_implementation` = `--experts` (`grouped_mm`, the fastest
  on CPU: `--time-kernels` times them all), `--threads` torch threads in this one process; one
  optimizer step per generation of prompts x G (num_iterations 1), mean-only advantages.
- async-rl: `async_rl.run.driver.train`, as `async-rl train` runs the config (Ray, buffer,
  learner, one actor, its batching and weight updates, FP8-emulated rollouts),
  `run.num_threads = threads // 2` in each of its two busy processes (learner, actor), so both
  tools get the same thread budget.

Timed, per run: from the end of optimizer step `--warmup` to the end of step `--warmup +
--steps` (start-up and warm-up excluded for both). Both run one step more than that: async-rl
checkpoints at its last step, TRL does not. A TRL step ends at its `on_step_end` callback, an
async-rl step when the learner's metrics row for it appears in metrics.jsonl (polled every
5 ms). Completions = prompts x G per step; completion tokens include eos. CPU s/step is the
user + system time of every process of the tool (async-rl: all of Ray's) over the same window;
TRL's includes OpenMP threads spinning. The machine may be shared: compare medians.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import get_args

from async_rl.choices import Quantization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

from async_rl.config import load_config  # noqa: E402
from async_rl.metrics import read_rows  # noqa: E402

KERNELS = ("eager", "batched_mm", "grouped_mm")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its descendants (Ray's processes included)."""
    import psutil

    me, total = psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:  # ended meanwhile
            pass
    return total


class RowClock(threading.Thread):
    """When each line of a JSONL file appears (the end of an async-rl step); CPU at `marks`."""

    def __init__(self, path: Path, marks: tuple[int, ...]):
        super().__init__(daemon=True)
        self.path, self.marks, self.done = path, marks, threading.Event()
        self.times, self.cpu = [], {}

    def run(self) -> None:
        size = seen = 0
        while not self.done.is_set():
            time.sleep(0.005)
            try:
                if self.path.stat().st_size == size:
                    continue
                data = self.path.read_bytes()
            except FileNotFoundError:
                continue
            now, size = time.perf_counter(), len(data)
            lines = data[: data.rfind(b"\n") + 1].count(b"\n")
            self.times += [now] * (lines - seen)
            self.cpu.update({m: cpu_seconds() for m in self.marks if seen < m <= lines})
            seen = max(seen, lines)


def window(args, times: list[float], tokens: list[int], cpu: dict[int, float], batch: int) -> dict:
    """Throughput from the end of step `warmup` to the end of step `warmup + steps`."""
    first, last = args.warmup, args.warmup + args.steps
    seconds = times[last - 1] - times[first - 1]
    return {
        "completions_s": args.steps * batch / seconds,
        "tokens_s": sum(tokens[first:last]) / seconds,
        "seconds": seconds,
        "cpu_per_step": (cpu[last] - cpu[first]) / args.steps,
    }


def run_async_rl(args, start: Path, out: Path, name: str) -> tuple[list, list, dict]:
    from async_rl.run.driver import train

    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"run.output_dir={out}",
            f"run.name={name}",
            f"run.num_steps={args.warmup + args.steps + 1}",
            f"run.num_threads={max(args.threads // 2, 1)}",
            "run.eval_every=0",
            "actor.num_actors=1",
            f"actor.quantization={args.quantization}",
            "learner.checkpoint_every=0",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
        ],
    )
    clock = RowClock(cfg.run_dir / "metrics.jsonl", (args.warmup, args.warmup + args.steps))
    clock.start()
    train(cfg, start)
    clock.done.set()
    clock.join()
    rows = [r for r in read_rows(cfg.run_dir) if "learner/num_tokens" in r]
    assert len(rows) == len(clock.times) == cfg.run.num_steps, (len(rows), len(clock.times))
    return clock.times, [r["learner/num_tokens"] for r in rows], clock.cpu


def run_trl(args, start: Path, out: Path, kernel: str) -> tuple[list, list, dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from async_rl.tasks import task_from_config

    cfg = load_config(args.config, args.overrides)
    task, g, prompts = task_from_config(cfg), cfg.algo.group_size, cfg.algo.prompts_per_minibatch
    torch.set_num_threads(args.threads)
    steps, marks = args.warmup + args.steps + 1, (args.warmup, args.warmup + args.steps)
    problems = [task.train_problem(i) for i in range(steps * prompts)]
    data = Dataset.from_dict(
        {"prompt": [f"<bos>{p.prompt}" for p in problems], "index": list(range(len(problems)))}
    )
    times, tokens, cpu = [], [], {}

    def exact_match(completions, completion_ids, index, **_):
        tokens.append(sum(len(c) for c in completion_ids))
        pairs = zip(index, completions, strict=True)
        return [task.reward(task.train_problem(i), c) for i, c in pairs]

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())
            if len(times) in marks:
                cpu[len(times)] = cpu_seconds()

    model = AutoModelForCausalLM.from_pretrained(
        start, dtype=torch.float32, experts_implementation=kernel
    )
    config = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        max_steps=steps,
        per_device_train_batch_size=prompts * g,
        num_generations=g,
        max_completion_length=cfg.actor.max_new_tokens,
        temperature=cfg.actor.temperature,
        beta=0.0,
        num_iterations=1,
        use_vllm=False,
        router_aux_loss_coef=0.0,
        scale_rewards="none",
        loss_type="dr_grpo",
        epsilon=cfg.algo.eps_low,
        epsilon_high=cfg.algo.eps_high,
        learning_rate=cfg.learner.lr,
        max_grad_norm=cfg.learner.grad_clip,
        shuffle_dataset=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.run.seed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(start),
        callbacks=[Clock()],
    )
    trainer.train()
    assert len(times) == len(tokens) == steps, (len(times), len(tokens))
    del trainer, model
    gc.collect()
    return times, tokens, cpu


def make_start(args, out: Path) -> Path:
    if args.start is not None:
        return args.start
    from async_rl.tasks import task_from_config
    from async_rl.tokenizer import load_tokenizer
    from learner.sft import run_sft

    sft = [f"sft.steps={args.sft_steps}"] if args.sft_steps else []
    cfg = load_config(args.config, [*args.overrides, f"run.output_dir={out}", "run.name=sft", *sft])
    import torch

    torch.set_num_threads(args.threads)
    from async_rl.run.evaluation import evaluate_checkpoint

    path = run_sft(cfg, load_tokenizer(cfg.model.tokenizer), task_from_config(cfg), out / "sft")
    result = evaluate_checkpoint(cfg, path)
    print(f"cold start: {cfg.sft.steps} SFT steps, held-out greedy accuracy {result.greedy:.2f}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="TRL, async-rl pairs, alternated")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all, per tool")
    p.add_argument("--experts", choices=KERNELS, default="grouped_mm", help="TRL's MoE kernel")
    p.add_argument("--quantization", choices=get_args(Quantization), default="fp8")
    p.add_argument("--start", type=Path, default=None, help="HF checkpoint (default: short SFT)")
    p.add_argument("--sft-steps", type=int, default=300, help="cold-start steps (0: the config's)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as for async-rl train")
    p.add_argument("--time-kernels", action="store_true", help="only time TRL's MoE kernels")
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the window starts at the end of a step)")
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    start = make_start(args, out)
    algo = load_config(args.config, args.overrides).algo
    batch = algo.group_size * algo.prompts_per_minibatch
    runs = [(f"trl ({k})", k) for k in (KERNELS if args.time_kernels else [args.experts])]
    runs += [] if args.time_kernels else [("async-rl", None)]
    results: dict[str, list[dict]] = {tool: [] for tool, _ in runs}
    for rnd in range(1, args.rounds + 1):
        for tool, kernel in runs:
            if kernel is None:
                measured = run_async_rl(args, start, out, f"async-rl-{rnd}")
            else:
                measured = run_trl(args, start, out, kernel)
            results[tool].append(window(args, *measured, batch))
            print(f"round {rnd} {tool}: {results[tool][-1]['completions_s']:.0f} completions/s")
    table = "{:<20}{:>6}{:>9}{:>15}{:>10}{:>12}".format
    print("\n" + table("tool", "round", "timed s", "completions/s", "tokens/s", "CPU s/step"))
    for tool, rs in results.items():
        median = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for rnd, r in [*enumerate(rs, 1), ("median", median)]:
            cells = (r["seconds"], r["completions_s"], r["tokens_s"])
            print(table(tool, rnd, *(f"{x:.1f}" for x in cells), f"{r['cpu_per_step']:.3f}"))
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up, {batch} completions per step "
        f"({algo.prompts_per_minibatch} prompts x G = {algo.group_size}), {args.threads} threads"
    )
    if "async-rl" in results:
        pairs = zip(results["async-rl"], results[runs[0][0]], strict=True)
        ratios = [a["completions_s"] / b["completions_s"] for a, b in pairs]
        print(
            f"async-rl / TRL completions/s, median over rounds: {statistics.median(ratios):.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
