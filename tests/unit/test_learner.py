"""The learner's global step: packing, routing replay modes, N updates, checkpoints and resume."""

import contextlib
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from async_rl.config import ModelConfig, load_config
from async_rl.paths import RunPaths, read_endpoints
from async_rl.tasks.arithmetic import ArithmeticTask
from async_rl.tokenizer import Tokenizer
from async_rl.types import RoutingSpec, Trajectory, group_to_batch
from learner.batch import pack
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.evaluate import sample
from learner.model import build_model, token_logprobs
from learner.optim import lr_multiplier
from learner.routing import RoutingHooks
from learner.run import Learner
from learner.train import replayed_routing
from tests.helpers import PublishedVersions, new_threads

CFG = ModelConfig()
SPEC = RoutingSpec.of(CFG)
G = 4


def rollouts(actor_model, num_groups=4, seed=0, noise=0.0):
    """Groups sampled by `actor_model` (optionally a perturbed copy: a different engine).

    Rewards alternate 0/1 within a group: an untrained model solves nothing, and the step needs
    nonzero advantages.
    """
    tok, task = Tokenizer.arithmetic(), ArithmeticTask(seed=0, max_digits=1, heldout_size=10)
    gen = torch.Generator().manual_seed(seed)
    model = actor_model
    if noise:
        model = build_model(CFG, seed=None)
        model.load_state_dict(actor_model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    model.eval()
    hooks = RoutingHooks(model)
    batches = []
    for g in range(num_groups):
        problem = task.train_problem(g)
        prompt = tok.encode_prompt(problem.prompt)
        out = sample(model, [prompt] * G, max_new_tokens=4, stop_ids=(1,), pad_id=0, generator=gen)
        rows = []
        for i, (c, lp, fr) in enumerate(
            zip(out.completions, out.logprobs, out.finish_reasons, strict=True)
        ):
            with torch.no_grad(), hooks.record() as trace:
                model(torch.tensor([prompt + c[:-1]]))
            rows.append(
                Trajectory(
                    f"g{g}-{i}",
                    f"g{g}",
                    problem.prompt_id,
                    "a0",
                    "embedded",
                    0,
                    0,
                    prompt,
                    c,
                    lp,
                    [0] * len(c),
                    trace.experts[0].numpy(),
                    float(i % 2),  # mixed rewards: nonzero advantages
                    fr,
                    1.0,
                    1.0,
                    "fp32",
                )
            )
        batches.append(group_to_batch(rows, SPEC))
    hooks.remove()
    return pa.Table.from_batches(batches)


def packed(table):
    return pack(table, SPEC, pad_id=0)


@pytest.fixture
def new_step(make_step):
    """A step with the plain policy gradient -(1/B) sum A log pi (no IS weight, no clipping):
    enough to drive the step; the MiniRL loss has its own tests."""

    def build(model, replay="none", n=1, lr=1e-3):
        return make_step(
            model,
            f"algo.routing_replay={replay}",
            f"algo.num_minibatches={n}",
            f"learner.lr={lr}",
            f"algo.group_size={G}",
            "algo.tis_mode=none",
            "algo.clip=false",
            "run.num_steps=100",
        )

    return build


@pytest.fixture(scope="module")
def base():
    return build_model(CFG, seed=0)


def clone(model):
    copy = build_model(CFG, seed=None)
    copy.load_state_dict(model.state_dict())
    return copy


def test_pack_aligns_targets_behaviour_and_routing(base):
    table = rollouts(base, num_groups=2)
    batch = packed(table)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        p, c = row["prompt_tokens"], row["completion_tokens"]
        assert batch.targets_BT[i][batch.mask_BT[i]].tolist() == c
        assert batch.inputs_BT[i, : len(p) + len(c) - 1].tolist() == (p + c)[:-1]
        assert torch.allclose(
            batch.behavior_logprobs_BT[i][batch.mask_BT[i]], torch.tensor(row["behavior_logprobs"])
        )
        trace = np.array([np.array(x) for x in row["routing"]]).reshape(-1, 2, 2)
        assert (batch.routing_BTLK[i, : len(trace)].numpy() == trace).all()
    # behaviour log-probs of a same-weights sampler equal the learner's (the engine here is fp32)
    with torch.no_grad():
        logp = token_logprobs(base.eval()(batch.inputs_BT), batch.targets_BT)
    assert torch.allclose(logp[batch.mask_BT], batch.behavior_logprobs_BT[batch.mask_BT], atol=1e-5)
    assert batch.advantages_B is None  # the learner's objective computes them, not packing


def test_r3_replays_the_actor_trace_and_r2_is_a_no_op_on_policy(base, new_step):
    table = rollouts(base, noise=0.02)  # a "quantized" actor: its routing differs a little
    batch = packed(table)
    free = new_step(clone(base))(batch)
    assert free["routing_agreement"] < 1.0
    assert free["routing_flip_infer"] == 1.0 - free["routing_agreement"] > 0
    assert free["flipped_token_frac"] > 0
    r3 = new_step(clone(base), "r3")(batch)
    assert r3["routing_agreement"] == 1.0 and r3["routing_flip_infer"] == 0.0
    assert r3["flipped_token_frac"] == 0.0 and r3["abs_log_rho_p99_flipped"] == 0.0
    broken = _replay_disabled(new_step(clone(base), "r3"))(batch)  # caught by the metric
    assert broken["routing_flip_infer"] == free["routing_flip_infer"]
    # R2 with one mini-batch replays exactly what the model would choose anyway
    losses = {}
    for mode in ("none", "r2"):
        torch.manual_seed(0)
        model, steps = clone(base), []
        step = new_step(model, mode)
        for _ in range(3):
            steps.append(step(batch)["loss"])
        losses[mode] = steps
    assert losses["none"] == losses["r2"]


def _replay_disabled(step):
    """`step` with a routing replay that silently does nothing (verl #7340's failure)."""
    step.hooks.replay = lambda experts_BTLK: contextlib.nullcontext()
    return step


def test_the_update_flip_share_is_what_r2_removes_and_a_disabled_replay_shows(base, new_step):
    """After the first update free routing drifts (mini-batch 2 routes otherwise than its
    proximal forward did); R2 replays the proximal choice: 0 flips. A replay that does
    nothing is seen in the metric alone: it flips exactly as free routing does."""
    batch = packed(rollouts(base))
    free = new_step(clone(base), "none", n=2, lr=0.05)(batch)
    r2 = new_step(clone(base), "r2", n=2, lr=0.05)(batch)
    broken = _replay_disabled(new_step(clone(base), "r2", n=2, lr=0.05))(batch)
    assert free["routing_flip_update"] > 0 and r2["routing_flip_update"] == 0.0
    assert broken["routing_flip_update"] == free["routing_flip_update"]
    assert "routing_flip_update" not in new_step(clone(base), "none")(batch)  # N = 1: none


def test_the_mismatch_metrics_of_a_hand_built_batch():
    """Flips ignore the order within a top-k; |log rho| percentiles split by flipped tokens,
    and the effective sample size, against numpy on the same numbers (two forwards)."""
    from learner.mismatch import Mismatch, flipped_BTL

    a = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]]]])  # B 1, T 2, L 2, K 2
    b = torch.tensor([[[[1, 0], [2, 3]], [[4, 5], [7, 5]]]])
    assert flipped_BTL(a, b).tolist() == [[[False, False], [False, True]]]
    log_rho = np.array([0.1, -2.0, 0.5, 3.0, -0.3])
    flipped = np.array([False, True, False, True, False])
    mismatch = Mismatch()
    for part in (slice(0, 2), slice(2, 5)):
        logp = torch.tensor(log_rho[part])[None] - 1.0
        mu, mask = torch.full_like(logp, -1.0), torch.ones_like(logp, dtype=torch.bool)
        mismatch.add(logp, mu, mask, torch.tensor(flipped[part])[None])
    out, w = mismatch.metrics(), np.exp(log_rho)
    assert out["is_ess"] == pytest.approx(w.sum() ** 2 / (len(w) * (w**2).sum()))
    assert out["flipped_token_frac"] == 0.4
    assert out["abs_log_rho_p99_flipped"] == pytest.approx(np.quantile([2.0, 3.0], 0.99))
    assert out["abs_log_rho_p99_steady"] == pytest.approx(np.quantile([0.1, 0.5, 0.3], 0.99))
    assert out["abs_log_rho_p99"] == pytest.approx(np.quantile(np.abs(log_rho), 0.99))
    unrouted = Mismatch()  # no actor routing to compare with: no split
    unrouted.add(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    assert unrouted.metrics() == {"abs_log_rho_p99": 0.0, "is_ess": 1.0}


def test_n_minibatches_make_n_optimizer_steps(base, new_step):
    batch = packed(rollouts(base))
    step = new_step(clone(base), n=4)
    metrics = step(batch)
    assert step.updates == 4 and metrics["num_tokens"] == int(batch.mask_BT.sum())
    with pytest.raises(ValueError, match="do not split"):
        new_step(clone(base), n=3)(batch)


def test_resume_from_checkpoint_continues_the_same_loss_trace(base, new_step, tmp_path):
    batches = [packed(rollouts(base, seed=s)) for s in range(4)]
    model = clone(base)
    step = new_step(model)
    straight = [step(b)["loss"] for b in batches]

    model = clone(base)
    step = new_step(model)
    first = [step(b)["loss"] for b in batches[:2]]
    save_checkpoint(tmp_path, 2, model, step.optimizer, {"version": 2, "updates": step.updates})
    resumed_model = build_model(CFG, seed=7)  # different weights, overwritten by the checkpoint
    resumed = new_step(resumed_model)
    state = load_checkpoint(latest_checkpoint(tmp_path), resumed_model, resumed.optimizer)
    resumed.updates = state["updates"]
    assert state["version"] == 2
    rest = [resumed(b)["loss"] for b in batches[2:]]
    assert first + rest == straight


def test_checkpoint_errors_name_the_problem(base, new_step, tmp_path):
    model = clone(base)
    step = new_step(model)
    path = save_checkpoint(tmp_path, 1, model, step.optimizer, {"version": 1, "updates": 0})
    other = build_model(ModelConfig(num_layers=1), seed=0)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    (path / "model-r00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable learner checkpoint"):
        load_checkpoint(path, model, step.optimizer)


def test_a_checkpoint_of_the_one_file_layout_still_loads(base, new_step, tmp_path):
    """Runs checkpointed before shards (`model.safetensors`, `optimizer.safetensors`) resume."""
    from safetensors.torch import save_file

    from learner.checkpoint import full_tensors

    model = clone(base)
    step = new_step(model)
    step(packed(rollouts(base, seed=0)))
    path = save_checkpoint(tmp_path, 1, model, step.optimizer, {"version": 1, "updates": 1})
    for kind in ("model", "optimizer"):
        save_file(full_tensors(path, kind), path / f"{kind}.safetensors")
        (path / f"{kind}-r00000.safetensors").unlink()
    (path / "shards-r00000.json").unlink()
    again = build_model(CFG, seed=7)
    load_checkpoint(path, again, new_step(again).optimizer)
    pairs = zip(again.parameters(), model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_the_replay_rule_is_table_1_of_the_paper():
    actor, recorded = torch.zeros(1), torch.ones(1)
    for i in (0, 1, 3):
        assert replayed_routing("none", i, actor, recorded) is None
        assert replayed_routing("r3", i, actor, recorded) is actor  # e^mu_old everywhere
    assert replayed_routing("r2", 0, actor, None) is None  # e^pi_old = e^pi: nothing to replay
    assert replayed_routing("r2", 1, actor, recorded) is recorded
    assert replayed_routing("r2", 3, actor, recorded) is recorded


def test_lr_schedules():
    assert lr_multiplier(0, 4, 100, "constant") == 0.25
    assert lr_multiplier(50, 0, 100, "constant") == 1.0
    assert lr_multiplier(50, 0, 100, "linear") == 0.5
    assert abs(lr_multiplier(100, 0, 100, "cosine")) < 1e-12
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier(5, 0, 10, "exp")


def test_replay_refuses_a_repeated_expert_within_a_token(base):
    hooks = RoutingHooks(base)
    with pytest.raises(ValueError, match="repeats an expert"):
        with hooks.replay(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)):
            pass
    hooks.remove()


def test_a_learner_builds_without_io_and_starts_when_told(tmp_path, start):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=absent", "run.eval_every=0"])
    threads, source = set(threading.enumerate()), PublishedVersions()
    learner = Learner(cfg, cfg.run_dir, start, sources=lambda: source)
    assert not cfg.run_dir.exists() and not new_threads(threads)
    with pytest.raises(RuntimeError, match=r"call start\(\) first"):
        learner.run()
    learner.close()  # never started: nothing to close
    assert not cfg.run_dir.exists() and not source.closed
    learner.start()
    try:
        assert learner.version == 0 and source.published == [0]
        assert learner.publisher.store.latest() == 0
        assert read_endpoints(RunPaths(cfg.run_dir), "learner") is not None
    finally:
        learner.close()
    assert source.closed
