"""The embedded engine: the CPU actor's `Engine` (it runs on CUDA too), in plain PyTorch.

Shape legend: B = running rows, P = prompts being admitted, T = positions, V = vocabulary,
L = MoE layers, K = experts per token.

The model, its precisions (fp32, bf16, FP8 W8A8 emulation) and its KV cache are
`actors.embedded_model`; this module schedules the rows (`actors.engine` describes the
interface):

- Continuous batching: up to `max_running_rows` rows run at once, each with its own length and
  KV cache row. A step first admits queued groups that fit (their distinct prompts prefilled in
  one forward, the cache row copied to each of the G samples), then runs one decode step for
  every running row. A row leaves the batch as soon as it samples eos or reaches its limit
  (`max_new_tokens`, or what is left of the context), so a step costs what the live rows cost.
  Rows live in slots of preallocated tensors (KV cache, routing, sampling state;
  `actors.embedded_rows`): the running rows are the first B slots, a new row is written into a
  free slot, and a finished row's slot takes a row from the end, so neither moves the other
  rows' cache.
- Sampling: each row draws from its own `torch.Generator`, seeded `params.seed + g` for sample
  g, by inverse transform of one uniform per token (drawn for all its tokens when it is
  admitted): a row samples the same tokens whatever else runs beside it. Behaviour log-probs
  are those of the distribution sampled from: softmax(logits / T), restricted to the top-p
  nucleus and renormalised. Temperature 0 is greedy (evaluation and tests); its log-probs are
  then those of softmax(logits).
- In-flight weight updates: `load_weights` between two steps swaps the running rows' weights
  too; each token records the version that drew it. `kv_on_swap = "keep"` keeps the KV entries
  the old weights computed (PipelineRL's rule); `"recompute"` runs every running row's sequence
  through the new weights again first. Routing traces keep the experts of the forward that
  produced each position's first use (what the engine really ran).
- Weights: `load_weights` takes a checkpoint directory, or (for the model already served)
  tensors by Hugging Face name, as the Ray weight store hands them out. An engine built from a
  directory without tensors (config.json only: an actor on a node without the run directory)
  serves nothing until its first `load_weights` of tensors.
- Routing: the top-k expert ids of every MoE layer for every position run forward: the prompt
  and every sampled token but the last, `[P + C - 1, L, K]`.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

from actors.embedded_model import Model, patch_model, read_tensors
from actors.embedded_rows import Row, RunningRows
from actors.engine import (
    Generation,
    GroupRequest,
    SamplingParams,
    capabilities_of,
    requests_of,
    run_to_completion,
)
from async_rl.choices import KvOnSwap, Quantization, check
from async_rl.hf_config import ModelSpec, check_tensors, has_weights, read_model_spec
from async_rl.weights import WeightsSource
from async_rl.weights.delta import Delta, patch_host


def sample_rows(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    uniform_B: torch.Tensor,
) -> tuple[list[int], list[float]]:
    """Each row's next token, drawn with its own uniform: ids and log-probs."""
    greedy_B = temperature_B == 0
    temps_B1 = torch.where(greedy_B, 1.0, temperature_B)[:, None]
    logp_BV = torch.log_softmax(logits_BV / temps_B1, dim=-1)
    top_p_B1 = top_p_B[:, None]
    if (top_p_B1 < 1).any():
        # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
        sorted_BV, order_BV = logp_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.exp()
        outside = ((probs_BV.cumsum(-1) - probs_BV) >= top_p_B1) & (top_p_B1 < 1)
        logp_BV = logp_BV.masked_fill(outside.scatter(-1, order_BV, outside), float("-inf"))
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    cdf_BV = logp_BV.exp().cumsum(-1)
    sampled_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None], right=True)
    sampled_B = sampled_B[:, 0].clamp(max=logits_BV.shape[-1] - 1)
    ids_B = torch.where(greedy_B, logp_BV.argmax(-1), sampled_B)
    return ids_B.tolist(), logp_BV.gather(-1, ids_B[:, None])[:, 0].tolist()


def check_request(request: GroupRequest, spec: ModelSpec) -> None:
    prompt, params = request.prompt, request.params
    if not 0 < len(prompt) < spec.max_positions:
        raise ValueError(
            f"prompts: a prompt of length {len(prompt)}; it must be 1..{spec.max_positions - 1} "
            f"(max_position_embeddings = {spec.max_positions})"
        )
    if min(prompt) < 0 or max(prompt) >= spec.vocab_size:
        raise ValueError(f"prompts: token ids must lie in 0..{spec.vocab_size - 1}")
    if request.num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {request.num_samples}")
    if not params.temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p: must lie in (0, 1], got {params.top_p}")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {params.max_new_tokens}")


