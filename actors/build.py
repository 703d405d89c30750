"""`build_engine`: the engine an actor's config names, built from a checkpoint directory.

It sits apart from `actors.engine` (the interface and types every engine imports), so that no
engine imports the module that chooses among them.

    engine = build_engine(cfg.actor, "runs/tiny/weights/v0")
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from actors.engine import Engine
from async_rl.choices import EngineKind
from async_rl.config import ActorConfig

ENGINES = get_args(EngineKind)


def build_engine(
    actor_cfg: ActorConfig, checkpoint_dir: str | Path, keep_host: bool = False
) -> Engine:
    """The engine `actor_cfg.engine` names, on `actor_cfg.device`, loaded from `checkpoint_dir`
    (`keep_host`: it keeps the weights as published, for deltas)."""
    if actor_cfg.engine == "embedded":
        from actors.embedded import EmbeddedEngine

        return EmbeddedEngine(
            checkpoint_dir,
            quantization=actor_cfg.quantization,
            device=actor_cfg.device,
            max_running_rows=actor_cfg.max_running_rows,
            kv_on_swap=actor_cfg.kv_on_swap,
            keep_host=keep_host,
        )
    if actor_cfg.engine == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(
            checkpoint_dir,
            actor_cfg.quantization,
            actor_cfg.device,
            max_num_seqs=actor_cfg.max_running_rows,
            tensor_parallel_size=actor_cfg.tensor_parallel_size,
            gpu_memory_utilization=actor_cfg.gpu_memory_utilization,
            keep_host=keep_host,
        )
    raise ValueError(
        f"actor.engine: {actor_cfg.engine!r} is not an engine; choose from "
        f"{', '.join(map(repr, ENGINES))}"
    )
