"""`async-rl plan`: where a run's processes go and whether they fit, before anything starts.

    plan = make_plan(cfg, Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=80))
    print(plan.report())

Parameters are counted on torchtitan's model built on the meta device (no memory, any size),
so every number below follows the configured `[model]` exactly:
- a learner rank (FSDP2 shards every parameter on its first dimension over `learner.num_ranks`
  ranks, rank 0 holding the largest shard): master parameters, their gradients and AdamW's
  two moments in `learner.master_dtype` (fp32: 16 bytes per parameter of the shard); under
  FSDP (several ranks, or a compute dtype other than the masters') the units in flight in
  `model.dtype`: the transformer block being computed and the one prefetched, the output
  layer's unit (kept unsharded from its forward to its backward) and the block's unsharded
  gradient before its fp32 reduce-scatter; and the activations one forward keeps for its
  backward at the micro-batch budget (`learner.max_tokens_per_microbatch`, else a whole
  mini-batch share of a rank at `model.max_seq_len`), with and without activation
  checkpointing, with the vocabulary's logits of one chunk of `learner.logprob_chunk`
  positions;
- an actor, per GPU of its `actor.tensor_parallel_size` (1/tp of the whole): its weights (FP8:
  one byte per attention and expert weight, bf16 for embeddings,
  norms, routers and the output layer; else two bytes) and the KV cache of
  `actor.max_running_rows` rows at `model.max_seq_len`;
- a weight version: its bytes in `model.dtype`, and the time to move it at `--bandwidth-gbps`;
  as a sparse delta (`weights.deltas`) when `--delta-share` of its entries change: 8
  bytes of index and the value per changed entry, a tensor whole where that is smaller.
The activation estimate counts what each layer saves for the backward per token (module
`activation_bytes`); on the tiny model it is within 2x of what a forward actually saves
(tests/unit/test_plan.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import get_args

from async_rl.choices import ActivationCheckpointing
from async_rl.config import Config, ModelConfig, precision_warning
from async_rl.run.placement import placement_lines

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
KV_BYTES = 2  # bf16 keys and values in the inference engine
# what an FP8 actor keeps in bf16: embeddings, norms, routers and the output layer
BF16_IN_FP8 = ("embeddings", "norm", "router", "lm_head")
MEMORY_SHARE = 0.9  # of a GPU's memory a process may plan to use (the rest: CUDA, fragments)


@dataclass(frozen=True)
class Cluster:
    """The machines a run is planned for; `gpus_per_node = 0` plans processes on CPUs."""

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_mem_gib: float = 80.0
    bandwidth_gbps: float = 100.0  # between the learner and the actors, per actor
    delta_share: float = 0.003  # entries of a version that change (bf16, fp32 masters, lr 1e-6)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def local(cls, cfg: Config) -> Cluster:
        """This machine: its GPUs when the actors run on CUDA, else CPU processes."""
        if cfg.actor.device != "cuda":
            return cls()
        import torch

        count = torch.cuda.device_count()
        memory = torch.cuda.get_device_properties(0).total_memory / GIB if count else 0.0
        return cls(1, count, memory)


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of the learner's model (torchtitan names)."""
    import torch

    from learner.model import titan_config

    with torch.device("meta"):
        model = titan_config(cfg).build()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_numel(shapes: dict[str, tuple[int, ...]], ranks: int) -> int:
    """Elements of rank 0's FSDP2 shards: every parameter split on dim 0 as `torch.chunk`."""
    return sum(
        math.ceil(shape[0] / ranks) * math.prod(shape[1:]) if shape else 1
        for shape in shapes.values()
    )


def activation_bytes(
    cfg: ModelConfig, tokens: int, checkpointing: str = "none", chunk: int = 1024
) -> int:
    """What a training forward of `tokens` positions keeps for its backward, per rank, and
    the vocabulary's logits of one chunk of `chunk` positions at its peak.

    Per token and layer: the norms' and projections' inputs (about 6 D), queries, keys and
    values before and after their norms and RoPE and the attention output (3 Hq hd + 5 Hkv hd),
    router scores (E), and for each of the K experts a token goes to its gathered input, the
    SwiGLU's gate, up and product (4 F) and its output (3 D in all); then the final norm's
    output (D), which the chunked log-probs keep. Full activation checkpointing keeps each
    block's input (D) and recomputes one block at a time; selective keeps about half. The
    output layer (`learner.model.VocabChunks`) holds one chunk's float32 log-softmax and
    gradients: `chunk V (b + 12)`, whatever the number of tokens.
    """
    b = DTYPE_BYTES[cfg.dtype]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 6 * cfg.dim + 3 * q + 5 * kv + cfg.num_experts
    per_layer += cfg.top_k * (4 * cfg.moe_hidden_dim + 3 * cfg.dim)
    if checkpointing == "full":
        kept = cfg.num_layers * cfg.dim + per_layer
    elif checkpointing == "selective":
        kept = cfg.num_layers * per_layer // 2
    else:
        kept = cfg.num_layers * per_layer
    return tokens * b * (kept + cfg.dim) + logits_bytes(cfg, min(tokens, chunk))


