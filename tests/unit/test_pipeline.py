"""Buffer service, learner and actor together (threads of one process, real zmq and files)."""

import contextlib
import threading
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from actors.embedded import EmbeddedEngine
from actors.engine import SamplingParams
from actors.loop import Actor, group_seed
from actors.versions import version_to_load
from async_rl.buffer.segments import inspect
from async_rl.config import load_config
from async_rl.tasks import task_from_config
from async_rl.tokenizer import Tokenizer
from async_rl.types import RoutingSpec, batch_to_trajectories
from learner.batch import pack
from learner.hf import export_hf, hf_state_dict, import_hf
from learner.optim import build_optimizer
from learner.train import TrainStep
from tests.helpers import new_threads, pipeline_config


def test_async_run_trains_publishes_and_respects_staleness(tmp_path, cold_start, train_in_threads):
    cfg = pipeline_config(tmp_path, "async", "run.num_steps=4", "buffer.max_staleness=1")
    rows, _, _ = train_in_threads(cfg, cold_start)
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(r["learner/staleness_max"] <= 1 for r in rows)
    fresh = [r for r in rows if r["learner/staleness_max"] == 0]
    assert fresh  # at least the first step trains on version-0 samples
    for r in fresh:  # same weights, fp32 actor: the learner sees what the actor saw
        assert r["learner/routing_agreement"] >= 0.999
        assert abs(r["learner/train_infer_kl"]) < 1e-5
    assert (cfg.run_dir / "weights" / "v000004" / "manifest.json").exists()
    info = inspect(cfg.run_dir / "buffer")
    assert info["trained_groups"] == 4 * 2
    assert max(info["staleness_histogram"]) <= 1
    assert (cfg.run_dir / "checkpoints" / "learner").exists()


