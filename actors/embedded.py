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
- Sampling: each row draws from its own `torch.Generator`, seeded `params.seed + g` for sample
  g, by inverse transform of one uniform per token: a row samples the same tokens whatever else
  runs beside it. Behaviour log-probs are those of the distribution sampled from:
  softmax(logits / T), restricted to the top-p nucleus and renormalised. Temperature 0 is
  greedy (evaluation and tests); its log-probs are then those of softmax(logits).
- In-flight weight updates: `load_weights` between two steps swaps the running rows' weights
  too; each token records the version that drew it. `kv_on_swap = "keep"` keeps the KV entries
  the old weights computed (PipelineRL's rule); `"recompute"` runs every running row's sequence
  through the new weights again first. Routing traces keep the experts of the forward that
  produced each position's first use (what the engine really ran).
- Weights: `load_weights` takes a checkpoint directory, or (for the model already served)
  tensors by Hugging Face name, as the Ray weight store hands them out.
- Routing: the top-k expert ids of every MoE layer for every position run forward: the prompt
  and every sampled token but the last, `[P + C - 1, L, K]`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from actors.embedded_model import Cache, Model, read_tensors
from actors.engine import (
    Generation,
    GroupRequest,
    SamplingParams,
    capabilities_of,
    requests_of,
    run_to_completion,
)
from async_rl.hf_config import ModelSpec, check_tensors, read_model_spec
from async_rl.weights import WeightsSource

KV_ON_SWAP = ("keep", "recompute")


@dataclass
class _Row:
    """One completion being generated."""

    request: GroupRequest
    sample: int  # g, within its group
    generator: torch.Generator | None  # None: greedy
    limit: int  # most completion tokens
    prompt_routing: np.ndarray  # [P, L, K]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routing: list[torch.Tensor] = field(default_factory=list)  # [L, K] per decode input
    logits: list[torch.Tensor] | None = None  # [V] per token, when kept
    finish_reason: str | None = None

    def generation(self) -> Generation:
        decode = [r.numpy() for r in self.routing]
        routing = np.concatenate([self.prompt_routing, *(r[None] for r in decode)])
        return Generation(
            tokens=self.tokens,
            logprobs=self.logprobs,
            versions=self.versions,
            routing=routing.astype(self.prompt_routing.dtype),
            finish_reason=self.finish_reason,
        )


def sample_rows(
    logits_BV: torch.Tensor, rows: list[_Row]
) -> tuple[list[int], list[float], torch.Tensor]:
    """A token of each row from its own stream: ids, log-probs, and the distributions `[B, V]`."""
    params = [row.request.params for row in rows]
    temps = torch.tensor([p.temperature or 1.0 for p in params])[:, None]
    logp_BV = torch.log_softmax(logits_BV / temps.to(logits_BV.device), dim=-1)
    top_p = torch.tensor([p.top_p for p in params])[:, None].to(logits_BV.device)
    if (top_p < 1).any():
        # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
        sorted_BV, order_BV = logp_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.exp()
        outside = ((probs_BV.cumsum(-1) - probs_BV) >= top_p) & (top_p < 1)
        logp_BV = logp_BV.masked_fill(outside.scatter(-1, order_BV, outside), float("-inf"))
        logp_BV = torch.log_softmax(logp_BV, dim=-1)
    cdf_BV = logp_BV.exp().cumsum(-1)
    uniform_B = torch.tensor(
        [0.0 if r.generator is None else torch.rand((), generator=r.generator).item() for r in rows]
    ).to(logits_BV.device)
    sampled_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None], right=True)
    sampled_B = sampled_B[:, 0].clamp(max=logits_BV.shape[-1] - 1)
    greedy = torch.tensor([p.temperature == 0 for p in params], device=logits_BV.device)
    ids_B = torch.where(greedy, logp_BV.argmax(-1), sampled_B)
    return ids_B.tolist(), logp_BV.gather(-1, ids_B[:, None])[:, 0].tolist(), logp_BV


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


