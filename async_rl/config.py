"""Typed run configuration: one TOML file per run, dotted overrides, validation at start-up.

Every field is declared once below with its type, default, allowed values and a one-line doc;
the docs become `async-rl train --help` text and the README's config reference
(`python -m async_rl.config --markdown`). Errors are `ConfigError` and name the key:

    >>> load_config(None, ["algo.tis_cap=0"])
    Traceback (most recent call last):
    ConfigError: algo.tis_cap: must be > 0, got 0.0

This module imports nothing heavy: `--help` and `--dry-run` must answer in a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from async_rl.by_name import normalize_name
from async_rl.capabilities import ENGINE_CAPABILITIES
from async_rl.choices import (
    ActivationCheckpointing,
    ArithmeticOp,
    AttnBackend,
    Batching,
    Device,
    Dtype,
    DurableStoreKind,
    EngineKind,
    IsCorrection,
    KvOnSwap,
    LrSchedule,
    Quantization,
    RewardPool,
    RoutingReplay,
    TisMode,
    WandbMode,
    WeightDeltas,
    WeightStoreKind,
    WeightUpdate,
    choices,
)
from async_rl.rewards import BUILTIN as BUILTIN_REWARDS
from async_rl.rewards import load_reward
from async_rl.tasks import TASK_KINDS as BUILTIN_TASKS
from async_rl.tasks import load_task_class

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"


class ConfigError(ValueError):
    """A configuration mistake; `key` is the dotted name of the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _f(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = _f("tiny", "Run name; the run writes `<output_dir>/<name>/`.")
    output_dir: str = _f("runs", "Directory that holds run directories.")
    seed: int = _f(0, "Seed for the task stream, sampling and initialisation.", ge=0)
    num_steps: int = _f(50, "Global RL steps (learner versions) to train.", ge=1)
    eval_every: int = _f(10, "Held-out evaluation every this many global steps (0 = never).", ge=0)
    eval_k: int = _f(4, "Samples per held-out prompt for avg@k accuracy.", ge=1)
    init_checkpoint: str = _f(
        "", "Hugging Face checkpoint to start RL from; empty = the run's (cached) cold start."
    )
    bind_host: str = _f(
        "127.0.0.1",
        "Address the run's ZeroMQ sockets bind to; non-loopback needs run.curve_keys.",
    )
    curve_keys: str = _f(
        "", "Directory of CURVE keys (`async-rl keys DIR`); empty = no encryption, loopback only."
    )
    num_threads: int = _f(
        1, "torch threads per process (2 cores are shared by all processes).", ge=1
    )
    heartbeat_timeout_s: float = _f(
        120.0,
        "A process that answers no ping for this long (stopped, hung) is killed and restarted.",
        gt=0,
    )
    startup_timeout_s: float = _f(
        600.0,
        "Longest a starting process waits for another's endpoints (an actor for the learner's "
        "first published version); past it the process fails and its supervisor restarts it.",
        gt=0,
    )
    resources_timeout_s: float = _f(
        0.0,
        "On an autoscaling Ray cluster: how long to wait for nodes with the roles' resources "
        "(asked of the autoscaler) before refusing the run; 0 = refuse at once.",
        ge=0,
    )


@dataclass
class ModelConfig:
    tokenizer: str = _f(
        "arithmetic", "`arithmetic` (built-in character tokenizer) or a Hugging Face tokenizer dir."
    )
    vocab_size: int = _f(32, "Vocabulary size of the embedding and output layers.", ge=2)
    dim: int = _f(128, "Hidden size.", ge=1)
    num_layers: int = _f(2, "Transformer layers (every layer is MoE).", ge=1)
    num_heads: int = _f(4, "Attention query heads.", ge=1)
    num_kv_heads: int = _f(2, "Attention key/value heads (grouped-query attention).", ge=1)
    head_dim: int = _f(32, "Size of one attention head.", ge=1)
    moe_hidden_dim: int = _f(128, "Hidden size of each expert's SwiGLU FFN.", ge=1)
    num_experts: int = _f(8, "Routed experts per MoE layer.", ge=1, le=65536)
    top_k: int = _f(2, "Experts each token is routed to.", ge=1)
    max_seq_len: int = _f(64, "Longest prompt + completion, in tokens.", ge=2)
    rope_theta: float = _f(1e6, "RoPE base frequency.", gt=0)
    norm_eps: float = _f(1e-6, "RMSNorm epsilon.", gt=0)
    dtype: Dtype = _f(
        "float32",
        "Learner compute dtype (forward and backward, experts included) and the dtype of "
        "published versions and exports; the learner's master weights are "
        "learner.master_dtype.",
    )
    attn_backend: AttnBackend = _f(
        "sdpa", "Attention kernel: `sdpa` (CPU and GPU) or `flex` (GPU)."
    )


@dataclass
class TaskConfig:
    type: str = _f(
        "arithmetic",
        "Prompt source: `arithmetic`, `file`, or a task class of yours by name, "
        "`package.module:Class` or `path/to/file.py:Class` (README, 'Tasks of your own').",
    )
    options: dict[str, Any] = _f(
        {}, "Keyword arguments of a task class by name, besides `seed`, e.g. {level = 2}."
    )
    path: str = _f(
        "",
        "JSONL or Parquet file with `prompt` and `answer` columns (type = file); other columns "
        "are each problem's metadata, a `solution` column the cold start's completion.",
    )
    reward: str = _f(
        "exact_match",
        "Reward of a completion: `exact_match` or `math_verify` (the task's own), or a "
        "function of yours by name, `package.module:function` or `path/to/file.py:function` "
        "(signature: README, 'Rewards of your own').",
    )
    reward_timeout_s: float = _f(
        60.0,
        "A reward call running longer scores 0 and counts in rollout/reward_errors.",
        gt=0,
    )
    reward_workers: int = _f(
        2, "Workers of an actor's reward pool (scoring runs beside generation).", ge=1
    )
    reward_pool: RewardPool = _f(
        "thread",
        "`thread`, or `process` for CPU-bound verifiers and ones that can hang (killed at the "
        "timeout); a process pool needs a reward by name.",
    )
    chat_template: bool = _f(
        False,
        "Render each prompt through the tokenizer's chat template as a user message with the "
        "generation prompt (transformers' apply_chat_template); otherwise bos + the prompt text.",
    )
    system_prompt: str = _f(
        "", "A system message before each prompt (needs chat_template = true); empty: none."
    )
    ops: list[ArithmeticOp] = _f(["+", "*"], "Arithmetic operators to draw from (`+`, `-`, `*`).")
    min_digits: int = _f(1, "Fewest digits of an arithmetic operand.", ge=1, le=9)
    max_digits: int = _f(3, "Most digits of an arithmetic operand.", ge=1, le=9)
    heldout_size: int = _f(256, "Size of the fixed held-out set (never trained on).", ge=1)
    worked: bool = _f(
        False,
        "Arithmetic completions write out their working (column sums with carries, partial "
        "products) before ` =answer`; the reward reads the text after the last `=`.",
    )


@dataclass
class ActorConfig:
    engine: EngineKind = _f("embedded", "Inference engine.")
    device: Device = _f("cpu", "Device the engine runs on.")
    quantization: Quantization = _f(
        "fp8",
        "Rollout precision (fp8 = e4m3 weights with a scale per output channel and "
        "activations per token, router in bf16: vLLM's fp8_per_channel).",
    )
    num_actors: int = _f(1, "Actors at start.", ge=1)
    min_actors: int = _f(1, "Fewest actors the fleet may shrink to.", ge=1)
    max_actors: int = _f(4, "Most actors the fleet may grow to.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling mass.", gt=0, le=1)
    max_new_tokens: int = _f(8, "Longest completion, in tokens.", ge=1)
    stop_tokens: list[str] = _f(
        [],
        "Tokens that end a completion besides the tokenizer's eos and its "
        'generation_config.json eos_token_id list, e.g. ["<|endoftext|>"].',
    )
    batching: Batching = _f(
        "static",
        "`static`: an actor leases a step's prompts and generates them together (a batch waits "
        "for its longest row); `continuous`: up to max_running_rows rows run at once, new "
        "prompts join as rows finish, and each group is pushed as soon as it is done.",
    )
    max_running_rows: int = _f(
        256,
        "Most rows (completions) an actor's engine runs at once (continuous batching; vLLM's "
        "max_num_seqs).",
        ge=1,
    )
    tensor_parallel_size: int = _f(
        1,
        "vLLM on CUDA: GPUs one actor's engine shards the model over (tensor parallel); the "
        "actor reserves that many GPUs.",
        ge=1,
    )
    gpu_memory_utilization: float = _f(
        0.85,
        "vLLM on CUDA: share of each of its GPUs' memory the engine may take (weights, "
        "activations and KV cache).",
        gt=0,
        le=1,
    )
    weight_update: WeightUpdate = _f(
        "between_groups",
        "When an actor loads a new weights version: `between_groups` (static: between batches; "
        "continuous: new groups wait while the running ones finish) or `in_flight` (between "
        "two decode steps: running rows go on with the new weights, each token tagged with "
        "the version that sampled it; needs batching = continuous).",
    )
    kv_on_swap: KvOnSwap = _f(
        "keep",
        "In-flight updates: `keep` the KV entries the old weights computed (PipelineRL) or "
        "`recompute` them with the new weights.",
    )
    autoscale: bool = _f(
        False,
        "Resize the fleet (within min_actors..max_actors) to keep the buffer's fill, the share "
        "of time admission holds actors back, between autoscale_fill_low and _high.",
    )
    autoscale_interval_s: float = _f(30.0, "Seconds between autoscaling decisions.", gt=0)
    autoscale_fill_low: float = _f(
        0.1,
        "Grow while the buffer is full less than this share of the time (actors never get "
        "ahead) and the learner waits for data more than autoscale_grow_idle of its loop.",
        ge=0,
        lt=1,
    )
    autoscale_fill_high: float = _f(
        0.75, "Shrink while the buffer is full more than this share of the time.", gt=0, le=1
    )
    autoscale_grow_idle: float = _f(
        0.1, "The learner's idle share (waiting for data) that growing needs.", gt=0, lt=1
    )

    resources: dict[str, float] = _f(
        {},
        "Ray resources each actor needs besides its CPU (and its engine's GPUs on cuda), e.g. "
        "{actor_node = 1}: it runs only on nodes that advertise them (`ray start --resources`); "
        "{} = any node.",
    )


@dataclass
class BufferConfig:
    max_staleness: int = _f(
        1, "K: a trajectory with learner version - policy_version > K is never trained on.", ge=0
    )
    reuse: int = _f(1, "Times a group may be trained on before it is retired.", ge=1)
    segment_groups: int = _f(
        256, "Groups per Arrow IPC segment file before it is closed and a new one opened.", ge=1
    )
    max_message_mib: float = _f(
        64.0, "Largest trajectory message accepted, in MiB; larger ones are rejected.", gt=0
    )
    lease_timeout_s: float = _f(
        600.0, "An actor's permission to generate a group expires after this long.", gt=0
    )
    wait_for_leases: bool = _f(
        True,
        "A global batch waits for a leased group that would otherwise go stale (a long "
        "completion that newer, shorter ones overtook) instead of dropping it when it arrives; "
        "the wait ends when the group arrives or its lease expires or is released.",
    )
    autopilot: bool = _f(
        False,
        "Staleness autopilot: the driver moves K (starting at max_staleness) within "
        "[autopilot_min_k, autopilot_max_k] every autopilot_every versions: up while the "
        "learner waits for data, down when K x the learner's per-version drift exceeds "
        "autopilot_max_drift (async_rl/run/autopilot.py).",
    )
    autopilot_min_k: int = _f(0, "The autopilot's lowest K.", ge=0)
    autopilot_max_k: int = _f(4, "The autopilot's highest K.", ge=0)
    autopilot_every: int = _f(10, "Versions between two autopilot decisions (its window).", ge=1)
    autopilot_idle_high: float = _f(
        0.1,
        "K goes up while the learner waits for batches more than this share of its time.",
        gt=0,
        lt=1,
    )
    autopilot_max_drift: float = _f(
        0.03,
        "Bound on K x drift, drift = mean |pi_{v+1} / pi_v - 1| over a sampled group's tokens "
        "(the staleness factor of delta one version apart, as `diagnose` measures it): the "
        "staleness factor at the worst staleness K allows. On tiny_cot, where `diagnose` finds "
        "the token and sequence gradients' cosine 0.99 at a factor of 0.003-0.007 and "
        "0.62-0.87 at 0.013-0.024, 0.03 lets K reach 4 at the on-policy lr.",
        gt=0,
    )
    wait_timeout_s: float = _f(
        600.0,
        "How long the learner waits for a global batch, and a client for the buffer to answer, "
        "before it gives up.",
        gt=0,
    )

    resources: dict[str, float] = _f(
        {},
        "Ray resources the buffer process needs besides its CPU share (none), e.g. "
        "{buffer_node = 1}: it runs only on nodes that advertise them (`ray start --resources`); "
        "{} = any node.",
    )


@dataclass
class LearnerConfig:
    lr: float = _f(2e-5, "Peak AdamW learning rate of RL.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    warmup_steps: int = _f(0, "Linear warm-up, in optimizer steps.", ge=0)
    lr_schedule: LrSchedule = _f("constant", "Learning-rate schedule after warm-up.")
    grad_clip: float = _f(1.0, "Gradient-norm clip (0 = off).", ge=0)
    checkpoint_every: int = _f(
        10, "Checkpoint every this many global steps (0 = only at end).", ge=0
    )
    device: Device = _f(
        "cpu",
        "Device the learner trains on: `cpu` (ranks talk over gloo) or `cuda` (a GPU per rank, "
        "NCCL between ranks).",
    )
    num_ranks: int = _f(
        1,
        "Learner ranks (processes; one GPU each on CUDA): the model is sharded with FSDP2 and "
        "each rank trains its share of every mini-batch.",
        ge=1,
    )
    expert_parallel: int = _f(
        1, "Expert-parallel degree of the learner ranks (divides num_ranks).", ge=1
    )
    max_tokens_per_microbatch: int = _f(
        0,
        "Positions (padding included) of one learner forward: mini-batches are split into "
        "micro-batches of whole rows bucketed by length, gradients accumulated (0 = one "
        "forward per mini-batch).",
        ge=0,
    )
    activation_checkpointing: ActivationCheckpointing = _f(
        "none", "torchtitan's activation checkpointing of every transformer block."
    )
    master_dtype: Dtype = _f(
        "float32",
        "Dtype of the learner's master weights, gradient reduction and AdamW state; with "
        "model.dtype = bfloat16 the forward and backward compute in bf16 (FSDP2 mixed "
        "precision). bfloat16 here is pure bf16, an explicit opt-in: an update below half a "
        "bf16 ulp of a weight (2^-9 to 2^-8 of it) rounds away.",
    )
    logprob_chunk: int = _f(
        512,
        "Positions whose vocabulary-sized logits the learner holds at once when it computes "
        "log-probs and entropy (recomputed in the backward).",
        ge=1,
    )

    resources: dict[str, float] = _f(
        {},
        "Ray resources each learner rank needs besides its CPU (and GPU on cuda), e.g. "
        "{learner_node = 1}: it runs only on nodes that advertise them (`ray start --resources`); "
        "{} = any node.",
    )


@dataclass
class WeightsConfig:
    """How the learner's versions reach the actors (README, 'Weight versions to the actors')."""

    store: WeightStoreKind = _f(
        "fs",
        "How weights reach the actors: `fs` (a Hugging Face checkpoint per version in the run "
        "directory), `ray` (the Ray object store), `collective` (buckets broadcast over a "
        "torch.distributed group of the learner and the actors, with durable_store behind it).",
    )
    durable_store: DurableStoreKind = _f(
        "fs", "The collective path's durable copy, for actors that join late or miss a transfer."
    )
    durable_every: int = _f(
        10,
        "The collective path also writes every this many versions, and every checkpoint's, to "
        "durable_store.",
        ge=1,
    )
    collective_timeout_s: float = _f(
        10.0,
        "Longest a weights broadcast (per bucket) or group rebuild waits for an actor; past it "
        "the learner goes on without that actor (a stall of the learner at most this long).",
        gt=0,
    )
    collective_trusted_network: bool = _f(
        False,
        "The collective path's TCPStore and gloo connections have no authentication: with a "
        "non-loopback run.bind_host, set true to state that the network is trusted.",
    )
    keep_versions: int = _f(3, "Weight versions kept after actors stop using them.", ge=1)
    deltas: WeightDeltas = _f(
        "off",
        "`measure`: rank 0 keeps the last published version (one more copy of the model in "
        "the published dtype) and logs each version's sparse delta against it "
        "(learner/delta_share, learner/delta_mib, learner/version_mib); `send`: the store "
        "keeps versions as those deltas (a whole one every full_every and at checkpoints) and "
        "actors patch their weights with them (README, 'Weight deltas').",
    )
    full_every: int = _f(
        10,
        "With deltas = send: every this many versions (and at every checkpoint) a "
        "version is stored whole too, so that a late or lagging actor starts from it (the "
        "collective path broadcasts it whole: an actor holds a whole version and at most "
        "full_every - 1 deltas).",
        ge=1,
    )
    bucket_mib: int = _f(
        256,
        "With several ranks, weights are gathered for publishing this many MiB at a time.",
        ge=1,
    )


@dataclass
class SftConfig:
    """The supervised cold start (`async-rl sft`) a run starts RL from."""

    steps: int = _f(4000, "Optimizer steps of the supervised cold start (`async-rl sft`).", ge=1)
    batch_size: int = _f(64, "Problems per cold-start step.", ge=1)
    lr: float = _f(3e-3, "Peak AdamW learning rate of the cold start.", gt=0)
    warmup_steps: int = _f(50, "Linear warm-up of the cold start, then cosine decay to 10%.", ge=0)
    num_threads: int = _f(
        0,
        "torch threads of the cold start, which runs alone before the run's processes start "
        "(0 = run.num_threads).",
        ge=0,
    )
    label_smoothing: float = _f(
        0.0, "Label smoothing of the cold start's cross-entropy (0 = none).", ge=0, lt=1
    )


@dataclass
class AlgoConfig:
    group_size: int = _f(8, "G: completions sampled per prompt.", ge=2)
    prompts_per_minibatch: int = _f(8, "Prompts (groups) per mini-batch.", ge=1)
    num_minibatches: int = _f(1, "N: mini-batch updates per global step (1 = on-policy).", ge=1)
    tis_mode: TisMode = _f("full", "Train-inference IS weight.")
    tis_cap: float = _f(5.0, "C: truncation of the IS weight.", gt=0)
    is_correction: IsCorrection = _f(
        "token_tis",
        "How the IS ratio becomes a weight: token_tis min(rho, C) per token; icepop rho masked "
        "to 0 outside [1/C, C]; seq_mask_tis token_tis times a mask of responses whose geometric "
        "mean ratio leaves [1/geo_mask_cap, geo_mask_cap]; seq_tis min(prod rho, C) per response.",
    )
    geo_mask_cap: float = _f(
        1.01, "C_geo of is_correction = seq_mask_tis (the geometric mean's bound).", gt=1
    )
    clip: bool = _f(True, "PPO-style clipping mask (false = the no-clipping ablation).")
    eps_low: float = _f(0.2, "Lower clip range (mask if A < 0 and r < 1 - eps_low).", gt=0, lt=1)
    eps_high: float = _f(0.27, "Upper clip range (mask if A > 0 and r > 1 + eps_high).", gt=0)
    length_norm: bool = _f(False, "Divide each response's token sum by its length (ablation).")
    adv_std_norm: bool = _f(False, "Divide advantages by the group std + 1e-6.")
    routing_replay: RoutingReplay = _f(
        "none", "Routing Replay: r2 replays the learner's own proximal routing, r3 the actor's."
    )


@dataclass
class LoggingConfig:
    wandb_mode: WandbMode = _f("offline", "wandb mode.")
    wandb_project: str = _f("async-rl", "wandb project.")
    log_every: int = _f(1, "Log metrics every this many global steps.", ge=1)
    progress: bool = _f(True, "Show a progress bar on the terminal.")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def global_batch_groups(self) -> int:
        return self.algo.prompts_per_minibatch * self.algo.num_minibatches

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}

# Keys that moved to another section: a config that names one is refused with the new name, so
# that no TOML file silently changes meaning.
MOVED: dict[str, str] = {
    "learner.weight_store": "weights.store",
    "learner.durable_store": "weights.durable_store",
    "learner.durable_every": "weights.durable_every",
    "learner.collective_timeout_s": "weights.collective_timeout_s",
    "learner.collective_trusted_network": "weights.collective_trusted_network",
    "learner.keep_versions": "weights.keep_versions",
    "learner.weight_deltas": "weights.deltas",
    "learner.full_every": "weights.full_every",
    "learner.publish_bucket_mib": "weights.bucket_mib",
    "learner.sft_steps": "sft.steps",
    "learner.sft_batch_size": "sft.batch_size",
    "learner.sft_lr": "sft.lr",
    "learner.sft_warmup_steps": "sft.warmup_steps",
    "learner.sft_num_threads": "sft.num_threads",
    "learner.sft_label_smoothing": "sft.label_smoothing",
}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its declared type and bounds; return it in that type."""
    typ, allowed = f.type, choices(f.type)
    if allowed:
        typ = list[str] if get_origin(typ) is list else str
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
    elif typ == list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
    elif typ == dict[str, float]:
        value = _resources(key, value)
    elif typ == dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, e.g. {{level = 2}}, got {value!r}")
    else:  # pragma: no cover - a field type this loader does not know is our bug
        raise AssertionError(f"unsupported config type {typ} for {key}")

    meta = f.metadata
    for item in value if isinstance(value, list) else [value]:
        if allowed and item not in allowed:
            raise ConfigError(
                key, f"{item!r} is not allowed; choose from {', '.join(map(repr, allowed))}"
            )
    if typ in (int, float):
        for bound, ok, word in (
            ("ge", value.__ge__, ">="),
            ("gt", value.__gt__, ">"),
            ("le", value.__le__, "<="),
            ("lt", value.__lt__, "<"),
        ):
            if meta[bound] is not None and not ok(meta[bound]):
                raise ConfigError(key, f"must be {word} {meta[bound]}, got {value}")
    return value


# Ray resources the run sets itself (from learner.device, actor.device, the engine's GPUs).
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _resources(key: str, value: Any) -> dict[str, float]:
    """A table of Ray resources: names to positive amounts (`{learner_node = 1}`)."""
    if not isinstance(value, dict):
        raise ConfigError(
            key, f"expected a table of Ray resources like {{name = 1}}, got {value!r}"
        )
    out = {}
    for name, amount in value.items():
        if not name or name in RESERVED_RESOURCES:
            raise ConfigError(
                key, f"{name!r}: the run reserves {', '.join(RESERVED_RESOURCES)} itself"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(key, f"{name!r}: the amount must be a number > 0, got {amount!r}")
        out[name] = float(amount)
    return out


def _apply(cfg: Config, data: dict[str, Any], origin: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            hint = _closest(section, list(SECTIONS))
            raise ConfigError(
                section, f"unknown section in {origin}{hint}; sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(section, f"expected a [{section}] table in {origin}")
        fields = _section_fields(section)
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in MOVED:
                raise ConfigError(key, f"moved in {origin}: it is now `{MOVED[key]}`")
            if name not in fields:
                hint = _closest(key, [f"{section}.{n}" for n in fields])
                raise ConfigError(key, f"unknown key in {origin}{hint}")
            setattr(getattr(cfg, section), name, _coerce(key, fields[name], value))


def parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(
            item or "override", f"{item!r}: an override must look like section.key=value"
        )
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1 or not all(dotted.split(".")):
        raise ConfigError(
            dotted or "override", f"{item!r}: an override key must look like section.key"
        )
    section, name = dotted.split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string: algo.routing_replay=r3
    return section, name, value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> None:
    """Checks that involve more than one field (single fields are checked as they are set)."""
    _validate_model_and_task(cfg)
    _validate_actor(cfg)
    _validate_learner(cfg)
    _validate_run(cfg)


def _validate_model_and_task(cfg: Config) -> None:
    m, t = cfg.model, cfg.task
    if m.top_k > m.num_experts:
        raise ConfigError(
            "model.top_k", f"must be <= model.num_experts ({m.num_experts}), got {m.top_k}"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            "model.num_kv_heads",
            f"must divide model.num_heads ({m.num_heads}), got {m.num_kv_heads}",
        )
    if t.min_digits > t.max_digits:
        raise ConfigError("task.min_digits", f"must be <= task.max_digits ({t.max_digits})")
    if t.type == "file" and not t.path:
        raise ConfigError("task.path", "is required when task.type = 'file'")
    _validate_task_type(t)
    _validate_reward(t)
    if t.system_prompt and not t.chat_template:
        raise ConfigError("task.system_prompt", "needs task.chat_template = true")
    if t.chat_template and m.tokenizer == "arithmetic":
        raise ConfigError(
            "task.chat_template", "the arithmetic tokenizer has none: set model.tokenizer to a dir"
        )
    if not t.ops:
        raise ConfigError("task.ops", "needs at least one operator")
    if t.worked and "-" in t.ops:
        raise ConfigError("task.ops", "worked solutions (task.worked) are written for + and *")


def _validate_task_type(t: TaskConfig) -> None:
    """A task class by name is found, imported and checked now, at start-up (it is built by
    each process that needs it: `async_rl.tasks.task_from_config`)."""
    if t.type in BUILTIN_TASKS:
        if t.options:
            raise ConfigError("task.options", f"is for a task class by name, not {t.type!r}")
        return
    _check_named(t, "type", load_task_class)


def _validate_reward(t: TaskConfig) -> None:
    """A reward by name is found, imported and its signature checked now, at start-up; a file
    path becomes absolute, so every process of the run reads the same file."""
    if t.reward in BUILTIN_REWARDS:
        if t.type == "arithmetic" and t.reward != "exact_match":
            raise ConfigError("task.reward", "the arithmetic task's own reward is 'exact_match'")
        if t.reward_pool == "process":
            raise ConfigError(
                "task.reward_pool",
                f"the built-in {t.reward!r} runs on threads; for a process pool name it as "
                f"a function: task.reward = 'async_rl.rewards:{t.reward}'",
            )
        return
    _check_named(t, "reward", load_reward)


def _check_named(t: TaskConfig, key: str, load) -> None:
    """`task.<key>` names the user's code: its file path made absolute, so that every process
    of the run reads the same file, and `load` checks what it names, now."""
    setattr(t, key, normalize_name(getattr(t, key)))
    try:
        load(getattr(t, key))
    except ValueError as e:
        raise ConfigError(f"task.{key}", str(e)) from None


def _validate_actor(cfg: Config) -> None:
    act = cfg.actor
    caps = ENGINE_CAPABILITIES[(act.engine, act.device)]
    if act.quantization not in caps["quantization"]:
        raise ConfigError(
            "actor.quantization",
            f"engine {act.engine!r} on {act.device} supports "
            f"{', '.join(caps['quantization'])}, not {act.quantization!r}",
        )
    if cfg.algo.routing_replay == "r3" and not caps["routing"]:
        raise ConfigError(
            "algo.routing_replay",
            f"'r3' replays the actor's routing, but engine "
            f"{act.engine!r} on {act.device} returns no routing traces; use "
            "'none' or 'r2', or an engine that returns routing",
        )
    if act.weight_update == "in_flight":
        if act.batching != "continuous":
            raise ConfigError(
                "actor.weight_update",
                "'in_flight' swaps weights between decode steps of running rows: it needs "
                "actor.batching = 'continuous'",
            )
        if not caps["in_flight"]:
            raise ConfigError(
                "actor.weight_update",
                f"engine {act.engine!r} on {act.device} cannot swap weights in flight; use "
                "'between_groups'",
            )
        if act.engine == "vllm" and act.kv_on_swap == "recompute":
            raise ConfigError(
                "actor.kv_on_swap",
                "vLLM keeps the running requests' KV entries across a swap; 'recompute' is "
                "the embedded engine's",
            )
    if act.tensor_parallel_size > 1 and (act.engine, act.device) != ("vllm", "cuda"):
        raise ConfigError(
            "actor.tensor_parallel_size",
            f"tensor parallel generation is vLLM's on CUDA; engine {act.engine!r} on "
            f"{act.device} runs on one device: set 1",
        )
    if not act.min_actors <= act.num_actors <= act.max_actors:
        raise ConfigError(
            "actor.num_actors",
            f"must lie in actor.min_actors..actor.max_actors "
            f"({act.min_actors}..{act.max_actors}), got {act.num_actors}",
        )
    if act.autoscale_fill_low >= act.autoscale_fill_high:
        raise ConfigError(
            "actor.autoscale_fill_low",
            f"must be below actor.autoscale_fill_high ({act.autoscale_fill_high}), "
            f"got {act.autoscale_fill_low}",
        )
    if act.max_new_tokens >= cfg.model.max_seq_len:
        raise ConfigError(
            "actor.max_new_tokens", f"must be < model.max_seq_len ({cfg.model.max_seq_len})"
        )


def _validate_learner(cfg: Config) -> None:
    lrn, algo = cfg.learner, cfg.algo
    if lrn.num_ranks % lrn.expert_parallel or cfg.model.num_experts % lrn.expert_parallel:
        raise ConfigError(
            "learner.expert_parallel",
            f"must divide learner.num_ranks ({lrn.num_ranks}) and model.num_experts "
            f"({cfg.model.num_experts}), got {lrn.expert_parallel}",
        )
    if algo.prompts_per_minibatch % lrn.num_ranks:
        raise ConfigError(
            "algo.prompts_per_minibatch",
            f"a mini-batch of {algo.prompts_per_minibatch} groups does not split into whole "
            f"groups for learner.num_ranks = {lrn.num_ranks} ranks; choose a multiple of "
            f"{lrn.num_ranks}",
        )
    if algo.is_correction != "token_tis" and algo.tis_mode == "none":
        raise ConfigError(
            "algo.is_correction",
            f"{algo.is_correction} corrects the IS ratio, and algo.tis_mode = none has none; "
            "choose algo.tis_mode = full or decoupled",
        )
    if algo.is_correction == "icepop" and algo.tis_cap <= 1:
        raise ConfigError(
            "algo.tis_cap",
            f"icepop keeps ratios in [1/C, C], empty for C = {algo.tis_cap}; choose C > 1",
        )
    if cfg.model.attn_backend == "flex" and lrn.device != "cuda":
        raise ConfigError(
            "model.attn_backend",
            "flex attention has no CPU backward: use sdpa, or learner.device = cuda",
        )
    if lrn.master_dtype == "bfloat16" and cfg.model.dtype == "float32":
        raise ConfigError(
            "learner.master_dtype",
            "bfloat16 master weights under float32 compute (model.dtype) would round every "
            "update the float32 step makes; use float32, or model.dtype = bfloat16",
        )
    budget = cfg.learner.max_tokens_per_microbatch
    if budget and budget < cfg.model.max_seq_len:
        raise ConfigError(
            "learner.max_tokens_per_microbatch",
            f"must be 0 or at least model.max_seq_len ({cfg.model.max_seq_len}): rows are "
            "never split",
        )


def _validate_run(cfg: Config) -> None:
    buf = cfg.buffer
    if buf.autopilot and not buf.autopilot_min_k <= buf.max_staleness <= buf.autopilot_max_k:
        raise ConfigError(
            "buffer.max_staleness",
            f"the autopilot starts at K = {buf.max_staleness}, outside buffer.autopilot_min_k.."
            f"buffer.autopilot_max_k ({buf.autopilot_min_k}..{buf.autopilot_max_k})",
        )
    w = cfg.weights
    if (
        w.store == "collective"
        and not is_loopback(cfg.run.bind_host)
        and not w.collective_trusted_network
    ):
        raise ConfigError(
            "weights.collective_trusted_network",
            f"weights.store = 'collective' on {cfg.run.bind_host!r} (not loopback) "
            "sends weights over a TCPStore and gloo, which have no authentication; set it to "
            "true on a trusted network, or use 'fs' or 'ray'",
        )
    if not is_loopback(cfg.run.bind_host) and not cfg.run.curve_keys:
        raise ConfigError(
            "run.bind_host",
            f"{cfg.run.bind_host!r} is not a loopback address; binding it without "
            "authentication would let anyone who reaches it feed or read the run: make keys "
            "with `async-rl keys DIR` and set run.curve_keys = DIR",
        )
    if cfg.run.curve_keys:
        from async_rl.wire.security import check_keys

        try:
            check_keys(cfg.run.curve_keys)
        except ValueError as e:
            raise ConfigError("run.curve_keys", str(e)) from None
    if "/" in cfg.run.name or cfg.run.name in ("", ".", ".."):
        raise ConfigError("run.name", f"must be a plain directory name, got {cfg.run.name!r}")


def precision_warning(cfg: Config) -> str | None:
    """What a run with pure bf16 masters should be told (None for fp32 masters)."""
    if cfg.learner.master_dtype != "bfloat16":
        return None
    lr = cfg.learner.lr
    return (
        "learner.master_dtype = bfloat16: the weights and AdamW state are bf16, and an update "
        "below half a unit in the last place of a weight (2^-9 to 2^-8 of it) rounds away: "
        "below 3.9e-3 for a norm weight of 1.0, below 6.1e-5 for a weight of 0.02, where "
        f"AdamW's updates are about learner.lr = {lr:g}. Use float32 masters (the default) "
        "unless pure bf16 is what you are measuring."
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- TOML file (the CPU default when `path` is None) <- dotted overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    return config_from_toml(text, str(path), overrides)


def config_from_toml(text: str, source: str, overrides: list[str] | tuple = ()) -> Config:
    """`load_config` of TOML text (`source` names it in errors): how the driver hands a run's
    resolved config to processes on nodes that do not have its run directory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{source} is not valid TOML: {e}") from None
    cfg = Config()
    _apply(cfg, data, source)
    for item in overrides:
        section, name, value = parse_override(item)
        _apply(cfg, {section: {name: value}}, "overrides")
    validate(cfg)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return repr(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _type_name(typ: Any) -> str:
    if typ == dict[str, float]:
        return "table"
    if choices(typ):
        return "list" if get_origin(typ) is list else "str"
    return getattr(typ, "__name__", str(typ))


def reference(markdown: bool = False) -> str:
    """Every field with its type, default and doc: `--help` text or a README table."""
    out = []
    for section in SECTIONS:
        if markdown:
            out += [
                f"\n**[{section}]**\n",
                "| key | type | default | meaning |",
                "|---|---|---|---|",
            ]
        for name, f in _section_fields(section).items():
            typ = _type_name(f.type)
            default = _toml_value(
                f.default if f.default is not dataclasses.MISSING else f.default_factory()
            )
            doc = f.metadata["doc"]
            if choices(f.type):
                doc += " One of " + ", ".join(f"`{c}`" for c in choices(f.type)) + "."
            if markdown:
                out.append(f"| `{section}.{name}` | {typ} | `{default}` | {doc} |")
            else:
                out.append(f"  {section}.{name} = {default}  ({typ})\n      {doc}")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    print(reference(markdown="--markdown" in sys.argv), end="")
