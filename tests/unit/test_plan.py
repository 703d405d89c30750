"""`async-rl plan`: its bytes against the real tensors, its activation estimate against what a
forward saves, the shipped 30B layout, and the layouts it refuses."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from async_rl.config import ConfigError, ModelConfig, load_config
from async_rl.run.cluster import check_placement
from async_rl.tools.plan import Cluster, activation_bytes, logits_bytes, make_plan
from learner.model import apply_activation_checkpointing, build_model, policy_logprobs
from tests.helpers import ROOT

CHUNK = 128  # positions whose logits the learner holds at once


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_gradients_and_adamw_bytes_are_the_real_ones_at_one_rank(dtype):
    """fp32 masters, gradients and moments, whether the model computes in fp32 or, through
    FSDP2's mixed precision over one process, in bf16."""
    from learner.model import DTYPES
    from learner.parallel import DataParallel, apply_fsdp, shutdown

    cfg = load_config(None, [f"model.dtype={dtype}"])
    model = build_model(cfg.model, seed=0, dtype=torch.float32)
    try:
        apply_fsdp(model, DataParallel(), compute_dtype=DTYPES[dtype])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randint(0, cfg.model.vocab_size, (2, 8))).float().sum().backward()
        opt.step()
    finally:
        shutdown()

    def nbytes(tensors):
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in tensors)

    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    plan = make_plan(cfg, Cluster())
    assert plan.learner["params"] == nbytes(model.parameters())
    assert plan.learner["grads"] == nbytes(p.grad for p in model.parameters())
    assert plan.learner["adamw"] == nbytes(moments)
    assert plan.version_bytes == plan.learner["numel"] * (2 if dtype == "bfloat16" else 4)
    assert (plan.learner["in_flight"] > 0) == (dtype != "float32")  # FSDP's units, mixed only


