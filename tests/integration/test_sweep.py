"""`async-rl sweep` then `async-rl plot`: a two-variant sweep of a few steps, resumable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from async_rl.tools.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}


def write_sweep(tmp_path, **extra):
    text = f"""
name = "two"
config = "{ROOT / "configs" / "tiny.toml"}"
seeds = [0]
overrides = ["run.output_dir={tmp_path}", "run.num_steps=3", "run.eval_every=3",
             "task.heldout_size=8", "run.eval_k=1", "algo.group_size=4",
             "algo.prompts_per_minibatch=2", "actor.max_new_tokens=4",
             "sft.steps=20", "logging.wandb_mode=disabled"]
[grid]
"algo.routing_replay" = ["none", "r3"]
"""
    path = tmp_path / "two.toml"
    path.write_text(text + extra.get("tail", ""))
    return path


def test_sweep_file_errors_name_the_problem(tmp_path):
    path = write_sweep(
        tmp_path, tail='[[variant]]\nname = "bad"\noverrides = ["algo.clip=maybe"]\n'
    )
    with pytest.raises(ValueError, match="variant 'bad'.*algo.clip"):
        load_sweep(path)
    (tmp_path / "x.toml").write_text('name = "x"\nbogus = 1\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_sweep(tmp_path / "x.toml")


@pytest.mark.parametrize(
    "file, name, variants, seeds",
    [
        ("onpolicy", "onpolicy", 6, 2),
        ("offpolicy", "offpolicy", 10, 2),
        ("staleness", "staleness", 4, 2),
        ("stress", "stress", 6, 2),
        ("cot_onpolicy", "cot", 5, 3),
        ("cot_offpolicy", "cot", 10, 3),
        ("cot_staleness", "cot", 4, 3),
    ],
)
def test_shipped_sweeps_parse(file, name, variants, seeds):
    meta, specs = load_sweep(ROOT / "configs" / "sweeps" / f"{file}.toml")
    assert meta["name"] == name and len(specs) == seeds * variants
    assert [s.seed for s in specs[:variants]] == [specs[0].seed] * variants  # seed by seed


def test_two_variant_sweep_runs_resumes_and_plots(tmp_path):
    path = write_sweep(tmp_path)
    cli = [sys.executable, "-m", "async_rl.cli"]
    out = subprocess.run(
        [*cli, "sweep", str(path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    runs = sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("_"))
    assert runs == ["routing_replay=none-s0", "routing_replay=r3-s0"]
    for run in runs:
        meta = json.loads((tmp_path / "two" / run / "variant.json").read_text())
        assert meta["variant"] == run[:-3]
    again = subprocess.run(
        [*cli, "sweep", str(path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and again.stdout.count("done already") == 2
    fig = tmp_path / "fig.png"
    plot = subprocess.run(
        [*cli, "plot", str(tmp_path / "two"), "--out", str(fig)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plot.returncode == 0, plot.stderr
    assert fig.read_bytes()[:4] == b"\x89PNG"
    table = fig.with_suffix(".md").read_text()
    assert "routing_replay=none" in table and "routing_replay=r3" in table
