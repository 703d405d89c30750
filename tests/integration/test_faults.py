"""Fault injection on real processes: kills, stops past the heartbeat, a full disk, bad zmq.

After every fault the run recovers (or stops with a clear error), and `tests/faults.audit`
finds, from the files alone: every stored group whole and stored once, every group the buffer
reported stored still on disk, nothing trained above staleness K, metrics versions 1..n, and no
actor's weights going backwards. `benchmarks/soak.py` does the same for half an hour.
"""

import json
import os
import random
import signal
import time

import pytest
import torch

from async_rl.buffer.segments import StorageError
from async_rl.config import ModelConfig, load_config, to_toml
from async_rl.paths import RunPaths, publish_endpoints, read_endpoints
from async_rl.types import RoutingSpec
from async_rl.weights import FsWeightStore
from learner.checkpoint import latest_checkpoint, save_checkpoint
from tests import faults
from tests.helpers import (
    descendants,
    end,
    launch,
    left_running,
    make_group,
    new_buffer,
    pid_of,
    spawn,
    stop,
    train_overrides,
    versions,
    wait_for,
)

TINY = RoutingSpec.of(ModelConfig())


@pytest.fixture
def small_disk(tmp_path):
    try:
        with faults.tmpfs(tmp_path / "disk", "2m") as disk:
            yield disk
    except PermissionError as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}): the disk-full tests need root")


def test_full_disk_accepts_nothing_it_cannot_store_and_loses_nothing_it_accepted(small_disk):
    buf = new_buffer(small_disk / "buffer", segment_groups=1000, max_staleness=999)
    accepted = []
    for i in range(4):
        buf.append([(make_group(f"g{i}", 0, seed=i), None)])
        accepted.append(f"g{i}")
    filler = faults.fill(small_disk)
    with pytest.raises(StorageError, match="the disk is full"):
        for i in range(4, 10_000):
            buf.append([(make_group(f"g{i}", 0, seed=i), None), (make_group(f"h{i}", 0), None)])
            accepted += [f"g{i}", f"h{i}"]
    assert list(buf.store.by_id) == accepted  # the failed write was not accepted
    assert buf.metrics()["buffer/stored"] == len(accepted)
    filler.unlink()  # space comes back: a reopened buffer has exactly what was accepted
    again = new_buffer(small_disk / "buffer", segment_groups=1000, max_staleness=999)
    assert list(again.store.by_id) == accepted
    assert all(g.num_rows == 4 for g in again.store.by_id.values())
    served = again.sample(0)
    assert served.column("group_id").unique().to_pylist() == accepted[:2]

    more = [f"m{i}" for i in range(300)]
    again.append([(make_group(gid, 0, seed=i), None) for i, gid in enumerate(more)])
    filler = faults.fill(small_disk)  # the consumption log cannot be written: nothing is served
    with pytest.raises(StorageError, match="consumed.jsonl.*the disk is full"):
        for version in range(1, 150):
            again.sample(version)
    assert version not in again.store.served_at
    filler.unlink()
    third = new_buffer(small_disk / "buffer", segment_groups=1000, max_staleness=999)
    assert sorted(third.store.served_at) == list(range(version))
    expected = (accepted + more)[2 * version : 2 * version + 2]
    assert third.sample(version).column("group_id").unique().to_pylist() == expected


def test_full_disk_leaves_no_partial_weights_or_checkpoint(small_disk):
    store = FsWeightStore(small_disk / "weights")
    model = torch.nn.Linear(64, 64)
    store.publish(0, {"w": torch.zeros(8)})
    filler = faults.fill(small_disk)
    with pytest.raises(Exception, match="No space left on device"):
        store.publish(1, {"w": torch.zeros(100_000)})
    with pytest.raises(Exception, match="No space left on device"):
        save_checkpoint(small_disk / "ckpt", 1, model, torch.optim.AdamW(model.parameters()), {})
    assert store.versions() == [0] and latest_checkpoint(small_disk / "ckpt") is None
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".")]  # no temporaries
    filler.unlink()
    store.publish(1, {"w": torch.zeros(8)})
    assert store.latest() == 1


