"""Weight versions as sparse deltas: exact, checked against an independent comparison, and
refused when they would give anything but the version the learner published."""

import pytest
import torch

from async_rl.weights.delta import apply_delta, fingerprint, make_delta

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.gate.weight": (8, 32)}


def _versions(n: int, lr: float = 1e-4, seed: int = 0):
    """bf16 versions published from fp32 masters that take small steps (the learner's way)."""
    gen = torch.Generator().manual_seed(seed)
    masters = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    out = []
    for _ in range(n):
        out.append({k: m.to(torch.bfloat16) for k, m in masters.items()})
        for m in masters.values():
            m.add_(lr * torch.randn(m.shape, generator=gen))
    return out


def _bitwise_equal(a, b) -> bool:
    return all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_a_chain_of_deltas_rebuilds_every_version_bit_for_bit():
    versions = _versions(4)
    held = {k: v.clone() for k, v in versions[0].items()}
    mark = fingerprint(held)
    for v in range(1, 4):
        delta = make_delta(versions[v - 1], versions[v], v - 1, v, fingerprint(versions[v - 1]))
        # independently: entries whose bits differ, counted by torch
        changed = sum(
            int((versions[v][k].view(torch.int16) != versions[v - 1][k].view(torch.int16)).sum())
            for k in SHAPES
        )
        assert delta.changed == changed and 0 < delta.share < 0.2
        assert delta.entries == sum(a * b for a, b in SHAPES.values())
        for patch in delta.patches:  # vLLM's SparseWeightPatch coordinates: flat row-major
            if patch.indices is not None:
                flat = versions[v][patch.name].reshape(-1)
                assert torch.equal(
                    flat[patch.indices].view(torch.int16), patch.values.view(torch.int16)
                )
        mark = apply_delta(held, delta, v - 1, mark)
        assert _bitwise_equal(held, versions[v])
        assert mark == delta.fingerprint == fingerprint(versions[v])
    sparse = sum(p.nbytes for p in delta.patches)
    assert sparse < sum(t.numel() * 2 for t in versions[3].values())


def test_a_missed_wrong_or_corrupted_delta_is_refused_and_nothing_is_written():
    v0, v1, v2 = _versions(3)
    f0 = fingerprint(v0)
    d1 = make_delta(v0, v1, 0, 1, f0)
    d2 = make_delta(v1, v2, 1, 2, d1.fingerprint)
    held = {k: t.clone() for k, t in v0.items()}
    with pytest.raises(ValueError, match="delta 1->2: these weights are version 0, not 1"):
        apply_delta(held, d2, 0, f0)  # missed version 1
    with pytest.raises(ValueError, match="would not be version 2"):
        apply_delta(held, d2, 1, f0)  # weights that claim to be version 1 but are not
    patch = next(p for p in d1.patches if p.indices is not None)
    patch.values[0] = patch.values[0] + 1  # a flipped value in transit
    with pytest.raises(ValueError, match="would not be version 1"):
        apply_delta(held, d1, 0, f0)
    assert _bitwise_equal(held, v0)  # refused before anything was written
    patch.indices = patch.indices[:-1]
    with pytest.raises(ValueError, match="values for"):
        apply_delta(held, d1, 0, f0)


def test_bits_decide_and_a_mostly_changed_tensor_goes_whole():
    values = [0.0, float("nan"), 1.0, 2.0] + [3.0] * 16
    a = {"x": torch.tensor(values, dtype=torch.bfloat16)}
    b = {"x": torch.tensor([-0.0, *values[1:]], dtype=torch.bfloat16)}
    delta = make_delta(a, b, 0, 1, fingerprint(a))
    assert delta.changed == 1 and delta.patches[0].indices.tolist() == [0]  # -0.0 is not 0.0
    c = {"x": torch.tensor([5.0, 6.0, 7.0, 8.0] + values[4:], dtype=torch.bfloat16)}
    whole = make_delta(a, c, 0, 1, fingerprint(a))  # 4 of 20 changed: 40 bytes sparse, whole
    assert whole.patches[0].indices is None and whole.changed == 4 and whole.nbytes == 40
    held = {"x": a["x"].clone()}
    assert apply_delta(held, whole, 0, fingerprint(a)) == fingerprint(c)
    assert torch.equal(held["x"], c["x"])
    with pytest.raises(ValueError, match="hold different tensors"):
        make_delta(a, {"y": c["x"]}, 0, 1, 0)


