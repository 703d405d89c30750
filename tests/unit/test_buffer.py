"""The replay buffer in process: schema checks, staleness, reuse, admission and recovery."""

import numpy as np
import pyarrow as pa
import pytest

from async_rl.buffer.segments import read_log
from async_rl.types import (
    InvalidGroup,
    RoutingSpec,
    batch_to_trajectories,
    check_group,
    group_to_batch,
)
from tests.helpers import SPEC, G, make_group, new_buffer


def served_ids(table):
    return list(dict.fromkeys(table.column("group_id").to_pylist()))


# ------------------------------------------------------------------------- schema
def test_arrow_round_trip_keeps_every_field():
    batch = make_group("g", 3, seed=1)
    rows = batch_to_trajectories(batch, SPEC)
    again = group_to_batch(rows, SPEC)
    assert again.equals(batch)
    assert rows[0].routing.dtype == np.uint8
    assert rows[0].routing.shape == (
        len(rows[0].prompt_tokens) + len(rows[0].completion_tokens) - 1,
        2,
        2,
    )
    check_group(batch, SPEC, G)
    check_group(make_group("h", 0, routing=False), SPEC, G)  # engines without traces


def _retyped(schema: pa.Schema, name: str, type_: pa.DataType) -> pa.Schema:
    return schema.set(schema.get_field_index(name), pa.field(name, type_, False))


def _with_column(batch: pa.RecordBatch, name: str, values) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    array = pa.array(values, batch.schema.field(name).type)
    return pa.RecordBatch.from_arrays(
        [array if j == i else c for j, c in enumerate(batch.columns)], schema=batch.schema
    )


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b.slice(0, G - 1), "group_size"),
        (lambda b: b.drop_columns(["reward"]), "schema"),
        (lambda b: b.cast(_retyped(b.schema, "reward", pa.float64())), "schema"),
        (lambda b: _with_column(b, "behavior_logprobs", [[-0.1]] * G), "lengths"),
        (lambda b: _with_column(b, "group_id", ["g", "g", "g", "other"]), "ids"),
        (lambda b: _with_column(b, "sample_id", ["s"] * G), "ids"),
        (lambda b: _with_column(b, "policy_version_max", [-1] * G), "version"),
        (
            lambda b: _with_column(
                b,
                "behavior_logprobs",
                [[0.5] * len(x) for x in b.column("completion_tokens").to_pylist()],
            ),
            "logprobs",
        ),
        (lambda b: _with_column(b, "reward", [float("nan")] * G), "reward"),
    ],
)
def test_check_group_names_what_is_wrong(mutate, reason):
    with pytest.raises(InvalidGroup) as e:
        check_group(mutate(make_group("g", 0)), SPEC, G)
    assert e.value.reason == reason


def test_check_group_rejects_wrong_routing_shape_and_ids():
    batch = make_group("g", 0)
    other = RoutingSpec(num_layers=3, top_k=2, num_experts=8)
    rows = batch_to_trajectories(batch, SPEC)
    for r in rows:
        r.routing = np.zeros((r.routing.shape[0], 3, 2), np.uint8)
    with pytest.raises(InvalidGroup, match="schema"):  # fixed-size list of 6, not 4
        check_group(group_to_batch(rows, other), SPEC, G)
    rows = batch_to_trajectories(batch, SPEC)
    rows[1].routing = rows[1].routing[:-1]  # one position short
    with pytest.raises(InvalidGroup, match="routing"):
        check_group(group_to_batch(rows, SPEC), SPEC, G)
    rows = batch_to_trajectories(batch, SPEC)
    rows[0].routing[0, 0, 0] = 9  # expert 9 of 8
    with pytest.raises(InvalidGroup, match="expert id"):
        check_group(group_to_batch(rows, SPEC), SPEC, G)


# ------------------------------------------------------------------------- sampling
def test_serves_oldest_fresh_groups_and_drops_stale_ones(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=1)
    buf.append([(make_group(f"g{i}", v, seed=i), None) for i, v in enumerate([0, 0, 1, 2, 2])])
    table = buf.sample(2)  # g0, g1 have staleness 2 > K = 1
    assert served_ids(table) == ["g2", "g3"]
    assert buf.metrics()["buffer/dropped_stale"] == 2
    assert buf.staleness(2) == [1, 0]
    assert buf.sample(3) is None  # only g4 left: not a full batch
    assert buf.metrics()["buffer/groups"] == 1
    assert table.num_rows == 2 * G


