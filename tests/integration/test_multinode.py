"""A run over several Ray nodes on this machine, placed by role (`<section>.resources`).

The cluster is what a user starts: a head and two worker nodes, `ray start` each, every node
advertising a custom resource; the run pins the learner to one node and the actors to another.
"""

import ipaddress
import json
import threading
import time
from pathlib import Path

import pytest

from async_rl.config import ConfigError, ModelConfig, load_config
from async_rl.run.cluster import check_resources, wait_for_resources
from async_rl.types import RoutingSpec
from async_rl.wire.security import create_keys
from tests import faults
from tests.helpers import (
    FileAudit,
    RayCluster,
    json_lines,
    launch,
    pid_of,
    train_overrides,
    versions,
    wait_for,
)


def test_a_role_no_node_can_hold_is_refused_naming_its_key(tmp_path):
    """Before anything starts: the resources a role names exist on no node, or too few."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, resources={"learner_node": 1}, include_dashboard=False)
    try:
        check_resources(load_config(None, ["learner.resources={learner_node = 1}"]))
        with pytest.raises(ConfigError, match=r"actor\.resources: .*actor_node"):
            check_resources(load_config(None, ["actor.resources={actor_node = 1}"]))
        two = ["learner.num_ranks=2", "learner.resources={learner_node = 1}"]
        with pytest.raises(ConfigError, match=r"learner\.resources: 2 learner .* hold 1"):
            check_resources(load_config(None, two))
        both = ["buffer.resources={learner_node = 1}", "learner.resources={learner_node = 0.5}"]
        with pytest.raises(ConfigError, match=r"need learner_node 1.5 together; .* has 1"):
            check_resources(load_config(None, both))
    finally:
        ray.shutdown()


def test_a_run_told_to_waits_for_the_nodes_its_roles_need_then_refuses(tmp_path):
    """`run.resources_timeout_s` (an autoscaling cluster): the roles' bundles are asked of Ray's
    autoscaler and the check waits for them; a node that joins meanwhile lets the run start,
    none within the timeout is the usual refusal, with the wait said."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        late = ["actor.resources={late_node = 1}", "run.resources_timeout_s=2"]
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"actor\.resources: .* \(after waiting 2s\)"):
            wait_for_resources(load_config(None, late))
        assert time.monotonic() - start >= 2
        said, errors = [], []
        waits = load_config(None, [late[0], "run.resources_timeout_s=120"])

        def wait():
            try:
                wait_for_resources(waits, said.append)
            except Exception as e:
                errors.append(e)

        waiting = threading.Thread(target=wait)
        waiting.start()
        wait_for(lambda: said, 30)  # waiting for the node, which then joins (Ray: main thread)
        cluster.add_node(num_cpus=1, resources={"late_node": 1})
        waiting.join(60)
        assert not waiting.is_alive() and not errors, errors
        assert len(said) == 1 and "late_node" in said[0]
    finally:
        ray.shutdown()
        cluster.shutdown()


def train_on(cluster: RayCluster, overrides: list[str], *more: str):
    """`async-rl train` on `cluster`, the buffer on its head: the run directory, log, process."""
    config = dict(o.split("=", 1) for o in overrides)
    run_dir = Path(config["run.output_dir"]) / config["run.name"]
    log = run_dir.with_suffix(".log")
    args = [*overrides, "buffer.resources={head_node = 1}", *more]
    proc = launch(log, *args, "--ray-address", cluster.address, env=cluster.env)
    return run_dir, log, proc


def placed(run_dir: Path):
    """The driver's `control/placement.json` of a run, and `on(name)`: the node it says the
    process `name` runs on (None before it answered)."""
    placement = run_dir / "control" / "placement.json"

    def on(name: str) -> str | None:
        if not placement.exists():
            return None
        return json.loads(placement.read_text())["processes"].get(name, {}).get("node")

    return placement, on