def test_a_run_measures_each_versions_delta_as_an_independent_comparison_counts_it(
    tmp_path, cold_start, train_in_threads
):
    """`weights.deltas = "measure"`: bf16 versions from fp32 masters; the logged share is
    what comparing the stored versions entry by entry gives."""
    from safetensors.torch import load_file

    from tests.helpers import pipeline_config

    cfg = pipeline_config(
        tmp_path,
        "deltas",
        "run.num_steps=3",
        "model.dtype=bfloat16",
        "learner.lr=1e-5",
        "weights.deltas=measure",
        "weights.keep_versions=9",
    )
    rows, _, _ = train_in_threads(cfg, cold_start)
    weights = cfg.run_dir / "weights"
    stored = [load_file(weights / f"v{v:06d}" / "model.safetensors") for v in range(4)]
    for row in rows:
        v = row["version"]
        old, new = stored[v - 1], stored[v]
        changed = sum(
            int((old[k].view(torch.int16) != new[k].view(torch.int16)).sum()) for k in new
        )
        entries = sum(t.numel() for t in new.values())
        assert new[next(iter(new))].dtype == torch.bfloat16
        assert row["learner/delta_share"] == pytest.approx(changed / entries)
        assert 0 < row["learner/delta_share"] < 0.5
        assert (
            row["learner/delta_mib"]
            < row["learner/version_mib"]
            == pytest.approx(entries * 2 / 2**20)
        )


@pytest.mark.parametrize("quantization", ["fp8", "bf16", "fp32"])
def test_the_embedded_engine_patched_in_place_serves_what_a_fresh_load_serves(
    quantization, tmp_path
):
    """Deltas of bf16 versions applied to a running engine (fp8: touched rows requantized)
    give bit for bit the model that loading the whole version builds."""
    from actors.embedded import EmbeddedEngine
    from actors.engine import SamplingParams
    from async_rl.config import ModelConfig
    from async_rl.tokenizer import Tokenizer
    from learner.hf import export_hf, hf_state_dict
    from learner.model import build_model

    cfg = ModelConfig(dtype="bfloat16")
    model = build_model(cfg, seed=1)
    path = export_hf(model, cfg, Tokenizer.arithmetic(), tmp_path / "v0")
    engine = EmbeddedEngine(path, quantization, keep_host=True)
    gen = torch.Generator().manual_seed(0)
    masters = {k: v.float() for k, v in hf_state_dict(model, cfg).items()}
    previous = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    for version in (1, 2):
        for k, m in masters.items():  # an update that moves some entries of every tensor
            scale = 1e-2 if "norm" in k else 3e-4 * m.abs().mean()  # norms start at 1.0
            m.add_(scale * torch.randn(m.shape, generator=gen))
            if m.dim() == 2:  # and a row's largest entry grows: its fp8 scale changes
                m.view(-1)[m.abs().argmax()] *= 1.25
        new = {k: m.to(torch.bfloat16) for k, m in masters.items()}
        delta = make_delta(previous, new, version - 1, version, fingerprint(previous))
        assert 0 < delta.share < 0.5 and any(p.indices is not None for p in delta.patches)
        assert {p.name for p in delta.patches} == set(new)
        engine.apply_delta(delta)
        fresh = EmbeddedEngine(path, quantization)
        fresh.load_weights(new, version)
        for a, b in zip(_served(engine.model), _served(fresh.model), strict=True):
            assert torch.equal(a, b)
        assert (engine.version, engine.fingerprint) == (version, fingerprint(new))
        previous = new
    greedy = SamplingParams(0.0, 1.0, 6, None)
    prompt = [[2, 5, 13, 6, 14]]
    assert (
        engine.generate(prompt, greedy, 1)[0][0].tokens
        == fresh.generate(prompt, greedy, 1)[0][0].tokens
    )
    with pytest.raises(ValueError, match="these weights are version 2, not 1"):
        engine.apply_delta(delta)


