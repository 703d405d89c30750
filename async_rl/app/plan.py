"""`async-rl plan`: where a run's processes go and whether they fit, before anything starts.

    plan = make_plan(cfg, Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=80))
    print(plan.report())

Parameters are counted on torchtitan's model built on the meta device (no memory, any size),
so every number below follows the configured `[model]` exactly:
- a learner rank (FSDP2 shards every parameter on its first dimension over `learner.num_ranks`
  ranks, rank 0 holding the largest shard): parameters and gradients in `model.dtype`, AdamW's
  two moments in the same dtype (torch's AdamW keeps them in the parameter's dtype), and the
  activations one forward keeps for its backward at the micro-batch budget
  (`learner.max_tokens_per_microbatch`, else a whole mini-batch share of a rank at
  `model.max_seq_len`), with and without activation checkpointing;
- an actor, per GPU of its `actor.tensor_parallel_size` (1/tp of the whole): its weights (FP8:
  one byte per attention and expert weight, bf16 for embeddings,
  norms, routers and the output layer; else two bytes) and the KV cache of
  `actor.max_running_rows` rows at `model.max_seq_len`;
- a weight version: its bytes in `model.dtype`, and the time to move it at `--bandwidth-gbps`.
The activation estimate counts what each layer saves for the backward per token (module
`activation_bytes`); on the tiny model it is within 2x of what a forward actually saves
(tests/test_plan.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from async_rl.config import Config, ModelConfig

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


def activation_bytes(cfg: ModelConfig, tokens: int, checkpointing: str = "none") -> int:
    """What a training forward of `tokens` positions keeps for its backward, per rank.

    Per token and layer: the norms' and projections' inputs (about 6 D), queries, keys and
    values before and after their norms and RoPE and the attention output (3 Hq hd + 5 Hkv hd),
    router scores (E), and for each of the K experts a token goes to its gathered input, the
    SwiGLU's gate, up and product (4 F) and its output (3 D in all). The output layer keeps its
    logits and their float32 log-softmax (V (b + 4)). Full activation checkpointing keeps each
    block's input (D) and recomputes one block at a time; selective keeps about half.
    """
    b = DTYPE_BYTES[cfg.dtype]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 6 * cfg.dim + 3 * q + 5 * kv + cfg.num_experts
    per_layer += cfg.top_k * (4 * cfg.moe_hidden_dim + 3 * cfg.dim)
    logits = cfg.vocab_size * (b + 4)
    if checkpointing == "full":
        kept = cfg.num_layers * cfg.dim + per_layer
    elif checkpointing == "selective":
        kept = cfg.num_layers * per_layer // 2
    else:
        kept = cfg.num_layers * per_layer
    return tokens * (b * kept + logits)


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
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for `async-rl train`."""
        lrn = self.learner
        return (
            f"plan: {self.cfg.learner.num_ranks} learner rank(s) x {_gib(lrn['total'])} "
            f"(weights+grads+AdamW {_gib(lrn['params'] + lrn['grads'] + lrn['adamw'])}, "
            f"activations {_gib(lrn['activations'])}); {self.cfg.actor.num_actors} actor(s) x "
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
        seconds = self.version_bytes * 8 / (cl.bandwidth_gbps * 1e9)
        lines = [
            f"cluster: {where}",
            f"placement: learner {ranks} rank(s) (FSDP2 over {ranks}, expert parallel {ep}), "
            f"{cfg.actor.num_actors} actor(s) (up to {cfg.actor.max_actors}), "
            f"{cfg.actor.tensor_parallel_size} device(s) each",
            f"model: {lrn['numel'] / 1e9:.3f} B parameters, {cfg.model.dtype}",
            f"learner rank (rank 0, the largest shard): {_gib(lrn['total'])}",
            f"  parameters {_gib(lrn['params'])}, gradients {_gib(lrn['grads'])}, "
            f"AdamW {_gib(lrn['adamw'])}",
            f"  activations of a forward of {lrn['tokens']} positions: "
            f"{_gib(lrn['activations'])} ({cfg.learner.activation_checkpointing} checkpointing;"
            f" none {_gib(lrn['act_none'])}, selective {_gib(lrn['act_selective'])}, "
            f"full {_gib(lrn['act_full'])})",
            f"actor, per device: {_gib(act['total'])} = weights {_gib(act['weights'])} "
            f"({cfg.actor.quantization}) + KV cache {_gib(act['kv'])} "
            f"({cfg.actor.max_running_rows} rows x {cfg.model.max_seq_len} positions; "
            f"{act['rows_that_fit']} rows fit)",
            f"weight version: {_gib(self.version_bytes)}, {seconds:.1f}s per actor at "
            f"{cl.bandwidth_gbps:g} Gb/s",
            "fits" if self.fits else "DOES NOT FIT:\n  " + "\n  ".join(self.problems),
        ]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:.2f} MiB"


def make_plan(cfg: Config, cluster: Cluster) -> Plan:
    m, lrn, act = cfg.model, cfg.learner, cfg.actor
    shapes = parameter_shapes(m)
    b = DTYPE_BYTES[m.dtype]
    numel = sum(math.prod(s) for s in shapes.values())
    shard = shard_numel(shapes, lrn.num_ranks) * b
    tokens = forward_tokens(cfg)
    acts = {mode: activation_bytes(m, tokens, mode) for mode in ("none", "selective", "full")}
    plan = Plan(cfg, cluster, version_bytes=numel * b)
    plan.learner = {
        "numel": numel,
        "params": shard,
        "grads": shard,
        "adamw": 2 * shard,
        "tokens": tokens,
        "activations": acts[lrn.activation_checkpointing],
        **{f"act_{mode}": v for mode, v in acts.items()},
    }
    plan.learner["total"] = 4 * shard + plan.learner["activations"]
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
