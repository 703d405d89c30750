"""`async-rl plot`: run directories to paper-style figures and a summary table.

One panel each for held-out accuracy, training reward, entropy and train-inference KL (log
scale) against global steps; one line per variant, the mean over its seeds with a min-max band.
The per-step panels (all but accuracy) are moving averages over `SMOOTH` of the steps (at least
one step), as per-step values of a small batch are too noisy to compare.
A run's variant is the `variant` in its `variant.json` (written by `async-rl sweep`), else its
run name. The table gives, per variant, peak held-out accuracy; the last held-out accuracy (mean
and standard deviation over seeds) and, with a `baseline` variant, how far it lies from the
baseline's in noise widths: the difference of the seed means over its standard error,
sqrt(sd^2 / n + sd_baseline^2 / n_baseline) (with three seeds each, beyond about 2.8 is
unlikely to be noise); the seeds that collapsed (`collapse_step` on each seed's own curves: the
reward, averaged over 5% of the run, falls below half its peak for good, and held-out accuracy
falls below half its best) and the median step at which they collapsed ("-" if none); the final
train-inference KL (k3, the mean of the last `FINAL_STEPS` steps, then over seeds), its mean
over the whole run, and the mean routing agreement between the actors' traces and the
learner's proximal pass.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from async_rl.paths import RunPaths

FINAL_STEPS = 10
SMOOTH = 0.05
PANELS = (  # key, title, log scale, smoothed
    ("eval/accuracy", "held-out accuracy (avg@k)", False, False),
    ("rollout/reward_mean", "training reward", False, True),
    ("learner/entropy", "entropy (token mean)", False, True),
    # k3, not k1: k1 is unbiased but its per-step estimate is often negative (a log axis
    # cannot show it); k3 estimates the same KL(mu || pi_prox) and is never negative.
    ("learner/train_infer_kl_k3", "train-inference KL (k3)", True, True),
)


def read_run(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(version, value)] from `metrics.jsonl` (the last value per version)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    path = RunPaths(run_dir).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series[key][row["version"]] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def variant_of(run_dir: Path) -> str:
    try:
        return json.loads(RunPaths(run_dir).variant.read_text())["variant"]
    except (FileNotFoundError, ValueError, KeyError):
        return Path(run_dir).name


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories given directly or found one level below (a sweep directory)."""
    found = []
    for p in paths:
        if RunPaths(p).metrics.exists():
            found.append(p)
        else:
            found += sorted(q for q in p.iterdir() if RunPaths(q).metrics.exists())
    if not found:
        raise FileNotFoundError(f"no run directories with metrics.jsonl in {paths}")
    return found


def _aligned(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps present in every seed's run, and values `[seeds, steps]`."""
    tables = [dict(run.get(key, [])) for run in runs]
    steps = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if not steps:
        return None
    return np.array(steps), np.array([[t[s] for s in steps] for t in tables])


def moving_average(
    steps: np.ndarray, values: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Trailing means over `window` steps of `values` `[seeds, steps]` (fewer at the start)."""
    if window <= 1:
        return steps, values
    cumsum = np.cumsum(values, axis=1)
    out = cumsum.copy()
    out[:, window:] = cumsum[:, window:] - cumsum[:, :-window]
    counts = np.minimum(np.arange(1, values.shape[1] + 1), window)
    return steps, out / counts


def collapse_step(
    steps: np.ndarray,
    reward: np.ndarray,
    accuracy: tuple[np.ndarray, np.ndarray] | None = None,
    window: int | None = None,
) -> int | None:
    """The step where training collapses, in Zheng et al.'s sense (the reward falls and stays
    down, and held-out accuracy with it), or None.

    The per-step reward is a mean over one global batch: at 64 samples its noise alone moves a
    5-step average by about 0.03, enough to dip below half of a noisy peak in a healthy run. So:
    the reward is averaged over `window` steps (default 5% of the run, at least 5); collapse
    begins where that average falls below half its peak after its last return to 3/4 of the
    peak, and stays down for at least a window (a dip at the very end is not a collapse). With
    `accuracy` (eval steps, values), the held-out accuracy after that step must also average
    below half its best before it; a reward that falls while accuracy holds is not a collapse.
    """
    n = len(reward)
    window = window or max(5, n // 20)
    if n < 2 * window:
        return None
    cumsum = np.cumsum(np.insert(np.asarray(reward, dtype=float), 0, 0.0))
    smooth = (cumsum[window:] - cumsum[:-window]) / window  # the mean of steps i .. i + w - 1
    peak = smooth.max()
    if peak <= 0:
        return None
    recovered = np.nonzero(smooth >= 0.75 * peak)[0]
    after = recovered[-1] + 1 if recovered.size else 0
    low = np.nonzero(smooth[after:] < 0.5 * peak)[0]
    if not low.size or len(smooth) - (after + low[0]) < window:
        return None
    at = int(steps[after + low[0] + window - 1])
    if accuracy is not None:
        eval_steps, values = (np.asarray(a, dtype=float) for a in accuracy)
        before, later = values[eval_steps < at], values[eval_steps >= at]
        if later.size and before.size and later.mean() >= 0.5 * before.max():
            return None
    return at


def _collapse(reward, acc) -> int | None:
    """The collapse step of one run's reward and held-out accuracy (as `_curves` gives them)."""
    if reward is None:
        return None
    accuracy = (acc[0], acc[1].mean(0)) if acc else None
    return collapse_step(reward[0], reward[1].mean(0), accuracy)


def summarize(groups: dict[str, list[dict]], baseline: str | None = None) -> list[dict]:
    """One row per variant (module docstring); `baseline` names the variant others are
    compared with."""
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {sorted(groups)}")
    rows = []
    for variant, runs in groups.items():
        collapses = [s for s in (_collapse(*_curves(r)) for r in runs) if s is not None]
        acc = _aligned(runs, "eval/accuracy")
        kl = _aligned(runs, "learner/train_infer_kl_k3")
        agree = _aligned(runs, "learner/routing_agreement")
        final = acc[1][:, -1] if acc else np.array([math.nan])
        rows.append(
            {
                "variant": variant,
                "seeds": len(runs),
                "peak_accuracy": float(acc[1].max(axis=1).mean()) if acc else math.nan,
                "final_accuracy": float(final.mean()),
                "final_sd": float(final.std(ddof=1)) if len(final) > 1 else math.nan,
                "collapse_step": int(np.median(collapses)) if collapses else None,
                "collapsed": len(collapses),
                "final_kl": float(kl[1][:, -FINAL_STEPS:].mean()) if kl else math.nan,
                "mean_kl": float(kl[1].mean()) if kl else math.nan,
                "agreement": float(agree[1].mean()) if agree else math.nan,
            }
        )
    base = next((r for r in rows if r["variant"] == baseline), None)
    for r in rows:
        r["separation"] = None if base is None or r is base else _separation(r, base)
    return rows


def _curves(run: dict):
    """One run's reward and held-out accuracy, as `_aligned` gives them."""
    return _aligned([run], "rollout/reward_mean"), _aligned([run], "eval/accuracy")


def _separation(row: dict, base: dict) -> float | None:
    """The difference of final accuracy from the baseline's, in standard errors."""
    se = math.sqrt(row["final_sd"] ** 2 / row["seeds"] + base["final_sd"] ** 2 / base["seeds"])
    if not se > 0:  # one seed (no spread known), or none at all
        return None
    return (row["final_accuracy"] - base["final_accuracy"]) / se


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | seeds | peak held-out accuracy | final held-out accuracy (sd) "
        "| vs baseline (noise widths) | collapsed seeds (step) "
        "| final train-infer KL (k3) | mean train-infer KL (k3) | routing agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        collapse = "-" if r["collapse_step"] is None else str(r["collapse_step"])
        sd = "" if math.isnan(r["final_sd"]) else f" ({r['final_sd']:.3f})"
        sep = "-" if r["separation"] is None else f"{r['separation']:+.1f}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['peak_accuracy']:.3f} "
            f"| {r['final_accuracy']:.3f}{sd} | {sep} | {r['collapsed']} ({collapse}) "
            f"| {r['final_kl']:.2e} | {r['mean_kl']:.2e} | {r['agreement']:.4f} |"
        )
    return "\n".join(lines) + "\n"


