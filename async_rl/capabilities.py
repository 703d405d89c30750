"""What each inference engine can do, by (engine, device): one table that config validation reads
at start-up (a bad combination fails before anything is imported or started) and the engines
read for their own `capabilities` (`actors.engine.capabilities_of`).

    routing       returns each token's routed experts (the traces of Routing Replay R3)
    quantization  the rollout precisions it runs (`actor.quantization`)
    in_flight     swaps weights between decode steps while rows keep generating
"""

from __future__ import annotations

from typing import Any, get_args

from async_rl.choices import Device, EngineKind, Quantization

ENGINE_CAPABILITIES: dict[tuple[EngineKind, Device], dict[str, Any]] = {
    ("embedded", "cpu"): {
        "routing": True,
        "quantization": get_args(Quantization),
        "in_flight": True,
    },
    ("embedded", "cuda"): {
        "routing": True,
        "quantization": get_args(Quantization),
        "in_flight": True,
    },
    ("vllm", "cpu"): {"routing": False, "quantization": ("bf16", "fp32"), "in_flight": True},
    ("vllm", "cuda"): {"routing": True, "quantization": ("fp8", "bf16"), "in_flight": True},
}
