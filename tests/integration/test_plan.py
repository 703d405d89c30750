"""The integration half of `tests/unit/test_plan.py`: what needs a subprocess or Ray."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from async_rl.config import load_config
from async_rl.tools.plan import Cluster, make_plan
from tests.helpers import ENV, ROOT


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "async_rl.cli", "plan", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)


def test_the_30b_config_fits_three_nodes_of_eight_80_gib_gpus_and_not_two():
    config = ["--config", "configs/qwen3_30b_a3b_fp8.toml", "--gpus-per-node", "8"]
    done = plan_cli(*config, "--nodes", "3", "--gpu-mem-gib", "80")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("fits") and "30.532 B parameters" in done.stdout
    assert "bfloat16 compute over float32 masters" in done.stdout
    assert "learner: 16 rank(s), each needs CPU 1, GPU 1" in done.stdout  # placement by role
    cfg = load_config(ROOT / "configs/qwen3_30b_a3b_fp8.toml", [])
    plan = make_plan(cfg, Cluster(nodes=3, gpus_per_node=8, gpu_mem_gib=80))
    # 16 bytes per parameter of a rank's shard: fp32 masters, gradients, AdamW's two moments
    shard = math.ceil(plan.learner["numel"] / 16)
    assert plan.learner["params"] + plan.learner["grads"] + plan.learner["adamw"] == pytest.approx(
        16 * shard, rel=0.01
    )
    assert plan.learner["logits"] == 512 * 151936 * (2 + 12)  # one chunk, not 34,816 positions
    eight = make_plan(
        load_config(ROOT / "configs/qwen3_30b_a3b_fp8.toml", ["learner.num_ranks=8"]),
        Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=80),
    )
    assert not eight.fits and any(p.startswith("a learner rank needs 77.") for p in eight.problems)
    h200 = Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=141)
    assert make_plan(eight.cfg, h200).fits
    overrides = ["learner.num_ranks=1", "learner.max_tokens_per_microbatch=0"]
    cfg = load_config(ROOT / "configs/qwen3_30b_a3b_fp8.toml", overrides)
    one = make_plan(cfg, Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    assert not one.fits
    assert any("= 9 devices, the cluster has 8" in p for p in one.problems)
    assert any(p.startswith("a learner rank needs") for p in one.problems)
