"""Data-parallel learner: two gloo ranks with FSDP2 make the same update as one process."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from async_rl.config import ModelConfig, load_config
from learner.batch import PackedBatch, microbatches, split_to
from learner.checkpoint import Snapshot, full_tensors, load_checkpoint
from learner.hf import hf_state_dict
from learner.model import DTYPES, build_model
from learner.parallel import (
    DataParallel,
    apply_fsdp,
    backend_for,
    full_state_dict,
    init_distributed,
    local_batch,
    mean_over_ranks,
    share_rows,
    shutdown,
)
from learner.train import TrainStep
from tests.helpers import random_batch

CFG = ModelConfig()
G, NUM_GROUPS, WORLD = 2, 4, 2
# (num_minibatches, routing_replay, optimizer, expert_parallel). SGD passes gradient roundoff on
# unchanged, so weights must agree to float precision. AdamW's first step is lr * g / (|g| + eps):
# for a small gradient element (|g| ~ 1e-7, e.g. an expert that saw few tokens) the different
# summation order across ranks moves the update by ~lr * eps * dg / g^2, measured: up to ~2% of lr
# on ~2% of the weights; the next gradient then sees those weights. So the AdamW case checks the
# first gradient exactly and the weights to a share of lr. (Adam and clipping hide a wrongly scaled
# gradient; the SGD cases and the pre-clip `grad_norm` metric do not.)
CASES = [
    (1, "none", "sgd", 1),
    (1, "r2", "sgd", 1),
    (2, "none", "sgd", 1),
    (2, "r2", "sgd", 1),
    (2, "r3", "sgd", 1),
    (2, "r2", "adamw", 1),
    # expert parallelism over the 2 ranks (the 4th field): tokens to their experts' rank and
    # back by gloo's all_to_all_single
    (1, "none", "sgd", 2),
    (2, "r3", "sgd", 2),
    # mixed precision (a 5th field): fp32 masters computing in bf16, FSDP2's MixedPrecisionPolicy
    # on both sides (one process: over a mesh of one rank)
    (2, "r2", "sgd", 1, "bfloat16"),
    (2, "r3", "sgd", 2, "bfloat16"),
    # micro-batches of at most 16 positions (a 6th field): the ranks' rows need different
    # numbers of them, and every rank must run as many forwards as the one needing most
    (2, "r2", "sgd", 2, "float32", 16),
]
LR = {"sgd": 0.5, "adamw": 1e-2}
# share of the largest gradient by which a first bf16 update may differ (measured: 0.4%); later
# updates start from weights that differ by as much, and may differ 10 times more (measured 4.2%)
BF16_TOL = 1e-2
NUM_STEPS = {"sgd": 2, "adamw": 1}
GRAD_CLIP = 0.5
METRICS = ("loss", "grad_norm", "entropy", "clip_frac", "train_infer_kl", "routing_agreement")
METRICS += ("abs_log_rho_p99", "abs_log_rho_p99_steady", "is_ess")  # gathered over ranks
ROUTING = ("routing_flip_update",)  # N > 1


def global_batch(seed: int) -> PackedBatch:
    return random_batch(seed, NUM_GROUPS, G, CFG)


def train(
    num_minibatches: int,
    replay: str,
    optimizer: str,
    ep: int,
    dtype: str = "float32",
    budget: int = 0,
    dp: DataParallel | None = None,
):
    """Global steps from a seeded model computing in `dtype` over fp32 masters: gathered
    weights, each step's metrics, and the clipped gradient of every update as
    `{"<update>/<parameter>": tensor}`."""
    model = build_model(CFG, seed=0, dtype=torch.float32)
    if dp is not None:
        apply_fsdp(model, dp, expert_parallel=ep, compute_dtype=DTYPES[dtype])
    elif dtype != "float32":  # the reference: one process, all experts its own
        apply_fsdp(model, DataParallel(), compute_dtype=DTYPES[dtype])
    try:
        return _train(model, num_minibatches, replay, optimizer, dtype, budget, dp)
    finally:
        if dp is None:
            shutdown()  # the one-process group of mixed precision


def _train(model, num_minibatches, replay, optimizer, dtype, budget, dp):
    lr = LR[optimizer]
    opt_class = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_class(model.parameters(), lr=lr)
    grads, names = {}, {p: n for n, p in model.named_parameters()}

    def keep_grads(optimizer, *_):  # collective under FSDP: every rank runs it
        update = len(grads) // len(names)
        for p in optimizer.param_groups[0]["params"]:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[f"{update}/{names[p]}"] = g.detach().clone()

    opt.register_step_pre_hook(keep_grads)
    cfg = load_config(
        None,
        [
            f"algo.group_size={G}",
            f"algo.num_minibatches={num_minibatches}",
            f"algo.routing_replay={replay}",
            f"learner.grad_clip={GRAD_CLIP}",
            f"learner.lr={lr}",
            f"model.dtype={dtype}",
            f"learner.max_tokens_per_microbatch={budget}",
            f"model.max_seq_len={16 if budget else CFG.max_seq_len}",
            "run.num_steps=100",
        ],
    )
    step = TrainStep(model, opt, cfg, dp=dp)
    metrics = [step(global_batch(seed)) for seed in range(NUM_STEPS[optimizer])]
    return full_state_dict(model), metrics, grads


def adamw_learner(dp: DataParallel | None, dtype: str = "float32"):
    """A seeded model (sharded over `dp`'s ranks, computing in `dtype` over fp32 masters),
    its AdamW and N = 2 R2 train step."""
    model = build_model(CFG, seed=0, dtype=torch.float32)
    if dp is not None:
        apply_fsdp(model, dp, compute_dtype=DTYPES[dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=LR["adamw"])
    overrides = [f"algo.group_size={G}", "algo.num_minibatches=2", "algo.routing_replay=r2"]
    overrides.append(f"model.dtype={dtype}")
    step = TrainStep(model, opt, load_config(None, [*overrides, "run.num_steps=100"]), dp=dp)
    return model, opt, step


def resave(source: Path, out: Path, dp: DataParallel | None) -> None:
    """Load a checkpoint (on `dp`'s ranks) and write it again: what the ranks hold of it."""
    model, opt, _ = adamw_learner(dp)
    load_checkpoint(source, model, opt)
    Snapshot.take(1, model, opt, {}).write(out, token="t")  # every rank its own shards


def trained_checkpoint(out: Path, dp: DataParallel | None) -> None:
    """One global step (two AdamW updates) on `dp`'s ranks, checkpointed."""
    model, opt, step = adamw_learner(dp)
    step(global_batch(0))
    Snapshot.take(1, model, opt, {}).write(out, token="t")
    return model, opt


def local_bytes(model, opt) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and AdamW moments (its shards under FSDP)."""

    def nbytes(tensors):
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in tensors)

    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": nbytes(model.parameters()),
        "grads": nbytes(p.grad for p in model.parameters()),
        "adamw": nbytes(moments),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dp = init_distributed("cpu")
    try:
        # checkpoints: one written by one process, loaded by two ranks; one written by two
        resave(Path(out_dir) / "one" / "step-000001", Path(out_dir) / "one-on-two", dp)
        model, opt = trained_checkpoint(Path(out_dir) / "two", dp)
        gathered = full_state_dict(model)
        experts = build_model(CFG, seed=0)  # expert parallel: experts sharded another way
        apply_fsdp(experts, dp, expert_parallel=WORLD)
        Snapshot.take(0, experts, torch.optim.AdamW(experts.parameters()), {}).write(
            Path(out_dir) / "ep", token="t"
        )
        mixed, mixed_opt, mixed_step = adamw_learner(dp, "bfloat16")
        mixed_step(global_batch(0))
        if dp.is_main:  # rank 0 holds the largest shards, which the planner counts
            for dtype, pair in (("float32", (model, opt)), ("bfloat16", (mixed, mixed_opt))):
                sizes = json.dumps(local_bytes(*pair))
                (Path(out_dir) / f"rank0-bytes-{dtype}.json").write_text(sizes)
            save_file(gathered, f"{out_dir}/two-gathered.safetensors")
        # weights for publishing: gathered in buckets of 64 KiB, kept by rank 0 alone
        hf = hf_state_dict(model, CFG, bucket_bytes=64 * 1024, keep=dp.is_main)
        full = full_state_dict(model)
        if dp.is_main:
            save_file(hf, f"{out_dir}/published.safetensors")
            save_file(full, f"{out_dir}/published-full.safetensors")
        else:
            assert hf == {}
        for case in CASES:
            state, metrics, grads = train(*case, dp=dp)
            if dp.is_main:  # rank 0 alone writes, as it alone publishes weights in a run
                name = "-".join(map(str, case))
                save_file(state, f"{out_dir}/{name}.safetensors")
                save_file(grads, f"{out_dir}/{name}-grads.safetensors")
                Path(f"{out_dir}/{name}.json").write_text(json.dumps(metrics))
    finally:
        shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every case on 2 gloo ranks (one spawn) while this process computes the references."""
    out = tmp_path_factory.mktemp("dp")
    # fork when this process has no other threads: the workers inherit torch and torchtitan
    # (8 s of imports each); spawn otherwise.
    method = "fork" if threading.active_count() == 1 else "spawn"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # three processes share the cores; idle OpenMP threads spin
    trained_checkpoint(out / "one", None)
    ctx = mp.start_processes(
        _worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=False, start_method=method
    )
    try:
        references = {case: train(*case) for case in CASES}
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("data-parallel workers did not finish in 300 s")
    finally:
        torch.set_num_threads(threads)
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join()
    resave(out / "two" / "step-000001", out / "two-on-one", None)
    results = {"checkpoints": out}
    for case in CASES:
        name = "-".join(map(str, case))
        results[case] = (
            load_file(out / f"{name}.safetensors"),
            json.loads((out / f"{name}.json").read_text()),
            load_file(out / f"{name}-grads.safetensors"),
        )
    return references, results


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_update_like_one_process(two_ranks, case):
    references, results = two_ranks
    ref_state, ref_metrics, ref_grads = references[case]
    state, metrics, grads = results[case]
    mixed = case[4:5] == ("bfloat16",)
    assert all(t.dtype == torch.float32 for t in (*state.values(), *grads.values()))
    assert grads.keys() == ref_grads.keys()
    num_updates = len(ref_grads) // len({k.split("/")[1] for k in ref_grads})
    for update in range(num_updates):
        keys = [k for k in ref_grads if k.startswith(f"{update}/")]
        grad_diff = max((grads[k] - ref_grads[k]).abs().max().item() for k in keys)
        grad_max = max(ref_grads[k].abs().max().item() for k in keys)
        print(f"{case} update {update}: max |g_dp - g| = {grad_diff:.3g} (max |g| {grad_max:.3g})")
        # The clipped gradient of the whole mini-batch. After an AdamW update the weights
        # differ a little (see CASES), and so do later gradients. In bf16 a rank's rows are
        # computed (and each rank's gradient rounded) in bf16 before the fp32 reduction.
        exact = case[2] == "sgd" or update == 0
        if mixed:
            assert grad_diff < (1 if update == 0 else 10) * BF16_TOL * grad_max
        else:
            assert grad_diff < (1e-5 if exact else 1e-3) * grad_max
    diffs = torch.cat([(state[k] - w).abs().flatten() for k, w in ref_state.items()])
    off = (diffs > 1e-6).float().mean().item()
    print(f"{case}: max |w_dp - w| = {diffs.max():.3g}, share of weights off by > 1e-6: {off:.2%}")
    if mixed:  # SGD: lr times the gradients' bf16 differences, summed over the updates
        largest = max(g.abs().max() for g in ref_grads.values())
        assert diffs.max() < 10 * BF16_TOL * LR["sgd"] * largest * num_updates
    elif case[2] == "sgd":
        assert diffs.max() < 1e-6
    else:
        assert diffs.max() < 0.05 * LR["adamw"] and off < 0.05
    assert any(m["grad_norm"] > GRAD_CLIP for m in ref_metrics)  # clipping was active
    rel = BF16_TOL if mixed else 1e-5 if case[2] == "sgd" else 1e-4  # AdamW: see CASES
    for ref, got in zip(ref_metrics, metrics, strict=True):
        for key in METRICS + tuple(k for k in ROUTING if k in ref):
            assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-6), key
        assert got["num_tokens"] == ref["num_tokens"]


def test_replay_changed_the_update(two_ranks):
    """The cases differ from each other, so agreement per case is not agreement by accident."""
    references, _ = two_ranks
    router = {c: references[c][0]["layers.0.moe.router.gate.weight"] for c in CASES}
    assert not torch.equal(router[(2, "none", "sgd", 1)], router[(2, "r2", "sgd", 1)])
    assert not torch.equal(router[(2, "r2", "sgd", 1)], router[(2, "r3", "sgd", 1)])
    fp32, bf16 = router[(2, "r2", "sgd", 1)], router[(2, "r2", "sgd", 1, "bfloat16")]
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=1e-2)


