"""The learner's global batches: rank 0 takes them from the buffer, the other ranks from rank 0.

    rank 0 (`BufferFeed`)                          ranks 1.. (`RankFeed`)
    feed.prefetch(v + 1)  asked on the fetch         -
        thread while the step of v trains
    feed.next(v)          the batch of v, packed;  feed.next(v)   what rank 0 broadcast
        broadcast to the other ranks as Arrow          (Arrow IPC bytes, no pickle), or None
        IPC bytes, or None ("stop") to all             when rank 0 stops

The buffer's waiting (staleness, back-pressure) is the fetch thread's, not the training loop's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pyarrow as pa

from async_rl.config import Config
from async_rl.types import RoutingSpec
from async_rl.wire.clients import BatchSource
from async_rl.wire.messages import Batch, ipc_to_table, table_to_ipc
from learner.background import Background
from learner.batch import PackedBatch, pack, rollout_metrics
from learner.parallel import DataParallel, broadcast_bytes


@dataclass
class Fetched:
    """A global batch as the learner trains it; rank 0's also carries the buffer's reply, the
    rollout metrics and, with several ranks, the Arrow IPC bytes it broadcasts."""

    packed: PackedBatch
    reply: Batch | None
    rollout: dict[str, float]
    payload: bytes | None


def _pack(table: pa.Table, cfg: Config, pad_id: int) -> PackedBatch:
    return pack(table, RoutingSpec.of(cfg.model), pad_id)


class BufferFeed:
    """Rank 0's feed: `source` (the run's buffer service) belongs to its fetch thread."""

    def __init__(
        self,
        cfg: Config,
        source: BatchSource,
        pad_id: int,
        dp: DataParallel,
        stopping: threading.Event,
    ):
        self.cfg, self.source, self.pad_id = cfg, source, pad_id
        self.dp, self.stopping = dp, stopping
        self.fetcher = Background("fetch")
        self._last_tokens: tuple[float, float] | None = None  # (time, buffer's token count)

    def next_batch(self, version: int) -> tuple[pa.Table, Batch] | None:
        """The buffer's global batch for `version` (None when the learner is stopping)."""
        deadline = time.monotonic() + self.cfg.buffer.wait_timeout_s
        while not self.stopping.is_set():
            try:
                table, reply = self.source.sample(version, wait_s=1.0)
            except TimeoutError:  # asked again for wait_timeout_s already
                if self.stopping.is_set():
                    break
                raise
            if table is not None:
                return table, reply
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no global batch for version {version} within "
                    f"buffer.wait_timeout_s = {self.cfg.buffer.wait_timeout_s:.0f}s "
                    f"({reply.metrics.get('buffer/groups', 0)} fresh groups waiting; "
                    "are actors running?)"
                )
        return None

    def fetch(self, version: int) -> Fetched | None:
        """On the fetch thread: the global batch for `version`, packed, the buffer's reply,
        the rollout metrics of the batch and, with several ranks, its bytes to broadcast."""
        got = self.next_batch(version)
        if got is None:
            return None
        table, reply = got
        rollout = rollout_metrics(table) | self._generation_rate(reply)
        payload = table_to_ipc(table).to_pybytes() if self.dp.enabled else None
        return Fetched(_pack(table, self.cfg, self.pad_id), reply, rollout, payload)

    def prefetch(self, version: int) -> None:
        """Ask for the batch of `version` now, on the fetch thread (the next `next` takes it)."""
        self.fetcher.submit(self.fetch, version)

    def next(self, version: int) -> Fetched | None:
        """The global batch of `version`, also broadcast to the other ranks; None (and "stop"
        to them) when the learner is stopping."""
        got = None
        if not self.stopping.is_set():
            if self.fetcher.pending is None:  # else the previous step asked for this version
                self.prefetch(version)
            got = self.fetcher.wait()
        if self.dp.enabled:
            broadcast_bytes(None if got is None else got.payload, self.dp)
        return got

    def _generation_rate(self, reply: Batch) -> dict[str, float]:
        """`rollout/tokens_per_s`: completion tokens the buffer accepted per second since the
        previous batch (none across a restart of the buffer, whose counter starts again)."""
        now, tokens = time.monotonic(), reply.metrics.get("buffer/completion_tokens", 0.0)
        last, self._last_tokens = self._last_tokens, (now, tokens)
        if last is None or tokens < last[1] or now <= last[0]:
            return {}
        return {"rollout/tokens_per_s": (tokens - last[1]) / (now - last[0])}

    def close(self) -> None:
        """The caller has set `stopping`: a fetch waiting for a batch gives up within a
        second (a batch fetched ahead and not trained is served again after a resume)."""
        self.source.close()


class RankFeed:
    """The feed of ranks 1..: what rank 0 broadcast."""

    def __init__(self, cfg: Config, pad_id: int, dp: DataParallel, stopping: threading.Event):
        self.cfg, self.pad_id, self.dp, self.stopping = cfg, pad_id, dp, stopping

    def prefetch(self, version: int) -> None:
        pass  # rank 0 fetches

    def next(self, version: int) -> Fetched | None:
        payload = broadcast_bytes(None, self.dp)
        if payload is None:
            self.stopping.set()
            return None
        return Fetched(_pack(ipc_to_table(payload), self.cfg, self.pad_id), None, {}, None)

    def close(self) -> None:
        pass
