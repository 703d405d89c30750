"""`async-rl train` end to end: Ray, real processes, SIGKILL of an actor, Ctrl-C and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from async_rl.config import ModelConfig
from async_rl.types import RoutingSpec, check_group
from tests import faults
from tests.helpers import (
    ENV,
    ROOT,
    RayCluster,
    descendants,
    fleet_sizes,
    json_lines,
    launch,
    left_running,
    stop,
    stored_groups,
    train_overrides,
    versions,
    wait_for,
)


def scale(run_dir: Path, actors: int) -> None:
    cli = [sys.executable, "-m", "async_rl.cli"]
    command = [*cli, "scale", str(run_dir), "--actors", str(actors)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_train_survives_a_killed_actor_and_leaves_only_whole_groups(tmp_path, start):
    """On the collective weight path: the killed actor's replacement and the actor added later
    start from the durable store and then receive versions by broadcast; the one that leaves
    is taken out of the group; no accepted group is lost."""
    run_dir, log = tmp_path / "kill", tmp_path / "kill.log"
    collective = ["weights.store=collective", "weights.durable_every=5"]
    proc = launch(log, *train_overrides(tmp_path, start, "kill", 20000), *collective)
    pids = run_dir / "control" / "pids"
    try:
        wait_for(lambda: len(versions(run_dir)) >= 2 and (pids / "a0.pid").exists(), 240, proc, log)
        first_pid = int((pids / "a0.pid").read_text())
        os.kill(first_pid, signal.SIGKILL)  # mid-run, possibly mid-group
        wait_for(lambda: int((pids / "a0.pid").read_text()) != first_pid, 240, proc, log)
        killed_at = len(versions(run_dir))
        wait_for(lambda: len(versions(run_dir)) >= killed_at + 2, 240, proc, log)  # goes on
        # grow the fleet while the run goes on, then shrink it back; the fleet size is a metric
        scale(run_dir, 2)
        wait_for(lambda: 2 in fleet_sizes(run_dir), 240, proc, log)
        grown_at = len(versions(run_dir))
        wait_for(lambda: (pids / "a1.pid").exists(), 240, proc, log)
        wait_for(lambda: len(versions(run_dir)) >= grown_at + 2, 240, proc, log)  # both at work
        scale(run_dir, 1)
        wait_for(lambda: fleet_sizes(run_dir)[-1] == 1, 240, proc, log)
        shrunk_at = len(versions(run_dir))
        wait_for(lambda: len(versions(run_dir)) >= shrunk_at + 2, 240, proc, log)  # one goes on
    finally:
        returncode = stop(proc)
    out = log.read_text()
    assert returncode == 0, out
    assert "fleet: 1 -> 2 actors" in out and "fleet: 2 -> 1 actors" in out
    assert "interrupted" in out
    sizes = fleet_sizes(run_dir)
    assert sizes[-1] == 1 and 2 in sizes
    done = versions(run_dir)
    assert done == list(range(1, len(done) + 1))
    spec = RoutingSpec.of(ModelConfig())
    groups = stored_groups(run_dir)
    for batch in groups:  # every stored group is whole and well formed
        check_group(batch, spec, 4)
    ids = [b.column("group_id")[0].as_py() for b in groups]
    assert len(ids) == len(set(ids))
    report = faults.audit(run_dir, RoutingSpec.of(ModelConfig()), group_size=4, max_staleness=1)
    assert not report["problems"] and report["groups_lost"] == 0, report
    rows = json_lines(run_dir / "metrics.jsonl")
    receivers = [r["learner/weights_receivers"] for r in rows if "learner/weights_receivers" in r]
    assert 2 in receivers  # both actors, then the one left (a transfer at the very end may
    last_two = len(receivers) - 1 - receivers[::-1].index(2)  # find it stopping: 0)
    assert 1 in receivers[last_two:]
    # wandb logged offline into the run directory
    assert list(run_dir.glob("wandb/offline-run-*"))


def test_ctrl_c_leaves_a_run_that_resume_continues(tmp_path, start):
    run_dir, log = tmp_path / "intr", tmp_path / "intr.log"
    # two learner ranks: the group stops together, checkpoints and resumes; the SIGINT goes
    # to the whole process group, as a terminal's Ctrl-C does
    proc = launch(log, *train_overrides(tmp_path, start, "intr", 30), "learner.num_ranks=2")
    try:
        wait_for(lambda: len(versions(run_dir)) >= 3, 240, proc, log)
        children = descendants(proc)
    finally:
        returncode = stop(proc, group=True)
    out = log.read_text()
    assert returncode == 0, out
    assert not left_running(children), "processes of the run outlived its driver"
    assert "interrupted" in out and f"async-rl train --resume {run_dir}" in out
    done = versions(run_dir)
    assert done == list(range(1, len(done) + 1))
    checkpoint = sorted((run_dir / "checkpoints" / "learner").glob("step-*"))[-1]
    saved = json.loads((checkpoint / "state.json").read_text())["version"]
    assert saved == done[-1]  # the learner checkpointed where it stopped

    resumed = launch(log, "--resume", str(run_dir), "run.num_steps=" + str(done[-1] + 3))
    assert resumed.wait(300) == 0, log.read_text()
    after = versions(run_dir)
    assert after == list(range(1, done[-1] + 4))  # versions continue, none repeated or skipped


def test_train_joins_an_existing_ray_cluster(tmp_path, start):
    """A head started by `ray start` on loopback (Ray's single-machine mode, as `init_ray`
    uses), with token authentication (Ray >= 2.59 authenticates every client of a cluster)."""
    with RayCluster(tmp_path, head_cpus=4) as cluster:
        joined = [*train_overrides(tmp_path, start, "joined", 3), "--ray-address", cluster.address]
        proc = launch(tmp_path / "joined.log", *joined, env=cluster.env)
        assert proc.wait(300) == 0, (tmp_path / "joined.log").read_text()
        assert versions(tmp_path / "joined") == [1, 2, 3]


def _rows(t0: float, n: int, wait: float, step: float, full_per_row: float) -> list[dict]:
    """Metric rows a step apart with the learner waiting `wait` s per step and the buffer full
    `full_per_row` s per step."""
    return [
        {
            "time": t0 + i * (wait + step),
            "learner/wait_time_s": wait,
            "learner/step_time_s": step,
            "learner/publish_time_s": 0.0,
            "buffer/full_s": 100.0 + i * full_per_row,
        }
        for i in range(n)
    ]


def test_the_autoscaler_keeps_the_buffer_fill_between_its_bounds():
    from async_rl.config import Config
    from async_rl.run.fleet import autoscale

    cfg = Config()
    cfg.actor.min_actors, cfg.actor.max_actors = 1, 3
    dry = _rows(1000.0, 10, wait=0.5, step=0.5, full_per_row=0.0)  # the learner waits half
    full = _rows(1000.0, 10, wait=0.0, step=1.0, full_per_row=0.9)  # actors held back 90%
    latency = _rows(1000.0, 10, wait=0.3, step=0.7, full_per_row=0.3)  # waits, actors ahead
    assert autoscale(dry, cfg, 2) == 3 and autoscale(dry, cfg, 3) == 3  # grows up to max
    assert autoscale(full, cfg, 2) == 1 and autoscale(full, cfg, 1) == 1  # shrinks down to min
    assert autoscale(latency, cfg, 2) == 2  # more actors would only be held back too
    busy = _rows(1000.0, 10, wait=0.01, step=0.99, full_per_row=0.0)
    assert autoscale(busy, cfg, 2) == 2  # never ahead, but the learner is not waiting
    assert autoscale(dry, cfg, 2, since=2000.0) == 2  # only rows after the last decision count
    cfg.actor.autoscale_fill_high = 0.95
    assert autoscale(full, cfg, 2) == 2  # the bounds are the config's
    restarted = full[:5] + [{**r, "buffer/full_s": 1.0} for r in full[5:]]
    assert autoscale(restarted, cfg, 2) == 2  # a restarted buffer's counter is no signal


def test_the_autoscaler_shrinks_an_oversized_fleet_in_a_real_run(tmp_path, start):
    """Three actors for a learner that one keeps fed: admission holds them back, the fleet
    shrinks until the buffer's fill is within bounds, and stays there (no flapping)."""
    run_dir, log = tmp_path / "auto", tmp_path / "auto.log"
    proc = launch(
        log,
        *train_overrides(tmp_path, start, "auto", 20000),
        "actor.num_actors=3",
        "actor.max_actors=3",
        "actor.autoscale=true",
        "actor.autoscale_interval_s=3",
    )
    try:
        wait_for(lambda: 3 in fleet_sizes(run_dir), 240, proc, log)
        wait_for(lambda: fleet_sizes(run_dir)[-1] == 1, 240, proc, log)
        settled = len(fleet_sizes(run_dir))
        time.sleep(15)  # five more decisions: nothing to await, the fleet must just stay
    finally:
        returncode = stop(proc)
    out = log.read_text()
    assert returncode == 0, out
    assert "fleet: 3 -> 2 actors" in out and "fleet: 2 -> 1 actors" in out
    assert "fleet: 1 -> 2 actors" not in out
    assert set(fleet_sizes(run_dir)[settled:]) == {1}