def test_the_micro_batch_case_needs_different_counts_on_the_two_ranks():
    """What the micro-batch case of CASES exercises: without `split_to` the ranks would run
    different numbers of (collective) forwards in some mini-batch."""
    budget = next(c[5] for c in CASES if len(c) > 5)

    def counts(seed: int, i: int) -> set[int]:
        out = set()
        for rank in range(WORLD):
            local = local_batch(global_batch(seed), 2, DataParallel(rank, WORLD), group_size=G)
            size = local.num_rows // 2
            out.add(len(microbatches(local.rows(i * size, (i + 1) * size), budget)))
        return out

    assert any(len(counts(seed, i)) > 1 for seed in range(NUM_STEPS["sgd"]) for i in range(2))


def test_split_to_halves_the_largest_micro_batch_until_there_are_enough():
    parts = split_to([torch.tensor([0, 1, 2]), torch.tensor([3])], 4)
    assert [p.tolist() for p in parts] == [[0], [1], [2], [3]]
    assert [p.tolist() for p in split_to([torch.tensor([0, 1, 2, 3])], 2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="at least 3 rows"):
        split_to([torch.tensor([0, 1])], 3)


def test_rank_shares_are_contiguous_whole_groups_of_every_minibatch():
    shares = [share_rows(8, 2, DataParallel(r, 2), group_size=2).tolist() for r in range(2)]
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert share_rows(8, 1, DataParallel(1, 2), group_size=2).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="num_minibatches"):
        share_rows(8, 4, DataParallel(0, 2), group_size=2)
    with pytest.raises(ValueError, match="do not split"):
        share_rows(8, 3, DataParallel(0, 2))


