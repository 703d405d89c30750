"""Kill the learner process and resume: the loss trace continues as if uninterrupted, with the
weights going to the actor as deltas (bf16 versions at lr 1e-6) before and after the restart.

Buffer, learner and actor run as separate processes through their own entry points
(`python -m async_rl.buffer.service`, `learner.run`, `actors.loop`). With K = 0 the samples of
every version are determined by that version's weights, so an interrupted run and an
uninterrupted one must agree exactly, step for step.
"""

import json
import signal

from tests.helpers import end, run_config, spawn, wait_for

STEPS = 6


def losses(run_dir):
    """The last loss logged for every version (a resumed run logs redone versions again)."""
    by_version = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "learner/loss" in row:
            by_version[row["version"]] = row["learner/loss"]
    return by_version


def run(tmp_path, start, name, kill_after=None):
    cfg = run_config(
        tmp_path / name,
        f"run.num_steps={STEPS}",
        "run.eval_every=0",
        "task.heldout_size=16",
        'task.ops=["+"]',  # the cold start's task: rewards, and so losses, that are not all 0
        "task.max_digits=1",
        "actor.max_new_tokens=4",
        "actor.quantization=fp32",
        "buffer.max_staleness=0",
        "buffer.max_message_mib=64",
        "learner.lr=1e-6",
        "learner.checkpoint_every=2",
        "model.dtype=bfloat16",  # versions as deltas on the one before (whole every 3rd)
        "weights.deltas=send",
        "weights.full_every=3",
    )
    run_dir, log = cfg.run_dir, tmp_path / f"{name}.log"
    procs = [spawn(log, "async_rl.buffer.service", run_dir)]
    try:
        learner = spawn(log, "learner.run", run_dir, "--start", start)
        procs += [learner, spawn(log, "actors.loop", run_dir, "--actor-id", "a0", "--start", start)]
        if kill_after is not None:

            def trained_past_kill_point():
                exists = (run_dir / "metrics.jsonl").exists()
                return exists and max(losses(run_dir), default=0) >= kill_after

            wait_for(trained_past_kill_point, proc=learner, log=log)
            learner.send_signal(signal.SIGKILL)
            learner.wait(30)
            learner = spawn(log, "learner.run", run_dir, "--start", start)  # resumes by itself
            procs.append(learner)
        assert learner.wait(300) == 0, log.read_text()[-3000:]
    finally:
        end(procs[2:] + procs[1:2])  # actors and learners, then the buffer closes its segment
        end(procs[:1])
    return run_dir


def test_killed_learner_resumes_with_the_same_versions_and_loss_trace(tmp_path, cold_start):
    straight = losses(run(tmp_path, cold_start, "straight"))
    assert sorted(straight) == list(range(1, STEPS + 1)) and all(straight.values())
    resumed_dir = run(tmp_path, cold_start, "killed", kill_after=3)  # checkpoint 2, killed past 3
    resumed = losses(resumed_dir)
    assert resumed == straight  # every version, bit for bit
    text = (resumed_dir / "metrics.jsonl").read_text()
    logged = [json.loads(line)["version"] for line in text.splitlines()]
    assert logged[:3] == [1, 2, 3] and logged[-1] == STEPS  # version 3 was trained twice
    manifests = sorted((resumed_dir / "weights").glob("v*/manifest.json"))
    assert len(manifests) >= 3  # older versions are collected, the newest kept
    assert json.loads(manifests[-1].read_text())["version"] == STEPS
    # the actor followed the resumed learner's deltas: none refused, none out of reach
    v5 = resumed_dir / "weights" / "v000005"
    assert (v5 / "delta.safetensors").exists() and not (v5 / "model.safetensors").exists()
    log = (tmp_path / "killed.log").read_text()
    assert "failed" not in log and "out of reach" not in log
