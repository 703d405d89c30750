"""Where the run's processes go: what each role asks of Ray, and the placement as `--dry-run` and
`async-rl plan` print it. It imports nothing heavy (no Ray): `--dry-run` answers in a second."""

from __future__ import annotations

from async_rl.config import Config


def role_resources(cfg: Config) -> dict[str, dict[str, float]]:
    """What one process of each role asks of Ray: the buffer, each learner rank, each actor
    (their CPU and GPUs, and the custom resources of `<section>.resources` that pin them)."""
    lrn, act = cfg.learner, cfg.actor
    actor_gpus = act.tensor_parallel_size if act.engine == "vllm" else 1
    return {
        "buffer": dict(cfg.buffer.resources),
        "learner": {"CPU": 1.0, **({"GPU": 1.0} if lrn.device == "cuda" else {}), **lrn.resources},
        "actor": {
            "CPU": 1.0,
            **({"GPU": float(actor_gpus)} if act.device == "cuda" else {}),
            **act.resources,
        },
    }


def placement_lines(cfg: Config) -> list[str]:
    """The placement by role, as `--dry-run` and `plan` print it."""
    need = {
        role: ", ".join(f"{k} {v:g}" for k, v in r.items()) or "nothing (any node)"
        for role, r in role_resources(cfg).items()
    }
    act = cfg.actor
    return [
        f"buffer: 1 process, needs {need['buffer']}",
        f"learner: {cfg.learner.num_ranks} rank(s), each needs {need['learner']}",
        f"actors: {act.num_actors} at start ({act.min_actors}..{act.max_actors}), each needs "
        f"{need['actor']}",
    ]
