"""Ray for a run: joining or starting it, and what the run's processes reserve in it.

`check_placement` refuses a learner this machine cannot hold before Ray starts; the learner's
ranks get a placement group (a CPU each, and a GPU each on CUDA), an actor the GPUs of its
engine.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from async_rl.config import Config, ConfigError, is_loopback


def init_ray(cfg: Config, address: str | None) -> None:
    """Join `address`, or start a local Ray instance that listens on loopback only.

    On Linux Ray turns a loopback node address into the machine's reachable one and its GCS,
    raylet and worker servers listen on every interface; with
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (its single-machine mode) they use 127.0.0.1. The
    variable is read by this process at import and by every Ray process it starts, so it is set
    in both places.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    if is_loopback(cfg.run.bind_host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 1 + cfg.learner.num_ranks + cfg.actor.max_actors),
        include_dashboard=False,
        _node_ip_address=cfg.run.bind_host,
        log_to_driver=False,
    )


def check_placement(cfg: Config, address: str | None) -> None:
    """Refuse, before Ray starts, a learner that this machine cannot place: a rank per core,
    and on CUDA a GPU per rank (a cluster, `--ray-address`, is checked by Ray's placement group
    as the run starts)."""
    if address is not None:
        return
    ranks, cores = cfg.learner.num_ranks, os.cpu_count() or 1
    if ranks > cores:
        raise ConfigError(
            "learner.num_ranks",
            f"{ranks} learner ranks need a CPU core each; this machine has {cores}",
        )
    if cfg.learner.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if ranks > gpus:
            raise ConfigError(
                "learner.device",
                f"cuda: {ranks} learner rank(s) (learner.num_ranks) need a GPU each; this "
                f"machine has {gpus}",
            )


def place_learner_ranks(cfg: Config, timeout_s: float) -> tuple[Any, list[dict[str, Any]]]:
    """Reserve the learner's ranks (a placement group of a CPU each, and a GPU each on CUDA):
    the group and, in rank order, the Ray options that put each rank in its bundle."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.learner.num_ranks
    bundle = {"CPU": 1, **({"GPU": 1} if cfg.learner.device == "cuda" else {})}
    group = placement_group([bundle] * world, strategy="PACK")
    if not ray.wait([group.ready()], timeout=timeout_s)[0]:
        raise RuntimeError(
            f"learner.num_ranks = {world}: Ray cannot place {world} x {bundle} within "
            f"{timeout_s:.0f}s (cluster: {ray.cluster_resources()})"
        )
    strategies = [
        PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
        for rank in range(world)
    ]
    options = {"num_cpus": 1, "num_gpus": bundle.get("GPU", 0)}
    return group, [{**options, "scheduling_strategy": s} for s in strategies]


def actor_gpus(cfg: Config) -> dict[str, int]:
    """The GPUs one actor reserves: its engine's on CUDA (a vLLM engine's tensor-parallel
    group), none on CPU."""
    act = cfg.actor
    if act.device != "cuda":
        return {}
    return {"num_gpus": act.tensor_parallel_size if act.engine == "vllm" else 1}
