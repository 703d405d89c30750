"""Buckets of tensors: the one scheme by which weights move, gathered from learner shards
(`gathered_buckets`) and broadcast to actors (`pack_bucket` / `unpack_bucket`).

`plan_buckets` lays out a state dict in order: small tensors packed at aligned offsets into
buckets of at most `bucket_bytes`, a large one (`ALONE`, or larger than a bucket) in a bucket
of its own. The plan is also the collective path's header: `[name, dtype, shape, bucket,
offset]` per tensor, JSON, so a receiver rebuilds every tensor as a view of the bucket it got.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch.distributed.tensor import DTensor

ALIGN = 64  # bytes: every tensor starts aligned in its bucket, so it is a view of it
ALONE = 16 * 2**20  # a tensor this large is a bucket of its own, sent from its own memory

_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64)
}


def plan_buckets(
    state: Mapping[str, torch.Tensor], bucket_bytes: int, dtype: torch.dtype | None = None
) -> list[list]:
    """`[name, dtype, shape, bucket, offset]` for every tensor of `state` in order (module
    docstring), each counted in `dtype` if given (its own otherwise) and at its full shape
    (a DTensor's global one); `bucket_bytes` 0: no limit but `ALONE`. Nothing is copied."""
    limit = bucket_bytes or float("inf")
    alone = min(ALONE, limit)
    tensors, bucket, size, closed = [], -1, 0, True  # the first tensor opens bucket 0
    for name, t in state.items():
        kind = dtype or t.dtype
        n = t.numel() * kind.itemsize
        offset = -(-size // ALIGN) * ALIGN
        if closed or n >= alone or offset + n > limit:
            bucket, offset = bucket + 1, 0
        tensors.append([name, str(kind), list(t.shape), bucket, offset])
        size, closed = offset + n, n >= alone  # a tensor alone closes its bucket
    return tensors


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"weights header: unknown dtype {name!r}")
    return _DTYPES[name]


def _nbytes(dtype: str, shape: list[int]) -> int:
    return _dtype(dtype).itemsize * int(torch.Size(shape).numel())


def bucket_sizes(tensors: list[list]) -> list[int]:
    """The bytes of each bucket of a plan."""
    sizes: list[int] = []
    for _, dtype, shape, bucket, offset in tensors:
        if bucket == len(sizes):
            sizes.append(0)
        sizes[bucket] = max(sizes[bucket], offset + _nbytes(dtype, shape))
    return sizes


def gathered_buckets(
    state: Mapping[str, torch.Tensor], bucket_bytes: int = 0, dtype: torch.dtype | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """`state` a bucket of the plan at a time, `{name: full tensor}`, cast to `dtype` if given
    (shards are cast before they are gathered: fp32 masters travel as bf16). DTensor shards are
    gathered a bucket at a time: collective, every rank iterates to the end. Plain tensors in
    their own dtype are yielded as they are (views)."""
    bucket: dict[str, torch.Tensor] = {}
    current = 0
    for name, _, _, index, _ in plan_buckets(state, bucket_bytes, dtype):
        if index != current and bucket:
            yield bucket
            bucket = {}
        current = index
        value = state[name] if dtype is None else state[name].to(dtype)
        bucket[name] = value.full_tensor() if isinstance(value, DTensor) else value
    if bucket:
        yield bucket


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def pack_bucket(tensors: list[list], index: int, size: int, state) -> torch.Tensor:
    """Bucket `index` to send: the tensor's own bytes when it is alone, else a packed copy."""
    members = [t for t in tensors if t[3] == index]
    if len(members) == 1:
        return _raw(state[members[0][0]])
    bucket = torch.zeros(size, dtype=torch.uint8)
    for name, _, _, _, offset in members:
        raw = _raw(state[name])
        bucket[offset : offset + raw.numel()] = raw
    return bucket


def unpack_bucket(tensors: list[list], index: int, bucket: torch.Tensor) -> dict:
    """The tensors of bucket `index`: views of it (it is theirs from now on)."""
    out = {}
    for name, dtype, shape, b, offset in tensors:
        if b != index:
            continue
        n = _nbytes(dtype, shape)
        if offset % ALIGN or offset + n > bucket.numel():
            raise ValueError(f"weights header: {name} does not fit bucket {index} at {offset}")
        out[name] = bucket[offset : offset + n].view(_dtype(dtype)).reshape(shape)
    return out
