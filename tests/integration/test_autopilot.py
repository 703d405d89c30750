"""The staleness autopilot: its rules on metric rows, K in the buffer, the learner's drift,
and a real run whose K it lowers."""

from __future__ import annotations

import copy

import pytest
import torch

from async_rl.buffer.segments import read_log
from async_rl.config import ConfigError, ModelConfig, load_config
from async_rl.run.autopilot import Autopilot
from async_rl.types import RoutingSpec
from tests import faults
from tests.helpers import (
    G,
    json_lines,
    launch,
    make_group,
    new_buffer,
    random_batch,
    train_overrides,
)


def pilot(k: int = 1, first: dict | None = None, **keys) -> Autopilot:
    """An autopilot from K = `k` (`keys`: its `buffer.autopilot_*`) past its start-up row
    (`first`: more of that row)."""
    overrides = ["buffer.autopilot=true", f"buffer.max_staleness={k}", "buffer.autopilot_every=4"]
    overrides += [f"buffer.autopilot_{key}={value}" for key, value in keys.items()]
    p = Autopilot(load_config(None, overrides))
    start_up = {"learner/wait_time_s": 9.0, "learner/step_time_s": 1.0, **(first or {})}
    assert p.observe(start_up) is None  # its wait is not counted
    return p


def window(p: Autopilot, wait: float, drift: float | None, n: int = 4, **more):
    """Feed `n` rows (the learner waiting `wait` s of each 1 s step); the last decision."""
    decision = None
    for _ in range(n):
        row = {"learner/wait_time_s": wait, "learner/step_time_s": 1.0 - wait, **more}
        if drift is not None:
            row["learner/drift"] = drift
        decision = p.observe(row) or decision
    return decision


def test_k_rises_while_the_learner_waits_and_the_bound_has_room():
    p = pilot(k=1, max_k=3, idle_high=0.2, max_drift=0.01)
    assert window(p, wait=0.5, drift=0.001, n=3) is None  # a window is 4 rows
    d = p.observe({"learner/wait_time_s": 0.5, "learner/step_time_s": 0.5, "learner/drift": 0.001})
    assert (d.k, d.changed) == (2, True) and "idle 50%" in d.reason
    assert d.signals == {
        "autopilot/k": 2.0,
        "autopilot/idle_share": 0.5,
        "autopilot/drift": 0.001,
        "autopilot/stale_bound": pytest.approx(0.001),  # K x drift of the window, K = 1
        "autopilot/decisions": 1.0,
    }
    assert window(p, 0.5, 0.001).k == 3
    d = window(p, 0.5, 0.001)
    assert (d.k, d.changed) == (3, False)  # at autopilot_max_k
    assert d.signals["autopilot/decisions"] == 2.0


def test_k_stays_when_one_more_would_break_the_bound_or_the_learner_is_busy():
    p = pilot(k=1, idle_high=0.2, max_drift=0.01)
    assert not window(p, wait=0.5, drift=0.006).changed  # 2 x 0.006 > 0.01
    assert not window(p, wait=0.1, drift=0.0).changed  # idle 10% < 20%
    d = window(p, wait=0.5, drift=None)  # no drift measured: nothing bounds K but max_k
    assert d.changed and d.k == 2


def test_k_falls_when_k_times_drift_crosses_the_bound_down_to_min_k():
    p = pilot(k=3, min_k=1, max_drift=0.01)
    d = window(p, wait=0.9, drift=0.004)  # 3 x 0.004 > 0.01, however idle the learner
    assert (d.k, d.changed) == (2, True) and "0.012 > autopilot_max_drift" in d.reason
    assert window(p, 0.9, 0.004).changed is False  # 2 x 0.004 <= 0.01, and 3 would break it
    assert window(p, 0.0, 0.02).k == 1
    assert window(p, 0.0, 0.02).k == 1  # at autopilot_min_k


def test_a_resumed_run_starts_from_the_buffers_k():
    first = {"buffer/max_staleness": 3, "autopilot/decisions": 5.0}  # the K the log left
    p = pilot(k=1, first=first, max_k=4, idle_high=0.2)
    d = window(p, wait=0.5, drift=0.0)
    assert (d.k, d.signals["autopilot/decisions"]) == (4, 6.0)


def test_the_autopilot_must_start_within_its_bounds():
    with pytest.raises(ConfigError, match="buffer.max_staleness"):
        load_config(None, ["buffer.autopilot=true", "buffer.max_staleness=5"])
    with pytest.raises(ConfigError, match="autopilot_idle_high"):
        load_config(None, ["buffer.autopilot_idle_high=1.5"])


# ------------------------------------------------------------------------- the buffer's K
def test_a_higher_k_binds_at_once(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=0, global_batch_groups=2)
    _, leases = buf.lease("a0", count=10)
    assert len(leases) == 2  # (K + 1) x B
    buf.set_max_staleness(2, "test")
    _, more = buf.lease("a0", count=10)
    assert len(more) == 4  # 2 more batches ahead, at once
    buf.release("a0")  # their groups will not come: no batch waits for them
    buf.append([(make_group("old", 0, seed=0), None), (make_group("new", 2, seed=1), None)])
    buf.set_published(2)
    assert buf.sample(2) is not None and buf.staleness(2) == [2, 0]  # served under K = 2
    assert buf.metrics()["buffer/max_staleness"] == 2


