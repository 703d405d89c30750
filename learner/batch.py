"""From the buffer's Arrow rows to the learner's tensors.

Shape legend: B = completions, T = positions (prompt + completion - 1, padded to the longest),
L = MoE layers, K = experts per token.

A row `prompt + completion` becomes the model input `x = seq[:-1]` and targets `y = seq[1:]`;
completion token j sits at target position `P - 1 + j`. The actor's routing trace covers
exactly the input positions (`P + C - 1`), so it lines up with `x` as `[B, T, L, K]`. Rows are
right-padded; with a causal mask padding never changes a real position. Packing knows nothing
of the algorithm: the learner's objective computes the advantages (`TrainStep`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import torch

from async_rl.types import RoutingSpec


@dataclass
class PackedBatch:
    inputs_BT: torch.Tensor  # int64 token ids, pad-filled
    targets_BT: torch.Tensor  # int64 next tokens
    mask_BT: torch.Tensor  # bool: the target is a completion token
    behavior_logprobs_BT: torch.Tensor  # float32 log mu at completion targets, 0 elsewhere
    rewards_B: torch.Tensor  # float32
    policy_versions_B: torch.Tensor  # int64
    routing_BTLK: torch.Tensor | None  # the actor's trace, None if the engine gave none
    # float32, per group: set by the step's objective on the whole global batch, before any split
    advantages_B: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.inputs_BT.shape[0]

    @property
    def width(self) -> int:
        return self.inputs_BT.shape[1]

    @property
    def valid_BT(self) -> torch.Tensor:
        """Real input positions (prompt + completion - 1 per row), not padding."""
        last_B = self.width - 1 - self.mask_BT.flip(1).int().argmax(1)
        return torch.arange(self.width, device=last_B.device) <= last_B[:, None]

    def to(self, device: torch.device) -> PackedBatch:
        """The batch on `device` (the same tensors where they are there already)."""
        return PackedBatch(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
                for f in fields(self)
            }
        )

    def rows(self, start: int, stop: int) -> PackedBatch:
        """Rows [start, stop), trimmed to their longest sequence."""
        return self.take(slice(start, stop))

    def take(self, index: torch.Tensor | slice) -> PackedBatch:
        """The rows `index` (indices, in that order, or a slice), trimmed to their longest
        sequence."""
        width = int(self.mask_BT[index].any(0).nonzero().max()) + 1
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value.ndim == 1:
                out[f.name] = None if value is None else value[index]
            else:
                out[f.name] = value[index, :width]
        return PackedBatch(**out)


def microbatches(batch: PackedBatch, max_tokens: int) -> list[torch.Tensor]:
    """Row indices of the micro-batches of `batch`: whole rows, at most `max_tokens` positions
    each (rows x the longest row's width, padding included); 0 means one micro-batch.

    Rows are bucketed by length (longest first, so that each micro-batch pads little) and each
    micro-batch is filled greedily. A row longer than `max_tokens` cannot be split: an error.
    """
    if max_tokens <= 0:
        return [torch.arange(batch.num_rows)]
    lengths_B = batch.valid_BT.sum(1).cpu()
    longest = int(lengths_B.max())
    if longest > max_tokens:
        raise ValueError(
            f"learner.max_tokens_per_microbatch: {max_tokens} tokens cannot hold a row of "
            f"{longest} positions (rows are never split); set it to at least model.max_seq_len"
        )
    order = torch.sort(lengths_B, descending=True, stable=True).indices.tolist()
    groups: list[list[int]] = []
    for row in order:  # descending: the first row of a micro-batch sets its width
        if groups and (len(groups[-1]) + 1) * int(lengths_B[groups[-1][0]]) <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [torch.tensor(g) for g in groups]


def split_to(parts: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`parts` (row indices of micro-batches) split into `count` micro-batches: the one of
    most rows is halved until there are `count` (each half fits the budget its whole did).
    The ranks of a learner run the same number of forwards this way: under FSDP and expert
    parallelism every forward is collective."""
    parts = list(parts)
    if count > sum(len(p) for p in parts):
        raise ValueError(f"{count} micro-batches need at least {count} rows")
    while len(parts) < count:
        largest = max(range(len(parts)), key=lambda i: len(parts[i]))
        whole = parts.pop(largest)
        half = (len(whole) + 1) // 2
        parts[largest:largest] = [whole[:half], whole[half:]]
    return parts


def pack(table: pa.Table, spec: RoutingSpec, pad_id: int) -> PackedBatch:
    """The tensors of a global batch (rows in the table's order)."""
    prompts = table.column("prompt_tokens").to_pylist()
    completions = table.column("completion_tokens").to_pylist()
    behavior = table.column("behavior_logprobs").to_pylist()
    lengths = [len(p) + len(c) - 1 for p, c in zip(prompts, completions, strict=True)]
    b, t = len(prompts), max(lengths)
    inputs = np.full((b, t), pad_id, np.int64)
    targets = np.full((b, t), pad_id, np.int64)
    mask = np.zeros((b, t), bool)
    mu = np.zeros((b, t), np.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, behavior, strict=True)):
        seq = p + c
        inputs[i, : lengths[i]] = seq[:-1]
        targets[i, : lengths[i]] = seq[1:]
        mask[i, len(p) - 1 : lengths[i]] = True
        mu[i, len(p) - 1 : lengths[i]] = lp
    routing = _pack_routing(table.column("routing"), spec, lengths, t)
    return PackedBatch(
        inputs_BT=torch.from_numpy(inputs),
        targets_BT=torch.from_numpy(targets),
        mask_BT=torch.from_numpy(mask),
        behavior_logprobs_BT=torch.from_numpy(mu),
        rewards_B=torch.tensor(table.column("reward").to_numpy(), dtype=torch.float32),
        policy_versions_B=torch.tensor(table.column("policy_version").to_pylist()),
        routing_BTLK=routing,
    )


