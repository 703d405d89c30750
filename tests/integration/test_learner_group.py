"""The learner as a group of ranks under `async-rl train` (Ray, gloo, FSDP2): it trains as one
process does, a killed rank restarts the whole group without losing a group, and no process of
a run outlives its driver however the driver is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from async_rl.buffer.replay import ReplayBuffer
from async_rl.config import ModelConfig, load_config
from async_rl.types import RoutingSpec
from learner.batch import pack
from learner.hf import hf_state_dict, import_hf
from learner.optim import build_optimizer
from learner.train import TrainStep
from tests import faults
from tests.helpers import (
    ROOT,
    descendants,
    json_lines,
    launch,
    left_running,
    pid_of,
    stop,
    train_overrides,
    versions,
    wait_for,
)

TINY = RoutingSpec.of(ModelConfig())
HEARTBEAT_S = 10


def first_update_alone(run_dir, start) -> tuple[dict, dict]:
    """The step-1 metrics and weights of one process trained on the batch the buffer served
    the run for version 0 (its consumption log serves the same groups again)."""
    cfg = load_config(run_dir / "config.toml")
    buffer = ReplayBuffer.of_run(cfg, run_dir)
    try:
        table = buffer.sample(0)
    finally:
        buffer.close()
    model, _ = import_hf(start, cfg.model)
    step = TrainStep(model, build_optimizer(model, cfg.learner), cfg)
    metrics = step(pack(table, TINY, pad_id=0))
    return metrics, hf_state_dict(model, cfg.model)


@pytest.mark.slow
def test_two_ranks_train_like_one_and_a_killed_rank_restarts_the_group(tmp_path, start):
    """FSDP2 and expert parallelism over 2 ranks: the first update is the one-process update
    of the same batch; a SIGKILLed rank restarts the group, nothing accepted is lost."""
    run_dir, log = tmp_path / "ranks", tmp_path / "ranks.log"
    args = [
        *train_overrides(tmp_path, start, "ranks", 8),
        "learner.num_ranks=2",
        "learner.expert_parallel=2",  # the experts split over the two ranks as well
        "weights.keep_versions=100",  # version 1 stays, for the comparison below
        f"run.heartbeat_timeout_s={HEARTBEAT_S}",
    ]
    proc = launch(log, *args)
    try:
        wait_for(
            lambda: len(versions(run_dir)) >= 3 and pid_of(run_dir, "learner-1"), 300, proc, log
        )
        killed = pid_of(run_dir, "learner-1")
        os.kill(killed, signal.SIGKILL)
        began = time.monotonic()
        wait_for(lambda: "restarting the learner" in log.read_text(), HEARTBEAT_S, proc, log)
        noticed = time.monotonic() - began
        wait_for(lambda: pid_of(run_dir, "learner-1") != killed, 240, proc, log)
        assert proc.wait(300) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)
    print(f"the killed rank was noticed after {noticed:.1f}s")
    out = log.read_text()
    assert "learner-1 " in out and "Traceback" not in out, out[-4000:]
    report = faults.audit(run_dir, TINY, group_size=4, max_staleness=1)
    assert not report["problems"] and report["groups_lost"] == 0, report
    rows = [r for r in json_lines(run_dir / "metrics.jsonl") if "learner/loss" in r]
    assert {r["learner/num_ranks"] for r in rows} == {2}
    assert max(versions(run_dir)) == 8

    # the group's first update is the one-process update of the same batch
    alone, weights = first_update_alone(run_dir, start)
    first = next(r for r in rows if r["version"] == 1)
    assert first["learner/loss"] == pytest.approx(alone["loss"], rel=1e-4, abs=1e-7)
    assert first["learner/grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-4)
    published = load_file(run_dir / "weights" / "v000001" / "model.safetensors")
    lr = load_config(run_dir / "config.toml").learner.lr
    for (
        name,
        value,
    ) in weights.items():  # AdamW's first step: see tests/integration/test_parallel.py
        assert (published[name] - value).abs().max() <= 0.05 * lr, name


# The other interrupts: one SIGINT to the whole process group (a terminal's Ctrl-C) in
# tests/integration/test_train_ray.py::test_ctrl_c_leaves_a_run_that_resume_continues,
# SIGTERM at the end of
# tests/integration/test_faults.py::test_random_kills_terms_and_stops_of_every_process;
# both check that no process outlives the driver.
@pytest.mark.slow
def test_no_process_outlives_a_driver_interrupted_twice(tmp_path, start):
    run_dir, log = tmp_path / "intr", tmp_path / "intr.log"
    proc = launch(log, *train_overrides(tmp_path, start, "intr", 10_000), "learner.num_ranks=2")
    try:
        wait_for(lambda: len(versions(run_dir)) >= 1, 300, proc, log)
        children = descendants(proc)
        assert any("LearnerWorker" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        proc.wait(240)
        left = left_running(children)
        assert not left, f"SIGINT twice: still running after the driver ended: {left}"
    finally:
        stop(proc)


def test_a_process_exits_without_waiting_for_its_background_jobs():
    """A learner interrupted while its fetch thread waits for a buffer that is gone exits at
    once (an exiting interpreter joins non-daemon threads: it once waited minutes)."""
    script = (
        "import time; from learner.run import Background; "
        "b = Background('fetch'); b.submit(time.sleep, 120); raise KeyboardInterrupt"
    )
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert done.returncode != 0 and b"KeyboardInterrupt" in done.stderr
    assert time.monotonic() - began < 60
