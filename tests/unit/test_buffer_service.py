"""The buffer service over real ZeroMQ sockets: fuzzed input, long polls, and a SIGKILL."""

import threading
import time

import numpy as np
import pyarrow as pa
import zmq

from async_rl.buffer.service import BufferService
from async_rl.types import RoutingSpec, batch_to_trajectories, group_to_batch
from async_rl.wire.messages import Group, encode, table_to_ipc
from tests.helpers import BufferClient, G, make_group, run_config, wait_ingested


def test_fuzzed_messages_are_rejected_and_counted_while_valid_traffic_flows(buffer_service):
    svc, client = buffer_service
    rng = np.random.default_rng(0)
    good = make_group("ok0", 0, seed=0)
    rows = batch_to_trajectories(make_group("bad-len", 0, seed=1), RoutingSpec(2, 2, 8))
    rows[2].behavior_logprobs = rows[2].behavior_logprobs[:-1] + [-0.1, -0.2]
    mismatched = group_to_batch(rows, RoutingSpec(2, 2, 8))
    rows = batch_to_trajectories(make_group("bad-routing", 0, seed=2), RoutingSpec(2, 2, 8))
    for r in rows:
        r.routing = np.zeros((r.routing.shape[0], 2, 3), np.uint8)
    wrong_routing = group_to_batch(rows, RoutingSpec(2, 3, 8))
    rows = batch_to_trajectories(make_group("short-routing", 0, seed=3), RoutingSpec(2, 2, 8))
    rows[1].routing = rows[1].routing[:-1]
    short_routing = group_to_batch(rows, RoutingSpec(2, 2, 8))
    wrong_schema = pa.RecordBatch.from_pydict({"x": [1, 2, 3]})
    bad = [
        [rng.bytes(int(rng.integers(1, 2000)))],  # random single frames
        [rng.bytes(100), rng.bytes(10), rng.bytes(50)],
        encode(Group(), rng.bytes(500)),  # garbage payload
        encode(Group(), table_to_ipc(good)[:-40]),  # truncated Arrow stream
        [b"group", b"{not json", table_to_ipc(good)],
        [b"nonsense", b"{}", table_to_ipc(good)],
        [b"group", b'{"lease": 7}', table_to_ipc(good)],  # a header field of the wrong type
        encode(Group(), table_to_ipc(wrong_schema)),
        encode(Group(), table_to_ipc(mismatched)),
        encode(Group(), table_to_ipc(wrong_routing)),  # [T, 2, 3] traces: schema
        encode(Group(), table_to_ipc(short_routing)),
        encode(Group(), table_to_ipc(good.slice(0, 2))),  # half a group
        encode(Group(), b"\0" * 80_000),  # over buffer.max_message_mib
    ]
    for i, frames in enumerate(bad):
        client.push_socket.send_multipart(frames)
        client.push(make_group(f"ok{i}", 0, seed=i))  # valid traffic between the bad
    client.push(make_group("ok0", 0, seed=0))  # a duplicate group id
    stats = wait_ingested(client, len(bad))
    deadline = time.monotonic() + 10
    while stats["buffer/rejected"] < len(bad) + 1 and time.monotonic() < deadline:
        stats = client.stats()
    assert stats["buffer/ingested"] == len(bad)
    assert stats["buffer/rejected"] == len(bad) + 1
    for reason in ("frames", "arrow", "header", "kind", "schema", "lengths", "routing"):
        assert stats[f"buffer/rejected/{reason}"] >= 1, reason
    assert stats["buffer/rejected/size"] == 1 and stats["buffer/rejected/duplicate"] == 1
    # bad requests are refused with a reason, and the service still answers
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(client.requests.address)
    raw.send_multipart([b"sample", b'{"rid": "r1", "version": "x"}', b""])
    assert raw.poll(10_000)
    kind, header, _ = raw.recv_multipart()
    assert kind == b"error" and b"sample.version" in header and b'"r1"' in header
    raw.close(linger=0)
    table, reply = client.sample(0)
    assert table.num_rows == 2 * G and reply.metrics["buffer/rejected"] == len(bad) + 2
    assert table.column("group_id").unique().to_pylist() == ["ok0", "ok1"]


