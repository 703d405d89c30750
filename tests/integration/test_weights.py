"""Weight versions: the fs store's atomicity and garbage collection, announcements, Ray store."""

import json
import os
import threading
import time

import pytest
import torch
import zmq

from async_rl.config import ModelConfig, load_config
from async_rl.paths import RunPaths, read_endpoints
from async_rl.tokenizer import Tokenizer
from async_rl.weights import (
    FsWeightStore,
    RayWeightStore,
    VersionGone,
    WeightAnnouncer,
    WeightSubscriber,
    read_manifest,
)
from learner.hf import export_hf, import_hf
from learner.model import build_model
from learner.publish import Publisher
from tests.helpers import PublishedVersions, new_threads


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
    }


def test_fs_store_round_trip_latest_and_collect(tmp_path):
    store = FsWeightStore(tmp_path / "weights", keep=2)
    assert store.latest() is None
    for v in range(5):
        store.publish(v, state(v))
    assert store.latest() == 4
    fetched = store.fetch(3)
    assert all(torch.equal(fetched[k], state(3)[k]) for k in fetched)
    assert fetched["b.weight"].dtype == torch.bfloat16
    with store.reading(3) as tensors:  # what every store's reader yields: tensors by name
        assert sorted(tensors) == sorted(fetched)
        assert all(torch.equal(tensors[k], fetched[k]) for k in fetched)
    with pytest.raises(VersionGone, match="not"):
        with store.reading(7):
            pass
    store.publish(4, state(9))  # a resumed learner publishes a version again
    assert torch.equal(store.fetch(4)["a.weight"], state(9)["a.weight"])
    # keep the newest 2, version 0 (the starting point) and what actors still use
    assert store.collect(in_use={2}) == [1]
    assert store.versions() == [0, 2, 3, 4]


READER = """
import sys, time
from async_rl.weights import FsWeightStore
store = FsWeightStore(sys.argv[1])
with store.reading(int(sys.argv[2])):
    print(store.path(int(sys.argv[2])), flush=True)
    time.sleep(600)
"""


def test_a_version_is_not_collected_under_a_reader_and_a_dead_reader_lets_go(tmp_path):
    """Another process loading version 1 keeps it (collection skips it, then takes it once the
    reader is SIGKILLed); a collected version reads as gone."""
    import subprocess
    import sys

    store = FsWeightStore(tmp_path / "weights", keep=1)
    for v in range(4):
        store.publish(v, state(v))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(store.root), "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip().endswith("v000001")  # holding it
        assert store.collect(in_use=set()) == [2]  # 1 is being read, 3 is the newest
        assert store.versions() == [0, 1, 3]
        with store.reading(1):  # readers share
            assert read_manifest(store.path(1))["version"] == 1
    finally:
        reader.kill()
        reader.wait(10)
    assert store.collect(in_use=set()) == [1]
    with pytest.raises(ValueError, match="no longer"):
        with store.reading(1):
            pass


def test_a_version_without_its_manifest_does_not_exist(tmp_path):
    store = FsWeightStore(tmp_path, keep=2)
    store.publish(0, state(0))
    store.publish(1, state(1))
    os.unlink(tmp_path / "v000001" / "manifest.json")  # as if the learner died just before it
    (tmp_path / ".v000002.partial").mkdir()  # and a half-written temporary directory
    assert store.latest() == 0
    with pytest.raises(ValueError, match="incomplete"):
        store.fetch(1)
    store.publish(1, state(5))  # publishing again replaces the incomplete attempt
    assert torch.equal(store.fetch(1)["a.weight"], state(5)["a.weight"])


@pytest.mark.parametrize(
    "manifest, message",
    [
        (b"\x00\xff garbage", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"version": -1, "files": {}}).encode(), "version"),
        (json.dumps({"version": True, "files": {}}).encode(), "version"),
        (json.dumps({"version": 1, "files": {}}).encode(), "model.safetensors"),
        (json.dumps({"version": 1, "files": {"model.safetensors": 3}}).encode(), "not 3 bytes"),
        (
            json.dumps({"version": 1, "files": {"model.safetensors": 1, "../x": 1}}).encode(),
            "bad file name",
        ),
        (json.dumps({"version": 1, "files": {"model.safetensors": "big"}}).encode(), "size"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(tmp_path, manifest, message):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "manifest.json").write_bytes(manifest)
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path)


def test_every_fs_version_is_a_hugging_face_checkpoint(tmp_path):
    from safetensors.torch import load_file

    cfg = ModelConfig()
    model = build_model(cfg, seed=0)
    start = export_hf(model, cfg, Tokenizer.arithmetic(), tmp_path / "start")
    store = FsWeightStore(tmp_path / "weights", template=start)
    store.publish(0, load_file(start / "model.safetensors"))
    loaded, _ = import_hf(store.path(0))
    tokens = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens), model.eval()(tokens))


