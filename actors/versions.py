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

import contextlib
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
        self.steps = {"whole": 0, "delta": 0}  # versions loaded whole, and patched in
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

    def wait_for(self, at_least: int, stopping, deadline: float | None = None) -> int:
        """The store's newest version once it is at least `at_least`; `TimeoutError` past
        `deadline` (a `time.monotonic()` time), when one is given."""
        while True:
            latest = self.store.latest()
            if latest is not None and latest >= at_least:
                self.need(latest)
                return latest
            if stopping.is_set():
                raise InterruptedError("actor stopped while waiting for weights")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no weights version {at_least} or newer in the store")
            self.announcements.newest(timeout_ms=50)  # wakes up at an announcement

    def build(self, start: Path | None, version: int) -> Engine:
        """An engine at `version` (or newer, if it was collected), built from `start`."""
        if start is None:
            raise ValueError("an actor needs the run's starting checkpoint for the model")
        engine = build_engine(self.cfg.actor, start, keep_host=self.deltas)
        self.load(engine, version)
        return engine

    @property
    def deltas(self) -> bool:
        return self.cfg.weights.deltas == "send"

    def close(self) -> None:
        self.announcements.close()
        self.store.close()

    def load(self, engine: Engine, version: int) -> None:
        """`engine` at `version`, or at a newer one when that one was collected before it could
        be read (the learner keeps the newest `weights.keep_versions` and those actors report
        using; one announced a moment ago may be gone by the time a busy actor asks for it,
        though never while it reads it). With weight deltas, by the cheaper of its chain of
        deltas and the newest whole version plus the deltas after it (`plan_load`); a chain
        that fails (a delta missed, collected or damaged) falls back to the whole version."""
        while True:
            try:
                if self.deltas:
                    return self._load_by_deltas(engine, version)
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

    def _load_by_deltas(self, engine: Engine, version: int) -> None:
        """`plan_load` from the weights held, else from none; if a delta on the way is
        refused (damaged, or for another base) both ways, the newest whole version up to
        `version` alone: never weights that are not a published version."""
        # weights a delta may patch: a published version whose fingerprint the engine knows
        # (not the starting checkpoint's files, which may differ from version 0 in dtype)
        known = getattr(engine, "fingerprint", None) is not None
        held = engine.version if known and engine.host is not None else None
        for start in dict.fromkeys((held, None)):
            try:
                return self._run(engine, plan_load(self.store, start, version))
            except (ValueError, VersionGone) as e:
                log.warning("loading version %d from %s failed: %s", version, start, e)
        whole = newest_whole(self.store, version)
        log.error("version %d is out of reach by deltas; serving whole version %d", version, whole)
        self._run(engine, [("whole", whole)])

    def _run(self, engine: Engine, steps: list[tuple[str, int]]) -> None:
        for kind, v in steps:
            self.steps[kind] += 1
            if kind == "whole":
                with self.store.reading(v) as tensors:
                    engine.load_weights(tensors, v)
                engine.version = v
                engine.fingerprint = self.store.fingerprint(v)  # the learner's, if it says
            else:
                engine.apply_delta(self.store.read_delta(v))


def newest_whole(store, version: int) -> int:
    """The newest version up to `version` stored whole; `VersionGone` if there is none."""
    for v in range(version, -1, -1):
        with contextlib.suppress(VersionGone):
            if store.sizes(v)[0] is not None:
                return v
    raise VersionGone(f"no whole version up to {version}")


def plan_load(store, held: int | None, target: int) -> list[tuple[str, int]]:
    """How to reach `target` from weights of version `held` (None: none to patch), as
    `("delta", v)` and `("whole", v)` steps: every delta after `held`, or the newest whole
    version up to `target` and the deltas after it, whichever reads fewer bytes; `VersionGone`
    when neither is in the store."""
    sizes: dict[int, tuple[int | None, int | None]] = {}
    low, whole = (target if held is None else held + 1), None
    for v in range(target, -1, -1):  # down to `held` and to the newest whole version
        try:
            sizes[v] = store.sizes(v)
        except VersionGone:
            sizes[v] = (None, None)
        if whole is None and sizes[v][0] is not None:
            whole = v
        if v <= low and whole is not None:
            break

    def chain(first: int) -> int | None:  # bytes of the deltas first..target (an empty one: 0)
        deltas = [sizes[v][1] for v in range(first, target + 1)]
        return None if None in deltas else sum(deltas)

    options = []
    if held is not None and held < target and (cost := chain(held + 1)) is not None:
        options.append((cost, [("delta", v) for v in range(held + 1, target + 1)]))
    if whole is not None and (cost := chain(whole + 1)) is not None:
        steps = [("whole", whole)] + [("delta", v) for v in range(whole + 1, target + 1)]
        options.append((sizes[whole][0] + cost, steps))
    if not options:
        raise VersionGone(f"version {target}: neither its deltas nor a whole version before it")
    return min(options)[1]
