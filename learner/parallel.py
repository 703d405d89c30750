"""Data parallelism for the learner: process group, FSDP2 over the ranks, each rank's rows.

Shape legend: B = rows (completions), T = positions, L = MoE layers, K = experts per token.

    dp = init_distributed()                 RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
                                            gloo on CPU, nccl on CUDA
    model = apply_fsdp(build_model(..., dtype=fp32), dp, compute_dtype=bf16)
                                            torchtitan's apply_fsdp_to_decoder, 1-D mesh,
                                            fp32 masters computing in bf16 (one rank too)
    optimizer = AdamW(model.parameters())   after FSDP: it swaps parameters for DTensors
    step = TrainStep(..., dp=dp, group_size=G)
    step(global_batch)                      every rank gets the same global batch and trains
                                            on its share of every mini-batch
    state = hf_state_dict(model, cfg, bucket, keep=dp.is_main)   (learner.hf) collective:
                                            every rank gathers a bucket at a time
                                            (`async_rl.weights.buckets`); rank 0 keeps it
                                            and alone publishes weights

Every rank takes a contiguous share of each mini-batch: mini-batch i has rows
`[i * M, (i + 1) * M)` of the global batch and rank r takes `[i * M + r * S, i * M + (r + 1) * S)`
with `S = M / world_size`, a whole number of groups. The proximal pass runs on a rank's own rows
only (R2 records, R3 replays, the routing of exactly those rows).

Why the update equals the single-process update of the whole mini-batch: the loss is a mean
over the mini-batch's responses, `L = (1/M) sum_i l_i`. Each rank computes its local mean over S
rows and back-propagates it times `S / M`; FSDP sums the gradients over ranks (torchtitan turns
off FSDP's own division), so the reduced gradient is `sum_r (S/M)(1/S) sum_{i in r} grad l_i =
grad L`. Gradient clipping uses the global norm: the gradients are sharded DTensors and
`clip_grad_norm_` reduces the norm over the mesh. Metrics are reduced too: the loss as the
row-weighted mean of local losses (the global loss), token means (entropy, the loss function's
metrics) weighted by each rank's completion tokens, `routing_agreement` by its real tokens.

FSDP2 on CPU with gloo (torch 2.13): sharding, all-gather and the optimizer step work; the
gradient reduce-scatter does not with FSDP's default op: with torchtitan's divide factor of 1
FSDP reduces with `ReduceOp.PREMUL_SUM`, which gloo rejects ("Cannot use ReduceOp.PREMUL_SUM with
Gloo"). `apply_fsdp` therefore forces plain-sum reductions on gloo
(`set_force_sum_reduction_for_comms`); NCCL keeps torchtitan's setting.

Under FSDP every forward and every state-dict gather is collective: all ranks run evaluation
together; weights are gathered a bucket at a time and checkpoints are written shard by shard
(`model.state_dict()` holds DTensor shards; the optimizer state too). `full_state_dict` gathers
everything at once (tests compare ranks with it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from learner.batch import PackedBatch

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits among the data-parallel ranks. `DataParallel()` is one process."""

    rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that publishes weights, writes checkpoints and logs metrics."""
        return self.rank == 0


def training_device(dp: DataParallel) -> torch.device:
    """The device this rank trains on: the CPU, or the GPU `join_group` gave it (the one
    Ray made visible, for a rank alone)."""
    if dp.device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("learner.device = cuda, but this learner process sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


def backend_for(device_type: str) -> str:
    """The process-group backend of a device type: gloo on CPU, nccl on CUDA."""
    backends = {"cpu": "gloo", "cuda": "nccl"}
    if device_type not in backends:
        raise ValueError(f"device_type: {device_type!r} is not one of {', '.join(backends)}")
    return backends[device_type]


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise ValueError(f"{name}: expected an integer environment variable, got {value!r}")
    return int(value)


def init_distributed(device_type: str | None = None, timeout_s: float = 600.0) -> DataParallel:
    """Join the process group described by RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    (`join_group`; rank 0 listens on MASTER_PORT).

    Without WORLD_SIZE (or with WORLD_SIZE = 1) this is one process and no group is created.
    `device_type` defaults to "cuda" when CUDA is available, else "cpu"; on CUDA each rank uses
    device LOCAL_RANK (default: RANK modulo the visible devices).
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend_for(device_type)  # refuses an unknown device type
    if dist.is_initialized():
        return DataParallel(dist.get_rank(), dist.get_world_size(), device_type)
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE: must be >= 1, got {world_size}")
    if world_size == 1:
        return DataParallel(0, 1, device_type)
    rank = _env_int("RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK: must lie in 0..{world_size - 1}, got {rank}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"{name}: not set; data parallelism needs {', '.join(ENV_VARS)}")
    port = _env_int("MASTER_PORT")
    return join_group(rank, world_size, os.environ["MASTER_ADDR"], port, timeout_s, device_type)


def open_rendezvous(host: str, world_size: int, timeout_s: float, attempts: int = 5):
    """Rank 0's side of a rendezvous: a TCPStore listening on a free port of `host`.

    The port is chosen by the system and taken at once by the store; if another process takes
    it in between, the next free port is tried. Returns `(store, port)`; the store must stay
    open while the group lives (`join_group(..., store=store)`).
    """
    last: Exception | None = None
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        try:
            store = dist.TCPStore(
                host,
                port,
                world_size,
                is_master=True,
                timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as e:  # taken between the probe and the store
            last = e
            continue
        return store, port
    raise RuntimeError(f"no free port for the learner's rendezvous on {host}: {last}")


def join_group(
    rank: int,
    world_size: int,
    host: str,
    port: int,
    timeout_s: float,
    device_type: str = "cpu",
    store=None,
) -> DataParallel:
    """Join the learner's process group (gloo on CPU, nccl on CUDA) with an explicit timeout,
    and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for the libraries that
    read them. Rank 0 passes the store of `open_rendezvous` (or listens on `port`); the others
    connect to it.

    A collective that waits longer than `timeout_s` for a peer raises instead of hanging.
    """
    if world_size == 1:
        return DataParallel(0, 1, device_type)
    local = rank
    if device_type == "cuda":  # a launcher's LOCAL_RANK, else RANK modulo the visible devices
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local),
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    timeout = timedelta(seconds=timeout_s)
    if store is None:  # rank 0 without `open_rendezvous` listens on `port` itself
        store = dist.TCPStore(
            host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend_for(device_type), store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    return DataParallel(rank, world_size, device_type)


def broadcast_bytes(payload: bytes | None, dp: DataParallel) -> bytes | None:
    """Rank 0's `payload` on every rank (None stands for "no more": the learner stops).

    Sent as a length and a uint8 tensor; nothing is pickled.
    """
    device = "cuda" if dp.device_type == "cuda" else "cpu"
    size = torch.tensor([-1 if payload is None else len(payload)], dtype=torch.int64)
    size = size.to(device)
    dist.broadcast(size, src=0)
    if int(size) < 0:
        return None
    if dp.is_main:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return payload if dp.is_main else data.cpu().numpy().tobytes()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def share_rows(num_rows: int, num_minibatches: int, dp: DataParallel, group_size: int = 1):
    """Indices `[B / world_size]` of this rank's rows: its contiguous share of every mini-batch.

    The global batch is `num_minibatches` consecutive mini-batches; each splits into
    `world_size` equal shares of whole groups of `group_size` rows.
    """
    if num_minibatches < 1 or num_rows % num_minibatches:
        raise ValueError(f"{num_rows} rows do not split into {num_minibatches} mini-batches")
    size = num_rows // num_minibatches
    if size % (dp.world_size * group_size):
        raise ValueError(
            f"num_minibatches: a mini-batch of {size} rows does not split into "
            f"{dp.world_size} ranks x whole groups of {group_size}; choose num_minibatches "
            f"so that mini-batches hold a multiple of {dp.world_size * group_size} rows"
        )
    share = size // dp.world_size
    starts = torch.arange(num_minibatches) * size + dp.rank * share
    return (starts[:, None] + torch.arange(share)).flatten()


def local_batch(
    batch: PackedBatch, num_minibatches: int, dp: DataParallel, group_size: int = 1
) -> PackedBatch:
    """This rank's rows of a global batch; its mini-batch i is local rows `[i * S, (i + 1) * S)`."""
    return batch.take(share_rows(batch.num_rows, num_minibatches, dp, group_size))


def apply_fsdp(
    model: torch.nn.Module,
    dp: DataParallel,
    expert_parallel: int = 1,
    compute_dtype: torch.dtype | None = None,
):
    """Shard `model` over the ranks with torchtitan's FSDP2 (`apply_fsdp_to_decoder`), in place;
    with `expert_parallel = ep > 1` the routed experts are first split over groups of ep ranks
    (torchtitan's expert parallelism: tokens go to their experts' rank and back by
    `all_to_all_single`, which gloo implements), and FSDP shards the experts over the
    remaining `world_size / ep` ranks.

    Mixed precision as torchtitan does it (FSDP2's `MixedPrecisionPolicy`): the sharded
    parameters, and so the gradients and AdamW's state, stay in the model's dtype (the
    master dtype, fp32), each unit is all-gathered in `compute_dtype` (default: the model's)
    for its forward and backward, and gradients are reduced in fp32. The same path serves one
    rank: a model whose compute dtype differs from its own is sharded over a mesh of one
    process (`one_process_group`), so that one rank and many train the same way. One process
    in its own dtype is returned unchanged. Gradients are summed over ranks, not averaged:
    `TrainStep` scales each rank's loss. Build the optimizer after this call.
    """
    dtype = next(model.parameters()).dtype
    compute_dtype = compute_dtype or dtype
    if not dp.enabled and compute_dtype == dtype:
        return model
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    if not dp.enabled:
        one_process_group(dp.device_type)
    if expert_parallel > 1:
        dims = _parallel_dims(dp, expert_parallel)
        model.parallelize(dims)
        apply_fsdp_to_decoder(
            model,
            dims.get_mesh("fsdp"),
            compute_dtype,
            torch.float32,
            pp_enabled=False,
            ep_degree=expert_parallel,
            edp_mesh=dims.get_optional_mesh("efsdp"),
        )
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dp.device_type, (dp.world_size,), mesh_dim_names=("fsdp",))
        apply_fsdp_to_decoder(model, mesh, compute_dtype, torch.float32, pp_enabled=False)
    if dist.get_backend() == "gloo":  # gloo has no PREMUL_SUM (module docstring)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def one_process_group(device_type: str = "cpu") -> None:
    """A process group of this process alone (an in-memory store, no port), unless one
    exists: what FSDP2 needs to shard a model over one rank. `shutdown` ends it."""
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(torch.cuda.current_device())
        dist.init_process_group(
            backend_for(device_type), store=dist.HashStore(), rank=0, world_size=1
        )


def _parallel_dims(dp: DataParallel, expert_parallel: int):
    """torchtitan's mesh for data parallelism over every rank with expert parallelism inside.

    torchtitan 0.3.0 takes its device type from the first accelerator it finds and falls back
    to "cuda" on a machine without one; on CPU its modules are told "cpu". Its default SPMD
    backend needs the mesh context its Trainer sets; ours is DTensor placements.
    """
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.models.common.token_dispatcher as token_dispatcher
    import torchtitan.tools.utils as titan_utils
    from torchtitan.distributed.utils import set_spmd_backend

    if dp.device_type == "cpu":
        for module in (parallel_dims, token_dispatcher, titan_utils):
            module.device_type, module.device_module = "cpu", torch.cpu
    set_spmd_backend("partial_dtensor")
    dims = parallel_dims.ParallelDims(
        dp_replicate=1,
        dp_shard=dp.world_size,
        cp=1,
        tp=1,
        pp=1,
        ep=expert_parallel,
        world_size=dp.world_size,
        spmd_backend="partial_dtensor",
    )
    dims.build_mesh()
    return dims


def check_sharded(model: torch.nn.Module, dp: DataParallel) -> None:
    """Raise unless `model` is FSDP-sharded when `dp` has several ranks (else no gradient sync)."""
    if dp.enabled and not isinstance(model, FSDPModule):
        raise ValueError(
            f"dp: world_size = {dp.world_size} but the model is not sharded; call "
            "learner.parallel.apply_fsdp(model, dp) before building the optimizer"
        )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every DTensor gathered to a full tensor, on CPU.

    Collective under FSDP: every rank must call it (rank 0 then publishes the result).
    """
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().cpu()
    return state


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global norm of `max_norm`; the norm before clipping, as a plain
    tensor. Sharded gradients are reduced over their mesh; with expert parallelism the experts
    live on a mesh of their own, and torchtitan's clipping combines the two norms."""
    params = list(model.parameters())
    if any(_on_ep_mesh(p) for p in params):
        from torchtitan.distributed.utils import clip_grad_norm_

        norm = clip_grad_norm_(params, max_norm, ep_enabled=True)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _on_ep_mesh(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ())


def max_over_ranks(value: int, dp: DataParallel) -> int:
    """The largest of every rank's `value` (collective; `value` itself with one process)."""
    if not dp.enabled:
        return value
    device = "cuda" if dp.device_type == "cuda" else "cpu"
    top = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top.item())


def mean_over_ranks(values: dict[str, float], weight: float, dp: DataParallel) -> dict[str, float]:
    """Weighted means across ranks, `sum_r w_r v_r / sum_r w_r`, in one all-reduce (float64).

    Every rank passes the same keys in the same order. A zero total weight gives 0.
    """
    if not dp.enabled:
        return dict(values)
    device = "cuda" if dp.device_type == "cuda" else "cpu"
    sums = torch.tensor([*(weight * v for v in values.values()), weight], dtype=torch.float64)
    sums = sums.to(device)
    dist.all_reduce(sums)
    total, means = sums[-1].item(), sums[:-1].tolist()
    return {k: (s / total if total else 0.0) for k, s in zip(values, means, strict=True)}


def gather_over_ranks(values: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    """Every rank's 1-D float64 `values` end to end, on every rank (collective; `values`
    itself with one process). Ranks may hold different numbers of values."""
    if not dp.enabled:
        return values
    device = "cuda" if dp.device_type == "cuda" else "cpu"
    size = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dp.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.zeros(max(max(counts), 1), dtype=torch.float64, device=device)
    padded[: values.numel()] = values.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n].cpu() for part, n in zip(parts, counts, strict=True)])
