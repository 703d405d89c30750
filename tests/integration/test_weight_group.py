"""The collective weight path: versions broadcast to actors in other processes over gloo.

The learner's side runs in this process (a `CollectiveWeightStore` with its sender); each actor
is a real process with the actor's side (`MEMBER` below): it receives versions through the
group, or reads them from the durable `fs` store, and generates with them.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

from async_rl.paths import RunPaths, publish_endpoints
from async_rl.weights import CollectiveWeightStore, FsWeightStore
from async_rl.weights.buckets import (
    ALONE,
    bucket_sizes,
    gathered_buckets,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from async_rl.weights.collective import WeightSender
from learner.hf import hf_state_dict, import_hf
from tests.helpers import ENV, ROOT

TIMEOUT_S = 5.0
PROMPTS = [[2, 5, 14, 7, 17], [2, 9, 14, 9, 17], [2, 4, 14, 12, 17]]

# An actor's side: wait for a version >= `want`, generate greedily with it, print what it saw.
MEMBER = """
import json, sys, time
import torch
from actors.embedded import EmbeddedEngine
from actors.engine import SamplingParams
from async_rl.weights import CollectiveWeightStore, FsWeightStore
from async_rl.weights.collective import WeightReceiver
run_dir, name, start, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
durable = FsWeightStore(run_dir + "/weights", template=start)
first = durable.latest()
store = CollectiveWeightStore(durable, 1000, receiver=WeightReceiver(run_dir, name, 5.0))
deadline = time.monotonic() + 120
while (store.latest() or 0) < want:
    assert time.monotonic() < deadline, f"{name}: version {want} never came"
    time.sleep(0.05)
engine = EmbeddedEngine(start, quantization="fp32")
got = store.latest()
with store.reading(got) as tensors:
    engine.load_weights(tensors, got)
params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
groups = engine.generate(PROMPTS, params, 1)
print(json.dumps({"first": first, "got": got, "received": store.receiver.received,
                  "tokens": [g[0].tokens for g in groups]}), flush=True)