def test_announcements_reach_subscribers_and_garbage_is_ignored():
    ctx = zmq.Context()
    announcer = WeightAnnouncer(ctx, "127.0.0.1")
    sub = WeightSubscriber(ctx, announcer.address)
    # PUB/SUB joins late (the store is the fallback for what is missed): announce version 0
    # until the subscription is up, however long a loaded machine takes to connect
    deadline = time.monotonic() + 60
    while sub.newest(timeout_ms=100) is None:
        assert time.monotonic() < deadline, "the subscriber never connected"
        announcer.announce(0)
    while sub.newest(timeout_ms=100) is not None:  # drain the probes
        pass
    announcer.socket.send_multipart([b"weights", b"{oops", b""])
    for v in (1, 3, 2):
        announcer.announce(v)
    assert sub.newest(timeout_ms=2000) == 3
    assert sub.newest() is None
    sub.close()
    announcer.close()
    ctx.term()


def test_ray_store_round_trip_outlives_its_publisher_and_keeps_deltas(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        _check_ray_deltas(tmp_path)
        store = RayWeightStore("weights-test", keep=1, create=True)
        for v in range(3):
            store.publish(v, state(v))
        reader = RayWeightStore("weights-test")  # another process would look it up by name
        assert reader.latest() == 2
        fetched = reader.fetch(2)
        assert all(torch.equal(fetched[k], state(2)[k]) for k in fetched)
        assert reader.collect(set()) == [1]
        with pytest.raises(VersionGone, match="not in the Ray object store"):
            with reader.reading(1):
                pass

        @ray.remote(num_cpus=0)
        class Publisher:  # a learner process, which may die with its node
            def publish(self, version):
                big = {"c.weight": torch.full((512, 512), float(version)), **state(version)}
                RayWeightStore("weights-test", create=True).publish(version, big)  # in plasma
                return os.getpid()

        learner = Publisher.remote()
        ray.get(learner.publish.remote(3))
        ray.kill(learner)  # a version put by the publisher itself would be lost with it
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(learner.publish.remote(4))  # answers once it is dead
        dead_since = time.monotonic()
        while time.monotonic() < dead_since + 3:  # Ray drops a dead owner's objects soon after
            fetched = reader.fetch(3)
            assert (fetched["c.weight"] == 3).all()
            assert torch.equal(fetched["a.weight"], state(3)["a.weight"])
            time.sleep(0.5)
    finally:
        ray.shutdown()


def _check_ray_deltas(tmp_path):
    """The ray store keeps versions as deltas and an actor follows them bit for bit."""
    from actors.versions import plan_load
    from tests.unit.test_delta import _check_a_lagging_actor, _follower, _holds, _published

    store, truth, engine_of = _published(tmp_path, 10, RayWeightStore("delta", 1, True))
    reader = RayWeightStore("delta")  # as an actor on another node looks it up
    assert reader.sizes(4)[0] is None and reader.sizes(3)[0] is not None
    assert plan_load(reader, None, 5) == [("whole", 3), ("delta", 4), ("delta", 5)]
    engine, follower = engine_of(), _follower(reader)
    for target in (1, 5, 8):
        follower.load(engine, target)
        assert engine.version == target and _holds(engine, truth[target])
    assert follower.steps["delta"] >= 6
    _check_a_lagging_actor(reader, truth, engine_of, follower)


def test_a_restarted_announcer_takes_its_address_back():
    dead = zmq.Context()  # the learner that crashed: its context ends, its port is free
    first = WeightAnnouncer(dead, "127.0.0.1")
    address = first.address
    first.close()
    dead.term()
    ctx = zmq.Context()
    again = WeightAnnouncer(ctx, "127.0.0.1", previous=address)
    assert again.address == address  # subscribers connected to it hear the new learner
    taken = WeightAnnouncer(ctx, "127.0.0.1", previous=address)  # in use: another port
    assert taken.address != address and taken.address.startswith("tcp://127.0.0.1:")
    other_host = WeightAnnouncer(ctx, "127.0.0.1", previous="tcp://10.0.0.9:5555")
    assert other_host.address.startswith("tcp://127.0.0.1:")
    for a in (again, taken, other_host):
        a.close()
    ctx.term()


def test_a_publisher_builds_without_io_and_starts_when_told(tmp_path, start):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=absent"])
    paths, source = RunPaths(cfg.run_dir), PublishedVersions()
    ctx, threads = zmq.Context.instance(), set(threading.enumerate())
    publisher = Publisher(cfg, paths, start, ctx, None, source)
    assert not cfg.run_dir.exists() and not new_threads(threads)
    publisher.close()  # never started: nothing to close
    assert not cfg.run_dir.exists() and not source.closed
    publisher.start(0, state(0))
    try:
        assert source.published == [0] and publisher.store.latest() == 0
        assert read_endpoints(paths, "learner")["weights"] == publisher.announcer.address
    finally:
        publisher.close()
    assert source.closed