def test_requests_wait_and_are_answered_when_they_can_be(buffer_service):
    svc, client = buffer_service
    table, info = client.sample(0, wait_s=0.2)
    assert table is None and info.metrics["buffer/groups"] == 0
    # K = 9, B = 2: 20 leases, then actors must pause
    assert len(client.lease("a0", count=19, wait_s=0.0).leases) == 19
    assert len(client.lease("a0", count=5, wait_s=0.0).leases) == 1
    assert client.lease("a0", wait_s=0.0) is None
    client.hello("a0")  # the actor restarted: its leases are released
    assert client.lease("a0", wait_s=0.0) is not None

    got = {}

    def learner():
        other = BufferClient(svc_dir(svc), ctx=svc.ctx)
        got["batch"] = other.sample(0, wait_s=10)
        other.close()

    thread = threading.Thread(target=learner)
    thread.start()
    deadline = time.monotonic() + 30
    while not svc.held:  # the buffer holds the request: not ready yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.push(make_group("g0", 0, seed=0))
    client.push(make_group("g1", 0, seed=1))
    thread.join(15)
    table, info = got["batch"]
    assert table.num_rows == 2 * G
    assert info.staleness_max == 0


def svc_dir(svc):
    return svc.buffer.store.root.parent


def _policy(version: int, index: int) -> pa.RecordBatch:
    """A stand-in for generation: the group depends only on the weights and the prompt."""
    return make_group(f"p{index}", version, seed=1000 * version + index)


def _run_async(tmp_path, k: int, steps: int):
    cfg = run_config(tmp_path, f"buffer.max_staleness={k}")
    svc = BufferService(cfg, cfg.run_dir, ctx=zmq.Context())
    threading.Thread(target=svc.run, daemon=True).start()
    published, total = [0], steps * cfg.global_batch_groups

    def actor():
        client, index = BufferClient(cfg.run_dir, ctx=svc.ctx), 0
        while index < total:
            lease = client.lease("a0", wait_s=0.2)
            if lease is None:
                continue
            [(lease_id, prompt)] = lease.leases
            assert prompt == index  # the buffer hands out prompts in order
            while published[0] < lease.min_version:  # load weights >= min_version
                time.sleep(0.001)
            client.push(_policy(published[0], prompt), lease_id)
            index += 1
        client.close()

    thread = threading.Thread(target=actor, daemon=True)
    thread.start()
    learner, batches = BufferClient(cfg.run_dir, ctx=svc.ctx), []
    for v in range(steps):
        table = None
        while table is None:
            table, info = learner.sample(v, wait_s=5)
        assert info.staleness_max <= k
        batches.append(table.drop_columns(["created_at"]))
        time.sleep(0.01)  # training
        published[0] = v + 1
        learner.publish(v + 1)
    thread.join(10)
    learner.close()
    svc.stop()
    return batches, cfg.global_batch_groups


def test_k0_one_minibatch_serves_exactly_what_a_synchronous_loop_trains_on(tmp_path):
    batches, b = _run_async(tmp_path / "async", k=0, steps=4)
    for v, table in enumerate(batches):
        sync = [_policy(v, i) for i in range(v * b, (v + 1) * b)]  # generate, then train
        expected = pa.Table.from_batches(sync).drop_columns(["created_at"])
        assert table.equals(expected), f"step {v}"


def test_k1_runs_ahead_by_at_most_one_version(tmp_path):
    batches, _ = _run_async(tmp_path, k=1, steps=4)
    for v, table in enumerate(batches):
        assert min(table.column("policy_version").to_pylist()) >= v - 1


def test_a_leaving_actor_and_a_refused_group_give_their_leases_back(buffer_service):
    svc, client = buffer_service
    (bad, bad_prompt), (kept, _), (gone, gone_prompt) = client.lease("a0", count=3).leases
    half = make_group("half", 0, seed=0).slice(0, 2)  # refused: not a whole group
    client.push_socket.send_multipart(encode(Group(lease=bad), table_to_ipc(half)))
    wait = time.monotonic() + 30
    while client.stats()["buffer/rejected"] < 1:
        assert time.monotonic() < wait
        time.sleep(0.02)
    assert client.stats()["buffer/leases"] == 2  # the refused group's prompt goes out again
    client.push(make_group("kept", 0, seed=1), kept)
    wait_ingested(client, 1)
    client.leave("a0")  # the third lease's group will not come
    assert client.stats()["buffer/leases"] == 0
    again = client.lease("a1", count=3).leases
    assert sorted(p for _, p in again)[:2] == sorted([bad_prompt, gone_prompt])