# The mechanism of routing replay (README, "Routing replay, measured"): the run's mean of
# each metric, its spread over seeds beside it.
MECHANISM = (
    ("learner/routing_flip_infer", "flip train-infer"),
    ("learner/routing_flip_update", "flip update"),
    ("learner/flipped_token_frac", "flipped tokens"),
    ("learner/abs_log_rho_p99_flipped", "p99 abs log rho, flipped"),
    ("learner/abs_log_rho_p99_steady", "p99 abs log rho, steady"),
    ("learner/is_ess", "IS ESS"),
)


def mechanism_table(groups: dict[str, list[dict]]) -> str:
    """One row per variant: the mean over its steps of each `MECHANISM` metric, averaged over
    seeds (their sd in brackets); "" when no run logged any of them."""
    if not any(key in run for runs in groups.values() for run in runs for key, _ in MECHANISM):
        return ""
    lines = ["| variant | " + " | ".join(label for _, label in MECHANISM) + " |"]
    lines.append("|---|" + "---|" * len(MECHANISM))
    for variant, runs in groups.items():
        cells = []
        for key, _ in MECHANISM:
            means = [np.mean([v for _, v in run[key]]) for run in runs if run.get(key)]
            sd = f" ({np.std(means, ddof=1):.2g})" if len(means) > 1 else ""
            cells.append(f"{np.mean(means):.4g}{sd}" if means else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    paths: list[Path],
    out: Path,
    title: str = "",
    baseline: str | None = None,
    panels: list[str] = (),
) -> tuple[Path, Path]:
    """Write `out` (PNG) and `out` with a `.md` suffix (the table); return both paths.
    `panels`: metric names (`buffer/max_staleness`, `learner/tokens_per_s`, ...) drawn after
    the four, each as its moving average; one no run logged is an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for run_dir in find_runs([Path(p) for p in paths]):
        groups[variant_of(run_dir)].append(read_run(run_dir))
    rows = summarize(groups, baseline)  # before drawing: a wrong baseline is an error
    logged = {key for runs in groups.values() for run in runs for key in run}
    unknown = [key for key in panels if key not in logged]
    if unknown:
        raise ValueError(f"--panels: no run logged {', '.join(unknown)}")
    drawn = [*PANELS, *((key, key, False, True) for key in panels)]
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4))
    for ax, (key, label, log, smoothed) in zip(axes, drawn, strict=True):
        for variant, runs in groups.items():
            data = _aligned(runs, key)
            if data is None:
                continue
            steps, values = data
            if smoothed:
                steps, values = moving_average(steps, values, max(1, round(SMOOTH * len(steps))))
            if log:
                values = np.clip(values, 1e-8, None)
            (line,) = ax.plot(steps, values.mean(0), label=variant, lw=1.5)
            if len(runs) > 1:
                ax.fill_between(
                    steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("global step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    table = out.with_suffix(".md")
    mechanism = mechanism_table(groups)
    table.write_text(markdown_table(rows) + (f"\n{mechanism}" if mechanism else ""))
    return out, table