def logits_bytes(cfg: ModelConfig, positions: int) -> int:
    """The peak of one chunk's vocabulary, in its backward: the recomputed float32
    log-softmax, the one-hot upstream gradient and the logits' gradient (float32, and in
    `model.dtype`)."""
    return positions * cfg.vocab_size * (DTYPE_BYTES[cfg.dtype] + 12)


def in_flight_bytes(cfg: Config, shapes: dict[str, tuple[int, ...]]) -> int:
    """What FSDP2 holds unsharded in `model.dtype` on a rank besides its shards: the largest
    block twice (computed, prefetched), the norm + output unit (unsharded from its forward
    to its backward), and the block's gradient before its reduce-scatter (`model.dtype`, and
    its fp32 copy for the reduction). A block's routed experts are gathered over the ranks
    of its expert-parallel group only (1/`learner.expert_parallel` of them). 0 without FSDP
    (one process computing in its masters' dtype)."""
    if cfg.learner.num_ranks == 1 and cfg.model.dtype == cfg.learner.master_dtype:
        return 0
    ep, blocks, head = cfg.learner.expert_parallel, {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + (numel // ep if "experts" in name else numel)
        elif not name.startswith("tok_embeddings"):
            head += numel
    layer, b = max(blocks.values()), DTYPE_BYTES[cfg.model.dtype]
    return b * (2 * layer + head) + (b + 4) * layer


def forward_tokens(cfg: Config) -> int:
    """Positions of the largest forward of a learner rank."""
    if cfg.learner.max_tokens_per_microbatch:
        return cfg.learner.max_tokens_per_microbatch
    rows = cfg.algo.prompts_per_minibatch * cfg.algo.group_size // cfg.learner.num_ranks
    return rows * cfg.model.max_seq_len


@dataclass
class Plan:
    cfg: Config
    cluster: Cluster
    learner: dict[str, int] = field(default_factory=dict)  # bytes per rank
    actor: dict[str, int] = field(default_factory=dict)  # bytes per actor
    version_bytes: int = 0
    delta_bytes: int = 0  # a version as a sparse delta at `cluster.delta_share`
    problems: list[str] = field(default_factory=list)

    @property
    def publish_host_bytes(self) -> int:
        """What rank 0 holds in host memory to publish a version (`Publisher.peak_bytes`
        without the bucket in flight): the version, and the last one with weight deltas."""
        return self.version_bytes * (1 if self.cfg.weights.deltas == "off" else 2)

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for `async-rl train`."""
        lrn = self.learner
        return (
            f"plan: {self.cfg.learner.num_ranks} learner rank(s) x {_gib(lrn['total'])} "
            f"({self.cfg.learner.master_dtype} weights+grads+AdamW "
            f"{_gib(lrn['params'] + lrn['grads'] + lrn['adamw'])}, "
            f"in flight {_gib(lrn['in_flight'])}, activations {_gib(lrn['activations'])}); "
            f"{self.cfg.actor.num_actors} actor(s) x "
            f"{_gib(self.actor['total'])}; a weight version {_gib(self.version_bytes)}"
            + ("" if self.fits else f"; DOES NOT FIT: {'; '.join(self.problems)}")
        )

    def report(self) -> str:
        cfg, cl = self.cfg, self.cluster
        lrn, act = self.learner, self.actor
        where = (
            f"{cl.nodes} node(s) x {cl.gpus_per_node} GPUs x {cl.gpu_mem_gib:g} GiB"
            if cl.gpus
            else "CPU processes"
        )
        ranks, ep = cfg.learner.num_ranks, cfg.learner.expert_parallel
        master = cfg.learner.master_dtype
        precision = (
            f"{cfg.model.dtype} compute over {master} masters"
            if master != cfg.model.dtype
            else cfg.model.dtype
        )
        seconds = self.version_bytes * 8 / (cl.bandwidth_gbps * 1e9)
        lines = [
            f"cluster: {where}",
            f"placement: learner {ranks} rank(s) (FSDP2 over {ranks}, expert parallel {ep}), "
            f"{cfg.actor.num_actors} actor(s) (up to {cfg.actor.max_actors}), "
            f"{cfg.actor.tensor_parallel_size} device(s) each",
            *(f"  {line}" for line in placement_lines(cfg)),
            f"model: {lrn['numel'] / 1e9:.3f} B parameters, {precision}",
            f"learner rank (rank 0, the largest shard): {_gib(lrn['total'])}",
            f"  {master} parameters {_gib(lrn['params'])}, gradients {_gib(lrn['grads'])}, "
            f"AdamW {_gib(lrn['adamw'])}; {cfg.model.dtype} units in flight (FSDP) "
            f"{_gib(lrn['in_flight'])}",
            f"  activations of a forward of {lrn['tokens']} positions: "
            f"{_gib(lrn['activations'])} ({cfg.learner.activation_checkpointing} checkpointing;"
            f" none {_gib(lrn['act_none'])}, selective {_gib(lrn['act_selective'])}, "
            f"full {_gib(lrn['act_full'])}), of which the logits of a chunk of "
            f"{min(lrn['tokens'], cfg.learner.logprob_chunk)} positions {_gib(lrn['logits'])}",
            f"actor, per device: {_gib(act['total'])} = weights {_gib(act['weights'])} "
            f"({cfg.actor.quantization}) + KV cache {_gib(act['kv'])} "
            f"({cfg.actor.max_running_rows} rows x {cfg.model.max_seq_len} positions; "
            f"{act['rows_that_fit']} rows fit)",
            f"weight version: {_gib(self.version_bytes)}, {seconds:.1f}s per actor at "
            f"{cl.bandwidth_gbps:g} Gb/s; as a delta with {cl.delta_share:.2%} of its entries "
            f"changed {_gib(self.delta_bytes)}, "
            f"{self.delta_bytes * 8 / (cl.bandwidth_gbps * 1e9):.2f}s",
            f"  host memory of rank 0 to publish it: {_gib(self.publish_host_bytes)} (the version"
            + (
                ", and the last one to compare against: weights.deltas)"
                if cfg.weights.deltas != "off"
                else "; x2 with weights.deltas)"
            ),
            "fits" if self.fits else "DOES NOT FIT:\n  " + "\n  ".join(self.problems),
        ]
        if warning := precision_warning(cfg):
            lines.insert(3, f"warning: {warning}")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:.2f} MiB"


def make_plan(cfg: Config, cluster: Cluster) -> Plan:
    m, lrn, act = cfg.model, cfg.learner, cfg.actor
    shapes = parameter_shapes(m)
    b, mb = DTYPE_BYTES[m.dtype], DTYPE_BYTES[lrn.master_dtype]
    numel = sum(math.prod(s) for s in shapes.values())
    shard = shard_numel(shapes, lrn.num_ranks) * mb
    tokens = forward_tokens(cfg)
    acts = {
        mode: activation_bytes(m, tokens, mode, lrn.logprob_chunk)
        for mode in get_args(ActivationCheckpointing)
    }
    plan = Plan(cfg, cluster, version_bytes=numel * b)
    plan.delta_bytes = sum(
        min(n * b, math.ceil(cluster.delta_share * n) * (b + 8))  # as `weights.delta`
        for n in (math.prod(s) for s in shapes.values())
    )
    plan.learner = {
        "numel": numel,
        "params": shard,
        "grads": shard,
        "adamw": 2 * shard,
        "in_flight": in_flight_bytes(cfg, shapes),
        "tokens": tokens,
        "logits": logits_bytes(m, min(tokens, lrn.logprob_chunk)),
        "activations": acts[lrn.activation_checkpointing],
        **{f"act_{mode}": v for mode, v in acts.items()},
    }
    lrn_bytes = plan.learner
    lrn_bytes["total"] = 4 * shard + lrn_bytes["in_flight"] + lrn_bytes["activations"]
    dense = sum(math.prod(s) for n, s in shapes.items() if any(k in n for k in BF16_IN_FP8))
    weights = (numel - dense) * 1 + dense * 2 if act.quantization == "fp8" else numel * 2
    # per GPU of the actor's tensor-parallel group: each holds 1/tp of the weights and KV heads
    tp = act.tensor_parallel_size
    weights = math.ceil(weights / tp)
    kv_row = m.max_seq_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * KV_BYTES / tp
    budget = cluster.gpu_mem_gib * GIB * MEMORY_SHARE
    actor_budget = cluster.gpu_mem_gib * GIB * act.gpu_memory_utilization  # what vLLM takes
    plan.actor = {
        "weights": weights,
        "kv": act.max_running_rows * kv_row,
        "total": weights + act.max_running_rows * kv_row,
        "rows_that_fit": max(int((actor_budget - weights) // kv_row), 0),
    }
    _check(plan, budget, actor_budget)
    return plan


def _check(plan: Plan, budget: float, actor_budget: float) -> None:
    cfg, cl = plan.cfg, plan.cluster
    if not cl.gpus:
        return  # processes on CPUs share the machine's memory; nothing per device to check
    tp = cfg.actor.tensor_parallel_size
    devices = cfg.learner.num_ranks + cfg.actor.max_actors * tp
    if devices > cl.gpus:
        plan.problems.append(
            f"learner.num_ranks + actor.max_actors x actor.tensor_parallel_size = {devices} "
            f"devices, the cluster has {cl.gpus}"
        )
    if plan.learner["total"] > budget:
        plan.problems.append(
            f"a learner rank needs {_gib(plan.learner['total'])}, a GPU offers "
            f"{_gib(budget)}: raise learner.num_ranks, lower learner.max_tokens_per_microbatch "
            "or set learner.activation_checkpointing"
        )
    if plan.actor["total"] > actor_budget:
        plan.problems.append(
            f"an actor needs {_gib(plan.actor['total'])} per GPU, actor.gpu_memory_utilization "
            f"gives it {_gib(actor_budget)}: at most {plan.actor['rows_that_fit']} rows of "
            "model.max_seq_len fit (actor.max_running_rows; or raise "
            "actor.tensor_parallel_size)"
        )
