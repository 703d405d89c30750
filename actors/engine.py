"""The inference-engine interface the actor loop talks to, and `build_engine` to choose one.

An engine turns prompts into G sampled completions each and reports, per completion, what the
learner needs to correct for the train-inference mismatch: the behaviour log-prob of every sampled
token under the distribution it was actually drawn from, and the routing trace (the experts every
position was sent to) for Routing Replay R3.

    engine = build_engine(cfg.actor, "runs/tiny/weights/v0")
    groups = engine.generate(prompts, SamplingParams(1.0, 1.0, 8, seed=0), num_samples=8)
    groups[i][g].tokens, groups[i][g].logprobs, groups[i][g].routing   # prompt i, sample g
    engine.load_weights("runs/tiny/weights/v1", version=1)             # swap in place
    engine.load_weights(store.source(2), version=2)                    # a directory or tensors

Engines know nothing of the learner or the loss; weights arrive as Hugging Face Qwen3-MoE
checkpoint directories (config.json + safetensors), the format the learner exports, or as that
checkpoint's tensors by Hugging Face name (`async_rl.weights.WeightsSource`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from async_rl.config import ENGINE_CAPABILITIES, ActorConfig
from async_rl.weights import WeightsSource

ENGINES = ("embedded", "vllm")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled.

    Example: `SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=17)`.
    """

    temperature: float  # softmax temperature; > 0 (0 = greedy, for evaluation and tests)
    top_p: float  # nucleus mass in (0, 1]; 1 = the full distribution
    max_new_tokens: int  # longest completion, eos included
    seed: int | None  # same seed, prompts and weights -> same samples; None = fresh randomness


@dataclass
class Generation:
    """One sampled completion of one prompt.

    Example: prompt `[2, 5, 13, 6, 14]` ("<bos>3+4=") -> `tokens = [11, 1]` ("7<eos>"),
    `logprobs = [-0.02, -0.001]`, `routing.shape == (5 + 2 - 1, L, K)`, `finish_reason = "stop"`.
    """

    tokens: list[int]  # [C] completion ids, eos included when it was sampled
    logprobs: list[float]  # [C] log mu(token): after temperature and top-p renormalisation
    # [P + C - 1, L, K] expert ids of every position run forward (the prompt and every completion
    # token but the last), in the router's top-k order; `RoutingSpec.numpy_dtype`.
    routing: np.ndarray | None
    finish_reason: str  # "stop" (eos sampled) or "length" (max_new_tokens or the context ran out)


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do. Example: `EngineCapabilities(True, ("fp8", "bf16", "fp32"))`."""

    routing: bool  # returns routing traces (needed by Routing Replay R3)
    quantizations: tuple[str, ...]  # rollout precisions it offers


def capabilities_of(engine: str, device: str) -> EngineCapabilities:
    """The capabilities `async_rl.config.ENGINE_CAPABILITIES` declares for (engine, device)."""
    if (engine, device) not in ENGINE_CAPABILITIES:
        known = ", ".join(f"{e}/{d}" for e, d in ENGINE_CAPABILITIES)
        raise ValueError(f"engine {engine!r} on device {device!r} is unknown; known: {known}")
    caps = ENGINE_CAPABILITIES[(engine, device)]
    return EngineCapabilities(routing=caps["routing"], quantizations=tuple(caps["quantization"]))


class Engine(Protocol):
    """An inference engine of one actor. `version` is the weights version it currently serves."""

    capabilities: EngineCapabilities
    version: int

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample."""
        ...

    def load_weights(self, source: WeightsSource, version: int) -> None:
        """Swap in place to the weights of `source` (a checkpoint directory, or tensors of the
        model already served) and serve them as `version`; on error nothing changes."""
        ...

    def close(self) -> None:
        """Release the weights and any worker the engine holds."""
        ...


def build_engine(actor_cfg: ActorConfig, checkpoint_dir: str | Path) -> Engine:
    """The engine `actor_cfg.engine` names, on `actor_cfg.device`, loaded from `checkpoint_dir`."""
    if actor_cfg.engine == "embedded":
        from actors.embedded import EmbeddedEngine

        return EmbeddedEngine(
            checkpoint_dir, quantization=actor_cfg.quantization, device=actor_cfg.device
        )
    if actor_cfg.engine == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(checkpoint_dir, actor_cfg.quantization, actor_cfg.device)
    raise ValueError(
        f"actor.engine: {actor_cfg.engine!r} is not an engine; choose from "
        f"{', '.join(map(repr, ENGINES))}"
    )
