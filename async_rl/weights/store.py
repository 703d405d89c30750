"""What every weight store is: the `WeightStore` protocol, and what its readers get.

A reader gets tensors by Hugging Face name, whichever store it has (`fs` reads them from the
version's safetensors file as they are asked for, `ray` fetches them from the object store,
`collective` hands over the buckets it received): no caller needs to know which store it has.
A version that is not (or no longer) in the store is `VersionGone`, the one error a reader
expects in normal operation (`actors.versions` then loads a newer one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from async_rl.weights.delta import Delta

# What an engine loads a version from: a Hugging Face checkpoint directory (to build the model
# it serves), or that checkpoint's tensors by Hugging Face name (to swap the weights of the
# model it already serves; what every store's reader yields).
WeightsSource = str | Path | Mapping[str, torch.Tensor]


class VersionGone(ValueError):
    """The version is not, or no longer, in the store (never published, incomplete, or
    collected): a newer one may be."""


class WeightStore(Protocol):
    def publish(
        self, version: int, hf_state: dict[str, torch.Tensor], durable: bool = False
    ) -> None:
        """Store `version` completely before any reader can see it (`durable`: a version
        that must outlive the learner, e.g. a checkpoint's; `fs` and `ray` keep them all)."""
        ...

    def before_gather(self) -> None:
        """The learner is about to gather the next version: a store lets go of what it still
        holds of the last one (the collective sender's copy for late joiners)."""
        ...

    def latest(self) -> int | None:
        """The newest complete version, None before the first."""
        ...

    def reading(self, version: int) -> contextlib.AbstractContextManager[Mapping]:
        """`with store.reading(v) as tensors:` the version's tensors by Hugging Face name, not
        collected before the block ends; `VersionGone` if it is not (or no longer) here."""
        ...

    def collect(self, in_use: set[int]) -> list[int]:
        """Delete versions no actor uses, keeping the newest `weights.keep_versions`."""
        ...

    def endpoints(self) -> dict[str, str]:
        """Addresses the learner publishes for the store's readers ({} for most)."""
        ...

    def stats(self) -> dict[str, float]:
        """Metrics of the last publish (`learner/<name>`; {} for most)."""
        ...

    def close(self) -> None: ...


class DeltaStore(WeightStore, Protocol):
    """A store that also keeps versions as sparse deltas (every store; `weights.delta`):
    `publish(version, hf_state, durable, delta=..., fingerprint=..., whole=...)` keeps it
    whole, as a delta on the version before (`whole` False), or both, with its weights'
    fingerprint; `collective` sends its members the delta, its durable store keeps it whole."""

    def sizes(self, version: int) -> tuple[int | None, int | None]:
        """Bytes of the version whole and as a delta (None where it is not kept so);
        `VersionGone` if it is not here."""
        ...

    def fingerprint(self, version: int) -> int | None:
        """The fingerprint of the version's weights, if it was stored."""
        ...

    def read_delta(self, version: int) -> Delta:
        """The version as a delta on the one before; `VersionGone` if it is not kept so."""
        ...


class PlainStore:
    """What a store without addresses, metrics, threads or a kept copy answers."""

    def before_gather(self) -> None:
        pass

    def endpoints(self) -> dict[str, str]:
        return {}

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