def _check_settings(kv_on_swap: KvOnSwap, max_running_rows: int) -> None:
    check("actor.kv_on_swap", kv_on_swap, KvOnSwap)
    if max_running_rows < 1:
        raise ValueError(f"max_running_rows: must be >= 1, got {max_running_rows}")


class EmbeddedEngine:
    """The `Engine` of the CPU actor: see the module docstring."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        quantization: Quantization = "fp8",
        device: str = "cpu",
        max_running_rows: int = 256,
        kv_on_swap: KvOnSwap = "keep",
        keep_host: bool = False,
    ):
        if not isinstance(checkpoint_dir, (str, Path)):
            raise ValueError(
                "checkpoint_dir: the first weights must be a checkpoint directory (config.json "
                f"says what model to build), got {type(checkpoint_dir).__name__}"
            )
        self.capabilities = capabilities_of("embedded", device)
        if quantization not in self.capabilities.quantizations:
            raise ValueError(
                f"quantization: {quantization!r} is not offered; choose from "
                f"{', '.join(map(repr, self.capabilities.quantizations))}"
            )
        _check_settings(kv_on_swap, max_running_rows)
        self.quantization, self.device = quantization, torch.device(device)
        self.max_running_rows, self.kv_on_swap = max_running_rows, kv_on_swap
        self.version = 0
        self.model: Model | None = None
        self.waiting: deque[GroupRequest] = deque()
        self.running = RunningRows(max_running_rows, self.device)
        self.finished: dict[str, list[Generation | None]] = {}  # groups not complete yet
        self._spec = read_model_spec(checkpoint_dir)
        self.closed = False
        # with weight deltas: the last weights loaded, as published, and their fingerprint
        self.keep_host = keep_host
        self.host: dict[str, torch.Tensor] | None = None
        self.fingerprint: int | None = None  # None: not known yet (computed when needed)
        if has_weights(checkpoint_dir):
            self.load_weights(checkpoint_dir, 0)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ weights
    def load_weights(self, source: WeightsSource, version: int) -> None:
        """Swap to a checkpoint directory, or to Hugging Face tensors of the model already
        served, quantized in fp8; running rows go on with them (module docstring). On error
        nothing changes."""
        if isinstance(source, (str, Path)):
            spec = read_model_spec(source)
            tensors = read_tensors(Path(source), spec)
        else:
            if self.closed:
                raise RuntimeError("the engine is closed")
            spec = self._spec
            tensors = check_tensors(dict(source), spec, f"weights of version {version}")
        rows = self.running.rows
        if self.model is not None and rows and spec != self.model.spec:
            raise ValueError(f"weights of version {version}: another model than the running one")
        with torch.inference_mode():
            model = Model(spec, tensors, self.quantization, self.device)
            self.model, self._spec, self.version = model, spec, version
            self._recompute_kv()
        if self.keep_host:  # what deltas patch (`apply_delta`)
            self.host, self.fingerprint = tensors, None  # the store may tell it

    def apply_delta(self, delta: Delta) -> None:
        """Patch the served weights to `delta.version` in place: the host copy entry by entry
        (checked first: a delta for another base, or one that would not give the version the
        learner published, is a `ValueError` and nothing changes), then what the model made of
        each patched tensor (fp8: only the touched rows requantized). Needs `keep_host`."""
        host = self.host if self.model is not None else None
        self.fingerprint = patch_host(host, delta, self.version, self.fingerprint)
        with torch.inference_mode():
            for patch in delta.patches:
                patch_model(self.model, self.host, patch.name, patch.indices)
            self.version = delta.version
            self._recompute_kv()

    def _recompute_kv(self) -> None:
        """With `kv_on_swap = "recompute"`, the running rows' KV cache under the new weights."""
        rows = self.running.rows
        if rows and self.kv_on_swap == "recompute":
            sequences = [r.request.prompt + r.tokens[:-1] for r in rows]
            _, cache, _ = self._prefill(self.model, sequences)
            self.running.replace_cache(cache)

    def close(self) -> None:
        self.model, self.closed = None, True

    # ------------------------------------------------------------------ scheduling
    def submit(self, request: GroupRequest) -> None:
        check_request(request, self._model().spec)
        if request.num_samples > self.max_running_rows:
            raise ValueError(
                f"num_samples: {request.num_samples} rows do not fit in max_running_rows = "
                f"{self.max_running_rows}"
            )
        if request.request_id in self.finished:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.finished[request.request_id] = [None] * request.num_samples
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> list[tuple[str, list[Generation]]]:
        done: list[Row] = []
        self._admit(done)
        if self.running.rows:
            self._decode(done)
        complete = []
        for row in done:
            group = self.finished[row.request.request_id]
            group[row.sample] = row.generation()
            if all(g is not None for g in group):
                complete.append((row.request.request_id, group))
                del self.finished[row.request.request_id]
        return complete

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample."""
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        if self.running.rows or self.waiting:
            raise RuntimeError("generate() needs an idle engine: groups are running")
        requests = requests_of(prompts, params, num_samples)
        for request in requests:  # nothing is queued unless every request is good
            check_request(request, self._model().spec)
        return run_to_completion(self, requests)

    # ------------------------------------------------------------------ internals
    def _prefill(self, model: Model, sequences: list[list[int]]):
        """Run sequences, right-padded, into a new cache: each one's last logits `[P, V]`, the
        cache and the routing `[P, T, L, K]`."""
        lengths_P = torch.tensor([len(s) for s in sequences], device=self.device)
        width = int(lengths_P.max())
        tokens_PT = torch.full((len(sequences), width), model.spec.pad_id, device=self.device)
        for i, s in enumerate(sequences):
            tokens_PT[i, : len(s)] = torch.tensor(s, device=self.device)
        positions_PT = torch.arange(width, device=self.device).expand(len(sequences), width)
        cache = model.new_cache(len(sequences))
        hidden_PTD, routing_PTLK = model.forward(tokens_PT, positions_PT, cache)
        last_PD = hidden_PTD[torch.arange(len(sequences)), lengths_P - 1]
        return model.logits(last_PD), cache, routing_PTLK

    def _admit(self, done: list[Row]) -> None:
        """Queued groups that fit join the running rows; each row samples its first token."""
        admitted, free = [], self.max_running_rows - len(self.running)
        while self.waiting and self.waiting[0].num_samples <= free:
            admitted.append(self.waiting.popleft())
            free -= admitted[-1].num_samples
        if not admitted:
            return
        model = self._model()
        logits_PV, cache, routing_PTLK = self._prefill(model, [r.prompt for r in admitted])
        routing = routing_PTLK.cpu().numpy().astype(model.spec.routing.numpy_dtype)
        rows, source = [], []
        for i, request in enumerate(admitted):
            for g in range(request.num_samples):
                rows.append(self._new_row(request, g, routing[i, : len(request.prompt)]))
                source.append(i)
        source_B = torch.tensor(source, device=self.device)
        params = [row.request.params for row in rows]
        temperature_B = torch.tensor([p.temperature for p in params], device=self.device)
        top_p_B = torch.tensor([p.top_p for p in params], device=self.device)
        uniform_B = torch.stack([row.uniforms[0] for row in rows]).to(self.device)
        logits_BV = logits_PV[source_B]
        keep = self._take(rows, logits_BV, temperature_B, top_p_B, uniform_B, done)
        if keep:
            self.running.add(
                model,
                [rows[b] for b in keep],
                cache,
                source_B[keep],
                routing_PTLK,
                temperature_B[keep],
                top_p_B[keep],
            )

    def _new_row(self, request: GroupRequest, g: int, prompt_routing: np.ndarray) -> Row:
        """Sample g of `request`; its uniforms come from its own stream, seeded `seed + g`."""
        params = request.params
        limit = min(params.max_new_tokens, self._model().spec.max_positions - len(request.prompt))
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed + g)
            uniforms = torch.rand(limit, generator=generator)  # = one draw per token
        else:
            uniforms = torch.zeros(limit)
        return Row(
            request=request, sample=g, limit=limit, uniforms=uniforms, routing=prompt_routing
        )

    def _decode(self, done: list[Row]) -> None:
        """One token for every running row; the rows that finished leave the batch."""
        logits_BV, temperature_B, top_p_B, uniform_B = self.running.forward(self._model())
        keep = self._take(self.running.rows, logits_BV, temperature_B, top_p_B, uniform_B, done)
        self.running.advance(keep)

    def _take(
        self,
        rows: list[Row],
        logits_BV: torch.Tensor,
        temperature_B: torch.Tensor,
        top_p_B: torch.Tensor,
        uniform_B: torch.Tensor,
        done: list[Row],
    ) -> list[int]:
        """Sample each row's next token from `logits_BV` (every token is drawn here: a subclass
        may read the logits, as `tests.helpers.LogitsEngine` does); finished rows go to `done`;
        the others' indices."""
        ids, logprobs = sample_rows(logits_BV, temperature_B, top_p_B, uniform_B)
        eos = set(self._model().spec.eos_ids)
        keep = []
        for b, (row, token, logprob) in enumerate(zip(rows, ids, logprobs, strict=True)):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.versions.append(self.version)
            if token in eos or token in row.request.params.stop_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.limit:
                row.finish_reason = "length"
            if row.finish_reason is None:
                keep.append(b)
            else:
                done.append(row)
        return keep

    def _model(self) -> Model:
        if self.model is None:
            why = "closed" if self.closed else "built without weights and none loaded yet"
            raise RuntimeError(f"the engine is {why}")
        return self.model
