"""Which weights version an actor's engine may load now, and loading it: one rule for static and
continuous batching alike.

    follower.heard()                 the newest version announced (or, every 2 s, in the store)
    follower.need(v)                 a lease needs weights >= v
    v = follower.to_load(engine.version, may_swap)
        the newest version known to be needed or available, as far as this actor's store
        holds it (the buffer hears of a version first; the collective path may still be
        delivering it), when it is newer than the engine's and the engine may swap now
        (always between generation steps; with rows running only for in-flight updates)
    follower.load(engine, v)         swap to v, or to a newer one if v was collected meanwhile

Every store's reader yields tensors (`async_rl.weights.store`): an engine is built once from
the run's starting checkpoint (architecture and tokenizer) and then loads the tensors of the
version it needs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from actors.build import build_engine
from actors.engine import Engine
from async_rl.config import Config
from async_rl.weights import VersionGone, WeightStore, WeightSubscriber

log = logging.getLogger(__name__)

STORE_CHECK_S = 2.0  # without announcements, ask the store this often (missed ones)


def version_to_load(engine_version: int, wanted: int, available: int | None, may_swap: bool):
    """The rule (module docstring): the version to load now, or None."""
    ready = min(wanted, available or 0)
    return ready if may_swap and ready > engine_version else None


class VersionFollower:
    """An actor's view of the learner's versions: its store and its announcements."""

    def __init__(self, cfg: Config, store: WeightStore, announcements: WeightSubscriber):
        self.cfg, self.store, self.announcements = cfg, store, announcements
        self.wanted = 0  # the newest version known to be needed or available
        self._last_store_check = 0.0

    def heard(self) -> int | None:
        """The newest version announced since the last call (as far as this actor's store has
        it), or (every `STORE_CHECK_S`, for missed announcements) the store's newest."""
        newest, now = self.announcements.newest(), time.monotonic()
        if newest is None and now - self._last_store_check > STORE_CHECK_S:
            newest, self._last_store_check = self.store.latest(), now
        elif newest is not None:  # announced; the collective path may not have delivered it
            newest = min(newest, self.store.latest() or 0)
        if newest is not None:
            self.wanted = max(self.wanted, newest)
        return newest

    def need(self, version: int) -> None:
        self.wanted = max(self.wanted, version)

    def to_load(self, engine_version: int, may_swap: bool = True) -> int | None:
        if not may_swap or self.wanted <= engine_version:
            return None  # the rule's answer, without asking the store
        return version_to_load(engine_version, self.wanted, self.store.latest(), may_swap)

    def wait_for(self, at_least: int, stopping) -> int:
        """The store's newest version once it is at least `at_least`."""
        while True:
            latest = self.store.latest()
            if latest is not None and latest >= at_least:
                self.need(latest)
                return latest
            if stopping.is_set():
                raise InterruptedError("actor stopped while waiting for weights")
            self.announcements.newest(timeout_ms=50)  # wakes up at an announcement

    def build(self, start: Path | None, version: int) -> Engine:
        """An engine at `version` (or newer, if it was collected), built from `start`."""
        if start is None:
            raise ValueError("an actor needs the run's starting checkpoint for the model")
        engine = build_engine(self.cfg.actor, start)
        self.load(engine, version)
        return engine

    def close(self) -> None:
        self.announcements.close()
        self.store.close()

    def load(self, engine: Engine, version: int) -> None:
        """`engine` at `version`, or at a newer one when that one was collected before it could
        be read (the learner keeps the newest `learner.keep_versions` and those actors report
        using; one announced a moment ago may be gone by the time a busy actor asks for it,
        though never while it reads it)."""
        while True:
            try:
                with self.store.reading(version) as tensors:
                    engine.load_weights(tensors, version)
                engine.version = version
                return
            except VersionGone:
                latest = self.store.latest()
                if latest is None or latest <= version:
                    raise
                log.info("version %d was collected; loading %d", version, latest)
                version = latest
