"""Weight versions from the learner to the actors: every piece of the weight path.

Version v is the learner's weights after v global steps; version 0 is the starting checkpoint.
The learner publishes v+1 after every global step and does not wait for anyone; an actor swaps
to the newest complete version between generation steps (`actors.versions` says which); a late
joiner fetches the newest.

    store.py        the `WeightStore` protocol; `VersionGone`; what readers get (tensors)
    fs.py           `fs`: each version a Hugging Face checkpoint directory under the run
    ray_store.py    `ray`: tensors in the Ray object store (no shared filesystem needed)
    collective.py   `collective`: buckets broadcast over a gloo group, `fs` or `ray` behind it
    buckets.py      the one bucketing scheme: gathering learner shards, broadcasting to actors
    announce.py     the learner's PUB announcements (`WeightsReady`) and the actors' SUB
    delta.py        versions as sparse deltas on the one before, checked by a fingerprint of
                    the weights (`weights.deltas`; every store carries them)

Every store hands out Hugging Face tensor names (`model.layers.0.mlp.experts.3.gate_proj.weight`),
the layout vLLM and transformers read, and every reader yields those tensors:
`with store.reading(v) as tensors:`. Nothing is unpickled: files are safetensors and JSON.
"""

from __future__ import annotations

from pathlib import Path

from async_rl.choices import DurableStoreKind
from async_rl.paths import RunPaths
from async_rl.weights.announce import WeightAnnouncer, WeightSubscriber
from async_rl.weights.collective import CollectiveWeightStore, WeightReceiver, WeightSender
from async_rl.weights.fs import FsWeightStore, read_manifest
from async_rl.weights.ray_store import RayWeightStore, create_registry
from async_rl.weights.store import VersionGone, WeightsSource, WeightStore

__all__ = [
    "CollectiveWeightStore",
    "FsWeightStore",
    "RayWeightStore",
    "VersionGone",
    "WeightAnnouncer",
    "WeightStore",
    "WeightSubscriber",
    "WeightsSource",
    "prepare_weight_store",
    "read_manifest",
    "weight_store",
]


def weight_store(
    cfg,
    run_dir: Path,
    start: Path | None = None,
    create: bool = False,
    member: str | None = None,
) -> WeightStore:
    """The run's store (`weights.store`); the learner creates it, actors open it (an
    actor names itself, `member`, for the collective path's group)."""
    w = cfg.weights
    if _durable_kind(cfg) == "ray":
        durable = RayWeightStore(_registry_name(cfg), w.keep_versions, create=create)
    else:
        durable = FsWeightStore(RunPaths(run_dir).weights, template=start, keep=w.keep_versions)
    if w.store != "collective":
        return durable
    timeout_s, bucket = w.collective_timeout_s, w.bucket_mib * 2**20
    sender = WeightSender(cfg.run.bind_host, timeout_s, bucket) if create else None
    receiver = WeightReceiver(run_dir, member, timeout_s) if member else None
    return CollectiveWeightStore(durable, w.durable_every, sender, receiver)


def prepare_weight_store(cfg):
    """Called by the driver under Ray before the learner starts: a `ray` store's registry is
    created on the driver's node (see `ray_store.create_registry`). The driver keeps what it
    returns for the run (the registry's handle, or None): Ray ends an actor nobody holds."""
    if _durable_kind(cfg) == "ray":
        return create_registry(_registry_name(cfg), cfg.weights.keep_versions)
    return None


def _durable_kind(cfg) -> DurableStoreKind:
    w = cfg.weights
    return w.durable_store if w.store == "collective" else w.store


def _registry_name(cfg) -> str:
    return f"{cfg.run.name}-weights"
