"""A run over several Ray nodes on this machine, placed by role (`<section>.resources`).

The cluster is what a user starts: a head and two worker nodes, `ray start` each, every node
advertising a custom resource; the run pins the learner to one node and the actors to another.
"""

import json

import pytest

from app.cluster import check_resources
from async_rl.config import ConfigError, load_config
from tests.helpers import RayCluster, json_lines, launch, train_overrides, versions


@pytest.mark.slow
def test_the_learner_and_the_actors_run_on_the_nodes_their_resources_name(tmp_path, start):
    head = {"head_node": 1}
    with RayCluster(tmp_path, head_cpus=1, head_resources=head, multinode=True) as cluster:
        cluster.add("learner", num_cpus=1, resources={"learner_node": 1})
        cluster.add("actors", num_cpus=2, resources={"actor_node": 2})
        nodes = cluster.node_ids()
        assert len(set(nodes.values())) == 3
        overrides = [
            *train_overrides(tmp_path, start, "nodes", 4),
            "run.eval_every=2",
            "actor.num_actors=2",
            "actor.max_actors=2",
            "buffer.resources={head_node = 1}",
            "learner.resources={learner_node = 1}",
            "actor.resources={actor_node = 1}",
        ]
        log = tmp_path / "nodes.log"
        proc = launch(log, *overrides, "--ray-address", cluster.address, env=cluster.env)
        assert proc.wait(400) == 0, log.read_text()[-4000:]
    run_dir = tmp_path / "nodes"
    assert versions(run_dir) == [0, 1, 2, 3, 4]  # 0: the held-out evaluation before training
    evaluated = [
        r["version"] for r in json_lines(run_dir / "metrics.jsonl") if "eval/accuracy" in r
    ]
    assert evaluated == [0, 2, 4]
    placed = json.loads((run_dir / "control" / "placement.json").read_text())
    on = {name: p["node"] for name, p in placed.items()}
    assert on["buffer"] == nodes["head_node"]
    assert on["learner"] == nodes["learner_node"]
    assert on["a0"] == on["a1"] == nodes["actor_node"]


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
    finally:
        ray.shutdown()