def test_local_batch_holds_the_rows_trimmed():
    batch = global_batch(0)
    local = local_batch(batch, 2, DataParallel(1, 2), group_size=2)
    index = [2, 3, 6, 7]
    width = int(batch.mask_BT[index].any(0).nonzero().max()) + 1
    assert local.inputs_BT.shape == (4, width)
    assert torch.equal(local.inputs_BT, batch.inputs_BT[index, :width])
    assert torch.equal(local.routing_BTLK, batch.routing_BTLK[index, :width])
    assert torch.equal(local.rewards_B, batch.rewards_B[index])


def test_init_distributed_reads_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == DataParallel(0, 1, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="device_type"):
        init_distributed("tpu")
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    single = DataParallel()
    assert mean_over_ranks({"a": 1.5}, 3.0, single) == {"a": 1.5}
    assert single.is_main and not single.enabled


def test_train_step_refuses_an_unsharded_model_with_several_ranks(make_step):
    model = build_model(CFG, seed=0)
    with pytest.raises(ValueError, match="apply_fsdp"):
        make_step(model, dp=DataParallel(0, 2))


@pytest.mark.parametrize("written, loaded", [("one", "one-on-two"), ("two", "two-on-one")])
def test_a_checkpoint_resumes_on_another_number_of_ranks(two_ranks, written, loaded):
    """Written by one process and loaded by two ranks, or the reverse: the ranks hold exactly
    the checkpoint's model and AdamW state (gathered again and compared tensor by tensor)."""
    out = two_ranks[1]["checkpoints"]
    for part in ("model", "optimizer"):
        want = full_tensors(out / written / "step-000001", part)
        got = full_tensors(out / loaded / "step-000001", part)
        assert got.keys() == want.keys()
        for name in want:
            if name != "rng.torch":
                assert torch.equal(got[name], want[name]), f"{part}: {name}"
    assert any(k.endswith("exp_avg_sq") for k in want)