store.close()
"""


def scaled(start, cfg, factor: float) -> dict[str, torch.Tensor]:
    model, _ = import_hf(start, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return hf_state_dict(model, cfg)


def member(procs: list, run_dir, name, start, want) -> subprocess.Popen:
    script = f"PROMPTS = {PROMPTS}\n" + MEMBER
    args = [sys.executable, "-c", script, str(run_dir), name, str(start), str(want)]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True))
    return procs[-1]


def wait_for_joins(sender: WeightSender, n: int, timeout_s: float = 120) -> None:
    """Until `n` joins in all (members register once per group they join)."""
    deadline = time.monotonic() + timeout_s

    def joins():
        keys = [f"event/{i}" for i in range(sender.store.add("events", 0))]
        return sum(sender.store.get(k).startswith(b"join") for k in keys if sender.store.check([k]))

    while joins() < n:
        assert time.monotonic() < deadline, f"{n} joins expected"
        time.sleep(0.05)


def file_loaded_tokens(path) -> list[list[int]]:
    from actors.embedded import EmbeddedEngine
    from actors.engine import SamplingParams

    engine = EmbeddedEngine(path, quantization="fp32")
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    return [g[0].tokens for g in engine.generate(PROMPTS, params, 1)]


def test_buckets_round_trip_every_dtype_and_bound_their_size():
    g = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: the next is unaligned
        "c": torch.randn(100, generator=g),
        "d": torch.arange(3),
        "e": torch.randn(2, 3, generator=g),
    }
    tensors = plan_buckets(state, bucket_bytes=128)
    assert [t[3:] for t in tensors] == [[0, 0], [0, 64], [1, 0], [2, 0], [2, 64]]
    sizes = bucket_sizes(tensors)
    assert sizes == [78, 400, 88]  # a + b; c alone (larger than a bucket); d + e
    out = {}
    for index, size in enumerate(sizes):
        sent = pack_bucket(tensors, index, size, state)
        out |= unpack_bucket(tensors, index, sent.clone())  # what a receiver got
    assert out.keys() == state.keys()
    assert all(torch.equal(out[k], state[k]) and out[k].dtype == state[k].dtype for k in state)
    assert pack_bucket(tensors, 1, 400, state).data_ptr() == state["c"].data_ptr()  # no copy
    with pytest.raises(ValueError, match="unknown dtype"):
        unpack_bucket([["x", "torch.complex64", [1], 0, 0]], 0, torch.zeros(8, dtype=torch.uint8))


def test_gathering_follows_the_same_plan_counted_in_the_cast_dtype():
    """The learner's gathering and the broadcast share one plan: buckets are what the plan
    says, counted in the dtype the tensors travel in (fp32 masters as bf16); 0 is one bucket
    but for tensors of `ALONE` bytes or more."""
    state = {"a": torch.zeros(16), "b": torch.zeros(16), "c": torch.zeros(24), "d": torch.ones(8)}
    plan = plan_buckets(state, bucket_bytes=128, dtype=torch.bfloat16)
    buckets = list(gathered_buckets(state, 128, torch.bfloat16))
    # bf16: a at 0, b at 64 (aligned); c would end at 128 + 48: a new bucket, with d at 64
    assert [sorted(b) for b in buckets] == [["a", "b"], ["c", "d"]]
    assert [t[3] for t in plan] == [0, 0, 1, 1]
    assert all(v.dtype == torch.bfloat16 for b in buckets for v in b.values())
    assert [sorted(b) for b in gathered_buckets(state)] == [["a", "b", "c", "d"]]
    big = {"x": torch.zeros(1), "y": torch.zeros(ALONE // 4), "z": torch.zeros(1)}
    assert [sorted(b) for b in gathered_buckets(big)] == [["x"], ["y"], ["z"]]


def test_the_sender_lets_go_of_the_last_version_before_the_next_is_gathered(tmp_path):
    """`WeightSender.last` (for late joiners) would keep a whole version alive while the
    learner gathers the next: `before_gather` drops it."""
    sender = WeightSender("127.0.0.1", TIMEOUT_S, 2**20)
    store = CollectiveWeightStore(FsWeightStore(tmp_path), 1000, sender)
    try:
        state = {"w": torch.ones(1000)}
        alive = weakref.ref(state["w"])
        store.publish(0, state)
        del state
        assert alive() is not None  # kept for joiners
        store.before_gather()
        gc.collect()
        assert alive() is None
    finally:
        store.close()


@pytest.mark.slow
def test_actors_receive_versions_through_the_group_and_join_late_from_the_durable_store(
    tmp_path, start
):
    """Two actor processes receive a version by broadcast alone (it is never written to disk)
    and generate exactly what a file-loaded copy does; a third, started later, begins at the
    durable store's newest version and then receives the next by broadcast (past the join of a
    member that died half-way through registering); a stalled member makes a transfer give up
    within the timeout, and the others get the next version."""
    from async_rl.config import ModelConfig

    cfg, run_dir = ModelConfig(), tmp_path / "run"
    durable = FsWeightStore(RunPaths(run_dir).weights, template=start)
    sender = WeightSender("127.0.0.1", TIMEOUT_S, bucket_bytes=256 * 1024)  # several buckets
    store = CollectiveWeightStore(durable, durable_every=1000, sender=sender)
    publish_endpoints(RunPaths(run_dir), "learner", store.endpoints())
    store.publish(0, scaled(start, cfg, 1.0))  # the first version is durable
    v1, v2, v3 = (scaled(start, cfg, f) for f in (1.5, 0.5, 2.0))
    copies = FsWeightStore(tmp_path / "copies", template=start)
    for v, state in ((1, v1), (3, v3)):
        copies.publish(v, state)
    procs: list[subprocess.Popen] = []
    try:
        actors = [member(procs, run_dir, f"a{i}", start, 1) for i in (1, 2)]
        wait_for_joins(sender, 2)
        store.publish(1, v1)
        assert store.last_receivers == 2 and durable.latest() == 0  # v1: broadcast only
        seen = [json.loads(a.communicate(timeout=120)[0]) for a in actors]
        want = file_loaded_tokens(copies.path(1))
        assert [s["tokens"] for s in seen] == [want, want]
        assert all(s["received"] >= 1 for s in seen)

        store.publish(2, v2, durable=True)  # a checkpoint's: on disk
        sender.store.add("events", 1)  # a member that died between counting and writing its join
        late = member(procs, run_dir, "a3", start, 3)
        wait_for_joins(sender, 3)
        store.publish(3, v3)
        assert store.last_receivers == 1
        seen = json.loads(late.communicate(timeout=120)[0])
        assert seen["first"] == 2 and seen["got"] == 3 and seen["received"] >= 1
        assert seen["tokens"] == file_loaded_tokens(copies.path(3))

        # a member that stops answering: the transfer gives up, the others go on
        stalled = member(procs, run_dir, "a4", start, 99)
        alive = member(procs, run_dir, "a5", start, 5)
        wait_for_joins(sender, 5)
        store.publish(4, v1)
        assert store.last_receivers == 2
        stalled.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        store.publish(5, v2)  # a4 never takes it
        assert store.last_receivers == 0 and time.monotonic() - began < 3 * TIMEOUT_S
        deadline, reached = time.monotonic() + 60, 0
        while alive.poll() is None and time.monotonic() < deadline:
            store.publish(6, v3)  # to the members that registered again
            reached = max(reached, store.last_receivers)
            time.sleep(0.5)
        assert alive.wait(60) == 0 and reached == 1
        seen = json.loads(alive.stdout.read())
        assert seen["got"] == 6 and seen["tokens"] == file_loaded_tokens(copies.path(3))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        store.close()