def _pack_routing(column, spec: RoutingSpec, lengths: list[int], width: int):
    """The actors' traces as `[B, T, L, K]` (`spec.torch_dtype`), None if rows have none."""
    if column.null_count == len(column):
        return None
    if column.null_count:
        raise ValueError("a batch mixes rows with and without routing traces")
    # Padding positions replay experts 0..K-1: distinct ids, as every real position has
    # (a repeated id would make the MoE miscount its tokens and corrupt real rows).
    routing = np.empty((len(lengths), width, spec.num_layers, spec.top_k), spec.numpy_dtype)
    routing[:] = np.arange(spec.top_k, dtype=spec.numpy_dtype)
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    ids = flat.flatten().flatten().to_numpy(zero_copy_only=False)
    ids = ids.reshape(-1, spec.num_layers, spec.top_k)
    offsets = flat.offsets.to_numpy()
    for i, length in enumerate(lengths):
        routing[i, :length] = ids[offsets[i] : offsets[i + 1]]
    return torch.from_numpy(routing).to(spec.torch_dtype)


def rollout_metrics(table: pa.Table) -> dict[str, float]:
    """What a global batch says of its rollouts: response lengths (their spread matters for
    continuous batching), weights versions per completion (in-flight updates), and the mean of
    each number a reward function returned besides the reward (`rollout/reward/<name>`, over
    the completions that have it)."""
    lengths = np.diff(_offsets(table.column("completion_tokens")))
    low = table.column("policy_version").to_numpy()
    high = table.column("policy_version_max").to_numpy()
    metrics = {
        "rollout/response_len_p50": float(np.percentile(lengths, 50)),
        "rollout/response_len_p90": float(np.percentile(lengths, 90)),
        "rollout/response_len_max": int(lengths.max()),
        "rollout/versions_per_completion": float((high - low + 1).mean()),
    }
    extras: dict[str, list[float]] = {}
    for row in table.column("reward_extras").to_pylist():
        for name, value in row:
            extras.setdefault(name, []).append(value)
    metrics.update({f"rollout/reward/{k}": float(np.mean(v)) for k, v in sorted(extras.items())})
    return metrics


def _offsets(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.offsets.to_numpy()