def _served(model):
    """Every tensor the embedded model computes with."""
    out = [model.embed, model.lm_head, model.norm]
    for layer in model.layers:
        out += [layer.attn_norm, layer.ffn_norm, layer.qk_norm, layer.gate]
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            out += [w.data.view(torch.uint8) if w.fp8 else w.data, w.matrix]
            out += [] if w.scale is None else [w.scale]
    return out


# ---------------------------------------------------------------------- stores and actors
def _model_versions(tmp_path, n: int):
    """`start, versions, engine_of`: versions 0..n-1 of a bf16 model (fp32 masters, small
    steps) and a maker of fp8 engines that keep their host weights, built from `start`."""
    from actors.embedded import EmbeddedEngine
    from async_rl.config import ModelConfig
    from async_rl.tokenizer import Tokenizer
    from learner.hf import export_hf, hf_state_dict
    from learner.model import build_model

    cfg = ModelConfig(dtype="bfloat16")
    model = build_model(cfg, seed=2)
    start = export_hf(model, cfg, Tokenizer.arithmetic(), tmp_path / "start")
    gen = torch.Generator().manual_seed(3)
    masters = {k: v.float() for k, v in hf_state_dict(model, cfg).items()}
    versions = []
    for _ in range(n):
        versions.append({k: m.to(torch.bfloat16) for k, m in masters.items()})
        for k, m in masters.items():
            scale = 1e-2 if "norm" in k else 2e-4 * m.abs().mean()
            m.add_(scale * torch.randn(m.shape, generator=gen))
    return start, versions, lambda: EmbeddedEngine(start, "fp8", keep_host=True)


def _publish(store, meter, v: int, state, full_every: int) -> None:
    """As the publisher does with `weight_deltas = send`: whole every `full_every`."""
    meter.measure(v, state)
    whole = meter.delta is None or v % full_every == 0
    store.publish(v, state, delta=meter.delta, fingerprint=meter.fingerprint, whole=whole)


def _published(tmp_path, n: int, store=None, full_every: int = 3):
    """The versions of `_model_versions` stored (default: in an `fs` store) as the publisher
    stores them: whole every `full_every`, deltas after 0."""
    from async_rl.weights.delta import DeltaMeter
    from async_rl.weights.fs import FsWeightStore

    start, truth, engine_of = _model_versions(tmp_path, n)
    store = store or FsWeightStore(tmp_path / "weights", template=start, keep=100)
    meter = DeltaMeter()
    for v, state in enumerate(truth):
        _publish(store, meter, v, state, full_every)
    return store, truth, engine_of


def _follower(store):
    from actors.versions import VersionFollower
    from async_rl.config import load_config

    return VersionFollower(load_config(None, ["weights.deltas=send"]), store, None)


def _holds(engine, truth) -> bool:
    """The engine holds `truth` bit for bit, and knows its fingerprint (the store told it)."""
    same = all(
        torch.equal(engine.host[k].view(torch.int16), t.view(torch.int16)) for k, t in truth.items()
    )
    return same and engine.fingerprint == fingerprint(truth)


def test_an_actor_reaches_every_version_bit_for_bit_by_chain_or_jump_and_survives_bad_deltas(
    tmp_path,
):
    from actors.versions import plan_load
    from async_rl.weights.fs import DELTA

    store, truth, engine_of = _published(tmp_path, 10)
    assert store.sizes(4) == (None, store.sizes(4)[1]) and store.sizes(3)[0] is not None
    engine, follower = engine_of(), _follower(store)
    assert plan_load(store, None, 5) == [("whole", 3), ("delta", 4), ("delta", 5)]
    follower.load(engine, 1)  # from the start checkpoint's files: a whole version first
    assert engine.version == 1 and _holds(engine, truth[1])
    assert plan_load(store, 1, 5) == [
        ("delta", v) for v in range(2, 6)
    ]  # fewer bytes than 3's whole
    follower.load(engine, 5)
    assert engine.version == 5 and _holds(engine, truth[5])
    # a delta damaged on disk (same size): refused before anything is written, both ways
    # (from 5, and from whole 6); the actor serves whole 6 until a whole version passes it
    damaged = store.root / "v000007" / DELTA
    data = bytearray(damaged.read_bytes())
    data[-64:] = bytes(64)
    damaged.write_bytes(bytes(data))
    follower.load(engine, 8)
    assert engine.version == 6 and _holds(engine, truth[6])
    follower.load(engine, 9)
    assert engine.version == 9 and _holds(engine, truth[9])
    _check_a_lagging_actor(store, truth, engine_of, follower)
    assert 5 not in store.versions()


