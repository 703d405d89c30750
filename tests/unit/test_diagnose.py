"""`async-rl diagnose`'s numbers on hand-made cases: exact where everything is known, and equal
to an independent float64 computation (transformers' model, autograd) under a perturbation."""

from __future__ import annotations

import pytest
import torch

from async_rl.config import ModelConfig
from async_rl.tokenizer import Tokenizer
from async_rl.tools.diagnose import measure
from learner.batch import PackedBatch
from learner.hf import export_hf, import_hf
from learner.model import build_model, token_logprobs
from learner.routing import RoutingHooks

CFG = ModelConfig()
G, PROMPT, COMPLETION = 4, 5, 7


def batch_of(model) -> PackedBatch:
    """Eight random sequences; behaviour log-probs are the model's own, rewards alternate."""
    g = torch.Generator().manual_seed(0)
    rows = 2 * G
    seq = torch.randint(4, CFG.vocab_size, (rows, PROMPT + COMPLETION), generator=g)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, PROMPT - 1 :] = True
    hooks = RoutingHooks(model)
    with torch.no_grad(), hooks.record() as trace:
        mu = token_logprobs(model(inputs), targets)
    hooks.remove()
    return PackedBatch(
        inputs_BT=inputs,
        targets_BT=targets,
        mask_BT=mask,
        behavior_logprobs_BT=torch.where(mask, mu, 0.0),
        rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
        policy_versions_B=torch.zeros(rows, dtype=torch.int64),
        routing_BTLK=trace.experts,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    old = build_model(CFG, seed=3).float()
    with torch.no_grad():  # decisive routing, as in a trained model
        for layer in old.layers.values():
            layer.moe.router.gate.weight.mul_(10)
    out = tmp_path_factory.mktemp("diag")
    path = export_hf(old, CFG, Tokenizer.arithmetic(), out / "old")
    old, _ = import_hf(path, CFG)
    new, _ = import_hf(path, CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    new_path = export_hf(new, CFG, Tokenizer.arithmetic(), out / "new")
    return old.float(), new.float(), new_path


ADVANTAGES = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, 0.25, 0.25, 0.25])


@pytest.mark.parametrize("replay", ["none", "r2", "r3"])
def test_the_same_weights_as_the_actor_give_ratio_1_gap_0_cosine_1(models, replay):
    old, _, _ = models
    row, gaps = measure(old, old, batch_of(old), replay, ADVANTAGES)
    assert row["tokens"] == 2 * G * COMPLETION
    for key in ("mean abs delta", "mean abs tif-1", "mean abs stale-1", "gap median", "gap p90"):
        assert row[key] < 1e-5, key
    assert gaps.max() < 1e-5
    assert row["cos all"] == pytest.approx(1.0, abs=1e-6)
    assert row["cos router"] == pytest.approx(1.0, abs=1e-6)
    assert row["flip infer"] == row["flip stale"] == row["flipped tokens"] == 0.0
    assert row["p99 abs log rho steady"] < 1e-5 and row["ess"] == pytest.approx(1.0)


def test_a_perturbation_gives_what_float64_transformers_gives(models):
    transformers = pytest.importorskip("transformers")
    old, new, new_path = models
    batch = batch_of(old)
    row, gaps = measure(old, new, batch, "none", ADVANTAGES)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        new_path, dtype=torch.float64, experts_implementation="eager"
    )
    mask, mu = batch.mask_BT, batch.behavior_logprobs_BT.double()
    out = hf(input_ids=batch.inputs_BT, output_router_logits=True)
    lp = torch.log_softmax(out.logits, -1)
    lp = lp.gather(-1, batch.targets_BT.unsqueeze(-1)).squeeze(-1)
    log_r = torch.where(mask, lp - mu, 0.0)
    r = torch.where(mask, log_r.exp(), 0.0)
    delta = (r - mask.double()).detach()
    w = log_r.sum(1).exp().detach()
    want_gaps = ((w - (1 + delta.sum(1))).abs() / w).numpy()
    adv = ADVANTAGES.double()
    params = list(hf.parameters())
    g_tok = torch.autograd.grad((r.sum(1) * adv).sum(), params, retain_graph=True)
    g_seq = torch.autograd.grad((log_r.sum(1).exp() * adv).sum(), params)

    def cos(a, b):
        a, b = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
        return float(a @ b / (a.norm() * b.norm()))

    routers = [i for i, (n, _) in enumerate(hf.named_parameters()) if n.endswith("mlp.gate.weight")]
    assert row["mean abs delta"] == pytest.approx(float(delta.abs().sum() / mask.sum()), rel=1e-3)
    assert row["mean abs delta"] > 0.03  # a perturbation that matters
    assert gaps == pytest.approx(want_gaps, rel=1e-2, abs=1e-5)
    assert row["gap median"] > 1e-3
    assert row["cos all"] == pytest.approx(cos(g_tok, g_seq), abs=1e-4)
    assert row["cos all"] < 0.9999  # the approximation is visibly off
    cos_router = cos([g_tok[i] for i in routers], [g_seq[i] for i in routers])
    assert row["cos router"] == pytest.approx(cos_router, abs=1e-4)
    # the new weights route otherwise than the old (the actor's, here): transformers' top-k
    top_k = [
        logits.topk(CFG.top_k, -1).indices.view(*batch.inputs_BT.shape, CFG.top_k)
        for logits in out.router_logits
    ]
    new_BTLK = torch.stack(top_k, dim=2).sort(-1).values
    moved = (new_BTLK != batch.routing_BTLK.long().sort(-1).values).any(-1)
    assert row["flip infer"] == 0.0 and row["flip stale"] == pytest.approx(moved.double().mean())
    assert row["flip stale"] > 0.01
    replayed, _ = measure(old, new, batch, "r2", ADVANTAGES)  # pi_theta replays pi_old's
    assert replayed["flip stale"] == 0.0