def saved_bytes(model, tokens_BT) -> int:
    """Bytes a training forward (and the log-probs of its targets) keeps for its backward:
    every tensor autograd saves, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _, _ = policy_logprobs(model, tokens_BT, tokens_BT, chunk=CHUNK)
    logp.sum().backward()
    return sum(storages.values())


def test_the_activation_estimate_is_within_2x_of_what_a_forward_saves():
    cfg = ModelConfig(max_seq_len=64)
    tokens_BT = torch.randint(0, cfg.vocab_size, (8, 64))
    saved = {
        mode: saved_bytes(apply_activation_checkpointing(build_model(cfg, seed=0), mode), tokens_BT)
        for mode in ("none", "full")
    }
    chunk_peak = logits_bytes(cfg, CHUNK)
    # full checkpointing: what the forward keeps, and one block recomputed in the backward
    # (a block's activations: what the layers keep without checkpointing, less their inputs)
    peak = {
        "none": saved["none"] + chunk_peak,
        "full": saved["full"] + (saved["none"] - saved["full"]) // cfg.num_layers + chunk_peak,
    }
    for mode, measured in peak.items():
        # what is saved, and at its peak one chunk's logits (not saved: recomputed)
        estimate = activation_bytes(cfg, tokens_BT.numel(), mode, CHUNK)
        print(f"{mode}: estimate {estimate} B, measured {measured} B")
        assert measured / 2 <= estimate <= 2 * measured, mode


def test_pure_bf16_masters_are_counted_in_bf16_and_warned_of():
    from async_rl.config import precision_warning

    path = ROOT / "configs/qwen3_30b_a3b_fp8.toml"
    mixed = make_plan(load_config(path, []), Cluster(nodes=3, gpus_per_node=8))
    pure = make_plan(load_config(path, ["learner.master_dtype=bfloat16"]), mixed.cluster)
    assert pure.learner["params"] * 2 == mixed.learner["params"]
    assert precision_warning(mixed.cfg) is None
    warning = precision_warning(pure.cfg)
    assert "rounds away" in warning and "6.1e-5" in warning and "learner.lr = 1e-06" in warning
    assert f"warning: {warning}" in pure.report() and "warning" not in mixed.report()
    with pytest.raises(ConfigError, match="learner.master_dtype.*model.dtype"):
        load_config(None, ["learner.master_dtype=bfloat16"])  # fp32 compute, bf16 masters


def test_a_tensor_parallel_actor_holds_a_share_per_gpu_and_takes_that_many_gpus():
    path = ROOT / "configs/qwen3_30b_a3b_fp8.toml"
    cluster = Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=80)
    one = make_plan(load_config(path, []), cluster)
    two = make_plan(load_config(path, ["actor.tensor_parallel_size=2"]), cluster)
    assert two.actor["weights"] == pytest.approx(one.actor["weights"] / 2, abs=1)
    assert two.actor["kv"] == pytest.approx(one.actor["kv"] / 2)
    assert not two.fits and any("= 32 devices, the cluster has 16" in p for p in two.problems)
    tight = make_plan(load_config(path, ["actor.gpu_memory_utilization=0.5"]), cluster)
    assert any("actor.gpu_memory_utilization gives it 40.00 GiB" in p for p in tight.problems)
    with pytest.raises(ConfigError, match="actor.tensor_parallel_size.*vLLM's on CUDA"):
        load_config(None, ["actor.tensor_parallel_size=2"])  # the embedded engine on CPU


def test_layouts_that_cannot_be_sharded_or_placed_are_config_errors():
    with pytest.raises(ConfigError, match="learner.expert_parallel.*num_experts"):
        load_config(None, ["learner.num_ranks=3", "learner.expert_parallel=3"])
    with pytest.raises(ConfigError, match="algo.prompts_per_minibatch.*whole groups"):
        load_config(None, ["learner.num_ranks=2", "algo.prompts_per_minibatch=3"])
    cores = os.cpu_count() or 1
    cfg = load_config(
        None, [f"learner.num_ranks={cores + 1}", f"algo.prompts_per_minibatch={cores + 1}"]
    )
    with pytest.raises(ConfigError, match=f"learner.num_ranks.*this machine has {cores}"):
        check_placement(cfg, None)
    check_placement(cfg, "127.0.0.1:6379")  # a cluster: Ray's placement group decides


def test_a_cuda_learner_needs_a_gpu_per_rank_and_flex_attention_needs_cuda():
    import torch

    from learner.parallel import DataParallel, training_device

    with pytest.raises(ConfigError, match="model.attn_backend.*no CPU backward"):
        load_config(None, ["model.attn_backend=flex"])  # the learner on the CPU
    load_config(None, ["model.attn_backend=flex", "learner.device=cuda"])
    gpus = torch.cuda.device_count()
    cfg = load_config(None, ["learner.device=cuda", f"learner.num_ranks={gpus + 1}"])
    with pytest.raises(ConfigError, match=f"learner.device.*this machine has {gpus}"):
        check_placement(cfg, None)
    assert training_device(DataParallel()) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="learner.device = cuda.*no CUDA device"):
            training_device(DataParallel(device_type="cuda"))


@pytest.mark.parametrize("share", [0.003, 0.1, 0.5])
def test_the_delta_estimate_is_the_bytes_of_a_real_delta_with_that_share_changed(share):
    """bf16 versions of the tiny model in which that share of every tensor's entries differ
    (one of them whole, past the 20% at which bf16 values alone are smaller)."""
    from async_rl.weights.delta import fingerprint, make_delta
    from learner.hf import hf_state_dict

    cfg = load_config(None, ["model.dtype=bfloat16"])
    model = build_model(cfg.model, seed=0)
    old = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model, cfg.model).items()}
    gen = torch.Generator().manual_seed(0)
    new = {}
    for k, t in old.items():
        n, flat = t.numel(), t.reshape(-1).clone()
        which = torch.randperm(n, generator=gen)[: math.ceil(share * n)]
        flat[which] = flat[which] * 2 + 1  # every chosen entry's bits change
        new[k] = flat.view(t.shape)
    delta = make_delta(old, new, 0, 1, fingerprint(old))
    estimate = make_plan(cfg, Cluster(delta_share=share)).delta_bytes
    # the plan counts the learner's stacked expert tensors: one entry's rounding per tensor
    assert abs(estimate - delta.nbytes) <= len(new) * (2 + 8)
    # rank 0 holds the version and, to compare against, the last one
    version = sum(t.numel() * t.element_size() for t in new.values())
    deltas = load_config(None, ["model.dtype=bfloat16", "weights.deltas=measure"])
    assert make_plan(deltas, Cluster()).publish_host_bytes == 2 * version
    assert make_plan(cfg, Cluster()).publish_host_bytes == version
