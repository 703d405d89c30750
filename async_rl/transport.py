"""ZeroMQ plumbing: binding, sending without copies, and a request client that survives timeouts.

The messages themselves (frames, kinds, headers, Arrow payloads) are `async_rl.messages`; where
a service's addresses are published is `async_rl.paths`. Services bind to a free port on
`run.bind_host` (loopback by default) and publish their addresses in the run directory, so
clients started anywhere in the run find them without fixed ports.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import zmq

from async_rl.messages import REPLIES, BadMessage, Error, Reply, Request, decode, encode


def send(socket: zmq.Socket, frames: list) -> None:
    """Send a multipart message; large payloads go without a copy."""
    socket.send_multipart(frames, copy=len(frames[-1]) < 65536)


def bind(socket: zmq.Socket, host: str, previous: str | None = None) -> str:
    """Bind to `previous` (the address a restarted service had, so that its clients reconnect
    without being told) if it is on `host` and free, else to a free port on `host`; return the
    address clients connect to."""
    if previous and previous.startswith(f"tcp://{host}:"):
        try:
            socket.bind(previous)
            return previous
        except zmq.ZMQError:
            pass  # taken meanwhile: a new port, published again by the caller
    return f"tcp://{host}:{socket.bind_to_random_port(f'tcp://{host}')}"


class Client:
    """Request/reply over a DEALER socket, safe against timeouts (late replies are discarded).

    A REQ socket is stuck after a timeout; a DEALER with a request id (`rid`) is not.
    """

    def __init__(self, ctx: zmq.Context, address: str, curve=None):
        self.address = address
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.socket.connect(address)

    def request(
        self, request: Request, replies: tuple[type[Reply], ...], timeout_s: float = 10.0
    ) -> tuple[Reply, Any]:
        """`(reply, payload)`; `RuntimeError` if the service refused, `TimeoutError` if it did
        not answer in `timeout_s`."""
        rid = uuid.uuid4().hex
        send(self.socket, encode(dataclasses.replace(request, rid=rid)))
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while True:
            if not poller.poll(timeout_s * 1000):
                raise TimeoutError(
                    f"no reply to {request.KIND!r} from {self.address} in {timeout_s:.0f}s"
                )
            reply, payload = decode(self.socket.recv_multipart(copy=False), *REPLIES)
            if reply.rid != rid:
                continue  # the reply to an earlier request that timed out
            if isinstance(reply, Error):
                raise RuntimeError(f"{self.address} refused {request.KIND!r}: {reply.error}")
            if not isinstance(reply, replies):
                raise BadMessage("kind", f"{reply.KIND!r} does not answer {request.KIND!r}")
            return reply, payload

    def close(self) -> None:
        self.socket.close(linger=0)
