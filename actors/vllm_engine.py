"""The vLLM engine: `actor.engine = "vllm"`, the `Engine` interface over `vllm.LLM`.

Shape legend: P = prompt tokens, C = completion tokens, L = MoE layers, K = experts per token.

- Groups go in as requests of vLLM's own engine (`llm_engine.add_request`, one `step()` of its
  scheduler per `step()`): continuous batching is vLLM's. Prompts are token ids
  (`TokensPrompt`), nothing is detokenised; a group's G samples are one request with `n = G`
  (vLLM gives sample g the seed `seed + g`, the `Engine` contract).
- In-flight weight updates: outputs come as deltas (`RequestOutputKind.DELTA`), so every token
  is tagged with the version of the step that sampled it (`Generation.versions`);
  `load_weights` between two steps swaps the weights under the running requests, whose KV
  entries (computed by the old weights) are kept, as PipelineRL does (`actor.kv_on_swap =
  keep`; vLLM cannot recompute them). Prompts carry a cache salt per version, so a request
  admitted after a swap never reuses prompt KV blocks that older weights computed.
- Behaviour log-probs: `logprobs_mode="processed_logprobs"` makes vLLM report the log-prob of
  the sampled token under the distribution it sampled from: softmax(logits / T), restricted to
  the top-p nucleus and renormalised. Greedy (T = 0) samples from a point mass: log-prob 0;
  vLLM refuses n > 1 greedy samples, so the one greedy completion is copied G times.
- Precision: `fp32`/`bf16` set vLLM's `dtype`; `fp8` (CUDA only) is vLLM's online W8A8
  `quantization="fp8"` over the bf16 checkpoint.
- Routing (CUDA): `enable_return_routed_experts=True`; vLLM returns each completion's
  `routed_experts` as `[P + C - 1, L, K]` (uint8, uint16 above 256 experts). vLLM's CPU backend
  cannot capture routing, so on CPU `routing` is None.
- Weight updates: `load_weights` reloads in place, from a new checkpoint directory through the
  worker's `reload_weights(weights_path=...)`, or from tensors by Hugging Face name (the `ray`
  weight store's source) through `reload_weights(weights_iterator=...)`; on CPU it then
  prepacks the MoE experts again (`_repack_moe_experts`: vLLM 0.32 skips that on a reload and
  the CPU kernel would misread them), and finally drops the prefix cache (its KV entries were
  computed by the old weights). A directory without tensors (config.json and tokenizer files:
  an actor on a node without the run directory) starts vLLM with `load_format="dummy"`, as
  verl's rollout workers do; the first `load_weights` of tensors then sets the real ones.
- On CPU the engine core runs in the caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set
  in `os.environ`): no worker process to track, no OpenMP thread pinning of the host, and a KV
  cache of `kv_cache_gib` instead of a fraction of the machine's memory; eager mode (no
  torch.compile, ~10 s to start).
- On CUDA it runs as users run vLLM: torch.compile and CUDA graphs on (most of vLLM's decode
  speed), `tensor_parallel_size` GPUs (`actor.tensor_parallel_size`; the driver reserves them
  for the actor) and `gpu_memory_utilization` of their memory. A reload of bf16 weights into
  an fp8 engine goes through vLLM's layerwise reload, which quantizes each layer online as
  its weights arrive and copies into the buffers the CUDA graphs captured. Not yet run on a
  GPU by this project's tests (CI has none).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from actors.engine import (
    Generation,
    GroupRequest,
    SamplingParams,
    capabilities_of,
    requests_of,
    run_to_completion,
)
from async_rl.hf_config import check_tensors, has_weights, read_model_spec
from async_rl.weights import WeightsSource

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}
FINISH_REASONS = ("stop", "length")
# what a reload cannot change: ModelSpec field -> its config.json key
SHAPE = {
    "dim": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_experts": "num_experts",
    "vocab_size": "vocab_size",
}


class _Partial:
    """One sample of a running request: what vLLM's deltas brought so far."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.finish_reason: str | None = None
        self.routed_experts = None

    def add(self, delta, version: int) -> None:
        """A delta's tokens, sampled by the weights of `version`."""
        tokens = list(delta.token_ids)
        self.tokens += tokens
        if delta.logprobs:  # one {token id: Logprob} per new position (None when greedy)
            self.logprobs += [s[t].logprob for t, s in zip(tokens, delta.logprobs, strict=True)]
        self.versions += [version] * len(tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if getattr(delta, "routed_experts", None) is not None:
            self.routed_experts = delta.routed_experts


def _cuda_kwargs(quantization: str, tensor_parallel_size: int, memory: float) -> dict:
    """vLLM's arguments on CUDA: routed experts returned, tensor parallelism, FP8."""
    return {
        "enable_return_routed_experts": True,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": memory,
        **({"quantization": "fp8"} if quantization == "fp8" else {}),
    }


class VLLMEngine:
    """`Engine` over vLLM. Example: `VLLMEngine("runs/tiny/weights/v0", "fp32", "cpu")`."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        quantization: str,
        device: str,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        max_num_seqs: int = 256,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
    ):
        caps = capabilities_of("vllm", device)
        if quantization not in caps.quantizations:
            raise ValueError(
                f"actor.quantization: {quantization!r} is not offered by vllm on {device}; "
                f"choose from {', '.join(map(repr, caps.quantizations))}"
            )
        self.capabilities, self.quantization, self.device = caps, quantization, device
        self.version = 0
        # running: the request and, per sample, what its deltas brought so far
        self.requests: dict[str, tuple[GroupRequest, list[_Partial]]] = {}
        path = Path(checkpoint_dir)
        self.spec = read_model_spec(path)
        self.max_model_len = self.spec.max_positions

        if device == "cpu":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        import torch
        from vllm import LLM

        if device == "cpu" and tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size: vLLM on CPU runs on one device here: use 1")
        if device == "cpu":
            kwargs = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        else:
            kwargs = _cuda_kwargs(quantization, tensor_parallel_size, gpu_memory_utilization)
        if not has_weights(path):  # config.json only: the first weights come as tensors
            kwargs["load_format"] = "dummy"
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(
                model=str(path),
                tokenizer=str(path),
                dtype=DTYPES[quantization],
                seed=seed,
                max_model_len=self.max_model_len,
                max_num_seqs=max_num_seqs,
                enforce_eager=device == "cpu",
                logprobs_mode="processed_logprobs",
                max_logprobs=1,
                **kwargs,
            )
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op (for the thread
            # pinning it does not do in-process); give the host process its function back.
            torch.set_num_threads = set_num_threads

    # ------------------------------------------------------------------ sampling
    @property
    def num_running(self) -> int:
        """Rows of the groups vLLM is generating (its own scheduler admits them)."""
        return sum(r.num_samples for r, _ in self.requests.values())

    @property
    def num_waiting(self) -> int:
        return 0  # vLLM queues what its scheduler cannot run yet: it counts as running here

    def submit(self, request: GroupRequest) -> None:
        """Queue a group as one vLLM request with `n = G` (sample g: seed `params.seed + g`)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check(request)
        params = request.params
        greedy = params.temperature == 0
        sampling = VLLMSamplingParams(
            n=1 if greedy else request.num_samples,  # vLLM refuses n > 1 greedy copies
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,  # tokens as they come: each with its version
        )
        salt = f"weights-v{self.version}"  # no prompt KV of other weights is reused
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt), cache_salt=salt)
        self.llm.llm_engine.add_request(request.request_id, prompt, sampling)
        samples = 1 if greedy else request.num_samples
        self.requests[request.request_id] = (request, [_Partial() for _ in range(samples)])

    def _check(self, request: GroupRequest) -> None:
        if not request.prompt:
            raise ValueError("prompts: need at least one non-empty prompt")
        if request.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {request.num_samples}")
        if len(request.prompt) >= self.max_model_len:
            raise ValueError(
                f"prompts: a prompt of {len(request.prompt)} tokens leaves no room for a "
                f"completion in the model's {self.max_model_len}-token context"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")

    def step(self) -> list[tuple[str, list[Generation]]]:
        """One step of vLLM's scheduler; the groups that finished."""
        if not self.requests:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            request, partials = self.requests[out.request_id]
            for completion in out.outputs:
                partials[completion.index].add(completion, self.version)
            if not out.finished:
                continue
            del self.requests[out.request_id]
            greedy = request.params.temperature == 0
            group = [self._generation(len(request.prompt), p, greedy) for p in partials]
            if greedy:
                group = [copy.deepcopy(group[0]) for _ in range(request.num_samples)]
            done.append((out.request_id, group))
        return done

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, num_samples: int
    ) -> list[list[Generation]]:
        """`num_samples` completions of every prompt: outer list per prompt, inner per sample."""
        if not prompts:
            raise ValueError("prompts: need at least one non-empty prompt")
        requests = requests_of(prompts, params, num_samples)
        for request in requests:  # nothing is queued unless every request is good
            self._check(request)
        return run_to_completion(self, requests)

    def _generation(self, prompt_len: int, done: _Partial, greedy: bool) -> Generation:
        if done.finish_reason not in FINISH_REASONS:
            raise RuntimeError(f"vLLM finished a request with {done.finish_reason!r}")
        routing = None
        if self.capabilities.routing:
            spec = self.spec.routing
            rows = prompt_len + len(done.tokens) - 1
            if done.routed_experts is None:
                raise RuntimeError("vLLM returned no routed experts for a completion")
            routing = np.asarray(done.routed_experts, dtype=spec.numpy_dtype)
            routing = routing.reshape(rows, spec.num_layers, spec.top_k)
        return Generation(
            tokens=done.tokens,
            logprobs=[0.0] * len(done.tokens) if greedy else done.logprobs,
            versions=done.versions,
            routing=routing,
            finish_reason=done.finish_reason,
        )

    # ------------------------------------------------------------------ weights
    def load_weights(self, source: WeightsSource, version: int) -> None:
        """Reload the weights in place from a Hugging Face checkpoint directory, or from tensors
        by Hugging Face name of the model served; a mismatch is a ValueError, nothing changes.
        Between two steps of running requests too (in flight: their KV entries stay)."""
        if isinstance(source, Mapping):
            tensors = check_tensors(dict(source), self.spec, f"weights of version {version}")
            kwargs = {"weights_iterator": list(tensors.items())}
        else:
            path = Path(source)
            spec = read_model_spec(path)
            changed = [hf for k, hf in SHAPE.items() if getattr(spec, k) != getattr(self.spec, k)]
            if changed:
                raise ValueError(f"{path}: {', '.join(changed)} differ from the served model's")
            if not (path / "model.safetensors").is_file():
                raise ValueError(f"{path}: no model.safetensors")
            kwargs = {"weights_path": str(path)}
        self.llm.collective_rpc("reload_weights", kwargs=kwargs)
        if self.device == "cpu":
            self.llm.apply_model(_repack_moe_experts)
        if not self.requests:  # blocks of running requests cannot go; the salt keeps them apart
            self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        """Shut the engine core down and release the weights and KV cache."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None


def _repack_moe_experts(model) -> None:
    """Redo the CPU MoE kernel's `process_weights_after_loading` on every fused-MoE layer.

    vLLM's CPU experts kernel prepacks w13/w2 into its grouped-GEMM layout when the model is
    first loaded. An in-place reload writes the checkpoint's plain layout into those tensors and
    skips the prepack (vLLM 0.32 runs it only on the first load), so the kernel would misread
    the new experts; this repeats the first load's step.
    """
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
