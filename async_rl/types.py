"""Boundary types: the trajectory record and its Arrow form (docs/design.md section 5).

Shape legend: P = prompt tokens, C = completion tokens, L = MoE layers, K = experts per token.

Only these types, their Arrow form and the messages of `async_rl.wire.messages` cross a process
boundary. One row is one
completion; the G completions of a prompt form a group, which travels, is stored, sampled and
dropped as one Arrow record batch of G rows.

    rows = [Trajectory(...), ...]                     # the G completions of one prompt
    batch = group_to_batch(rows, RoutingSpec(2, 2, 8))
    check_group(batch, spec, group_size=8)            # raises InvalidGroup(reason) if bad
    rows == batch_to_trajectories(batch)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RoutingSpec:
    """What a routing trace of this model looks like: `[T, num_layers, top_k]` expert ids.

    The one owner of the id width: uint8 up to 256 experts, uint16 above, on the wire (Arrow,
    numpy); in torch, which cannot index with uint16, uint8 or int16 (ids stay below 32768).
    Example: `RoutingSpec(num_layers=2, top_k=2, num_experts=8).numpy_dtype == np.uint8`.
    """

    num_layers: int
    top_k: int
    num_experts: int

    @property
    def width(self) -> int:
        """Ids per position, layer-major: `num_layers * top_k`."""
        return self.num_layers * self.top_k

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_experts <= 256 else np.uint16)

    @property
    def torch_dtype(self):
        """`torch.uint8` or `torch.int16` (torch is imported only by those who ask)."""
        import torch

        return torch.uint8 if self.num_experts <= 256 else torch.int16

    @property
    def arrow_type(self) -> pa.DataType:
        value = pa.from_numpy_dtype(self.numpy_dtype)
        return pa.list_(pa.list_(value, self.width))

    @classmethod
    def of(cls, model_cfg) -> RoutingSpec:
        """From a `ModelConfig`."""
        return cls(model_cfg.num_layers, model_cfg.top_k, model_cfg.num_experts)


@dataclass
class Trajectory:
    """One completion with everything the learner needs and the tags that explain it.

    Example: prompt "12+7=" -> completion "19<eos>", reward 1.0, sampled by actor "a0" from
    weights version 3 (`token_versions = [3, 3, 3]`, `policy_version = policy_version_max = 3`).
    With in-flight weight updates one completion's tokens can come from several versions:
    `token_versions = [3, 3, 4]`, `policy_version = 3`, `policy_version_max = 4`.
    """

    sample_id: str  # unique per completion, e.g. "a0-17-3"
    group_id: str  # shared by the G completions of one prompt, e.g. "a0-17"
    prompt_id: str  # the task's id of the prompt, e.g. "arith-train-17"
    actor_id: str  # which actor produced it, e.g. "a0"
    engine: str  # "embedded" | "vllm"
    policy_version: int  # the oldest version that sampled a token: min(token_versions)
    policy_version_max: int  # the newest: max(token_versions)
    prompt_tokens: list[int]  # [P]
    completion_tokens: list[int]  # [C], eos included when sampled
    behavior_logprobs: list[float]  # [C], log mu(token) of the distribution sampled from
    token_versions: list[int]  # [C], the weights version that sampled each token
    routing: np.ndarray | None  # [P + C - 1, L, K] expert ids, uint8 (uint16 above 256 experts)
    reward: float  # scalar sequence reward
    finish_reason: str  # "stop" | "length"
    temperature: float
    top_p: float
    quantization: str  # "fp8" | "bf16" | "fp32"
    created_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    # the other numbers a reward function returned besides the reward, e.g. {"format": 1.0}
    reward_extras: dict[str, float] = field(default_factory=dict)
    problem_metadata: str = "{}"  # the task's metadata of the problem, JSON, e.g. '{"level": 2}'


def trajectory_schema(spec: RoutingSpec) -> pa.Schema:
    """The Arrow schema of trajectory rows for a model with routing shape `spec`."""
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("group_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("problem_metadata", pa.string(), nullable=False),
            pa.field("actor_id", pa.string(), nullable=False),
            pa.field("engine", pa.string(), nullable=False),
            pa.field("policy_version", pa.int64(), nullable=False),
            pa.field("policy_version_max", pa.int64(), nullable=False),
            pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("completion_tokens", pa.list_(pa.int32()), nullable=False),
            pa.field("behavior_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("token_versions", pa.list_(pa.int32()), nullable=False),
            pa.field("routing", spec.arrow_type, nullable=True),
            pa.field("reward", pa.float32(), nullable=False),
            pa.field("reward_extras", pa.map_(pa.string(), pa.float32()), nullable=False),
            pa.field("finish_reason", pa.string(), nullable=False),
            pa.field("temperature", pa.float32(), nullable=False),
            pa.field("top_p", pa.float32(), nullable=False),
            pa.field("quantization", pa.string(), nullable=False),
            pa.field("created_at", pa.timestamp("ms"), nullable=False),
        ]
    )


_SCALARS = (
    "sample_id",
    "group_id",
    "prompt_id",
    "problem_metadata",
    "actor_id",
    "engine",
    "policy_version",
    "policy_version_max",
    "reward",
    "finish_reason",
    "temperature",
    "top_p",
    "quantization",
)


def _routing_array(rows: list[Trajectory], spec: RoutingSpec) -> pa.Array:
    """`list<fixed_size_list<uint>[L*K]>` built from flat buffers (no per-position Python)."""
    if all(r.routing is None for r in rows):
        return pa.nulls(len(rows), spec.arrow_type)
    if any(r.routing is None for r in rows):
        raise ValueError("routing: either every row of a group has a trace or none has")
    flat, offsets = [], [0]
    for r in rows:
        trace = np.asarray(r.routing)
        if trace.ndim != 3 or trace.shape[1:] != (spec.num_layers, spec.top_k):
            raise ValueError(
                f"routing of {r.sample_id}: shape {trace.shape}, expected "
                f"[T, {spec.num_layers}, {spec.top_k}]"
            )
        flat.append(trace.astype(spec.numpy_dtype, copy=False).reshape(-1))
        offsets.append(offsets[-1] + trace.shape[0])
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(flat)), spec.width)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def group_to_batch(rows: list[Trajectory], spec: RoutingSpec) -> pa.RecordBatch:
    """The Arrow record batch of one group (or any list of rows)."""
    columns = {name: [getattr(r, name) for r in rows] for name in _SCALARS}
    columns["prompt_tokens"] = [r.prompt_tokens for r in rows]
    columns["completion_tokens"] = [r.completion_tokens for r in rows]
    columns["behavior_logprobs"] = [r.behavior_logprobs for r in rows]
    columns["token_versions"] = [r.token_versions for r in rows]
    columns["created_at"] = [r.created_at_ms for r in rows]
    columns["reward_extras"] = [sorted(r.reward_extras.items()) for r in rows]
    schema = trajectory_schema(spec)
    arrays = [
        _routing_array(rows, spec)
        if f.name == "routing"
        else pa.array(columns[f.name], type=f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def routing_of(batch: pa.RecordBatch | pa.Table, spec: RoutingSpec) -> list[np.ndarray | None]:
    """Each row's routing trace as a `[T, L, K]` numpy array (None where the row has none)."""
    column = batch.column("routing")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out: list[np.ndarray | None] = []
    for i in range(len(column)):
        if not column[i].is_valid:
            out.append(None)
            continue
        cell = column.slice(i, 1).flatten().flatten()
        ids = cell.to_numpy(zero_copy_only=False).copy()
        out.append(ids.reshape(-1, spec.num_layers, spec.top_k))
    return out


