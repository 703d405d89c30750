"""The `ray` weight store: each version's tensors in the Ray object store, indexed by a named
Ray actor, for runs whose actors share no filesystem with the learner. Tensors travel as numpy
arrays (bfloat16 as its raw 16 bits) in Ray's own serialization."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from async_rl.weights.store import PlainStore, VersionGone


class _Registry:
    """Ray actor body: version -> object ref of that version's tensors (numpy arrays)."""

    def __init__(self, keep: int):
        self.keep, self.refs = keep, {}

    def put(self, version: int, refs: list) -> None:
        self.refs[version] = refs[0]  # wrapped in a list so Ray passes the ref, not the value

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
        if create:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # on the learner's node: the versions' objects are the learner's (it put them) and
            # go with it; a registry elsewhere would only add a node whose loss loses them all
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
            registry = ray.remote(num_cpus=0)(_Registry)
            self.registry = registry.options(
                name=name, get_if_exists=True, scheduling_strategy=here
            ).remote(keep)
        else:
            self.registry = ray.get_actor(name)

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], durable=False) -> None:
        arrays = {k: _to_numpy(v) for k, v in hf_state.items()}
        self.ray.get(self.registry.put.remote(version, [self.ray.put(arrays)]))

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


def _to_numpy(t: torch.Tensor) -> tuple:
    """(array, dtype name): numpy has no bfloat16, so those travel as their 16 raw bits."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(array, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(array.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
