"""The replay buffer: a `SegmentStore` (storage, sampling) and an `Admission` controller.

    store      append, recover, sample by learner version: never staler than K, every accepted
               group durable, served at most `buffer.reuse` times (`async_rl.segments`)
    admission  leases, prompt indices, actor versions: at most (K + p + 1) * B groups accepted
               or leased, so none is generated only to be dropped (`async_rl.admission`)

They share the consumption log (`consumed.jsonl`). The service (`async_rl.buffer_service`)
holds one `ReplayBuffer` and is its only user in a run; it is single-threaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa

from async_rl.admission import Admission
from async_rl.config import Config
from async_rl.paths import RunPaths
from async_rl.segments import SegmentStore
from async_rl.types import RoutingSpec

log = logging.getLogger(__name__)


class ReplayBuffer:
    """Storage, sampling and admission of one run's trajectories (module docstring)."""

    def __init__(
        self,
        root: Path,
        spec: RoutingSpec,
        *,
        group_size: int,
        global_batch_groups: int,
        max_staleness: int,
        reuse: int = 1,
        segment_groups: int = 256,
        lease_timeout_s: float = 600.0,
        vocab_size: int | None = None,
    ):
        self.store = SegmentStore(
            root,
            spec,
            group_size=group_size,
            global_batch_groups=global_batch_groups,
            max_staleness=max_staleness,
            reuse=reuse,
            segment_groups=segment_groups,
            vocab_size=vocab_size,
        )
        self.admission = Admission(
            global_batch_groups=global_batch_groups,
            max_staleness=max_staleness,
            lease_timeout_s=lease_timeout_s,
            log=self.store.log.append,
            recovered=self.store.recovered,
        )
        self.rejected: Counter[str] = Counter()

    @classmethod
    def of_run(cls, cfg: Config, run_dir: Path) -> ReplayBuffer:
        """The buffer of a run directory, as its config sets it up."""
        return cls(
            RunPaths(run_dir).buffer,
            RoutingSpec.of(cfg.model),
            group_size=cfg.algo.group_size,
            global_batch_groups=cfg.global_batch_groups,
            max_staleness=cfg.buffer.max_staleness,
            reuse=cfg.buffer.reuse,
            segment_groups=cfg.buffer.segment_groups,
            lease_timeout_s=cfg.buffer.lease_timeout_s,
            vocab_size=cfg.model.vocab_size,
        )

    def check(self, batch: pa.RecordBatch) -> None:
        """Raise `InvalidGroup` unless `batch` may be stored."""
        self.store.check(batch)

    def reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected a message (%s): %s", reason, detail)

    def append(self, groups: list[tuple[pa.RecordBatch, str | None]]) -> None:
        """Store checked groups durably, then spend the leases they were generated under."""
        self.store.append([batch for batch, _ in groups])
        for _, lease in groups:
            self.admission.fulfilled(lease)

    def sample(self, version: int) -> pa.Table | None:
        return self.store.sample(version)

    def lease(
        self,
        actor_id: str,
        count: int = 1,
        version: int | None = None,
        now: float | None = None,
        work: tuple[int, int] = (0, 0),
    ) -> tuple[int, list[tuple[str, int]]] | None:
        """Leases for `actor_id` within the staleness budget (`Admission.lease`)."""
        accepted = self.store.num_accepted
        return self.admission.lease(actor_id, accepted, count, version, now, work)

    def metrics(self) -> dict[str, float]:
        return {
            **self.store.metrics(),
            **self.admission.metrics(),
            "buffer/rejected": sum(self.rejected.values()),
        }

    def close(self) -> None:
        self.store.close()
