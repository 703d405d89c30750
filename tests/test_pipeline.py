"""Buffer service, learner and actor together (threads of one process, real zmq and files)."""

import contextlib
import functools
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import zmq

from actors.embedded import EmbeddedEngine
from actors.engine import SamplingParams
from actors.loop import Actor, group_seed
from async_rl.buffer import inspect
from async_rl.buffer_service import BufferService
from async_rl.config import load_config, to_toml
from async_rl.losses import group_advantages, minirl_loss
from async_rl.tasks import task_from_config
from async_rl.tokenizer import Tokenizer
from async_rl.types import RoutingSpec, batch_to_trajectories
from learner.batch import pack
from learner.hf import export_hf, hf_state_dict, import_hf
from learner.run import Learner
from learner.sft import run_sft
from learner.train import TrainStep


def make_config(tmp_path, name, *overrides):
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            "run.eval_every=0",
            'task.ops=["+"]',
            "task.max_digits=1",
            "task.heldout_size=20",
            "actor.max_new_tokens=4",
            "actor.quantization=fp32",
            "algo.group_size=4",
            "algo.prompts_per_minibatch=2",
            "learner.lr=1e-3",
            "learner.sft_steps=80",
            "learner.sft_batch_size=32",
            *overrides,
        ],
    )
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
    return cfg


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A briefly cold-started policy: right on some prompts, so advantages are not all zero."""
    tmp = tmp_path_factory.mktemp("start")
    cfg = make_config(tmp, "sft")
    torch.manual_seed(0)
    out = tmp / "sft"
    run_sft(cfg, Tokenizer.arithmetic(), task_from_config(cfg), out, log=lambda *_: None)
    return out


@contextlib.contextmanager
def services(cfg, start):
    """The buffer service (in a thread), a learner and an actor of one run; closed after."""
    ctx = zmq.Context()
    buffer = BufferService(cfg, cfg.run_dir, ctx=ctx)
    buffer_thread = threading.Thread(target=buffer.run, daemon=True)
    buffer_thread.start()
    learner = Learner(cfg, cfg.run_dir, start, ctx=ctx)
    actor = Actor(cfg, cfg.run_dir, "a0", ctx=ctx)
    try:
        yield learner, actor
    finally:
        actor.close()
        learner.close()
        buffer.stop()
        buffer_thread.join(30)


def run_async(cfg, start, steps):
    """The three services of a run, in threads; returns the learner's metric rows."""
    with services(cfg, start) as (learner, actor):
        thread = threading.Thread(target=actor.run, daemon=True)
        thread.start()
        rows = []
        learner.run(rows.append)
        actor.stop()
        thread.join(30)
    assert learner.version == steps
    return rows


def test_async_run_trains_publishes_and_respects_staleness(tmp_path, start):
    cfg = make_config(tmp_path, "async", "run.num_steps=4", "buffer.max_staleness=1")
    rows = run_async(cfg, start, 4)
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


def test_k0_one_minibatch_is_a_synchronous_generate_then_train_loop(tmp_path, start):
    """K = 0, N = 1: the learner trains on exactly the samples, and computes exactly the losses,
    of a loop that generates a global batch with the current weights, trains on it, repeats."""
    steps = 3
    cfg = make_config(tmp_path, "k0", f"run.num_steps={steps}", "buffer.max_staleness=0")
    rows = run_async(cfg, start, steps)
    spec = RoutingSpec.of(cfg.model)
    stored = pa.concat_tables(
        pa.ipc.open_file(p).read_all() for p in sorted((cfg.run_dir / "buffer").glob("*.arrow"))
    )

    model, _ = import_hf(start, cfg.model)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.learner.lr,
        betas=(cfg.learner.adam_beta1, cfg.learner.adam_beta2),
        weight_decay=cfg.learner.weight_decay,
    )
    step = TrainStep(
        model,
        optimizer,
        functools.partial(minirl_loss, cfg=cfg.algo),
        num_minibatches=1,
        routing_replay="none",
        temperature=1.0,
        grad_clip=cfg.learner.grad_clip,
        lr=cfg.learner.lr,
        warmup_steps=0,
        lr_schedule="constant",
        total_updates=steps,
    )
    task, tok = task_from_config(cfg), Tokenizer.arithmetic()
    b, g = cfg.global_batch_groups, cfg.algo.group_size
    for v in range(steps):
        weights = export_hf(model, cfg.model, tok, tmp_path / f"sync-v{v}")
        engine = EmbeddedEngine(weights, quantization="fp32")
        problems = [task.train_problem(i) for i in range(v * b, (v + 1) * b)]
        params = SamplingParams(1.0, 1.0, cfg.actor.max_new_tokens, group_seed(0, v * b, v))
        groups = engine.generate([tok.encode_prompt(p.prompt) for p in problems], params, g)
        served = stored.filter(pc.equal(stored["policy_version"], v))
        assert [r.completion_tokens for r in batch_to_trajectories(served, spec)] == [
            gen.tokens for group in groups for gen in group
        ], f"step {v}: different samples"
        packed = pack(served, spec, g, functools.partial(group_advantages, std_norm=False), 0)
        assert step(packed)["loss"] == rows[v]["learner/loss"], f"step {v}: different loss"


def test_an_actor_told_of_a_version_collected_before_it_reads_it_loads_the_newest(tmp_path, start):
    """Versions fly by faster than a busy actor reads them: the one it was told of is gone
    (the learner keeps the newest `learner.keep_versions`), so it swaps to the newest."""
    cfg = make_config(tmp_path, "gone", "run.num_steps=4", "learner.keep_versions=2")
    with services(cfg, start) as (learner, actor):
        state = hf_state_dict(learner.model, cfg.model)
        for v in range(1, 5):
            learner.store.publish(v, state)
        assert learner.store.collect(set()) == [1, 2]
        actor.weights.newest = lambda timeout_ms=0: 1  # the announcement it got was of v1
        actor.sync_weights()
        assert actor.engine.version == 4 and actor.stats["weight_swaps"] == 1
