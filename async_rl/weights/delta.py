"""Weight versions as sparse deltas: the entries of version v+1 that differ from version v.

    delta = make_delta(previous, new, base=v, version=v + 1, base_fingerprint=f_v)
    f_next = apply_delta(tensors, delta, version=v, fingerprint=f_v)     in place; checked

A delta holds, for each tensor (by Hugging Face name) that changed, a `Patch`: the flat
row-major indices of the entries whose bits differ (compared bitwise in the published dtype:
-0.0 and 0.0 differ, a NaN equals its own bits) and their new values: the coordinates of
vLLM's `SparseWeightPatch(name, indices, values, full_shape)`, so one delta can feed both
engines. A tensor goes whole (`indices` None) where that is no more bytes: past 20% of a bf16
tensor's entries changed (an int64 index and a 2-byte value each), a third of an fp32 one.

Exactness: every delta names its base version and the fingerprint of the weights it produces.
`fingerprint(tensors)` is a linear hash of a version's bits, `sum_i bits(x_i) * w(name, i)`
mod 2^64 with pseudo-random odd weights (splitmix64 of the index, seeded by the name), so a
delta moves it by `sum over changed entries of (new - old) * w`: an actor that tracks its own
weights' fingerprint checks, before writing anything, that applying a delta to *its* weights
gives exactly the version the learner published; a wrong base, a missed or corrupted delta is
refused (`ValueError`) and the actor loads a full version instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class Patch:
    """Tensor `name`'s new values: at the flat `indices` (int64), or all of it (`indices`
    None, `values` the whole tensor)."""

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor | None
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        index_bytes = 0 if self.indices is None else self.indices.numel() * 8
        return index_bytes + self.values.numel() * self.values.element_size()


@dataclass
class Delta:
    """Version `version` as patches on version `base` (module docstring)."""

    base: int
    version: int
    patches: list[Patch]
    fingerprint: int  # `fingerprint()` of version `version`'s weights
    changed: int  # entries whose bits changed
    entries: int  # entries of the whole model

    @property
    def share(self) -> float:
        """The changed share of the model's entries."""
        return self.changed / max(self.entries, 1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.patches)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as flat unsigned integers of its width (numpy: no bf16 there)."""
    flat = t.detach().contiguous().view(-1).cpu()
    return flat.view(_INT[flat.element_size()]).numpy().view(_UNSIGNED[flat.element_size()])


def _weights(name: str, indices: np.ndarray) -> np.ndarray:
    """The fingerprint's odd weight of each index of tensor `name` (splitmix64, wrapping)."""
    seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def _dot(bits: np.ndarray, weights: np.ndarray) -> int:
    with np.errstate(over="ignore"):
        return int((bits.astype(np.uint64) * weights).sum(dtype=np.uint64))


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> int:
    """The linear hash of a version's bits (module docstring), an integer below 2^64."""
    total = 0
    for name in sorted(tensors):
        bits = _bits(tensors[name])
        total += _dot(bits, _weights(name, np.arange(bits.size, dtype=np.uint64)))
    return total % 2**64


def make_delta(
    previous: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    base: int,
    version: int,
    base_fingerprint: int,
) -> Delta:
    """`new` (version `version`) as a delta on `previous` (version `base`, whose fingerprint
    is `base_fingerprint`); the two must hold the same tensors, shapes and dtypes."""
    if previous.keys() != new.keys():
        raise ValueError(f"delta {base}->{version}: the two versions hold different tensors")
    patches, changed, entries, moved = [], 0, 0, 0
    for name in sorted(new):
        old_t, new_t = previous[name], new[name]
        if old_t.shape != new_t.shape or old_t.dtype != new_t.dtype:
            raise ValueError(f"delta {base}->{version}: {name} changed shape or dtype")
        old_bits, new_bits = _bits(old_t), _bits(new_t)
        where = np.flatnonzero(old_bits != new_bits)
        entries += new_bits.size
        if not where.size:
            continue
        changed += where.size
        w = _weights(name, where.astype(np.uint64))
        moved += _dot(new_bits[where], w) - _dot(old_bits[where], w)
        flat = new_t.detach().reshape(-1).cpu()
        size = new_t.element_size()
        if where.size * (size + 8) >= new_bits.size * size:
            patches.append(Patch(name, tuple(new_t.shape), None, flat.clone()))
        else:
            index = torch.from_numpy(where.astype(np.int64))
            patches.append(Patch(name, tuple(new_t.shape), index, flat[index].clone()))
    result = (base_fingerprint + moved) % 2**64
    return Delta(base, version, patches, result, changed, entries)