def _check_a_lagging_actor(store, truth, engine_of, follower):
    """A delta collected under a lagging actor: it takes the newest whole version and the rest."""
    lagging = engine_of()
    follower.load(lagging, 2)
    store.keep = 1
    store.collect(in_use=set())
    assert store.latest() == 9
    follower.load(lagging, 9)
    assert lagging.version == 9 and _holds(lagging, truth[9])


def test_the_collective_path_broadcasts_deltas_and_its_actors_follow_them_bit_for_bit(tmp_path):
    """Members receive deltas while they hold the base (a new epoch and every `full_every`
    version go whole); an actor patches along them, or takes the received whole version and
    the deltas after it; a damaged received delta is refused and it serves a whole version;
    the durable store holds whole versions only."""
    import time

    from actors.versions import plan_load
    from async_rl.paths import RunPaths, publish_endpoints
    from async_rl.weights import CollectiveWeightStore, FsWeightStore
    from async_rl.weights.collective import WeightReceiver, WeightSender
    from async_rl.weights.delta import DeltaMeter

    start, truth, engine_of = _model_versions(tmp_path, 6)
    durable = FsWeightStore(RunPaths(tmp_path).weights, template=start)
    learner = CollectiveWeightStore(durable, 1000, WeightSender("127.0.0.1", 5.0, 2**16))
    publish_endpoints(RunPaths(tmp_path), "learner", learner.endpoints())
    meter, actors = DeltaMeter(), []

    def joined(name):
        receiver = WeightReceiver(tmp_path, name, 5.0)
        actors.append(CollectiveWeightStore(durable, 1000, None, receiver))
        return actors[-1]

    def until(store, v):
        deadline = time.monotonic() + 60
        while store.receiver.newest() != v:
            assert time.monotonic() < deadline, f"version {v} never came"
            time.sleep(0.02)

    try:
        _publish(learner, meter, 0, truth[0], full_every=3)
        a1 = joined("a1")
        until(a1, 0)  # a joiner gets the last version whole
        engine, follower = engine_of(), _follower(a1)
        follower.load(engine, 0)
        for v in (1, 2):
            _publish(learner, meter, v, truth[v], full_every=3)
        until(a1, 2)
        assert a1.sizes(2)[0] is None and plan_load(a1, 0, 2) == [("delta", 1), ("delta", 2)]
        follower.load(engine, 2)
        assert _holds(engine, truth[2]) and follower.steps == {"whole": 1, "delta": 2}
        for v in (3, 4):  # 3 goes whole
            _publish(learner, meter, v, truth[v], full_every=3)
        until(a1, 4)
        follower.load(engine, 4)
        assert _holds(engine, truth[4]) and follower.steps == {"whole": 2, "delta": 3}

        a2 = joined("a2")  # a new epoch: 4 again, whole, to both; then 5 as a delta
        until(a2, 4)
        _publish(learner, meter, 5, truth[5], full_every=3)
        assert learner.last_receivers == 2
        until(a1, 5), until(a2, 5)
        late, late_follower = engine_of(), _follower(a2)
        late_follower.load(late, 5)
        assert _holds(late, truth[5]) and late_follower.steps == {"whole": 1, "delta": 1}
        _publish(learner, meter, 6, truth[5], full_every=7)  # nothing changed: an empty delta
        until(a2, 6)
        assert a2.sizes(6) == (None, 0) and plan_load(a2, 5, 6) == [("delta", 6)]
        late_follower.load(late, 6)
        assert late.version == 6 and _holds(late, truth[5]) and late_follower.steps["delta"] == 2
        a1.read_delta(5).patches[0].values[0] += 1  # damaged in memory: refused
        follower.load(engine, 5)
        assert engine.version == 4 and _holds(engine, truth[4])
        assert durable.versions() == [0] and durable.sizes(0)[1] is None
        assert durable.fingerprint(0) == fingerprint(truth[0])
    finally:
        for store in (learner, *actors):
            store.close()