def batch_to_trajectories(batch: pa.RecordBatch | pa.Table, spec: RoutingSpec) -> list[Trajectory]:
    """Rows back as `Trajectory` objects (tests and small consumers; the learner reads columns)."""
    d = batch.to_pydict()
    traces = routing_of(batch, spec)
    created = batch.column("created_at").cast(pa.int64()).to_pylist()
    return [
        Trajectory(
            **{name: d[name][i] for name in _SCALARS},
            prompt_tokens=d["prompt_tokens"][i],
            completion_tokens=d["completion_tokens"][i],
            behavior_logprobs=d["behavior_logprobs"][i],
            token_versions=d["token_versions"][i],
            routing=traces[i],
            created_at_ms=created[i],
            reward_extras=dict(d["reward_extras"][i]),
        )
        for i in range(batch.num_rows)
    ]


class InvalidGroup(ValueError):
    """A message that must not reach the buffer; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_group(batch: pa.RecordBatch, spec: RoutingSpec, group_size: int) -> None:
    """Raise `InvalidGroup` unless `batch` is one well-formed group of `group_size` rows."""
    expected = trajectory_schema(spec)
    if not batch.schema.equals(expected):
        raise InvalidGroup("schema", schema_diff(batch.schema, expected))
    nulls = [f.name for f in expected if f.name != "routing" and batch.column(f.name).null_count]
    if nulls:
        raise InvalidGroup("nulls", f"null values in {nulls}")
    if batch.num_rows != group_size:
        raise InvalidGroup("group_size", f"{batch.num_rows} rows, expected {group_size}")
    for name in ("sample_id", "group_id", "prompt_id", "actor_id"):
        values = batch.column(name).to_pylist()
        if any(not v for v in values):
            raise InvalidGroup("ids", f"empty {name}")
    d = batch.select(
        ["sample_id", "group_id", "prompt_id", "policy_version", "policy_version_max"]
    ).to_pydict()
    if len(set(d["sample_id"])) != group_size:
        raise InvalidGroup("ids", "sample_id repeats within the group")
    if len(set(d["group_id"])) != 1 or len(set(d["prompt_id"])) != 1:
        raise InvalidGroup("ids", "rows of one group must share group_id and prompt_id")
    for v, vmax in zip(d["policy_version"], d["policy_version_max"], strict=True):
        if v < 0 or vmax < v:
            raise InvalidGroup("version", f"policy_version {v}, policy_version_max {vmax}")
    prompt_lens = _lengths(batch, "prompt_tokens")
    completion_lens = _lengths(batch, "completion_tokens")
    if (prompt_lens == 0).any() or (completion_lens == 0).any():
        raise InvalidGroup("lengths", "empty prompt or completion")
    if not (_lengths(batch, "behavior_logprobs") == completion_lens).all():
        raise InvalidGroup("lengths", "behavior_logprobs and completion_tokens differ in length")
    if not (_lengths(batch, "token_versions") == completion_lens).all():
        raise InvalidGroup("lengths", "token_versions and completion_tokens differ in length")
    _check_token_versions(batch, d["policy_version"], d["policy_version_max"])
    prompts = batch.column("prompt_tokens")
    if any(not prompts[i].equals(prompts[0]) for i in range(1, batch.num_rows)):
        raise InvalidGroup("ids", "rows of one group must share prompt_tokens")
    logprobs = batch.column("behavior_logprobs").flatten().to_numpy(zero_copy_only=False)
    if not (np.isfinite(logprobs) & (logprobs <= 1e-4)).all():
        raise InvalidGroup("logprobs", "behavior_logprobs must be finite and <= 0")
    rewards = batch.column("reward").to_numpy(zero_copy_only=False)
    if not np.isfinite(rewards).all():
        raise InvalidGroup("reward", "reward must be finite")
    _check_routing(batch, spec, prompt_lens + completion_lens - 1)


def _check_token_versions(batch: pa.RecordBatch, lows: list[int], highs: list[int]) -> None:
    for row, (versions, low, high) in enumerate(
        zip(batch.column("token_versions").to_pylist(), lows, highs, strict=True)
    ):
        if min(versions) != low or max(versions) != high:
            raise InvalidGroup(
                "version",
                f"row {row}: token_versions span {min(versions)}..{max(versions)}, but "
                f"policy_version..policy_version_max is {low}..{high}",
            )


def _lengths(batch: pa.RecordBatch, name: str) -> np.ndarray:
    column = batch.column(name)
    if column.null_count:
        raise InvalidGroup("lengths", f"null {name}")
    offsets = column.offsets.to_numpy()
    return offsets[1:] - offsets[:-1]


def _check_routing(batch: pa.RecordBatch, spec: RoutingSpec, positions: np.ndarray) -> None:
    column = batch.column("routing")
    if column.null_count == len(column):
        return
    if column.null_count:
        raise InvalidGroup("routing", "either every row of a group has a trace or none has")
    lengths = _lengths(batch, "routing")
    if not (lengths == positions).all():
        raise InvalidGroup(
            "routing",
            f"trace lengths {lengths.tolist()}, expected prompt + completion - 1 = "
            f"{positions.tolist()}",
        )
    ids = column.flatten().flatten().to_numpy(zero_copy_only=False)
    if ids.size and int(ids.max()) >= spec.num_experts:
        raise InvalidGroup("routing", f"expert id {int(ids.max())} >= {spec.num_experts}")


def schema_diff(got: pa.Schema, expected: pa.Schema) -> str:
    """The first difference of `got` from `expected`, in words."""
    for f in expected:
        if f.name not in got.names:
            return f"missing column {f.name!r}"
        if not got.field(f.name).type.equals(f.type):
            return f"column {f.name!r} is {got.field(f.name).type}, expected {f.type}"
    extra = [n for n in got.names if n not in expected.names]
    if extra:
        return f"unexpected columns {extra}"
    return "column order or nullability differs from the trajectory schema"
