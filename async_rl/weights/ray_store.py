"""The `ray` weight store: each version's tensors in the Ray object store, indexed by a named
Ray actor, for runs whose actors share no filesystem with the learner. Tensors travel as numpy
arrays (bfloat16 as its raw 16 bits) in Ray's own serialization. With weight deltas a version
is kept whole, as a delta on the one before (`async_rl.weights.delta`), or both, as in `fs`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from async_rl.choices import Dtype
from async_rl.weights.delta import Delta, from_tensors, to_tensors
from async_rl.weights.store import PlainStore, VersionGone


class _Registry:
    """Ray actor body: version -> object refs of that version's tensors (numpy arrays), whole
    and as a delta (`{"whole": ref or None, "delta": ref or None, "sizes": (bytes, bytes)}`).

    The registry puts each version itself, so the objects are its own and sit in its node's
    object store: they outlive the learner process (and node) that published them (Ray loses a
    `ray.put` object with its owner or with the one node that holds it)."""

    def __init__(self, keep: int):
        self.keep, self.refs = keep, {}

    def put(self, version: int, arrays, delta, sizes: tuple, fingerprint=None) -> None:
        import ray

        self.refs[version] = {
            "whole": None if arrays is None else ray.put(arrays),
            "delta": None if delta is None else ray.put(delta),
            "sizes": sizes,
            "fingerprint": fingerprint,
        }

    def latest(self) -> int | None:
        return max(self.refs) if self.refs else None

    def get(self, version: int, kind: str = "whole") -> list:
        ref = self.refs.get(version, {}).get(kind)
        return [] if ref is None else [ref]

    def sizes(self, version: int) -> tuple | None:
        return self.refs[version]["sizes"] if version in self.refs else None

    def fingerprint(self, version: int) -> str | None:
        return self.refs.get(version, {}).get("fingerprint")

    def collect(self, in_use: list[int]) -> list[int]:
        """Versions no actor uses, but the newest `keep`, version 0, and the newest whole
        version with every delta after it."""
        versions = sorted(self.refs)
        whole = max((v for v in versions if self.refs[v]["whole"] is not None), default=0)
        doomed = [v for v in versions[: -self.keep] if v not in in_use and 0 != v < whole]
        for v in doomed:
            del self.refs[v]
        return doomed


class RayWeightStore(PlainStore):
    """Weights in the Ray object store, indexed by a named Ray actor (multi-node runs)."""

    def __init__(self, name: str, keep: int = 3, create: bool = False):
        import ray

        self.ray = ray
        self.registry = create_registry(name, keep) if create else ray.get_actor(name)

    def publish(
        self,
        version: int,
        hf_state: dict[str, torch.Tensor],
        durable=False,
        delta: Delta | None = None,
        fingerprint: int | None = None,
        whole: bool = True,
    ) -> None:
        """`version` whole, as a delta (`delta`, and not `whole`), or both, as in `fs`."""
        arrays = packed = None
        whole_bytes = delta_bytes = None
        if whole or delta is None:
            arrays = {k: _to_numpy(v) for k, v in hf_state.items()}
            whole_bytes = sum(a.nbytes for a, _ in arrays.values())
        if delta is not None:
            tensors, header = to_tensors(delta)
            packed = ({k: _to_numpy(v) for k, v in tensors.items()}, header)
            delta_bytes = delta.nbytes
        sizes = (whole_bytes, delta_bytes)
        mark = delta.fingerprint if fingerprint is None and delta is not None else fingerprint
        mark = None if mark is None else f"{mark:016x}"  # Ray's msgpack: no 64-bit unsigned
        self.ray.get(self.registry.put.remote(version, arrays, packed, sizes, mark))

    def latest(self) -> int | None:
        return self.ray.get(self.registry.latest.remote())

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator[dict[str, torch.Tensor]]:
        """The version's tensors: fetched whole, so collection cannot touch them."""
        yield self.fetch(version)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        refs = self.ray.get(self.registry.get.remote(version))
        if not refs:
            raise VersionGone(f"weights version {version} is not in the Ray object store whole")
        return {k: _from_numpy(*v) for k, v in self.ray.get(refs[0]).items()}

    def sizes(self, version: int) -> tuple[int | None, int | None]:
        """Bytes of the version whole and as a delta (None where it is not kept so)."""
        sizes = self.ray.get(self.registry.sizes.remote(version))
        if sizes is None:
            raise VersionGone(f"weights version {version} is not in the Ray object store")
        return tuple(sizes)

    def fingerprint(self, version: int) -> int | None:
        """The fingerprint of the version's weights (`weights.delta`), if it was stored."""
        mark = self.ray.get(self.registry.fingerprint.remote(version))
        return None if mark is None else int(mark, 16)

    def read_delta(self, version: int) -> Delta:
        refs = self.ray.get(self.registry.get.remote(version, "delta"))
        if not refs:
            raise VersionGone(
                f"weights version {version} is not in the Ray object store as a delta"
            )
        arrays, header = self.ray.get(refs[0])
        tensors = {k: _from_numpy(*v) for k, v in arrays.items()}
        return from_tensors(tensors, header, f"ray weight delta {version}")

    def collect(self, in_use: set[int]) -> list[int]:
        return self.ray.get(self.registry.collect.remote(sorted(in_use)))


def create_registry(name: str, keep: int):
    """The named registry, created on this process's node unless it exists. The driver creates
    it first, on its own node: the one node a run cannot lose (a registry on a learner or actor
    node would lose every version with that node). The registry lives while a handle to it
    does: its creator keeps the one returned."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    registry = ray.remote(num_cpus=0)(_Registry)
    return registry.options(name=name, get_if_exists=True, scheduling_strategy=here).remote(keep)


def _to_numpy(t: torch.Tensor) -> tuple:
    """(array, dtype name): numpy has no bfloat16, so those travel as their 16 raw bits."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(array, dtype: Dtype) -> torch.Tensor:
    t = torch.from_numpy(array.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