def test_a_lower_k_keeps_the_promise_of_the_leases_granted_under_the_old(tmp_path):
    """K 2 -> 0 at version 0: no new lease until the pending groups are trained; the groups
    leased under K = 2 are still served up to staleness 2 until version 0 + 2 + 1, from when
    K = 0 drops what is older. A buffer reopened in between keeps both."""
    buf = new_buffer(tmp_path, max_staleness=2, global_batch_groups=2)
    _, leases = buf.lease("a0", count=10)
    assert len(leases) == 6
    groups = [(make_group(f"g{i}", 0, seed=i), lease) for i, (lease, _) in enumerate(leases)]
    buf.append(groups)
    buf.set_max_staleness(0, "drift")
    assert buf.lease("a0") is None  # admission at once
    assert read_log(tmp_path)[-1] == {"max_staleness": 0, "from_version": 3, "reason": "drift"}
    for version in (0, 1):
        assert buf.sample(version) is not None
        buf.set_published(version + 1)
    assert buf.staleness(1) == [1, 1]  # above the new K: leased under the old one
    del buf  # a crash mid-way
    buf = new_buffer(tmp_path, max_staleness=2, global_batch_groups=2)  # the config's K
    assert buf.metrics()["buffer/max_staleness"] == 0
    assert buf.sample(2) is not None and buf.staleness(2) == [2, 2]
    buf.set_published(3)
    buf.append([(make_group("late", 2, seed=9), None), (make_group("x", 3, seed=8), None)])
    buf.append([(make_group("y", 3, seed=7), None)])
    assert buf.sample(3) is not None and buf.staleness(3) == [0, 0]  # "late" is stale now
    assert buf.metrics()["buffer/dropped_stale"] == 1


# ------------------------------------------------------------------------- the learner's drift
@pytest.mark.parametrize(
    "shape", [[], ["algo.num_minibatches=2", "learner.max_tokens_per_microbatch=40"]]
)
def test_drift_is_how_far_one_step_moves_the_first_groups_token_probabilities(make_step, shape):
    """Against the model's plain forward (whole logits, float64 ratio) before and after; in
    one piece, and with two mini-batches in micro-batches (pi_v is mini-batch 1's forward)."""
    from learner.model import build_model, token_logprobs

    model = build_model(ModelConfig(), seed=0)
    batch = random_batch(0, 2, G, ModelConfig())
    before = copy.deepcopy(model)
    step = make_step(
        model, "buffer.autopilot=true", f"algo.group_size={G}", "learner.lr=1e-2", *shape
    )
    metrics = step(batch)
    first = batch.rows(0, G)

    def logprobs(m):
        with torch.no_grad():
            return token_logprobs(m(first.inputs_BT), first.targets_BT).double()

    ratio = (logprobs(model) - logprobs(before)).exp() - 1
    want = ratio.abs()[first.mask_BT].mean().item()
    assert metrics["drift"] == pytest.approx(want, rel=1e-4) and want > 1e-4
    assert "drift" not in make_step(before, f"algo.group_size={G}")(batch)  # autopilot off


# ------------------------------------------------------------------------- a real run
def test_a_run_whose_policy_moves_too_fast_for_its_k_gets_a_lower_one(tmp_path, cold_start):
    """From K = 2 with a bound no step meets: K falls 2 -> 1 -> 0, one window apart, each
    change on the terminal, in the consumption log with its reason and in the metrics; no
    batch after a change's `from_version` is staler than its K, and no group is lost."""
    run_dir, log = tmp_path / "pilot", tmp_path / "pilot.log"
    proc = launch(
        log,
        *train_overrides(tmp_path, cold_start, "pilot", 60),
        "learner.lr=1e-3",
        "buffer.max_staleness=2",
        "buffer.autopilot=true",
        "buffer.autopilot_every=3",
        "buffer.autopilot_max_drift=1e-12",
    )
    assert proc.wait(300) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "autopilot: K -> 1" in out and "autopilot: K -> 0" in out
    changes = [e for e in read_log(run_dir / "buffer") if "max_staleness" in e]
    assert [e["max_staleness"] for e in changes] == [1, 0]
    assert all("autopilot_max_drift" in e["reason"] for e in changes)
    rows = [r for r in json_lines(run_dir / "metrics.jsonl") if "learner/drift" in r]
    assert len(rows) == 60 and max(r["learner/drift"] for r in rows) > 0
    assert rows[-1]["autopilot/k"] == 0 and rows[-1]["autopilot/decisions"] == 2
    assert rows[-1]["buffer/max_staleness"] == 0
    for change in changes:  # the batch of learner version v is the row of version v + 1
        after = [r for r in rows if r["version"] - 1 >= change["from_version"]]
        assert len(after) > 5
        assert all(r["learner/staleness_max"] <= change["max_staleness"] for r in after)
    report = faults.audit(run_dir, RoutingSpec.of(ModelConfig()), group_size=4, max_staleness=2)
    assert not report["problems"] and report["groups_lost"] == 0, report
