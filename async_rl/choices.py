"""Every choice of the configuration, as a `typing.Literal` type: the one place its values are
written. The config's fields are typed with them, and its checks, `--help` and the README's
reference derive the allowed values from them (`choices`); a module that branches on a choice
imports its type (`tests/unit/test_layout.py` checks both).
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

Dtype = Literal["float32", "bfloat16"]
AttnBackend = Literal["sdpa", "flex"]
RewardPool = Literal["thread", "process"]
ArithmeticOp = Literal["+", "-", "*"]
EngineKind = Literal["embedded", "vllm"]
Device = Literal["cpu", "cuda"]
Quantization = Literal["fp8", "bf16", "fp32"]
Batching = Literal["static", "continuous"]
WeightUpdate = Literal["between_groups", "in_flight"]
KvOnSwap = Literal["keep", "recompute"]
LrSchedule = Literal["constant", "cosine", "linear"]
WeightStoreKind = Literal["fs", "ray", "collective"]
DurableStoreKind = Literal["fs", "ray"]
WeightDeltas = Literal["off", "measure", "send"]
ActivationCheckpointing = Literal["none", "full", "selective"]
TisMode = Literal["full", "decoupled", "none"]
IsCorrection = Literal["token_tis", "icepop", "seq_mask_tis", "seq_tis"]
RoutingReplay = Literal["none", "r2", "r3"]
WandbMode = Literal["offline", "online", "disabled"]


def choices(typ: Any) -> tuple:
    """The values a choice type (or a list of one) allows; () for any other type."""
    if get_origin(typ) is list:
        (typ,) = get_args(typ)
    return get_args(typ) if get_origin(typ) is Literal else ()


def check(key: str, value: Any, typ: Any) -> None:
    """A ValueError naming `key` unless `value` is one of `typ`'s values: for what is built
    without a validated config (an engine, a scorer, a training step of a test's own)."""
    if value not in get_args(typ):
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, get_args(typ)))}")