def test_every_rank_writes_its_own_shards_of_a_checkpoint(two_ranks):
    """Two ranks, two sets of files, each about half of the model; put together, the model
    the ranks held (gathered by FSDP)."""
    out = two_ranks[1]["checkpoints"]
    step = out / "two" / "step-000001"
    assert json.loads((step / "state.json").read_text())["world"] == WORLD
    sizes = [
        sum(t.numel() for t in load_file(step / f"model-r{r:05d}.safetensors").values())
        for r in range(WORLD)
    ]
    assert min(sizes) > 0.4 * sum(sizes)
    gathered = load_file(out / "two-gathered.safetensors")
    whole = full_tensors(step)
    assert whole.keys() == gathered.keys()
    assert all(torch.equal(whole[k], gathered[k]) for k in gathered)
    assert not list(out.glob("two/.step-*"))  # committed: nothing half-written is left
    written = full_tensors(out / "ep" / "step-000000")  # written by 2 expert-parallel ranks
    want = build_model(CFG, seed=0).state_dict()
    assert written.keys() == want.keys()
    assert all(torch.equal(written[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_planner_counts_the_shards_of_rank_0(two_ranks, dtype):
    """fp32 masters, gradients and moments, whichever dtype the ranks compute in."""
    from async_rl.tools.plan import Cluster, make_plan

    out = two_ranks[1]["checkpoints"]
    real = json.loads((out / f"rank0-bytes-{dtype}.json").read_text())
    cfg = load_config(None, ["learner.num_ranks=2", f"algo.group_size={G}", f"model.dtype={dtype}"])
    plan = make_plan(cfg, Cluster())
    assert {k: plan.learner[k] for k in real} == real


def test_weights_are_gathered_in_buckets_to_rank_0(two_ranks):
    out = two_ranks[1]["checkpoints"]
    model = build_model(CFG, seed=0)
    model.load_state_dict(load_file(out / "published-full.safetensors"))
    want = hf_state_dict(model, CFG)  # one process, all at once
    got = load_file(out / "published.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and in one process, buckets change nothing
    buckets = hf_state_dict(model, CFG, bucket_bytes=4096)
    assert all(torch.equal(buckets[k], want[k]) for k in want)
