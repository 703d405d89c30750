"""Announcements of weight versions: the learner's PUB socket sends `WeightsReady(version=v)`
(`async_rl.wire.messages`); actors SUB and also ask their store for `latest()`, so a missed
announcement only delays a swap."""

from __future__ import annotations

import time

import zmq

from async_rl.wire.messages import BadMessage, WeightsReady, decode, encode
from async_rl.wire.transport import bind


class WeightAnnouncer:
    """The learner's PUB socket: tells subscribed actors that a version is ready."""

    def __init__(self, ctx: zmq.Context, host: str, curve=None, previous: str | None = None):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.serve(self.socket)
        # a restarted learner takes its old address back: subscribed actors hear it again
        self.address = bind(self.socket, host, previous)

    def announce(self, version: int) -> None:
        self.socket.send_multipart(encode(WeightsReady(version=version)))

    def close(self) -> None:
        self.socket.close(linger=0)


class WeightSubscriber:
    """An actor's SUB socket; `newest()` drains announcements without blocking."""

    def __init__(self, ctx: zmq.Context, address: str, curve=None):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.socket.setsockopt(zmq.SUBSCRIBE, WeightsReady.KIND.encode())
        self.socket.connect(address)

    def newest(self, timeout_ms: int = 0) -> int | None:
        """The newest version announced since the last call, or None; waits up to `timeout_ms`
        for a first valid announcement (a bad one does not end the wait)."""
        best, deadline = None, time.monotonic() + timeout_ms / 1000
        while True:
            wait = 0 if best is not None else max(int((deadline - time.monotonic()) * 1000), 0)
            if not self.socket.poll(wait):
                return best
            try:
                announcement, _ = decode(self.socket.recv_multipart(), WeightsReady)
            except BadMessage:
                continue  # a bad announcement is ignored; the store is the source of truth
            best = max(best or 0, announcement.version)

    def close(self) -> None:
        self.socket.close(linger=0)
