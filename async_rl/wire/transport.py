"""ZeroMQ plumbing: binding, sending without copies, and a request client that survives timeouts.

The messages themselves (frames, kinds, headers, Arrow payloads) are `async_rl.wire.messages`; where
a service's addresses are published is `async_rl.paths`. Services bind to a free port on
`run.bind_host` (loopback by default) and publish their addresses (`async_rl.paths`), so
clients started anywhere in the run find them without fixed ports. A wildcard bind host
(`0.0.0.0`, `::`) listens on every interface and publishes the node's own address
(`reachable_host`): Ray's node IP under Ray, else the host name's.
"""

from __future__ import annotations

import dataclasses
import socket as sockets
import sys
import uuid
from typing import Any

import zmq

from async_rl.wire.messages import REPLIES, BadMessage, Error, Reply, Request, decode, encode


def send(socket: zmq.Socket, frames: list) -> None:
    """Send a multipart message; large payloads go without a copy."""
    socket.send_multipart(frames, copy=len(frames[-1]) < 65536)


WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


def reachable_host(host: str) -> str:
    """The address clients on other nodes reach a socket bound to `host` at: `host` itself,
    or for a wildcard the node's IP (Ray's, when this process is in a Ray cluster)."""
    if host not in WILDCARD_HOSTS:
        return host
    return node_ip()


def node_ip() -> str:
    """This node's address: under Ray, the one its node was started with (`ray start
    --node-ip-address`); else the host name's."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node["NodeID"] == here:
                return node["NodeManagerAddress"]
    return sockets.gethostbyname(sockets.gethostname())


def bind(socket: zmq.Socket, host: str, previous: str | None = None) -> str:
    """Bind to `previous`'s port (the address a restarted service had, so that its clients
    reconnect without being told) if it is on this node and free, else to a free port on
    `host`; return the address clients connect to."""
    listen = "*" if host in WILDCARD_HOSTS else host
    reach = reachable_host(host)
    if previous and previous.startswith(f"tcp://{reach}:"):
        try:
            socket.bind(f"tcp://{listen}:{previous.rsplit(':', 1)[1]}")
            return previous
        except zmq.ZMQError:
            pass  # taken meanwhile: a new port, published again by the caller
    return f"tcp://{reach}:{socket.bind_to_random_port(f'tcp://{listen}')}"


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