def test_never_serves_staleness_above_k_property(tmp_path):
    rng = np.random.default_rng(0)
    for k in (0, 1, 3):
        buf = new_buffer(tmp_path / f"k{k}", max_staleness=k, segment_groups=50)
        version, n = 0, 0
        for _ in range(40):
            buf.append(
                [
                    (
                        make_group(
                            f"g{n + j}", max(0, version - int(rng.integers(0, 5))), seed=n + j
                        ),
                        None,
                    )
                    for j in range(int(rng.integers(0, 4)))
                ]
            )
            n += 4
            if buf.sample(version) is not None:
                assert max(buf.staleness(version)) <= k
                version += 1
        assert version > 3


def test_reuse_serves_a_group_at_most_reuse_times(tmp_path):
    buf = new_buffer(tmp_path, reuse=2, max_staleness=5)
    buf.append([(make_group(f"g{i}", 0, seed=i), None) for i in range(3)])
    # oldest first: a group is reused at the next step, until it has been trained on twice
    assert served_ids(buf.sample(0)) == ["g0", "g1"]
    assert served_ids(buf.sample(1)) == ["g0", "g1"]
    assert buf.sample(2) is None
    buf.append([(make_group("g3", 2, seed=3), None)])
    assert served_ids(buf.sample(2)) == ["g2", "g3"]
    assert buf.metrics()["buffer/groups"] == 0


def test_a_repeated_request_gets_the_same_batch(tmp_path):
    buf = new_buffer(tmp_path, segment_groups=2)
    buf.append([(make_group(f"g{i}", 0, seed=i), None) for i in range(5)])
    first = buf.sample(0)
    assert buf.sample(0).equals(first)
    second = buf.sample(1)
    assert set(served_ids(second)).isdisjoint(served_ids(first))
    with pytest.raises(ValueError, match="older than the last served"):
        buf.sample(-1)


def test_admission_allows_k_plus_one_batches_ahead(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2)
    min_version, leases = buf.lease("a0", count=5, version=0)
    assert min_version == 0 and len(leases) == 4  # (K + 1) * B = 4 groups ahead at version 0
    assert [prompt for _, prompt in leases] == [0, 1, 2, 3]  # prompts in order, once each
    assert buf.lease("a0") is None
    buf.append([(make_group(f"g{i}", 0, seed=i), lease) for i, (lease, _) in enumerate(leases)])
    assert buf.lease("a0") is None  # 4 pending
    assert buf.sample(0) is not None
    assert buf.lease("a0") is None  # trained on 2, pending 2: still 4
    buf.set_published(1)
    buf.clock.now = 2.5
    assert buf.lease("a0", count=3)[0] == 1  # a new version opens B more slots...
    assert buf.metrics()["buffer/full_s"] == 2.5  # actors were held back from 0.0 to 2.5
    buf.clock.now = 3.0
    assert buf.lease("a0") is None  # ...and only B
    # leases expire: their prompts go to the next actor that asks
    buf.clock.now = 10_000.0
    min_version, again = buf.lease("a1", count=5, version=1)
    assert [prompt for _, prompt in again] == [4, 5]
    assert buf.versions_in_use() == [1]  # a0 reported too long ago
    buf.release("a1")
    assert not buf.admission.leases and buf.admission.reissue == [4, 5]


def test_prompt_indices_are_never_handed_out_twice_across_restarts(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=100)
    _, first = buf.lease("a0", count=10)
    del buf  # crash
    again = new_buffer(tmp_path, max_staleness=100)
    _, second = again.lease("a0", count=10)
    assert not {p for _, p in first} & {p for _, p in second}


def test_sync_mode_admits_exactly_one_batch_per_version(tmp_path):
    """K = 0: each published version admits one global batch, generated from that version."""
    buf = new_buffer(tmp_path, max_staleness=0, global_batch_groups=2)
    for version in range(3):
        min_version, leases = buf.lease("a0", count=10)
        assert min_version == version and len(leases) == 2
        assert buf.lease("a0") is None
        ids = [lease for lease, _ in leases]
        buf.append([(make_group(lease, version, seed=i), lease) for i, lease in enumerate(ids)])
        assert served_ids(buf.sample(version)) == ids
        buf.set_published(version + 1)
    assert buf.metrics()["buffer/dropped_stale"] == 0


# ------------------------------------------------------------------------- storage
def test_segments_are_arrow_files_other_readers_open(tmp_path):
    polars = pytest.importorskip("polars")
    buf = new_buffer(tmp_path, segment_groups=2)
    groups = [make_group(f"g{i}", 0, seed=i) for i in range(5)]
    buf.append([(g, None) for g in groups])
    buf.close()
    files = sorted(tmp_path.glob("segment-*.arrow"))
    assert [f.name for f in files] == [f"segment-00000{i}.arrow" for i in (1, 2, 3)]
    frame = polars.concat([polars.read_ipc(f) for f in files])
    assert frame.height == 5 * G
    assert frame["group_id"].n_unique() == 5
    assert sorted(frame["sample_id"].to_list()) == sorted(
        sid for g in groups for sid in g.column("sample_id").to_pylist()
    )
    assert frame.schema["routing"] == polars.List(polars.Array(polars.UInt8, 4))


