"""The `ray` weight store: each version's tensors in the Ray object store, indexed by a named
Ray actor, for runs whose actors share no filesystem with the learner. Tensors travel as numpy
arrays (bfloat16 as its raw 16 bits) in Ray's own serialization."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from async_rl.weights.store import PlainStore, VersionGone


class _Registry:
    """Ray actor body: version -> object ref of that version's tensors (numpy arrays).

    The registry puts each version itself, so the objects are its own and sit in its node's
    object store: they outlive the learner process (and node) that published them (Ray loses a
    `ray.put` object with its owner or with the one node that holds it)."""

    def __init__(self, keep: int):
        self.keep, self.refs = keep, {}

    def put(self, version: int, arrays: dict) -> None:
        import ray

        self.refs[version] = ray.put(arrays)

    def latest(self) -> int | None:
        return max(self.refs) if self.refs else None

    def get(self, version: int) -> list:
        return [self.refs[version]] if version in self.refs else []

    def collect(self, in_use: list[int]) -> list[int]:
        versions = sorted(self.refs)
        doomed = [v for v in versions[: -self.keep] if v not in in_use and v != 0]
        for v in doomed:
            del self.refs[v]
        return doomed


class RayWeightStore(PlainStore):
    """Weights in the Ray object store, indexed by a named Ray actor (multi-node runs)."""

    def __init__(self, name: str, keep: int = 3, create: bool = False):
        import ray

        self.ray = ray
        self.registry = create_registry(name, keep) if create else ray.get_actor(name)

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], durable=False) -> None:
        arrays = {k: _to_numpy(v) for k, v in hf_state.items()}
        self.ray.get(self.registry.put.remote(version, arrays))

    def latest(self) -> int | None:
        return self.ray.get(self.registry.latest.remote())

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator[dict[str, torch.Tensor]]:
        """The version's tensors: fetched whole, so collection cannot touch them."""
        yield self.fetch(version)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        refs = self.ray.get(self.registry.get.remote(version))
        if not refs:
            raise VersionGone(f"weights version {version} is not in the Ray object store")
        return {k: _from_numpy(*v) for k, v in self.ray.get(refs[0]).items()}

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


def _from_numpy(array, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(array.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
