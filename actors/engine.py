"""The inference-engine interface the actor loop talks to (`actors.build` chooses an engine).

An engine turns prompts into G sampled completions each and reports, per completion, what the
learner needs to correct for the train-inference mismatch: the behaviour log-prob of every sampled
token under the distribution it was actually drawn from, the weights version that drew it, and
the routing trace (the experts every position was sent to) for Routing Replay R3.

    engine = build_engine(cfg.actor, "runs/tiny/weights/v0")     # actors.build
    engine.submit(GroupRequest("g17", prompt, 8, SamplingParams(1.0, 1.0, 64, seed=991)))
    while engine.num_running or engine.num_waiting:
        for request_id, group in engine.step():       # one decode step of every running row
            group[g].tokens, group[g].logprobs, group[g].versions, group[g].routing
        engine.load_weights(source, v)                # between two steps: in flight
    groups = engine.generate(prompts, params, num_samples=8)   # the same, for a list of prompts

Continuous batching: `submit` queues a group; each `step` first admits queued groups into the
running set while `max_running_rows` allows (their prompts are prefilled), then runs one decode
step for every running row; a row that samples eos or reaches its length limit leaves at once,
and a group is returned as soon as its G completions are finished. Sample g of a group draws
from its own random stream, seeded `params.seed + g`: a row samples the same tokens whatever
else runs beside it.

In-flight weight updates: `load_weights` between two steps swaps the weights of the running
rows too. Their tokens from then on come from the new version (`Generation.versions`); the KV
entries the old weights computed are kept (as PipelineRL does), or computed again by the new
weights (`kv_on_swap = "recompute"`, an engine setting).

Engines know nothing of the learner or the loss; weights arrive as Hugging Face Qwen3-MoE
checkpoint directories (config.json + safetensors), the format the learner exports, or as that
checkpoint's tensors by Hugging Face name (`async_rl.weights.WeightsSource`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from async_rl.capabilities import ENGINE_CAPABILITIES
from async_rl.weights import WeightsSource


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled.

    Example: `SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=17)`.
    """

    temperature: float  # softmax temperature; > 0 (0 = greedy, for evaluation and tests)
    top_p: float  # nucleus mass in (0, 1]; 1 = the full distribution
    max_new_tokens: int  # longest completion, eos included
    seed: int | None  # same seed, prompts and weights -> same samples; None = fresh randomness
    # ids that end a completion (kept as its last token) besides the checkpoint's own eos ids
    # (config.json and generation_config.json); the run's are `Tokenizer.stop_ids`
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GroupRequest:
    """G completions of one prompt; sample g draws from the random stream `params.seed + g`.

    Example: `GroupRequest("a0-17", [2, 5, 13, 6, 14], 8, SamplingParams(1.0, 1.0, 8, 991))`.
    """

    request_id: str  # returned with the finished group
    prompt: list[int]  # [P] token ids, bos included
    num_samples: int  # G
    params: SamplingParams


@dataclass
class Generation:
    """One sampled completion of one prompt.

    Example: prompt `[2, 5, 13, 6, 14]` ("<bos>3+4=") -> `tokens = [11, 1]` ("7<eos>"),
    `logprobs = [-0.02, -0.001]`, `versions = [3, 3]`, `routing.shape == (5 + 2 - 1, L, K)`,
    `finish_reason = "stop"`.
    """

    tokens: list[int]  # [C] completion ids, eos included when it was sampled
    logprobs: list[float]  # [C] log mu(token): after temperature and top-p renormalisation
    versions: list[int]  # [C] the weights version whose distribution each token was drawn from
    # [P + C - 1, L, K] expert ids of every position run forward (the prompt and every completion
    # token but the last), in the router's top-k order; `RoutingSpec.numpy_dtype`.
    routing: np.ndarray | None
    finish_reason: str  # "stop" (eos sampled) or "length" (max_new_tokens or the context ran out)


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do. Example: `EngineCapabilities(True, ("fp8", "bf16", "fp32"))`."""

    routing: bool  # returns routing traces (needed by Routing Replay R3)
    quantizations: tuple[str, ...]  # rollout precisions it offers
    in_flight: bool = True  # swaps weights between decode steps while rows keep generating


def capabilities_of(engine: str, device: str) -> EngineCapabilities:
    """The capabilities `async_rl.config.ENGINE_CAPABILITIES` declares for (engine, device)."""
    if (engine, device) not in ENGINE_CAPABILITIES:
        known = ", ".join(f"{e}/{d}" for e, d in ENGINE_CAPABILITIES)
        raise ValueError(f"engine {engine!r} on device {device!r} is unknown; known: {known}")
    caps = ENGINE_CAPABILITIES[(engine, device)]
    return EngineCapabilities(
        routing=caps["routing"],
        quantizations=tuple(caps["quantization"]),
        in_flight=caps["in_flight"],
    )


class Engine(Protocol):
    """An inference engine of one actor. `version` is the weights version it currently serves."""

    capabilities: EngineCapabilities
    version: int

    @property
    def num_running(self) -> int:
        """Rows (completions) being generated."""
        ...

    @property
    def num_waiting(self) -> int:
        """Groups submitted and not yet admitted."""
        ...

    def submit(self, request: GroupRequest) -> None:
        """Queue a group; `ValueError` naming what is wrong with a bad request."""
        ...

    def step(self) -> list[tuple[str, list[Generation]]]:
        """Admit what fits, run one decode step; the groups that finished, with their ids."""
        ...

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample.
        Prompt i's samples use the seeds `params.seed + i * num_samples + g`."""
        ...

    def load_weights(self, source: WeightsSource, version: int) -> None:
        """Swap in place to the weights of `source` (a checkpoint directory, or tensors of the
        model already served) and serve them as `version`, running rows included; on error
        nothing changes."""
        ...

    def close(self) -> None:
        """Release the weights and any worker the engine holds."""
        ...


def requests_of(
    prompts: list[list[int]], params: SamplingParams, num_samples: int
) -> list[GroupRequest]:
    """`generate()`'s groups: prompt i gets the seeds `params.seed + i * num_samples + g`."""
    requests = []
    for i, prompt in enumerate(prompts):
        seed = None if params.seed is None else params.seed + i * num_samples
        requests.append(GroupRequest(str(i), list(prompt), num_samples, _with_seed(params, seed)))
    return requests


def run_to_completion(engine: Engine, requests: list[GroupRequest]) -> list[list[Generation]]:
    """Submit `requests`, step until every one finished; their groups in request order."""
    for request in requests:
        engine.submit(request)
    done: dict[str, list[Generation]] = {}
    while len(done) < len(requests):
        done.update(engine.step())
    return [done[r.request_id] for r in requests]


def engine_generate(engine: Engine, max_new_tokens: int, seed: int, stop_ids: tuple[int, ...] = ()):
    """`generate(prompts, temperature, repeats)` completions through `engine` (held-out
    evaluation, `learner.evaluate`): call c samples from the seeds `seed + 1_000_003 c + ...`."""
    calls = iter(range(1 << 62))

    def generate(prompts: list[list[int]], temperature: float, repeats: int):
        call_seed = seed + 1_000_003 * next(calls)
        params = SamplingParams(temperature, 1.0, max_new_tokens, call_seed, tuple(stop_ids))
        return [[g.tokens for g in group] for group in engine.generate(prompts, params, repeats)]

    return generate


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
