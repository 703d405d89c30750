"""Ray for a run: joining or starting it, and what the run's processes reserve in it.

Every process asks Ray for what its role needs (`async_rl.run.placement.role_resources`): a learner
rank a CPU (and a GPU on CUDA), an actor a CPU (and its engine's GPUs), the buffer nothing, and
each the custom resources of `<section>.resources`, which pin a role to the nodes that
advertise them (`ray start --resources='{"learner_node": 1}'`). `check_placement` refuses a
learner this machine cannot hold before Ray starts; `check_resources` refuses, once Ray is up
and before anything starts, a role that no node of the cluster can hold. The learner's ranks
get a placement group of one bundle each.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from async_rl.config import Config, ConfigError, is_loopback
from async_rl.run.placement import role_resources
from async_rl.wire.transport import WILDCARD_HOSTS


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
        _node_ip_address=None if cfg.run.bind_host in WILDCARD_HOSTS else cfg.run.bind_host,
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


def ray_options(need: dict[str, float]) -> dict[str, Any]:
    """Ray actor options asking for `need` (a role's resources)."""
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": need.get("CPU", 0), "num_gpus": need.get("GPU", 0), "resources": custom}


def _fits(offer: dict[str, float], need: dict[str, float]) -> int:
    """How many processes needing `need` a node offering `offer` holds (many if `need` is
    nothing)."""
    counts = [int(offer.get(k, 0) // v) for k, v in need.items() if v > 0]
    return min(counts) if counts else 1 << 30


def check_resources(cfg: Config) -> None:
    """Once Ray is up: a `ConfigError` naming the key for a role that the alive nodes cannot
    hold: no node holds one of its processes (the learner: all its ranks, over the nodes
    together), or the cluster's total of a resource is less than the buffer, the learner and
    one actor need together. (Both are necessary, not sufficient: Ray's placement decides.)"""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    offers = "; ".join(
        ", ".join(f"{k} {v:g}" for k, v in sorted(o.items()) if not k.startswith("node:"))
        for o in nodes
    )
    wanted = {"buffer": 1, "learner": cfg.learner.num_ranks, "actor": 1}
    needs = role_resources(cfg)
    for role, need in needs.items():
        room = sum(_fits(offer, need) for offer in nodes)
        if room < wanted[role]:
            raise ConfigError(
                f"{role}.resources",  # the sections are named after the roles
                f"{wanted[role]} {role} process(es) need {need} each; the Ray cluster's nodes "
                f"hold {room} (they offer: {offers})",
            )
    for name in {k: None for need in needs.values() for k in need}:  # each resource once
        total = sum(o.get(name, 0.0) for o in nodes)
        demand = sum(wanted[r] * n.get(name, 0.0) for r, n in needs.items())
        if demand > total:
            role = next(r for r, n in needs.items() if name in n)
            raise ConfigError(
                f"{role}.resources",
                f"the buffer, {wanted['learner']} learner rank(s) and an actor need "
                f"{name} {demand:g} together; the cluster has {total:g} (nodes: {offers})",
            )


def wait_for_resources(cfg: Config, say=print) -> None:
    """`check_resources`, at once with `run.resources_timeout_s = 0`; else the roles' bundles
    are asked of Ray's autoscaler (`request_resources`: the buffer, every learner rank and
    `actor.num_actors` actors) and the check is repeated until it passes or the timeout ends,
    when the last refusal is raised."""
    timeout_s = cfg.run.resources_timeout_s
    if timeout_s <= 0:
        return check_resources(cfg)
    from ray.autoscaler.sdk import request_resources

    needs = role_resources(cfg)
    counts = {"buffer": 1, "learner": cfg.learner.num_ranks, "actor": cfg.actor.num_actors}
    bundles = [need for role, need in needs.items() for _ in range(counts[role]) if need]
    request_resources(bundles=bundles)
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            return check_resources(cfg)
        except ConfigError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(e.key, f"{e.message} (after waiting {timeout_s:g}s)") from None
            if not told:
                say(f"waiting up to {timeout_s:g}s for nodes (run.resources_timeout_s): {e}")
                told = True
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))


def place_learner_ranks(cfg: Config, timeout_s: float) -> tuple[Any, list[dict[str, Any]]]:
    """Reserve the learner's ranks (a placement group of a CPU each, and a GPU each on CUDA):
    the group and, in rank order, the Ray options that put each rank in its bundle."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.learner.num_ranks
    bundle = role_resources(cfg)["learner"]
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
    return group, [{**ray_options(bundle), "scheduling_strategy": s} for s in strategies]


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class NodeWatch:
    """The Ray nodes alive, looked at every `CHECK_S`: `lost()` names those gone since (Ray
    marks a node dead when its raylet misses heartbeats, about 15 s after it died)."""

    CHECK_S = 2.0

    def __init__(self):
        self.alive, self.checked = alive_nodes(), time.monotonic()

    def lost(self) -> set[str]:
        if time.monotonic() - self.checked < self.CHECK_S:
            return set()
        alive, self.checked = alive_nodes(), time.monotonic()
        gone, self.alive = self.alive - alive, alive
        return gone
