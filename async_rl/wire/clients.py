"""What actors and the learner are written against, and the ZeroMQ implementations.

    RolloutSink   the actors' side:  hello, lease, push a group       ZmqRolloutSink
    BatchSource   the learner's side: sample a global batch, publish   ZmqBatchSource

Both talk to the buffer service (`async_rl.buffer.service`) with the typed messages of
`async_rl.wire.messages`. A request without a reply (the buffer restarting, or stopped) is asked
again on a fresh socket for up to `retry_s` seconds, or until `stopping` is set; every request
is safe to repeat (a repeated `sample(v)` gets the same groups, a repeated lease's grant
expires unused). Thread-unsafe: one client per thread.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import zmq

from async_rl.paths import RunPaths, wait_for_endpoints
from async_rl.wire.messages import (
    Batch,
    Counters,
    Group,
    Hello,
    Lease,
    Leases,
    Leave,
    Publish,
    Published,
    Reply,
    Request,
    Sample,
    Stats,
    Wait,
    Welcome,
    encode,
    ipc_to_table,
    table_to_ipc,
)
from async_rl.wire.security import Curve
from async_rl.wire.transport import Client, send

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 5.0  # how long a leaving actor waits for the buffer to release its leases


class RolloutSink(Protocol):
    """Where an actor's groups go, and who tells it what to generate."""

    def hello(self, actor_id: str) -> int:
        """Announce a (re)started actor; returns the newest published version."""
        ...

    def leave(self, actor_id: str) -> None:
        """The actor leaves: its leases are released (best effort: a buffer that is gone is not
        waited for; the leases then expire)."""
        ...

    def lease(
        self,
        actor_id: str,
        count: int = 1,
        version: int | None = None,
        wait_s: float = 1.0,
        running_rows: int = 0,
        swaps_in_flight: int = 0,
        reward_errors: int = 0,
    ) -> Leases | None:
        """Leases to generate up to `count` groups, or None: pause for now. The actor reports
        the weights it holds and what its engine is doing (`async_rl.wire.messages.Lease`)."""
        ...

    def push(self, batch: pa.RecordBatch, lease: str | None = None) -> None:
        """One finished group (a record batch of G rows), generated under `lease`."""
        ...

    def close(self) -> None: ...


class BatchSource(Protocol):
    """Where the learner's global batches come from, and whom it tells of new versions."""

    def sample(self, version: int, wait_s: float = 1.0) -> tuple[pa.Table | None, Batch | Wait]:
        """The global batch for learner `version` and its reply, or (None, `Wait`) for now."""
        ...

    def publish(self, version: int) -> None:
        """Weights `version` are complete and announced."""
        ...

    def close(self) -> None: ...


class BufferConnection:
    """Requests to a run's buffer service, asked again while no reply comes (module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        ctx: zmq.Context | None = None,
        timeout_s: float = 60.0,
        curve: Curve | None = None,
        retry_s: float = 0.0,
        stopping: threading.Event | None = None,
    ):
        self.retry_s, self.stopping, self.curve = retry_s, stopping, curve
        self.ctx = ctx or zmq.Context.instance()
        self.addresses = wait_for_endpoints(RunPaths(run_dir), "buffer", timeout_s)
        self.requests = Client(self.ctx, self.addresses["requests"], curve)

    def ask(self, request: Request, *replies: type[Reply], timeout_s: float = 10.0):
        """`(reply, payload)` of the first reply of a kind in `replies`; asked again on a fresh
        socket while none comes (the unanswered request is then never delivered twice)."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return self.requests.request(request, replies, timeout_s=timeout_s)
            except TimeoutError as e:
                if time.monotonic() >= deadline or (self.stopping and self.stopping.is_set()):
                    raise
                log.warning("%s; asking again", e)
                self.requests.close()
                self.requests = Client(self.ctx, self.requests.address, self.curve)

    def stats(self) -> dict[str, Any]:
        """The buffer's counters (`buffer/*`, rejects by reason)."""
        return self.ask(Stats(), Counters)[0].metrics

    def close(self) -> None:
        self.requests.close()


class ZmqRolloutSink(BufferConnection):
    """`RolloutSink` over the buffer service: requests on DEALER, groups on PUSH."""

    def __init__(self, run_dir: Path, **kwargs):
        super().__init__(run_dir, **kwargs)
        self.push_socket = self.ctx.socket(zmq.PUSH)
        self.push_socket.setsockopt(zmq.LINGER, 5000)  # queued groups are still delivered
        if self.curve is not None:
            self.curve.connect(self.push_socket)
        self.push_socket.connect(self.addresses["ingest"])

    def hello(self, actor_id: str) -> int:
        return self.ask(Hello(actor_id=actor_id), Welcome)[0].published

    def leave(self, actor_id: str) -> None:
        try:
            self.requests.request(Leave(actor_id=actor_id), (Welcome,), timeout_s=LEAVE_TIMEOUT_S)
        except (TimeoutError, RuntimeError, zmq.ZMQError) as e:
            log.warning("%s left without the buffer's answer (%s)", actor_id, e)

    def lease(
        self,
        actor_id: str,
        count: int = 1,
        version: int | None = None,
        wait_s: float = 1.0,
        running_rows: int = 0,
        swaps_in_flight: int = 0,
        reward_errors: int = 0,
    ) -> Leases | None:
        request = Lease(
            actor_id=actor_id,
            count=count,
            version=version,
            wait_s=wait_s,
            running_rows=running_rows,
            swaps_in_flight=swaps_in_flight,
            reward_errors=reward_errors,
        )
        reply, _ = self.ask(request, Leases, Wait, timeout_s=wait_s + 10)
        return reply if isinstance(reply, Leases) else None

    def push(self, batch: pa.RecordBatch, lease: str | None = None) -> None:
        send(self.push_socket, encode(Group(lease=lease), table_to_ipc(batch)))

    def close(self) -> None:
        super().close()
        self.push_socket.close()


class ZmqBatchSource(BufferConnection):
    """`BatchSource` over the buffer service."""

    def sample(self, version: int, wait_s: float = 1.0) -> tuple[pa.Table | None, Batch | Wait]:
        request = Sample(version=version, wait_s=wait_s)
        reply, payload = self.ask(request, Batch, Wait, timeout_s=wait_s + 30)
        if isinstance(reply, Wait):
            return None, reply
        return ipc_to_table(payload, full=False), reply

    def publish(self, version: int) -> None:
        self.ask(Publish(version=version), Published)
