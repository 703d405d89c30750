"""Rank 0's side of the weights: the store, the announcer and the publish thread.

    publisher = Publisher(cfg, paths, start, ctx, curve, source)   rank 0; opens nothing
    publisher.start(version, weights)   opens the store, binds the announcer, publishes `version`
    publisher.before_gather()       the last publish is done, the store lets go of its copy
    state = hf_weights()            (collective: every rank gathers)
    publisher.submit(v, state, in_use)   on the publish thread: store, tell the buffer,
                                         announce, collect old versions

Other ranks have no publisher. One version is in flight at most: the publish of v runs while
the step of v + 1 trains, and is done before v + 1 is gathered, so that rank 0 never holds
two versions at once (the collective sender's copy for late joiners included).
"""

from __future__ import annotations

from pathlib import Path

import torch
import zmq

from async_rl.config import Config
from async_rl.paths import RunPaths, publish_endpoints, read_endpoints
from async_rl.weights import WeightAnnouncer, weight_store
from async_rl.weights.delta import DeltaMeter, worth_sending
from async_rl.wire.clients import BatchSource
from learner.background import Background


def checkpoints_at(cfg: Config, version: int) -> bool:
    """Whether the run checkpoints `version`: every `learner.checkpoint_every`, and the last."""
    every = cfg.learner.checkpoint_every
    return version == cfg.run.num_steps or bool(every and version % every == 0)


class Publisher:
    """Rank 0's weights (module docstring). Build it, which stores its arguments and opens
    nothing, then `start(version, weights)`; the other methods need a started publisher.
    `close()` closes what `start()` opened (nothing, for a publisher never started)."""

    def __init__(
        self,
        cfg: Config,
        paths: RunPaths,
        start: Path,
        ctx: zmq.Context,
        curve,
        source: BatchSource,
        ranks: int = 1,
    ):
        """`source` belongs to the publish thread from `start()` on."""
        self.cfg, self.paths, self.start_checkpoint = cfg, paths, start
        self.ctx, self.curve, self.source, self.ranks = ctx, curve, source, ranks
        self.started = False
        self.store, self.announcer, self.deltas = None, None, None  # `start()` opens them
        self.thread = Background("publish")  # a thread per job, from the first `submit`

    def start(self, version: int, weights: dict[str, torch.Tensor]) -> Publisher:
        """Open the run's store (publishing `version` unless it holds it), bind the announcer
        (a restarted learner takes its old address back), record the endpoints and tell the
        buffer `version`."""
        if self.started:
            raise RuntimeError("the publisher is started already")
        self.started = True
        cfg, paths = self.cfg, self.paths
        self.store = weight_store(cfg, paths.root, self.start_checkpoint, create=True)
        self.deltas = DeltaMeter() if cfg.weights.deltas != "off" else None
        if self.deltas is not None:  # `weights` may be views of the parameters
            self.deltas.measure(version, {k: v.clone() for k, v in weights.items()})
        latest = self.store.latest()
        if latest is None or latest < version:
            self._store(version, weights, None, self._mark())
        previous = (read_endpoints(paths, "learner") or {}).get("weights")
        self.announcer = WeightAnnouncer(self.ctx, cfg.run.bind_host, self.curve, previous)
        publish_endpoints(
            paths, "learner", {"weights": self.announcer.address, **self.store.endpoints()}
        )
        self.source.publish(version)
        return self

    def publish(self, version, hf_state, in_use: set[int], delta=None, mark=None, whole=True):
        """On the publish thread: the store writes the version (manifest last; whole, as a
        delta, or both), the buffer learns it (admission), the announcement goes out, old
        versions are collected. A checkpoint's version is durable (the collective path's
        late joiners start there)."""
        self._store(version, hf_state, delta, mark, whole)
        self.source.publish(version)  # first: an actor told of it may lease at once
        self.announcer.announce(version)
        self.store.collect(in_use)

    def before_gather(self) -> None:
        self.thread.wait()
        self.store.before_gather()

    def submit(self, version: int, hf_state: dict[str, torch.Tensor], in_use: set[int]) -> dict:
        """Publish on the thread; the metrics of the previous version's transfer (if the store
        tells) and the bytes rank 0 holds for it (`publish_peak_mib`)."""
        deltas = {} if self.deltas is None else self.deltas.measure(version, hf_state)
        send = self.cfg.weights.deltas == "send"
        delta = self.deltas.delta if send else None
        full = sum(t.numel() * t.element_size() for t in hf_state.values())
        if delta is not None and not worth_sending(delta, full):
            delta = None
        whole = delta is None or self._whole(version)
        self.thread.submit(self.publish, version, hf_state, in_use, delta, self._mark(), whole)
        peak = self.peak_bytes(hf_state) / 2**20
        return {"publish_peak_mib": peak, **deltas, **self.store.stats()}

    def _store(self, version: int, hf_state, delta, mark, whole=True) -> None:
        durable = checkpoints_at(self.cfg, version)
        if mark is None:
            self.store.publish(version, hf_state, durable=durable)
        else:  # weight deltas: the version's fingerprint, and its delta where it pays
            kept = {"delta": delta, "fingerprint": mark, "whole": whole}
            self.store.publish(version, hf_state, durable=durable, **kept)

    def _mark(self) -> int | None:
        """The fingerprint of the version just measured, stored with it when deltas are sent."""
        return self.deltas.fingerprint if self.cfg.weights.deltas == "send" else None

    def _whole(self, version: int) -> bool:
        """Whether `version` is stored whole besides its delta: every `weights.full_every`,
        and at checkpoints."""
        every = version % self.cfg.weights.full_every == 0
        return every or checkpoints_at(self.cfg, version)

    def peak_bytes(self, state: dict[str, torch.Tensor]) -> int:
        """Bytes rank 0 holds to publish a version beyond the model: the version's copy (and
        the last version's, when deltas are measured), and with several ranks the last bucket
        in flight (the others hold at most a bucket)."""
        copy = sum(v.numel() * v.element_size() for v in state.values())
        copy *= 1 if self.deltas is None else 2
        bucket = min(self.cfg.weights.bucket_mib * 2**20, copy)
        return copy + (bucket if self.ranks > 1 else 0)

    def wait(self) -> None:
        self.thread.wait()

    def close(self) -> None:
        """What is in flight is finished first; a publisher never started has nothing open."""
        if not self.started:
            return
        try:
            self.thread.close()
        finally:
            for part in (self.announcer, self.source, self.store):  # as far as `start()` got
                if part is not None:
                    part.close()