def test_an_actor_asking_for_a_version_its_receiver_is_still_staging_waits_for_it(tmp_path):
    """The learner announces a version once its broadcast returned, a moment before an actor's
    receiver has staged it: asked then, the store waits for the version instead of finding it
    missing (the actor then served an older whole version from the durable store)."""
    import threading

    from async_rl.paths import RunPaths
    from async_rl.weights import CollectiveWeightStore, FsWeightStore
    from async_rl.weights.collective import WeightReceiver

    receiver = WeightReceiver(tmp_path, "a0", 30.0)  # no learner: it only waits to join
    store = CollectiveWeightStore(FsWeightStore(RunPaths(tmp_path).weights), 1000, None, receiver)
    state = {"w": torch.arange(4.0)}
    with receiver.lock:
        receiver.incoming = 3  # its header read, its buckets on the way

    def arrive():
        while not receiver.settled._waiters:  # the store is waiting for version 3
            threading.Event().wait(0.01)
        receiver._stage({"version": 3, "fingerprint": "ff"}, state)
        with receiver.settled:
            receiver.incoming = None
            receiver.settled.notify_all()

    thread = threading.Thread(target=arrive)
    thread.start()
    try:
        assert store.sizes(3) == (16, None) and store.fingerprint(3) == 0xFF
        with store.reading(3) as tensors:
            assert tensors["w"].equal(state["w"])
    finally:
        thread.join(30)
        store.close()


@pytest.mark.parametrize("batching,store", [("static", "fs"), ("continuous", "collective")])
def test_a_run_sends_deltas_and_its_actor_holds_exactly_what_the_learner_published(
    tmp_path, cold_start, train_in_threads, batching, store
):
    """`weights.deltas = "send"`: versions stored (`fs`) or broadcast (`collective`)
    as deltas, whole every 2nd, the actor patching its fp8 engine in place; its weights'
    fingerprint is the learner's."""
    import json

    from async_rl.weights.fs import DELTA, WEIGHTS
    from tests.helpers import pipeline_config

    cfg = pipeline_config(
        tmp_path,
        f"send-{batching}",
        "run.num_steps=5",
        "model.dtype=bfloat16",
        "actor.quantization=fp8",
        f"actor.batching={batching}",
        "actor.weight_update=in_flight"
        if batching == "continuous"
        else "actor.weight_update=between_groups",
        "learner.lr=1e-6",
        "weights.deltas=send",
        "weights.full_every=2",
        "weights.keep_versions=9",
        f"weights.store={store}",
        "weights.durable_every=1",  # collective: every version on disk whole, to compare
    )
    rows, _, actor = train_in_threads(cfg, cold_start)
    root = cfg.run_dir / "weights"
    if store == "fs":
        assert not (root / "v000003" / WEIGHTS).exists() and (root / "v000003" / DELTA).exists()
        assert (root / "v000004" / WEIGHTS).exists() and (root / "v000005" / WEIGHTS).exists()
    else:  # the deltas the actor applied came through the group
        assert not list(root.glob(f"v*/{DELTA}")) and rows[-1]["learner/weights_receivers"] == 1
    assert all(0 < r["learner/delta_share"] < 0.1 for r in rows)  # deltas pay: under 10%
    engine = actor.engine
    manifest = json.loads((root / f"v{engine.version:06d}" / "manifest.json").read_text())
    assert engine.fingerprint == int(manifest["fingerprint"], 16)
    assert actor.versions.steps["delta"] > 0, actor.versions.steps
