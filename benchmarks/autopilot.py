"""The staleness autopilot against fixed K: throughput, learner idle share, accuracy, K chosen.

    async-rl sweep configs/sweeps/cot_autopilot.toml
    python benchmarks/autopilot.py runs/cot/pilot-* runs/cot/fixK* [--baseline pilot]

Reads run directories (those of a sweep: the variant is `variant.json`'s) and prints, per
variant, means over its seeds of: trained completion tokens per second in the steady state
(from the end of the first global step to the end of the last, by the metric rows' wall-clock
`time`; held-out evaluations included, as every variant runs the same ones) and global steps
per second over the same span (tokens/s also moves with the lengths the policy writes); the
learner's idle
share (waiting for a batch over its loop: `learner/wait_time_s` over wait + step + publish,
first step excluded); final held-out accuracy (mean and sd over seeds); the mean trained
staleness; and the K in force (`buffer/max_staleness` as the buffer served each batch: its
mean over the run and its value at each quarter). Then each variant's tokens/s and idle share
against the `--baseline` variant's, and against the best fixed K's (the fastest variant whose
K never changed). The runs must have used the same machine one at a time (a sweep's
`parallel = 1`): the ratios are of one sweep, on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_rl.paths import RunPaths  # noqa: E402
from async_rl.tools.plots import find_runs, variant_of  # noqa: E402


def run_figures(run_dir: Path) -> dict[str, float]:
    """One run's figures (module docstring)."""
    rows = []
    for line in RunPaths(run_dir).metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    steps = [r for r in rows if "learner/wait_time_s" in r]
    if len(steps) < 3:
        raise ValueError(f"{run_dir}: fewer than 3 global steps logged")
    steady = steps[1:]
    tokens = sum(r["learner/num_tokens"] for r in steady)
    wait = sum(r["learner/wait_time_s"] for r in steady)
    busy = sum(r["learner/step_time_s"] + r.get("learner/publish_time_s", 0.0) for r in steady)
    ks = [r.get("buffer/max_staleness", float("nan")) for r in steps]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    return {
        "tokens_per_s": tokens / (steps[-1]["time"] - steps[0]["time"]),
        "steps_per_s": len(steady) / (steps[-1]["time"] - steps[0]["time"]),
        "idle": wait / (wait + busy),
        "final_accuracy": evals[-1] if evals else float("nan"),
        "staleness": statistics.fmean(r["learner/staleness_mean"] for r in steps),
        "k_mean": statistics.fmean(ks),
        "k_quarters": [ks[min(len(ks) - 1, len(ks) * q // 4)] for q in (1, 2, 3, 4)],
        "k_fixed": len(set(ks)) == 1,
        "decisions": steps[-1].get("autopilot/decisions", 0.0),
    }


def table(groups: dict[str, list[dict]], baseline: str | None) -> str:
    """The markdown table of the variants' seed means, and the ratios (module docstring)."""
    mean = {
        v: {
            k: statistics.fmean(r[k] for r in runs)
            for k in (
                "tokens_per_s",
                "steps_per_s",
                "idle",
                "final_accuracy",
                "staleness",
                "k_mean",
                "decisions",
            )
        }
        for v, runs in groups.items()
    }
    fixed = [v for v, runs in groups.items() if all(r["k_fixed"] for r in runs)]
    best = max(fixed, key=lambda v: mean[v]["tokens_per_s"], default=None)
    lines = [
        "| variant | seeds | trained tokens/s | vs best fixed K | global steps/s | learner idle "
        "| final held-out "
        "accuracy (sd) | trained staleness | K mean | K at 1/4, 1/2, 3/4, end | K changes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, runs in groups.items():
        m, accs = mean[v], [r["final_accuracy"] for r in runs]
        sd = f" ({statistics.stdev(accs):.3f})" if len(accs) > 1 else ""
        ratio = f"{m['tokens_per_s'] / mean[best]['tokens_per_s']:.3f}x" if best else "-"
        quarters = ", ".join("/".join(f"{r['k_quarters'][q]:g}" for r in runs) for q in range(4))
        lines.append(
            f"| {v} | {len(runs)} | {m['tokens_per_s']:,.0f} | {ratio} | {m['steps_per_s']:.2f} "
            f"| {m['idle']:.1%} "
            f"| {m['final_accuracy']:.3f}{sd} | {m['staleness']:.2f} | {m['k_mean']:.2f} "
            f"| {quarters} | {m['decisions']:.1f} |"
        )
    if best:
        lines.append(f"\nbest fixed K: {best}")
    if baseline in mean and best:
        b, f = mean[baseline], mean[best]
        lines.append(
            f"{baseline} / {best}: tokens/s {b['tokens_per_s'] / f['tokens_per_s']:.3f}x, "
            f"learner idle {b['idle']:.1%} vs {f['idle']:.1%}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run or sweep directories")
    parser.add_argument("--baseline", default="pilot", help="the variant set against the best")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run_dir in find_runs(args.runs):
        groups[variant_of(run_dir)].append(run_figures(run_dir))
    print(table(dict(sorted(groups.items())), args.baseline), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