def test_crash_recovery_keeps_every_accepted_group_and_serves_none_twice(tmp_path):
    buf = new_buffer(tmp_path, segment_groups=3, max_staleness=9)
    buf.append([(make_group(f"g{i}", 0, seed=i), None) for i in range(7)])
    first = served_ids(buf.sample(0))
    # a crash: no close(); the open segment and a torn log line stay behind
    with open(tmp_path / "consumed.jsonl", "ab") as f:
        f.write(b'{"version": 1, "serv')
    with open(next(tmp_path.glob("*.open")), "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00")  # half an IPC message
    del buf
    again = new_buffer(tmp_path, segment_groups=3, max_staleness=9)
    assert not list(tmp_path.glob("*.open"))
    assert len(again.store.by_id) == 7
    assert served_ids(again.sample(0)) == first  # the same request gets the same batch
    rest = served_ids(again.sample(1)) + served_ids(again.sample(2))
    assert sorted(first + rest) == [f"g{i}" for i in range(6)]
    assert len(read_log(tmp_path)) == 3
    again.append([(make_group("g7", 2, seed=7), None)])  # appends work after recovery
    assert served_ids(again.sample(3)) == ["g6", "g7"]


def test_check_refuses_duplicates_and_tokens_outside_the_vocabulary(tmp_path):
    buf = new_buffer(tmp_path)
    g = make_group("g", 0)
    buf.append([(g, None)])
    with pytest.raises(InvalidGroup, match="duplicate"):
        buf.check(g)
    rows = batch_to_trajectories(make_group("h", 0), SPEC)
    for r in rows:
        r.completion_tokens = [40] * len(r.completion_tokens)
    with pytest.raises(InvalidGroup, match="vocabulary"):
        buf.check(group_to_batch(rows, SPEC))


