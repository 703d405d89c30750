"""Counterfactual replay next to a sweep: paired differences on identical data, unpaired ones.

    async-rl sweep configs/sweeps/cot_replay.toml       # off-clip, off-noclip, off-r2, off-r3
    for s in 0 1 2; do
      async-rl replay runs/cot/off-clip-s$s algo.clip=false run.name=off-clip-s$s-noclip
      async-rl replay runs/cot/off-clip-s$s algo.routing_replay=r2 run.name=off-clip-s$s-r2
      async-rl replay runs/cot/off-clip-s$s algo.routing_replay=r3 run.name=off-clip-s$s-r3
    done
    python benchmarks/paired_replay.py runs/cot --baseline off-clip

Among the run directories given (or found one level below), the replays of the `--baseline`
variant's runs (`replay.json`) are grouped by the settings they changed (their variant,
`off-clip replay algo.clip=false`). For each group and each of `METRICS` (the final held-out
accuracy, and the mean over the run of the training metrics), per seed the difference
d_s = replay of seed s - the recorded run of seed s: the same global batches, the same
starting weights, only the learner's settings differ. Its mean, sd and separation
mean / (sd / sqrt(n)) are printed next to the sweep's unpaired difference for the variant
with the same settings (its overrides less the baseline's): mean over its seeds - mean over
the baseline's, separation over sqrt(sd^2 / n + sd_baseline^2 / n_baseline), as
`async-rl plot` computes it. The last column: how many seeds per variant an unpaired sweep
would need for the standard error the paired replays reach, n (sd^2 + sd_baseline^2) / sd_d^2.

A paired difference is a counterfactual on the recorded policy's data (the replayed learner
moves away from the policy that generated it); an unpaired one compares runs whose data each
came from its own policy. They measure different things: a setting that changes what the
actors generate (collapse that feeds on its own samples) shows in the sweep, not in a replay.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_rl.paths import RunPaths  # noqa: E402
from async_rl.tools.plots import find_runs, read_run, variant_of  # noqa: E402

METRICS = (  # (metric, how a run's series becomes one number)
    ("eval/accuracy", "final"),
    ("learner/train_infer_kl_k3", "mean"),
    ("learner/entropy", "mean"),
    ("learner/clip_frac", "mean"),
)


def figure(series: dict, metric: str, how: str) -> float:
    values = [v for _, v in series.get(metric, [])]
    if not values:
        return math.nan
    return values[-1] if how == "final" else statistics.fmean(values)


def _own_overrides(run_dir: Path) -> set[str]:
    """A sweep run's overrides, without the run's own (`run.*`)."""
    try:
        data = json.loads(RunPaths(run_dir).variant.read_text())
    except (FileNotFoundError, ValueError):
        return set()
    return {o for o in data.get("overrides", []) if not o.startswith("run.")}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def rows(runs: list[Path], baseline: str) -> list[dict]:
    """One row per (replay group, metric): the paired and unpaired comparison."""
    recorded = {r.resolve(): r for r in runs if variant_of(r) == baseline}
    if not recorded:
        raise ValueError(f"no run of the baseline variant {baseline!r} among {len(runs)} runs")
    base_overrides = _own_overrides(next(iter(recorded.values())))
    replays, sweep = defaultdict(list), defaultdict(list)
    for r in runs:
        marker = r / "replay.json"
        if marker.exists():
            data = json.loads(marker.read_text())
            of = Path(data["replay_of"]).resolve()
            if of in recorded:
                changed = frozenset(
                    o for o in data["overrides"] if not o.startswith(("run.", "logging."))
                )
                replays[changed].append((recorded[of], r))
        elif variant_of(r) != baseline:
            sweep[frozenset(_own_overrides(r) - base_overrides)].append(r)
    series = {r: read_run(r) for r in runs}
    out = []
    for changed, pairs in sorted(replays.items(), key=lambda kv: sorted(kv[0])):
        for metric, how in METRICS:
            d = [figure(series[b], metric, how) - figure(series[a], metric, how) for a, b in pairs]
            row = {"changed": " ".join(sorted(changed)), "metric": metric, "how": how}
            row |= {"pairs": len(d), "d_mean": statistics.fmean(d), "d_sd": _sd(d)}
            row["paired_sep"] = row["d_mean"] / (row["d_sd"] / math.sqrt(len(d)))
            row |= _unpaired(sweep.get(changed, []), list(recorded.values()), series, metric, how)
            row["seeds_needed"] = len(d) * row.get("var_sum", math.nan) / row["d_sd"] ** 2
            out.append(row)
    return out


def _unpaired(variant_runs, base_runs, series, metric, how) -> dict:
    if not variant_runs:
        return {"sweep_variant": "-", "u_diff": math.nan, "u_sep": math.nan}
    a = [figure(series[r], metric, how) for r in variant_runs]
    b = [figure(series[r], metric, how) for r in base_runs]
    se = math.sqrt(_sd(a) ** 2 / len(a) + _sd(b) ** 2 / len(b))
    diff = statistics.fmean(a) - statistics.fmean(b)
    return {
        "sweep_variant": f"{variant_of(variant_runs[0])} ({len(a)} seeds)",
        "u_diff": diff,
        "u_sep": diff / se,
        "var_sum": _sd(a) ** 2 + _sd(b) ** 2,
    }


def markdown(table: list[dict], baseline: str) -> str:
    lines = [
        f"| changed from {baseline} | metric | pairs | paired diff (sd) | paired separation "
        "| sweep variant | unpaired diff | unpaired separation | seeds an unpaired sweep needs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['changed']} | {r['metric']} ({r['how']}) | {r['pairs']} "
            f"| {r['d_mean']:+.3g} ({r['d_sd']:.2g}) | {r['paired_sep']:+.1f} "
            f"| {r['sweep_variant']} | {r['u_diff']:+.3g} | {r['u_sep']:+.1f} "
            f"| {r['seeds_needed']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run or sweep directories")
    parser.add_argument("--baseline", required=True, help="the recorded runs' variant")
    args = parser.parse_args(argv)
    print(markdown(rows(find_runs(args.runs), args.baseline), args.baseline), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