def _train_overrides(tmp_path, start, name, steps, *extra):
    return [
        *train_overrides(tmp_path, start, name, steps),
        "logging.progress=false",
        "buffer.wait_timeout_s=240",
        *extra,
    ]


def _inject(run_dir, target, sig, rng, proc, log, stopped):
    """Send `sig` to the process `target`, then wait until it runs again and training goes on."""
    name = rng.choice(["a0", "a1"]) if target == "actor" else target
    pid = pid_of(run_dir, name)
    os.kill(pid, getattr(signal, sig))
    if sig == "SIGSTOP":
        stopped.append((name, pid))
    began = time.monotonic()

    def replaced():
        new = pid_of(run_dir, name)
        return new != pid and faults.alive(new) and not faults.alive(pid)

    wait_for(replaced, timeout=240, proc=proc, log=log)
    at = len(versions(run_dir))

    def trains():
        return len(versions(run_dir)) > at

    wait_for(trains, timeout=240, proc=proc, log=log)
    return f"{sig} {name}: replaced and training again after {time.monotonic() - began:.0f}s"


@pytest.mark.slow
def test_random_kills_terms_and_stops_of_every_process(tmp_path, start):
    """SIGKILL, SIGTERM and SIGSTOP (past the heartbeat) of actors, buffer and learner."""
    run_dir, log = tmp_path / "faults", tmp_path / "faults.log"
    args = _train_overrides(
        tmp_path, start, "faults", 10_000, "actor.num_actors=2", "run.heartbeat_timeout_s=10"
    )
    proc = launch(log, *args)
    rng = random.Random(7)
    plan = [
        (t, s) for t in ("actor", "buffer", "learner") for s in ("SIGKILL", "SIGTERM", "SIGSTOP")
    ]
    rng.shuffle(plan)
    done, stopped = [], []
    try:
        wait_for(
            lambda: len(versions(run_dir)) >= 2 and pid_of(run_dir, "a1"),
            proc=proc,
            log=log,
        )
        for target, sig in plan:
            time.sleep(rng.uniform(0, 2))  # a random point of the step
            done.append(_inject(run_dir, target, sig, rng, proc, log, stopped))
        children = descendants(proc)
        proc.send_signal(signal.SIGTERM)  # to the driver: stops like Ctrl-C
        assert proc.wait(300) == 0, log.read_text()[-4000:]
        left = left_running(children)
        assert not left, f"SIGTERM: still running after the driver ended: {left}"
    finally:
        stop(proc)
        for _, pid in stopped:  # a process this test stopped and the run did not end
            if faults.state(pid) == "T":
                os.kill(pid, signal.SIGKILL)
    out = log.read_text()
    print("\n".join(done))
    assert "interrupted" in out and "Traceback" not in out, out[-4000:]
    for name, pid in stopped:  # each SIGSTOP was found by the heartbeat
        assert f"{name} (pid {pid}) did not answer for" in out, out[-4000:]
    report = faults.audit(run_dir, TINY, group_size=4, max_staleness=1)
    print(json.dumps(report, indent=1))
    assert not report["problems"]
    assert report["groups_lost"] == 0 and report["steps"] >= 2 + len(plan)
    # the learner was replaced three times; only SIGKILL and the stop redo versions
    assert report["learner_restarts_seen"] <= 2


def _stops_with(proc, log, *needles, timeout=300):
    """The driver ends by itself with exit 1 and a clear error, not a traceback."""
    assert proc.wait(timeout) == 1, log.read_text()[-4000:]
    out = log.read_text()
    error = [line for line in out.splitlines() if line.startswith("async-rl: error:")]
    assert error and all(n in error[-1] for n in needles), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return error[-1]