class EmbeddedEngine:
    """The `Engine` of the CPU actor: see the module docstring."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        quantization: str = "fp8",
        device: str = "cpu",
        max_running_rows: int = 256,
        kv_on_swap: str = "keep",
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
        if kv_on_swap not in KV_ON_SWAP:
            raise ValueError(f"kv_on_swap: {kv_on_swap!r} is not one of {', '.join(KV_ON_SWAP)}")
        if max_running_rows < 1:
            raise ValueError(f"max_running_rows: must be >= 1, got {max_running_rows}")
        self.quantization, self.device = quantization, torch.device(device)
        self.max_running_rows, self.kv_on_swap = max_running_rows, kv_on_swap
        self.version = 0
        self.model: Model | None = None
        self.waiting: deque[GroupRequest] = deque()
        self.rows: list[_Row] = []  # the running rows, in the order of the batch tensors below
        self.cache: Cache | None = None  # [B, J, S, Dh] per layer
        self.lengths_B = torch.zeros(0, dtype=torch.long)  # positions cached per row
        self.next_B = torch.zeros(0, dtype=torch.long)  # each row's last token: the next input
        self.finished: dict[str, list[Generation | None]] = {}  # groups not complete yet
        self.keep_logits = False  # rows admitted meanwhile keep their logits (tests, benchmarks)
        self.kept_logits: dict[str, list[torch.Tensor | None]] = {}
        self.load_weights(checkpoint_dir, 0)

    @property
    def spec(self) -> ModelSpec:
        return self._model().spec

    @property
    def num_running(self) -> int:
        return len(self.rows)

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
            spec = self._model().spec
            tensors = check_tensors(dict(source), spec, f"weights of version {version}")
        if self.model is not None and self.rows and spec != self.model.spec:
            raise ValueError(f"weights of version {version}: another model than the running one")
        with torch.inference_mode():
            model = Model(spec, tensors, self.quantization, self.device)
            self.model, self.version = model, version
            if self.rows and self.kv_on_swap == "recompute":
                sequences = [r.request.prompt + r.tokens[:-1] for r in self.rows]
                _, self.cache, _ = self._prefill(model, sequences)

    def close(self) -> None:
        self.model = None

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
        done: list[_Row] = []
        self._admit(done)
        if self.rows:
            self._decode(done)
        complete = []
        for row in done:
            group = self.finished[row.request.request_id]
            group[row.sample] = row.generation()
            if row.logits is not None:
                kept = self.kept_logits.setdefault(row.request.request_id, [None] * len(group))
                kept[row.sample] = torch.stack(row.logits)
            if all(g is not None for g in group):
                complete.append((row.request.request_id, group))
                del self.finished[row.request.request_id]
        return complete

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample."""
        return self.generate_with_logits(prompts, params, num_samples, keep_logits=False)[0]

    def generate_with_logits(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        num_samples: int,
        keep_logits: bool = True,
    ) -> tuple[list[list[Generation]], list[list[torch.Tensor]] | None]:
        """`generate`, and (if `keep_logits`) each completion's logits `[C, V]` in float32 before
        temperature and top-p: the distributions its tokens were sampled from."""
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        if self.rows or self.waiting:
            raise RuntimeError("generate() needs an idle engine: groups are running")
        requests = requests_of(prompts, params, num_samples)
        for request in requests:  # nothing is queued unless every request is good
            check_request(request, self._model().spec)
        self.keep_logits = keep_logits
        try:
            groups = run_to_completion(self, requests)
        finally:
            self.keep_logits = False
        if not keep_logits:
            return groups, None
        logits = [self.kept_logits.pop(r.request_id) for r in requests]
        return groups, logits

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

    def _admit(self, done: list[_Row]) -> None:
        """Queued groups that fit join the running rows; each row samples its first token."""
        admitted, free = [], self.max_running_rows - len(self.rows)
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
        keep = self._take(rows, logits_PV[source_B], done)
        index = source_B[keep]
        new_cache = [(k[index], v[index]) for k, v in cache]
        self.cache = (
            new_cache
            if self.cache is None
            else [
                (torch.cat([k0, k1]), torch.cat([v0, v1]))
                for (k0, v0), (k1, v1) in zip(self.cache, new_cache, strict=True)
            ]
        )
        lengths = torch.tensor([len(rows[b].request.prompt) for b in keep], dtype=torch.long)
        self.lengths_B = torch.cat([self.lengths_B, lengths.to(self.device)])
        nexts = torch.tensor([rows[b].tokens[-1] for b in keep], dtype=torch.long)
        self.next_B = torch.cat([self.next_B, nexts.to(self.device)])
        self.rows += [rows[b] for b in keep]

    def _new_row(self, request: GroupRequest, g: int, prompt_routing: np.ndarray) -> _Row:
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed + g)
        room = self._model().spec.max_positions - len(request.prompt)
        return _Row(
            request=request,
            sample=g,
            generator=generator,
            limit=min(params.max_new_tokens, room),
            prompt_routing=prompt_routing,
            logits=[] if self.keep_logits else None,
        )

    def _decode(self, done: list[_Row]) -> None:
        """One token for every running row; the rows that finished leave the batch."""
        model = self._model()
        hidden_B1D, routing_B1LK = model.forward(
            self.next_B[:, None], self.lengths_B[:, None], self.cache
        )
        routing_BLK = routing_B1LK[:, 0].cpu()
        for row, routing_LK in zip(self.rows, routing_BLK, strict=True):
            row.routing.append(routing_LK)
        self.lengths_B = self.lengths_B + 1
        keep = self._take(self.rows, model.logits(hidden_B1D[:, 0]), done)
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache = [(k[index], v[index]) for k, v in self.cache]
            self.lengths_B, self.next_B = self.lengths_B[index], self.next_B[index]
            self.rows = [self.rows[b] for b in keep]
        if self.rows:
            self.next_B = torch.tensor([r.tokens[-1] for r in self.rows], device=self.device)
        else:
            self.cache = None

    def _take(self, rows: list[_Row], logits_BV: torch.Tensor, done: list[_Row]) -> list[int]:
        """Sample each row's next token; finished rows go to `done`; the others' indices."""
        ids, logprobs, _ = sample_rows(logits_BV, rows)
        eos = set(self._model().spec.eos_ids)
        keep = []
        for b, (row, token, logprob) in enumerate(zip(rows, ids, logprobs, strict=True)):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.versions.append(self.version)
            if row.logits is not None:
                row.logits.append(logits_BV[b].cpu())
            if token in eos:
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
            raise RuntimeError("the engine is closed")
        return self.model
