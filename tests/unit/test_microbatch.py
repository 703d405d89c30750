"""Micro-batches by token budget: an update accumulated over micro-batches of whole rows equals
the one-shot update of the mini-batch (and with activation checkpointing too), for routing
replay none / R2 / R3 and N = 1 / 4; and log-probs in chunks of positions equal one chunk."""

from __future__ import annotations

import pytest
import torch

from async_rl.config import ConfigError, ModelConfig, load_config
from learner.batch import microbatches
from learner.model import apply_activation_checkpointing, build_model
from learner.train import TrainStep
from tests.helpers import random_batch

CFG, G = ModelConfig(), 2  # the shapes of tests/integration/test_parallel.py's batches


def global_batch(seed: int):
    return random_batch(seed, 4, G, CFG)


BUDGET = 16  # positions per forward; the batch's rows have 4..12, so 1 to 4 rows each
STEPS = 2


def train(num_minibatches: int, replay: str, budget: int, ac: str = "none", chunk: int = 1024):
    """SGD global steps from a seeded model: weights, metrics, and every update's gradient."""
    model = apply_activation_checkpointing(build_model(CFG, seed=0), ac)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # activation checkpointing wraps blocks: their parameters' names gain a prefix, the
    # state dict's do not
    names = {p: n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters()}
    grads = []
    opt.register_step_pre_hook(
        lambda o, *_: grads.append(
            {names[p]: p.grad.detach().clone() for p in o.param_groups[0]["params"]}
        )
    )
    cfg = load_config(
        None,
        [
            f"algo.group_size={G}",
            f"algo.num_minibatches={num_minibatches}",
            f"algo.routing_replay={replay}",
            "learner.grad_clip=0.5",
            "learner.lr=0.5",
            "model.max_seq_len=16",
            f"learner.max_tokens_per_microbatch={budget}",
            f"learner.logprob_chunk={chunk}",
            "run.num_steps=100",
        ],
    )
    step = TrainStep(model, opt, cfg)
    metrics = [step(global_batch(seed)) for seed in range(STEPS)]
    return model.state_dict(), metrics, grads


def assert_same_training(got, want):
    (w_got, m_got, g_got), (w_want, m_want, g_want) = got, want
    assert w_got.keys() == w_want.keys()  # activation checkpointing keeps the names
    for a, b in zip(g_got, g_want, strict=True):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in w_want:
        torch.testing.assert_close(w_got[name], w_want[name], rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(m_got, m_want, strict=True):
        for key in ("loss", "grad_norm", "entropy", "clip_frac", "train_infer_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        if "routing_agreement" in b:
            assert a["routing_agreement"] == pytest.approx(b["routing_agreement"], abs=1e-6)


@pytest.mark.parametrize("replay", ["none", "r2", "r3"])
@pytest.mark.parametrize("n", [1, 4])
def test_microbatched_updates_equal_one_shot_updates(replay, n):
    assert_same_training(train(n, replay, BUDGET), train(n, replay, 0))


@pytest.mark.parametrize("replay,ac", [("r3", "full"), ("r2", "selective")])
def test_activation_checkpointing_recomputes_the_replayed_routing(replay, ac):
    # the recomputed forward of the backward pass must route as the forward did
    assert_same_training(train(4, replay, BUDGET, ac), train(4, replay, 0))


@pytest.mark.parametrize("replay,budget", [("r2", BUDGET), ("r3", BUDGET), ("r2", 0)])
def test_log_probs_in_chunks_of_positions_train_as_in_one(replay, budget):
    """The output layer's chunked log-probs (chunks of 5 positions: several per row, rows
    split across chunks) train exactly as one chunk does, under R2 / R3 and micro-batches:
    its recomputed backward keeps the routing of the forward."""
    chunked, whole = train(4, replay, budget, chunk=5), train(4, replay, budget)
    assert_same_training(chunked, whole)
    first, want = chunked[2][0], whole[2][0]  # the first update: the same weights
    largest = max(g.abs().max() for g in want.values())
    assert max((first[k] - want[k]).abs().max() for k in want) <= 1e-6 * largest
    for a, b in zip(chunked[1], whole[1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_microbatches_hold_whole_rows_within_the_budget_bucketed_by_length():
    batch = global_batch(0)
    lengths = batch.valid_BT.sum(1)
    parts = microbatches(batch, BUDGET)
    assert sorted(torch.cat(parts).tolist()) == list(range(batch.num_rows))
    for index in parts:
        assert len(index) * int(lengths[index].max()) <= BUDGET
    firsts = [int(lengths[index[0]]) for index in parts]
    assert firsts == sorted(firsts, reverse=True)  # longest rows first, similar ones together
    assert len(microbatches(batch, 0)) == 1
    with pytest.raises(ValueError, match="max_tokens_per_microbatch.*12 positions"):
        microbatches(batch, 11)


def test_a_budget_below_the_longest_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="learner.max_tokens_per_microbatch.*max_seq_len"):
        load_config(None, ["model.max_seq_len=64", "learner.max_tokens_per_microbatch=63"])
