"""Kill the learner process and resume: the loss trace continues as if uninterrupted.

Buffer, learner and actor run as separate processes through their own entry points
(`python -m async_rl.buffer_service`, `learner.run`, `actors.loop`). With K = 0 the samples of
every version are determined by that version's weights, so an interrupted run and an
uninterrupted one must agree exactly, step for step.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_rl.config import ModelConfig, load_config, to_toml
from async_rl.tokenizer import Tokenizer
from learner.hf import export_hf
from learner.model import build_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    out = tmp_path_factory.mktemp("start") / "ckpt"
    return export_hf(build_model(ModelConfig(), seed=1), ModelConfig(), Tokenizer.arithmetic(), out)


def spawn(module, *args):
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def losses(run_dir):
    """The last loss logged for every version (a resumed run logs redone versions again)."""
    by_version = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "learner/loss" in row:
            by_version[row["version"]] = row["learner/loss"]
    return by_version


def run(tmp_path, start, name, kill_after=None):
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"run.num_steps={STEPS}",
            "run.eval_every=0",
            "task.heldout_size=16",
            "algo.group_size=4",
            "algo.prompts_per_minibatch=2",
            "actor.max_new_tokens=4",
            "actor.quantization=fp32",
            "buffer.max_staleness=0",
            "learner.lr=1e-3",
            "learner.checkpoint_every=2",
        ],
    )
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    procs = [spawn("async_rl.buffer_service", run_dir)]
    try:
        learner = spawn("learner.run", run_dir, "--start", start)
        procs += [learner, spawn("actors.loop", run_dir, "--actor-id", "a0")]
        if kill_after is not None:
            deadline = time.monotonic() + 240
            while (
                not (run_dir / "metrics.jsonl").exists()
                or max(losses(run_dir), default=0) < kill_after
            ):
                assert time.monotonic() < deadline and learner.poll() is None
                time.sleep(0.1)
            learner.send_signal(signal.SIGKILL)
            learner.wait(30)
            learner = spawn("learner.run", run_dir, "--start", start)  # resumes by itself
            procs.append(learner)
        assert learner.wait(300) == 0, learner.stderr.read().decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
    return run_dir


def test_killed_learner_resumes_with_the_same_versions_and_loss_trace(tmp_path, start):
    straight = losses(run(tmp_path, start, "straight"))
    assert sorted(straight) == list(range(1, STEPS + 1))
    resumed_dir = run(tmp_path, start, "killed", kill_after=3)  # checkpoint at 2, killed after 3
    resumed = losses(resumed_dir)
    assert resumed == straight  # every version, bit for bit
    text = (resumed_dir / "metrics.jsonl").read_text()
    logged = [json.loads(line)["version"] for line in text.splitlines()]
    assert logged[:3] == [1, 2, 3] and logged[-1] == STEPS  # version 3 was trained twice
    manifests = sorted((resumed_dir / "weights").glob("v*/manifest.json"))
    assert len(manifests) >= 3  # older versions are collected, the newest kept
    assert json.loads(manifests[-1].read_text())["version"] == STEPS