@pytest.mark.slow
def test_a_run_over_three_nodes_is_placed_by_role_and_survives_losing_the_actors_node(
    tmp_path, start
):
    """The buffer and the learner on the head, two actors on the actor nodes, as a user runs
    it across machines: sockets on every interface with CURVE keys, the `ray` weight store,
    the actors' nodes started in a directory of their own. No actor process touches a file of
    the run directory or of the starting checkpoint (an audit hook in every Python process of
    those nodes says so). Then the node of actor a0 dies (its raylet and every process on it,
    SIGKILL) mid-run: Ray starts a0 again on the other actor node, the run finishes, no
    accepted group is lost, and the loss is in control/placement.json, metrics.jsonl and on
    the terminal."""
    head = {"head_node": 2}
    run_dir, elsewhere = tmp_path / "nodes", tmp_path / "elsewhere"
    elsewhere.mkdir()
    audit = FileAudit(tmp_path / "audit.log", [run_dir, start])
    with RayCluster(tmp_path, head_cpus=2, head_resources=head, multinode=True) as cluster:
        for name in ("a", "b"):
            resources = {"actor_node": 2, f"node_{name}": 1}
            cluster.add(name, num_cpus=2, resources=resources, env=audit.env, cwd=elsewhere)
        nodes = cluster.node_ids()
        assert len(set(nodes.values())) == 3
        run_dir, log, proc = train_on(
            cluster,
            # outlasts the kill: 100 versions took 9 s, a0 came back after the end
            train_overrides(tmp_path, start, "nodes", 400),
            "run.eval_every=200",
            "learner.checkpoint_every=50",
            "actor.num_actors=2",
            "actor.max_actors=2",
            "learner.resources={head_node = 1}",
            "actor.resources={actor_node = 1}",
            "weights.store=ray",
            "run.bind_host=0.0.0.0",
            f"run.curve_keys={create_keys(tmp_path / 'keys')}",
        )
        placement, on = placed(run_dir)

        wait_for(lambda: on("a0") and on("a1") and len(versions(run_dir)) >= 3, 240, proc, log)
        assert on("buffer") == on("learner") == nodes["head_node"]
        assert {on("a0"), on("a1")} <= {nodes["node_a"], nodes["node_b"]}
        actor_pids = {pid_of(run_dir, "a0"), pid_of(run_dir, "a1")}
        victim, survivor = ("a", "b") if on("a0") == nodes["node_a"] else ("b", "a")
        cluster.kill(victim)
        wait_for(lambda: on("a0") == nodes[f"node_{survivor}"], 240, proc, log)  # back
        wait_for(lambda: pid_of(run_dir, "a0") not in actor_pids, 60, proc, log)
        actor_pids.add(pid_of(run_dir, "a0"))
        assert proc.wait(400) == 0, log.read_text()[-4000:]
    assert versions(run_dir) == list(range(401))  # 0: the held-out evaluation before training
    rows = json_lines(run_dir / "metrics.jsonl")
    assert [r["version"] for r in rows if "eval/accuracy" in r] == [0, 200, 400]
    lost = json.loads(placement.read_text())["lost_nodes"]
    assert [n["node"] for n in lost] == [nodes[f"node_{victim}"]] and "a0" in lost[0]["processes"]
    assert rows[-1]["rollout/nodes_lost"] == 1 and rows[0].get("rollout/nodes_lost", 0) == 0
    assert "lost (a0" in log.read_text()  # on the terminal
    report = faults.audit(run_dir, RoutingSpec.of(ModelConfig()), group_size=4, max_staleness=1)
    assert not report["problems"] and report["groups_lost"] == 0, report
    # sockets on every interface, published at the node's address (Ray's), where the actors
    # reached them; and the actors touched no file of the run or of its starting checkpoint
    published = json.loads((run_dir / "endpoints" / "buffer.json").read_text())
    hosts = {a.removeprefix("tcp://").rsplit(":", 1)[0] for a in published.values()}
    assert len(hosts) == 1 and not ipaddress.ip_address(hosts.pop()).is_unspecified, published
    started = audit.started()
    assert actor_pids <= set(started) and {started[p] for p in actor_pids} == {str(elsewhere)}
    assert audit.touched() == []


@pytest.mark.slow
@pytest.mark.heavy
def test_losing_the_learners_node_restarts_the_group_on_another_from_its_checkpoint(
    tmp_path, start
):
    """Two nodes can hold the learner; the one it runs on dies after a checkpoint: the group
    starts again on the other (its rank's crash is seen at once, the node's loss when Ray marks
    it dead), resumes from the newest checkpoint (on the run directory, which both nodes see
    here) and finishes the run, no accepted group lost. The weights take the collective path
    off loopback, as a user runs it on a trusted network (its durable versions in Ray)."""
    head = {"head_node": 2}
    with RayCluster(tmp_path, head_cpus=2, head_resources=head, multinode=True) as cluster:
        for name in ("l1", "l2"):
            cluster.add(name, num_cpus=1, resources={"learner_node": 1, f"node_{name}": 1})
        nodes = cluster.node_ids()
        run_dir, log, proc = train_on(
            cluster,
            # outlasts Ray's ~15-30 s to mark the node dead (the collective path trains ~7/s)
            train_overrides(tmp_path, start, "lrn", 1000),
            "actor.resources={head_node = 1}",
            "learner.resources={learner_node = 1}",
            "weights.store=collective",
            "weights.durable_store=ray",
            "weights.collective_trusted_network=true",
            "run.bind_host=0.0.0.0",
            f"run.curve_keys={create_keys(tmp_path / 'keys')}",
        )
        placement, on = placed(run_dir)

        checkpoints = run_dir / "checkpoints" / "learner"
        wait_for(lambda: on("learner") and list(checkpoints.glob("step-*")), 240, proc, log)
        victim, survivor = ("l1", "l2") if on("learner") == nodes["node_l1"] else ("l2", "l1")
        cluster.kill(victim)
        wait_for(lambda: on("learner") == nodes[f"node_{survivor}"], 300, proc, log)
        wait_for(lambda: json.loads(placement.read_text())["lost_nodes"], 120, proc, log)
        assert proc.wait(400) == 0, log.read_text()[-4000:]
    assert versions(run_dir)[-1] == 1000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rollout/nodes_lost"] == 1
    lost = json.loads(placement.read_text())["lost_nodes"]
    assert [n["node"] for n in lost] == [nodes[f"node_{victim}"]]
    assert lost[0]["processes"] == ["learner"]
    assert "restarting the learner" in log.read_text()
    report = faults.audit(run_dir, RoutingSpec.of(ModelConfig()), group_size=4, max_staleness=1)
    assert not report["problems"] and report["groups_lost"] == 0, report