class DeltaMeter:
    """What deltas would carry, version after version: keeps the last version it saw (one
    copy of the model) and its fingerprint. `measure(v, tensors)` -> metrics of the delta
    from the previous version to v ({} for the first)."""

    def __init__(self):
        self.previous: Mapping[str, torch.Tensor] | None = None
        self.version, self.fingerprint = -1, 0
        self.delta: Delta | None = None  # the last version's, None after the first

    def measure(self, version: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        metrics, self.delta = {}, None
        if self.previous is None:
            mark = fingerprint(tensors)
        else:
            delta = make_delta(self.previous, tensors, self.version, version, self.fingerprint)
            mark, self.delta = delta.fingerprint, delta
            full = sum(t.numel() * t.element_size() for t in tensors.values())
            metrics = {
                "delta_share": delta.share,
                "delta_mib": delta.nbytes / 2**20,
                "version_mib": full / 2**20,
            }
        self.previous, self.version, self.fingerprint = tensors, version, mark
        return metrics


def patch_host(host, delta: Delta, version: int, known: int | None) -> int:
    """An engine's kept weights `host` (version `version`; fingerprint `known`, None: not
    told, computed here) patched by `delta` as `apply_delta` does; the new fingerprint."""
    if host is None:
        raise ValueError(f"delta {delta.base}->{delta.version}: no weights kept to patch")
    return apply_delta(host, delta, version, fingerprint(host) if known is None else known)


def worth_sending(delta: Delta, whole_bytes: int) -> bool:
    """Whether a version goes as `delta` at all: it must halve the bytes (a denser one costs
    an actor more to check and apply than loading the version whole)."""
    return delta.nbytes <= whole_bytes / 2


def apply_delta(
    tensors: MutableMapping[str, torch.Tensor], delta: Delta, version: int, fingerprint: int
) -> int:
    """Patch `tensors` (version `version`, fingerprint `fingerprint`) to `delta.version` in
    place; its fingerprint. Checked first, nothing written on error: `ValueError` when the
    delta is for another base, names a tensor or shape `tensors` lack, or would not give the
    version the learner published (a wrong base, a missed or corrupted delta)."""
    where = f"delta {delta.base}->{delta.version}"
    if version != delta.base:
        raise ValueError(f"{where}: these weights are version {version}, not {delta.base}")
    moved = 0
    for patch in delta.patches:
        target = tensors.get(patch.name)
        if target is None or tuple(target.shape) != patch.shape:
            raise ValueError(f"{where}: no tensor {patch.name} of shape {list(patch.shape)}")
        if patch.values.dtype != target.dtype:
            raise ValueError(f"{where}: {patch.name} is {target.dtype}, its patch is not")
        old = _bits(target)
        new = _bits(patch.values)
        expected = old.size if patch.indices is None else patch.indices.numel()
        if new.size != expected:
            raise ValueError(f"{where}: {patch.name} has {new.size} values for {expected} entries")
        if patch.indices is None:
            index = np.arange(old.size, dtype=np.uint64)
            old_at = old
        else:
            ix = patch.indices
            if ix.numel() and not 0 <= int(ix.min()) <= int(ix.max()) < old.size:
                raise ValueError(f"{where}: {patch.name} has an index outside the tensor")
            index = patch.indices.numpy().astype(np.uint64)
            old_at = old[patch.indices.numpy()]
        w = _weights(patch.name, index)
        moved += _dot(new, w) - _dot(old_at, w)
    result = (fingerprint + moved) % 2**64
    if result != delta.fingerprint:
        raise ValueError(
            f"{where}: the patched weights would not be version {delta.version} (fingerprint "
            f"{result:#018x}, published {delta.fingerprint:#018x}): a wrong base or a corrupted "
            "delta; load a full version"
        )
    with torch.no_grad():
        for patch in delta.patches:
            flat = tensors[patch.name].view(-1)
            if patch.indices is None:
                flat.copy_(patch.values)
            else:
                flat[patch.indices.to(flat.device)] = patch.values.to(flat.device)
    return result


# ---------------------------------------------------------------------- files
def to_tensors(delta: Delta) -> tuple[dict[str, torch.Tensor], dict]:
    """`delta` as flat tensors (`<name>:values`, and `<name>:indices` where sparse) and a
    JSON-able header: what the stores keep (a safetensors file, Ray objects)."""
    tensors, shapes = {}, {}
    for patch in delta.patches:
        tensors[f"{patch.name}:values"] = patch.values.contiguous()
        if patch.indices is not None:
            tensors[f"{patch.name}:indices"] = patch.indices.contiguous()
        shapes[patch.name] = list(patch.shape)
    header = {
        "base": delta.base,
        "version": delta.version,
        "fingerprint": f"{delta.fingerprint:016x}",
        "changed": delta.changed,
        "entries": delta.entries,
        "shapes": shapes,
    }
    return tensors, header


def from_tensors(tensors: Mapping[str, torch.Tensor], header: dict, where: str) -> Delta:
    """The delta `to_tensors` gave; `ValueError` naming `where` when something is missing."""
    try:
        patches = [
            Patch(name, tuple(shape), tensors.get(f"{name}:indices"), tensors[f"{name}:values"])
            for name, shape in header["shapes"].items()
        ]
        return Delta(
            int(header["base"]),
            int(header["version"]),
            patches,
            int(header["fingerprint"], 16),
            int(header["changed"]),
            int(header["entries"]),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: not a weight delta ({type(e).__name__}: {e})") from None


def save_delta(delta: Delta, path: Path) -> None:
    """`delta` as a safetensors file, its header in the file's metadata."""
    tensors, header = to_tensors(delta)
    save_file(tensors, path, metadata={"format": "pt", "delta": json.dumps(header)})


def load_delta(path: Path) -> Delta:
    """A delta file (`save_delta`), checked for what it must hold; `ValueError` naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {})["delta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable weight delta ({type(e).__name__}: {e})") from None
    return from_tensors(tensors, header, str(path))