MODES = {
    "static": [],
    "continuous": ["actor.batching=continuous"],
    "in-flight": ["actor.batching=continuous", "actor.weight_update=in_flight"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_k0_one_minibatch_is_a_synchronous_generate_then_train_loop(
    tmp_path, cold_start, train_in_threads, mode
):
    """K = 0, N = 1: the learner trains on exactly the samples, and computes exactly the losses,
    of a loop that generates a global batch with the current weights, trains on it, repeats,
    however the actor batches its rows and swaps its weights."""
    steps = 3
    overrides = [f"run.num_steps={steps}", "buffer.max_staleness=0", *MODES[mode]]
    cfg = pipeline_config(tmp_path, "k0", *overrides, "actor.max_running_rows=12")
    rows, _, _ = train_in_threads(cfg, cold_start)
    spec = RoutingSpec.of(cfg.model)
    stored = pa.concat_tables(
        pa.ipc.open_file(p).read_all() for p in sorted((cfg.run_dir / "buffer").glob("*.arrow"))
    )
    model, _ = import_hf(cold_start, cfg.model)
    step = TrainStep(model, build_optimizer(model, cfg.learner), cfg)  # as the learner builds it
    task, tok = task_from_config(cfg), Tokenizer.arithmetic()
    b, g = cfg.global_batch_groups, cfg.algo.group_size
    for v in range(steps):
        weights = export_hf(model, cfg.model, tok, tmp_path / f"sync-v{v}")
        engine = EmbeddedEngine(weights, quantization="fp32")
        expected = {}
        for i in range(v * b, (v + 1) * b):  # generate with these weights, then train
            problem = task.train_problem(i)
            params = SamplingParams(1.0, 1.0, cfg.actor.max_new_tokens, group_seed(0, i, v))
            (group,) = engine.generate([tok.encode_prompt(problem.prompt)], params, g)
            expected[problem.prompt_id] = [gen.tokens for gen in group]
        served = stored.filter(pc.equal(stored["policy_version"], v))
        got = {}
        for r in batch_to_trajectories(served, spec):
            got.setdefault(r.prompt_id, []).append(r.completion_tokens)
            assert r.token_versions == [v] * len(r.completion_tokens)
        assert got == expected, f"step {v}: different samples"
        packed = pack(served, spec, pad_id=0)
        assert step(packed)["loss"] == rows[v]["learner/loss"], f"step {v}: different loss"


@pytest.mark.parametrize(
    "engine, wanted, available, may_swap, expected",
    [
        (0, 3, 3, True, 3),  # the newest known, and the store holds it
        (0, 3, 2, True, 2),  # the store holds 2 so far (the collective path delivering 3)
        (0, 3, None, True, None),  # the store holds nothing yet
        (2, 3, 2, True, None),  # the engine has what the store holds
        (3, 3, 4, True, None),  # nothing newer is needed or announced
        (0, 3, 3, False, None),  # rows running without in-flight updates: they finish first
    ],
)
def test_which_version_an_actor_loads(engine, wanted, available, may_swap, expected):
    """The one rule of static and continuous batching (`actors.versions`)."""
    assert version_to_load(engine, wanted, available, may_swap) == expected


def test_an_actor_told_of_a_version_collected_before_it_reads_it_loads_the_newest(
    tmp_path, cold_start, run_services
):
    """Versions fly by faster than a busy actor reads them: the one it was told of is gone
    (the learner keeps the newest `weights.keep_versions`), so it swaps to the newest."""
    cfg = pipeline_config(tmp_path, "gone", "run.num_steps=4", "weights.keep_versions=2")
    with run_services(cfg, cold_start) as (learner, actor):
        state = hf_state_dict(learner.model, cfg.model)
        for v in range(1, 5):
            learner.publisher.store.publish(v, state)
        assert learner.publisher.store.collect(set()) == [1, 2]
        announcements = actor.versions.announcements
        announcements.newest = lambda timeout_ms=0: 1  # the announcement it got was of v1
        actor.sync_weights()
        assert actor.engine.version == 4 and actor.stats.weight_swaps == 1


class TensorStore:
    """A store that hands an actor tensors fetched whole, as the `ray` store does (here read
    from the learner's `fs` store, without a Ray cluster)."""

    def __init__(self, files):
        self.files = files

    def latest(self):
        return self.files.latest()

    @contextlib.contextmanager
    def reading(self, version):
        yield self.files.fetch(version)

    def close(self):
        pass


def test_an_actor_on_a_store_of_tensors_builds_from_the_start_and_swaps_them(
    tmp_path, cold_start, run_services
):
    cfg = pipeline_config(tmp_path, "tensors", "run.num_steps=2")
    with run_services(cfg, cold_start) as (learner, actor):
        store = learner.publisher.store
        actor.versions.store = TensorStore(store)
        engine = actor.versions.build(cold_start, 0)  # tensors: the model is the start's
        assert engine.version == 0
        actor.engine = engine
        model, _ = import_hf(cold_start, cfg.model)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        store.publish(1, hf_state_dict(model, cfg.model))
        actor.sync_weights(at_least=1)
        assert actor.engine.version == 1 and actor.stats.weight_swaps == 1
        from_dir = EmbeddedEngine(store.path(1), quantization="fp32")
        params = SamplingParams(0.0, 1.0, 4, seed=0)
        prompts = [[2, 5, 13, 6, 14], [2, 7, 13, 8, 14]]
        assert [g.tokens for grp in actor.engine.generate(prompts, params, 1) for g in grp] == [
            g.tokens for grp in from_dir.generate(prompts, params, 1) for g in grp
        ]
        with pytest.raises(ValueError, match="starting checkpoint"):
            actor.versions.build(None, 0)


def test_an_in_flight_actor_swaps_weights_under_running_rows(tmp_path, start, run_services):
    """Continuous batching with in-flight updates: a version published while rows run is loaded
    between two decode steps; those rows' later tokens carry it, earlier ones the old version."""
    cfg = pipeline_config(
        tmp_path,
        "inflight",
        "actor.batching=continuous",
        "actor.weight_update=in_flight",
        "actor.max_new_tokens=10",
        "buffer.max_staleness=3",
    )
    with run_services(cfg, start) as (learner, actor):
        pushed = []
        push = actor.sink.push
        actor.sink.push = lambda batch, lease: (pushed.append(batch), push(batch, lease))
        actor.step()  # leases, admits, prefills and decodes once
        running = actor.engine.num_running
        assert running > 0
        model, _ = import_hf(start, cfg.model)
        learner.publisher.store.publish(1, hf_state_dict(model, cfg.model))
        actor.versions._last_store_check = 0.0  # as if the store's newest were checked now
        while actor.engine.num_running or actor.engine.num_waiting:
            actor.step()
    assert actor.stats.swaps_in_flight == 1 and actor.engine.version == 1
    rows = [r for b in pushed for r in batch_to_trajectories(b, RoutingSpec.of(cfg.model))]
    spanning = [r for r in rows if r.policy_version_max > r.policy_version]
    assert len(spanning) == running  # every row running at the swap finished on version 1
    for r in spanning:
        k = r.token_versions.index(1)
        assert r.token_versions == [0] * k + [1] * (len(r.completion_tokens) - k) and k >= 2
        assert (r.policy_version, r.policy_version_max) == (0, 1)


@pytest.mark.parametrize("absent", ["buffer", "learner"])
def test_an_actor_builds_without_io_and_waits_startup_timeout_s_to_start(tmp_path, absent):
    over = [f"run.output_dir={tmp_path}", "run.name=absent", "run.startup_timeout_s=0.5"]
    cfg, threads = load_config(None, over), set(threading.enumerate())
    sink = None if absent == "buffer" else mock.Mock()  # the learner is absent whatever
    actor = Actor(cfg, cfg.run_dir, "a0", sink=sink)
    assert not cfg.run_dir.exists() and not new_threads(threads)
    with pytest.raises(RuntimeError, match=r"call start\(\) first"):
        actor.step()
    Actor(cfg, cfg.run_dir, "a1", sink=sink).close()  # never started: nothing to close
    assert sink is None or not sink.method_calls
    with pytest.raises(TimeoutError, match=rf"{absent} did not .*startup_timeout_s = 0\.5 s"):
        actor.start()  # (with the default, 600 s, this test would hang instead)
    actor.close()
    assert not cfg.run_dir.exists()
