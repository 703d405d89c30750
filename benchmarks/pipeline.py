"""Synchronous vs asynchronous RL: the same global steps, in one invocation, through `train()`.

    python benchmarks/pipeline.py [--steps 20] [--start CHECKPOINT] [--repeats 1]

Synchronous = `buffer.max_staleness = 0` with one mini-batch (generate a global batch, train on
it, publish, repeat); asynchronous = `buffer.max_staleness = 1` (actors generate the next batch
while the learner trains). Both run the CPU default (Ray, one actor, one learner, the buffer)
from the same starting checkpoint. Printed per mode, in the steady state (from the end of the
first step to the end of the last, by the wall-clock `time` of the metric rows): the loop time
per step, the learner's idle share (time waiting for data / loop time), its other time per step
(packing, checkpoints, logging: neither waiting nor training), the actors' idle share
(back-pressure plus waiting for weights, over their whole run), and the ideal bounds per step:
generation + training (what a synchronous loop cannot beat) and max(generation, training)
(what overlapping them can reach at best), and the loop's ratio to that best.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

from async_rl.app.driver import train  # noqa: E402
from async_rl.config import load_config  # noqa: E402
from async_rl.metrics import read_rows  # noqa: E402


def run(mode: str, k: int, steps: int, start: Path, out: Path, rep: int) -> dict:
    cfg = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            f"run.output_dir={out}",
            f"run.name={mode}-{rep}",
            f"run.num_steps={steps}",
            "run.eval_every=0",
            f"buffer.max_staleness={k}",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
        ],
    )
    summary = train(cfg, start)
    # steady state: the steps after the first (whose wait includes the actors' start-up); the
    # loop is the wall-clock time between the first row and the last
    rows = [r for r in read_rows(cfg.run_dir) if "learner/step_time_s" in r][1:]
    first = next(r for r in read_rows(cfg.run_dir) if "learner/step_time_s" in r)
    loop = rows[-1]["time"] - first["time"]
    actors = list(summary["actors"].values())
    gen = sum(a.generate_s for a in actors)
    idle = sum(a.paused_s + a.weights_s for a in actors)
    wait = sum(r["learner/wait_time_s"] for r in rows)
    train_s = sum(r["learner/step_time_s"] + r["learner/publish_time_s"] for r in rows)
    return {
        "mode": mode,
        "wall": summary["wall_time_s"],
        "loop": loop,
        "learner_idle": wait / loop,
        "other_per_step": (loop - wait - train_s) / len(rows),
        "actor_idle": idle / max(gen + idle, 1e-9),
        "gen_per_step": gen / (len(rows) + 1),
        "train_per_step": train_s / len(rows),
        "steps": len(rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--start", type=Path, default=None, help="HF checkpoint (default: fresh)")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="pipeline-"))
    start = args.start
    if start is None:
        from async_rl.config import ModelConfig
        from async_rl.tokenizer import Tokenizer
        from learner.hf import export_hf
        from learner.model import build_model

        start = export_hf(
            build_model(ModelConfig(), 0), ModelConfig(), Tokenizer.arithmetic(), out / "start"
        )
    results = []
    for rep in range(args.repeats):  # alternate the two modes
        results.append(run("sync (K=0)", 0, args.steps, start, out, rep))
        results.append(run("async (K=1)", 1, args.steps, start, out, rep))
    print(
        f"{args.steps} global steps, tiny model, 1 actor, {args.repeats} repeat(s); "
        f"times are the training loop (start-up excluded)"
    )
    print(
        f"{'mode':<13}{'loop s':>8}{'s/step':>8}{'learner idle':>14}{'actor idle':>12}"
        f"{'other s/step':>14}{'gen s/step':>12}{'train s/step':>14}{'gen+train':>11}"
        f"{'max(g,t)':>10}{'loop/max':>10}"
    )
    for r in results:
        g, t = r["gen_per_step"], r["train_per_step"]
        print(
            f"{r['mode']:<13}{r['loop']:>8.1f}{r['loop'] / r['steps']:>8.3f}"
            f"{r['learner_idle']:>14.0%}{r['actor_idle']:>12.0%}{r['other_per_step']:>14.3f}"
            f"{g:>12.3f}{t:>14.3f}{g + t:>11.3f}{max(g, t):>10.3f}"
            f"{r['loop'] / r['steps'] / max(g, t):>10.2f}"
        )
    sync = [r for r in results if r["mode"].startswith("sync")]
    asyn = [r for r in results if r["mode"].startswith("async")]
    speedup = sum(r["loop"] for r in sync) / sum(r["loop"] for r in asyn)
    print(f"async speed-up over sync (loop time): {speedup:.2f}x")


if __name__ == "__main__":
    main()
