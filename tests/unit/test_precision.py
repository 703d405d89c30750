"""Mixed precision: fp32 master weights, gradients and AdamW state under bf16 compute.

At lr 1e-6 an AdamW update is far below half a bf16 ulp of most weights: with bf16 masters
it rounds away, with fp32 masters it lands, and the published bf16 versions drift as the
masters accumulate. Measured here on the tiny model, against an fp32 learner and pure bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from async_rl.config import load_config
from learner.checkpoint import Snapshot, full_tensors
from learner.hf import hf_state_dict
from learner.model import DTYPES, build_model, policy_logprobs
from learner.parallel import DataParallel, apply_fsdp, full_state_dict, shutdown
from learner.train import TrainStep
from tests.helpers import random_batch

STEPS = 12


def learner(dtype: str, master: str, lr: float = 1e-6):
    """A seeded tiny model in `master` computing in `dtype` (FSDP2 over one process when
    they differ), its AdamW and train step."""
    cfg = load_config(
        None,
        [
            f"model.dtype={dtype}",
            f"learner.master_dtype={master}",
            f"learner.lr={lr}",
            "algo.group_size=2",
            "run.num_steps=1000",
        ],
    )
    model = build_model(cfg.model, seed=0, dtype=DTYPES[master])
    apply_fsdp(model, DataParallel(), compute_dtype=DTYPES[dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return cfg, model, opt, TrainStep(model, opt, cfg)


def masters(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter, whole (FSDP's one-rank shards are views of the masters)."""
    full = {
        n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.named_parameters()
    }
    return {n: p.detach().clone() for n, p in full.items()}


def changed_share(a: dict, b: dict) -> float:
    return sum(int((a[k] != b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())


@pytest.fixture(scope="module")
def runs():
    """Per precision: the share of master entries each step changed, and the share of the
    published version's entries that differ from version 0's, after every step."""
    out = {}
    for dtype, master in (
        ("float32", "float32"),
        ("bfloat16", "float32"),
        ("bfloat16", "bfloat16"),
    ):
        cfg, model, opt, step = learner(dtype, master)
        try:
            v0 = {k: v.clone() for k, v in hf_state_dict(model, cfg.model).items()}
            before = masters(model)
            per_step, drift = [], []
            for i in range(STEPS):
                step(random_batch(i % 4, 4, 2, cfg.model))
                now = masters(model)
                per_step.append(changed_share(now, before))
                before = now
                published = hf_state_dict(model, cfg.model)
                assert all(v.dtype == DTYPES[dtype] for v in published.values())
                drift.append(changed_share(published, v0))
            states = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
            out[dtype, master] = {
                "per_step": per_step,
                "drift": drift,
                "masters": {p.dtype for p in model.parameters()},
                "grads": {p.grad.dtype for p in model.parameters() if p.grad is not None},
                "moments": {s.dtype for s in states},
                "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            }
        finally:
            shutdown()
    return out


def test_fp32_masters_move_at_lr_1e_6_as_an_fp32_learner_does(runs):
    fp32, mixed = runs["float32", "float32"], runs["bfloat16", "float32"]
    print("changed per step, fp32:", fp32["per_step"], "mixed:", mixed["per_step"])
    assert min(fp32["per_step"]) > 0.9 and min(mixed["per_step"]) > 0.9
    assert mixed["masters"] == mixed["grads"] == mixed["moments"] == {torch.float32}
    assert mixed["sharded"] and not fp32["sharded"]  # FSDP's mixed precision, over one rank


def test_pure_bf16_masters_round_the_updates_away(runs):
    pure = runs["bfloat16", "bfloat16"]
    print("changed per step, pure bf16:", pure["per_step"])
    assert max(pure["per_step"][2:]) < 0.05  # the few entries near zero, nothing else
    assert pure["masters"] == pure["moments"] == {torch.bfloat16}


def test_published_bf16_versions_drift_as_the_masters_accumulate(runs):
    mixed, pure = runs["bfloat16", "float32"]["drift"], runs["bfloat16", "bfloat16"]["drift"]
    print("published entries off version 0, mixed:", mixed, "pure:", pure)
    assert all(b > a for a, b in zip(mixed, mixed[1:], strict=False))  # more every step
    assert mixed[-1] > 3 * mixed[0] and mixed[-1] > 0.1
    assert pure[-1] < 0.05 and pure[-1] - pure[2] < 0.005  # stuck after the first steps


def test_mixed_precision_computes_exactly_as_bf16_casts_of_the_masters():
    """The forward under FSDP's mixed precision is that of the same model with its
    parameters cast to bf16, bit for bit (buffers, such as RoPE's, stay fp32 in both)."""
    cfg, model, _, _ = learner("bfloat16", "float32")
    try:
        copy = build_model(cfg.model, seed=0, dtype=torch.float32)
        for p in copy.parameters():
            p.data = p.data.to(torch.bfloat16)
        batch = random_batch(0, 4, 2, cfg.model)
        with torch.no_grad():
            ours, _, _ = policy_logprobs(model, batch.inputs_BT, batch.targets_BT)
            theirs, _, _ = policy_logprobs(copy, batch.inputs_BT, batch.targets_BT)
            fp32, _, _ = policy_logprobs(copy.float(), batch.inputs_BT, batch.targets_BT)
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, fp32)  # the compute was bf16
    finally:
        shutdown()


def test_checkpoints_hold_the_fp32_masters_and_exports_the_compute_dtype(tmp_path):
    cfg, model, opt, step = learner("bfloat16", "float32", lr=1e-3)
    try:
        step(random_batch(0, 4, 2, cfg.model))
        masters = full_state_dict(model)
        Snapshot.take(1, model, opt, {}).write(tmp_path, token="t")
        saved = full_tensors(tmp_path / "step-000001")
        assert all(saved[k].dtype == torch.float32 for k in masters)
        assert all(torch.equal(saved[k], masters[k]) for k in masters)
        moments = full_tensors(tmp_path / "step-000001", "optimizer")
        assert {v.dtype for k, v in moments.items() if "exp_avg" in k} == {torch.float32}
        published = hf_state_dict(model, cfg.model)
        assert {v.dtype for v in published.values()} == {torch.bfloat16}
    finally:
        shutdown()
