"""The replay buffer: a `SegmentStore` (storage, sampling) and an `Admission` controller.

    store      append, recover, sample by learner version: never staler than K, every accepted
               group durable, served at most `buffer.reuse` times (`async_rl.buffer.segments`)
    admission  leases, prompt indices, actor versions: at most (K + p + 1) * B groups accepted
               or leased, so none is generated only to be dropped (`async_rl.buffer.admission`)

Admission's promise needs the learner's side too: a group leased at published version p must
be trained by learner version p + K, but a long completion arrives after shorter ones leased
later (continuous batching, in-flight updates). With `buffer.wait_for_leases` (the default) a
global batch is held while a group still being generated would otherwise go stale: earliest
deadline first, a lease of `min_version` p is due by version p + K, and the batch for version v
waits while, for some deadline d >= v, the leases due by d outnumber what the batches after
this one can take, (d - v) * B, and fewer than B arrived groups are due by d. So no completion
is dropped for being long; a lease that expires (`buffer.lease_timeout_s`) or whose actor
leaves or restarts ends the wait. Without it the batch takes newer groups and the late one is
dropped when it arrives (prime-rl's and TRL's rule; it trains on the short completions first).

K may change during a run (`set_max_staleness`, the staleness autopilot's lever) without
breaking admission's promise: a higher K binds at once; a lower K binds new leases at once, and
the store's drop rule only from learner version p + K_old + 1 on (p the version published at
the change): by then every group leased under the old bound is trained or past its old
deadline. Each change is a consumption-log entry, so a restarted buffer keeps it.

They share the consumption log (`consumed.jsonl`). The service (`async_rl.buffer.service`)
holds one `ReplayBuffer` and is its only user in a run; it is single-threaded. It calls the
buffer's methods only, never the store or admission behind them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from async_rl.buffer.admission import Admission
from async_rl.buffer.segments import SegmentStore
from async_rl.config import Config
from async_rl.paths import RunPaths
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
        wait_for_leases: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`clock`: the one source of seconds for leases, their expiry and the wait metrics
        (tests give a manual one)."""
        self.clock = clock
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
            clock=clock,
        )
        self.rejected: Counter[str] = Counter()
        self.wait_for_leases = wait_for_leases
        self.lowering: tuple[int, int] | None = None  # (K, from learner version) of the store
        self.autopilot: dict[str, float] = {}  # the controller's last signals (`autopilot/*`)
        self._recover_staleness(self.store.recovered)
        self.lease_wait_s, self.waiting_since = 0.0, None  # complete batches held for leases

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
            wait_for_leases=cfg.buffer.wait_for_leases,
        )

    def check(self, batch: pa.RecordBatch) -> None:
        """Raise `InvalidGroup` unless `batch` may be stored."""
        self.store.check(batch)

    def reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected a message (%s): %s", reason, detail)

    def append(self, groups: list[tuple[pa.RecordBatch, str | None]]):
        """Store checked groups durably, then spend the leases they were generated under."""
        self.store.append([batch for batch, _ in groups])
        for _, lease in groups:
            self.admission.fulfilled(lease)

    def sample(self, version: int) -> pa.Table | None:
        """The global batch for learner `version`, or None while it is not complete or is held
        for groups still being generated (module docstring)."""
        now = self.clock()
        if self.lowering is not None and version >= self.lowering[1]:
            self.store.max_staleness, self.lowering = self.lowering[0], None
        if self.wait_for_leases and version not in self.store.served_at and self._due(version):
            # the clock runs only while a complete batch is held: what waiting costs the learner
            if self.waiting_since is None and self.store.ready(version):
                self.waiting_since = now
            return None
        table = self.store.sample(version)
        if table is not None and self.waiting_since is not None:
            self.lease_wait_s += now - self.waiting_since
            self.waiting_since = None
        return table

    def set_max_staleness(self, k: int, reason: str = "") -> None:
        """Change K (module docstring): at once for new leases, for the store's drop rule at
        once if higher, else from the version when no group leased under the old K remains."""
        if k < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {k}")
        if k == self.admission.max_staleness:
            return
        self.admission.max_staleness = k
        at = self.published if k >= self.store.max_staleness else None
        if at is None:
            at = self.published + self.store.max_staleness + 1
            self.lowering = (k, at)
        else:
            self.store.max_staleness, self.lowering = k, None
        self.store.log.append({"max_staleness": k, "from_version": at, "reason": reason})
        log.info("max_staleness -> %d (the store's from version %d): %s", k, at, reason)

    def _recover_staleness(self, entries: list[dict]) -> None:
        """K as the log's changes left it (the config's K without any)."""
        served = max(self.store.served_at, default=-1)
        for e in entries:
            if "max_staleness" not in e:
                continue
            k, at = e["max_staleness"], e["from_version"]
            self.admission.max_staleness = k
            if k >= self.store.max_staleness or served + 1 >= at:
                self.store.max_staleness, self.lowering = k, None
            else:
                self.lowering = (k, at)

    def _due(self, version: int) -> bool:
        """Whether a leased group must be in this batch, and room is left for it."""
        k, b = self.store.max_staleness, self.store.batch_groups
        leased = Counter(v + k for v in self.admission.outstanding() if v + k >= version)
        if not leased:
            return False
        live = Counter(g.policy_version + k for g in self.store.live)
        owed = arrived = 0
        for deadline in sorted(leased.keys() | {d for d in live if d >= version}):
            owed, arrived = owed + leased[deadline], arrived + live[deadline]
            if arrived < b and owed > (deadline - version) * b:
                return True
        return False

    def lease(
        self,
        actor_id: str,
        count: int = 1,
        version: int | None = None,
        work: tuple[int, int, int] = (0, 0, 0),
    ) -> tuple[int, list[tuple[str, int]]] | None:
        """Leases for `actor_id` within the staleness budget (`Admission.lease`)."""
        accepted = self.store.num_accepted
        return self.admission.lease(actor_id, accepted, count, version, work)

    def give_back(self, lease: str | None) -> None:
        """The group of `lease` was refused: its prompt is handed out again."""
        self.admission.give_back(lease)

    def release(self, actor_id: str) -> None:
        """Drop the leases of an actor that restarted or left; their prompts go out again."""
        self.admission.release(actor_id)

    @property
    def published(self) -> int:
        """The newest weights version the learner published."""
        return self.admission.published

    def set_published(self, version: int) -> None:
        """The learner published `version` (an older one changes nothing)."""
        self.admission.set_published(version)

    def staleness(self, version: int) -> list[int]:
        """`version - policy_version` of each group served for learner `version`."""
        return self.store.staleness(version)

    def versions_in_use(self) -> list[int]:
        """Weights versions that actors reported within the lease timeout."""
        return self.admission.versions_in_use()

    def metrics(self) -> dict[str, float]:
        return {
            **self.store.metrics(),
            **self.admission.metrics(),
            "buffer/rejected": sum(self.rejected.values()),
            "buffer/lease_wait_s": self.lease_wait_s,
            "buffer/max_staleness": self.admission.max_staleness,
            **self.autopilot,
        }

    def close(self) -> None:
        self.store.close()