@pytest.mark.slow
def test_full_disk_stops_the_run_with_a_clear_error_and_resume_continues(tmp_path, start):
    out_dir, log = tmp_path / "out", tmp_path / "disk.log"
    run_dir = out_dir / "disk"
    try:
        outer = faults.tmpfs(out_dir, "96m")
        outer.__enter__()
    except PermissionError as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}): the disk-full test needs root")
    errors = []
    try:
        with faults.tmpfs(run_dir / "buffer", "4m") as buffer_disk:
            # 1. the buffer's disk fills up: the run stops, naming it
            proc = launch(log, *_train_overrides(out_dir, start, "disk", 10_000))
            try:
                wait_for(lambda: len(versions(run_dir)) >= 2, proc=proc, log=log)
                filler = faults.fill(buffer_disk)
                errors.append(_stops_with(proc, log, "the buffer stopped", "the disk is full"))
            finally:
                stop(proc)
            first = faults.audit(run_dir, TINY, group_size=4, max_staleness=1)
            assert not first["problems"] and first["groups_lost"] == 0
            filler.unlink()

            # 2. space came back: resume; then the learner's disk fills up
            at = len(versions(run_dir))
            proc = launch(log, "--resume", str(run_dir), "run.num_steps=10000")
            try:
                wait_for(lambda: len(versions(run_dir)) >= at + 2, proc=proc, log=log)
                filler = faults.fill(out_dir)
                errors.append(_stops_with(proc, log, "the learner stopped", "No space left"))
            finally:
                stop(proc)
            filler.unlink()

            # 3. and the run goes on from its last checkpoint
            steps = max(versions(run_dir)) + 2
            proc = launch(log, "--resume", str(run_dir), f"run.num_steps={steps}")
            try:
                assert proc.wait(300) == 0, log.read_text()[-4000:]
            finally:
                stop(proc)
            report = faults.audit(run_dir, TINY, group_size=4, max_staleness=1)
    finally:
        outer.__exit__(None, None, None)
    print("\n".join(errors))
    print(json.dumps(report, indent=1))
    assert not report["problems"] and report["groups_lost"] == 0
    assert report["steps"] == steps


@pytest.mark.slow
def test_dropped_delayed_and_corrupted_zmq_traffic(tmp_path, start):
    """A proxy between the services and the buffer drops, delays and corrupts messages."""
    cfg = load_config(
        None,
        [
            *train_overrides(tmp_path, start, "zmq", 12),
            "buffer.lease_timeout_s=3",  # a dropped group's prompt is handed out again soon
            "buffer.wait_timeout_s=120",
        ],
    )
    run_dir, log = cfg.run_dir, tmp_path / "zmq.log"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    procs = [spawn(log, "async_rl.buffer.service", run_dir)]
    try:
        paths = RunPaths(run_dir)
        wait_for(lambda: read_endpoints(paths, "buffer"), timeout=60)
        target = read_endpoints(paths, "buffer")
        with faults.FaultProxy(target, seed=3, drop=0.15, delay=0.15, corrupt=0.15) as proxy:
            publish_endpoints(paths, "buffer", proxy.addresses)  # clients find the proxy
            learner = spawn(log, "learner.run", run_dir, "--start", start)
            procs += [learner] + [
                spawn(log, "actors.loop", run_dir, "--actor-id", a, "--start", start)
                for a in ("a0", "a1")
            ]
            assert learner.wait(400) == 0, log.read_text()[-4000:]  # never stalled for good
            counts = dict(proxy.counts)
    finally:
        end(procs[1:])  # actors, then the buffer closes its segment
        end(procs[:1])
    print(counts)
    report = faults.audit(run_dir, TINY, group_size=4, max_staleness=1)
    print(json.dumps(report, indent=1))
    assert not report["problems"] and report["groups_lost"] == 0
    assert report["steps"] == 12 and report["learner_restarts_seen"] == 0
    assert counts["group/dropped"] and counts["group/delayed"] and counts["group/corrupted"]
    assert report["rejected"] >= 1  # corrupted copies, counted by reason