def test_inspect_command_reports_counts_staleness_and_bytes(tmp_path, capsys):
    from async_rl.cli import main

    buf = new_buffer(tmp_path / "run" / "buffer", segment_groups=3, max_staleness=1)
    groups = [make_group(f"g{i}", i // 2, seed=i) for i in range(8)]
    buf.append([(g, None) for g in groups] + [(_spanning("g8", [4, 5]), None)])
    buf.sample(2)  # drops g0, g1 (version 0); trains on g2, g3 (version 1)
    assert main(["buffer", "inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "groups 9  trajectories 36" in out
    assert "trained on 2  waiting 5  dropped stale 2" in out
    assert "groups by policy version:  0: 2  1: 2  2: 2  3: 2  4: 1" in out
    assert "staleness when trained:    1: 2" in out
    assert "completion lengths (from): 0: 36" in out  # make_group's are 1 to 4 tokens long
    spans = sum(len(c) > 1 for c in _spanning("g8", [4, 5]).column("completion_tokens").to_pylist())
    assert f"versions per completion:   1: {36 - spans}  2: {spans}" in out
    assert "2 closed, 1 open" in out
    assert main(["buffer", "inspect", str(tmp_path / "missing")]) == 2


def test_inspect_sums_many_versions_into_ranges():
    from async_rl.cli import _histogram

    counts = {v: 8 for v in range(1001)}  # a long run: one entry per version would be unreadable
    line = _histogram(counts)
    pairs = [p.split(": ") for p in line.split("  ")]
    assert len(pairs) == 10 and pairs[0][0] == "0-100" and pairs[-1][0].endswith("-1000")
    assert sum(int(n) for _, n in pairs) == 8 * 1001
    assert _histogram({0: 3, 1: 5}) == "0: 3  1: 5" and _histogram({}) == "-"


def _spanning(gid: str, versions: list[int], seed: int = 0) -> pa.RecordBatch:
    """A group whose completions' tokens come from several weights versions (in-flight)."""
    rows = batch_to_trajectories(make_group(gid, min(versions), seed=seed), SPEC)
    for r in rows:
        r.token_versions = [
            versions[min(t, len(versions) - 1)] for t in range(len(r.completion_tokens))
        ]
        r.policy_version, r.policy_version_max = min(r.token_versions), max(r.token_versions)
    return group_to_batch(rows, SPEC)


def test_staleness_counts_from_the_oldest_token_of_a_completion(tmp_path):
    buf = new_buffer(tmp_path, global_batch_groups=1, max_staleness=1)
    spanning = _spanning("spans-1-3", [1, 3, 3, 3], seed=1)
    assert batch_to_trajectories(spanning, SPEC)[0].policy_version == 1
    buf.append([(spanning, None), (make_group("fresh", 3, seed=2), None)])
    # at learner version 3 the oldest token (version 1) is 2 versions old: dropped, not served
    assert served_ids(buf.sample(3)) == ["fresh"]
    assert buf.metrics()["buffer/dropped_stale"] == 1


def test_token_versions_must_agree_with_the_policy_versions():
    good = _spanning("g", [2, 2, 3])
    check_group(good, SPEC, G)
    rows = batch_to_trajectories(good, SPEC)
    rows[0].token_versions = [4] * len(rows[0].completion_tokens)  # newer than its tags say
    with pytest.raises(InvalidGroup, match="token_versions span"):
        check_group(group_to_batch(rows, SPEC), SPEC, G)
    rows = batch_to_trajectories(good, SPEC)
    rows[1].token_versions = rows[1].token_versions[:-1]
    with pytest.raises(InvalidGroup, match="token_versions and completion_tokens"):
        check_group(group_to_batch(rows, SPEC), SPEC, G)


def test_a_buffer_of_another_schema_is_refused_by_name_and_left_alone(tmp_path):
    old = make_group("old", 0).drop_columns(["token_versions"])  # as an older version wrote it
    (tmp_path / "segment-000001.arrow").write_bytes(b"")
    with pa.OSFile(str(tmp_path / "segment-000001.arrow"), "wb") as f:
        with pa.ipc.new_file(f, old.schema) as writer:
            writer.write_batch(old)
    before = (tmp_path / "segment-000001.arrow").read_bytes()
    with pytest.raises(ValueError, match="segment-000001.arrow.*missing column 'token_versions'"):
        new_buffer(tmp_path)
    assert (tmp_path / "segment-000001.arrow").read_bytes() == before


def test_older_weights_are_served_first_whatever_the_arrival_order(tmp_path):
    """A continuous actor's long completion (version 0) arrives after newer short ones: it is
    trained first, before it would go stale."""
    buf = new_buffer(tmp_path, global_batch_groups=2, max_staleness=1)
    buf.append([(make_group("new-a", 1, seed=1), None), (make_group("new-b", 1, seed=2), None)])
    buf.append([(make_group("old", 0, seed=3), None)])
    assert served_ids(buf.sample(1)) == ["old", "new-a"]
    assert buf.metrics()["buffer/dropped_stale"] == 0


def _long_and_short_leases(buf):
    """K = 1, B = 2: four leases at version 0 (two long completions, two short), then the
    short ones come in; version 1 is published and two short groups of it come in too."""
    _, first = buf.lease("a0", count=4, version=0)
    (long_a, _), (long_b, _), (short_c, _), (short_d, _) = first
    buf.append([(make_group("c", 0, seed=3), short_c), (make_group("d", 0, seed=4), short_d)])
    assert served_ids(buf.sample(0)) == ["c", "d"]  # a and b still fit at version 1
    buf.set_published(1)
    _, second = buf.lease("a0", count=2, version=1)
    buf.append([(make_group(f"new{i}", 1, seed=5 + i), s) for i, (s, _) in enumerate(second)])
    return long_a, long_b


def test_a_batch_waits_for_leased_groups_that_would_go_stale(tmp_path):
    """Admission promises a group leased at version p a place in a batch by version p + K; a
    long completion overtaken by shorter, newer ones keeps it: the batch waits for it."""
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2)
    long_a, long_b = _long_and_short_leases(buf)
    buf.clock.now = 1.0
    assert buf.sample(1) is None  # new0 and new1 are there, but a and b are due
    buf.append([(make_group("a", 0, seed=1), long_a)])
    buf.clock.now = 2.0
    assert buf.sample(1) is None  # b is still being generated
    buf.append([(make_group("b", 0, seed=2), long_b)])
    buf.clock.now = 3.5
    assert served_ids(buf.sample(1)) == ["a", "b"]
    assert served_ids(buf.sample(2)) == ["new0", "new1"]
    metrics = buf.metrics()
    assert metrics["buffer/dropped_stale"] == 0
    assert metrics["buffer/lease_wait_s"] == 2.5  # held from 1.0 to 3.5


def test_lease_wait_counts_only_a_complete_batch_held(tmp_path):
    """A batch held while it could not be served anyway costs the learner nothing: the clock
    does not run."""
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2)
    _, leases = buf.lease("a0", count=2, version=0)
    (lease_a, _), (lease_b, _) = leases
    buf.set_published(1)
    buf.clock.now = 1.0
    assert buf.sample(1) is None  # a and b are due, and nothing else is there
    buf.append([(make_group("a", 0, seed=1), lease_a)])
    buf.clock.now = 2.0
    assert buf.sample(1) is None  # one group of two
    buf.append([(make_group("b", 0, seed=2), lease_b)])
    buf.clock.now = 4.0
    assert served_ids(buf.sample(1)) == ["a", "b"]
    assert buf.metrics()["buffer/lease_wait_s"] == 0.0


def test_group_latency_is_lease_to_arrival_over_the_last_batch_of_groups(tmp_path):
    """`rollout/group_latency_s` (mean) and `_max_s`: seconds from a lease to its group's arrival,
    over the last global batch's worth of groups (what K learner steps must cover)."""
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2)
    assert "rollout/group_latency_s" not in buf.metrics()
    buf.clock.now = 10.0
    _, [(lease_a, _), (lease_b, _)] = buf.lease("a0", count=2, version=0)
    buf.clock.now = 11.0
    _, [(lease_c, _)] = buf.lease("a0", count=1, version=0)
    buf.clock.now = 10.5
    buf.append([(make_group("a", 0, seed=1), lease_a)])
    buf.clock.now = 13.0
    buf.append([(make_group("b", 0, seed=2), lease_b)])
    metrics = buf.metrics()
    assert metrics["rollout/group_latency_s"] == 1.75  # 0.5 and 3.0
    assert metrics["rollout/group_latency_max_s"] == 3.0
    buf.clock.now = 12.0
    buf.append([(make_group("c", 0, seed=3), lease_c)])  # a leaves the window
    metrics = buf.metrics()
    assert metrics["rollout/group_latency_s"] == 2.0  # 3.0 and 1.0
    assert metrics["rollout/group_latency_max_s"] == 3.0
    buf.append([(make_group("d", 0, seed=4), None)])  # no lease: nothing to time
    assert buf.metrics()["rollout/group_latency_s"] == 2.0


def test_without_waiting_a_late_long_group_is_dropped(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2, wait_for_leases=False)
    long_a, long_b = _long_and_short_leases(buf)
    buf.clock.now = 1.0
    assert served_ids(buf.sample(1)) == ["new0", "new1"]
    buf.append([(make_group("a", 0, seed=1), long_a), (make_group("b", 0, seed=2), long_b)])
    buf.clock.now = 2.0
    assert buf.sample(2) is None
    assert buf.metrics()["buffer/dropped_stale"] == 2


def test_a_lease_that_expires_or_is_released_ends_the_wait(tmp_path):
    buf = new_buffer(tmp_path, max_staleness=1, global_batch_groups=2, lease_timeout_s=10.0)
    long_a, _ = _long_and_short_leases(buf)
    buf.append([(make_group("a", 0, seed=1), long_a)])
    buf.clock.now = 5.0
    assert buf.sample(1) is None
    # b's lease expires at 10 s: its prompt goes out again and the batch is served without it
    buf.clock.now = 10.0
    assert served_ids(buf.sample(1)) == ["a", "new0"]
    assert buf.admission.reissue == [1]

    other = new_buffer(tmp_path / "released", max_staleness=1, global_batch_groups=2)
    _long_and_short_leases(other)
    other.clock.now = 1.0
    assert other.sample(1) is None
    other.release("a0")  # the actor left (or restarted): a and b will not come
    assert served_ids(other.sample(1)) == ["new0", "new1"]


def test_a_batch_waits_early_when_later_batches_cannot_take_every_leased_group(tmp_path):
    """K = 2, B = 1: three groups leased at version 0 are due by version 2, one batch each at
    versions 0, 1 and 2; the batch for version 0 may not take a newer group instead."""
    buf = new_buffer(tmp_path, max_staleness=2, global_batch_groups=1)
    _, first = buf.lease("a0", count=3, version=0)
    buf.set_published(1)
    _, [(newer, _)] = buf.lease("a0", count=1, version=1)
    buf.append([(make_group("newer", 1, seed=9), newer)])
    assert buf.sample(0) is None  # three due by 2, two batches after this one
    for i, (lease, _) in enumerate(first):
        buf.append([(make_group(f"old{i}", 0, seed=i), lease)])
    buf.clock.now = 1.0
    assert [served_ids(buf.sample(v)) for v in range(4)] == [
        ["old0"],
        ["old1"],
        ["old2"],
        ["newer"],
    ]
    assert buf.metrics()["buffer/dropped_stale"] == 0
