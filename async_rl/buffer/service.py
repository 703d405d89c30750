"""The replay buffer as a service: ZeroMQ sockets around `ReplayBuffer`.

    actors --PUSH  group [Arrow IPC, one group]-------> PULL   ┐
    actors --DEALER hello / lease ---------------------> ROUTER ├ BufferService (one thread)
    learner --DEALER publish / sample -----------------> ROUTER ┘      │
                                                                     └─ ReplayBuffer (disk)

The messages are those of `async_rl.wire.messages`; the clients are `async_rl.wire.clients`.
Requests that cannot be answered yet (a lease while actors must pause, a global batch that is not
ready) are held and answered as soon as they can be, or with `wait` when the time the client
allowed runs out; the client then asks again. Bad messages are counted by reason and logged;
the service keeps serving.

Run on its own: `python -m async_rl.buffer.service RUN_DIR` (reads `RUN_DIR/config.toml`).
The service binds the ports it bound before, when it restarts on the same run directory, so
clients reconnect to it without being told.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
from pathlib import Path

import pyarrow as pa
import zmq

from async_rl.buffer.replay import ReplayBuffer
from async_rl.config import Config, load_config
from async_rl.paths import RunPaths, publish_endpoints, read_endpoints
from async_rl.types import InvalidGroup
from async_rl.wire.messages import (
    REQUESTS,
    BadMessage,
    Batch,
    Counters,
    Error,
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
    decode,
    encode,
    ipc_to_table,
    request_id,
    table_to_ipc,
)
from async_rl.wire.security import curve_for
from async_rl.wire.transport import bind, send

log = logging.getLogger(__name__)

MAX_DRAIN = 512
MAX_LEASES = 1024  # granted per request at most


class BufferService:
    def __init__(self, cfg: Config, run_dir: Path, ctx: zmq.Context | None = None):
        self.buffer = ReplayBuffer.of_run(cfg, run_dir)
        self.max_bytes = int(cfg.buffer.max_message_mib * 2**20)
        self.ctx = ctx or zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        # Beyond 4x the limit, zmq drops the connection before the frame is read into memory.
        self.pull.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_bytes)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.curve = curve_for(cfg)
        for s in (self.pull, self.router):
            s.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.serve(s)
        paths = RunPaths(run_dir)
        previous = read_endpoints(paths, "buffer") or {}
        host = cfg.run.bind_host
        self.addresses = {
            "ingest": bind(self.pull, host, previous.get("ingest")),
            "requests": bind(self.router, host, previous.get("requests")),
        }
        publish_endpoints(paths, "buffer", self.addresses)
        self.held: list[tuple[float, bytes, Request]] = []  # (deadline, peer, request)
        self.stopping = threading.Event()
        self.control: queue.SimpleQueue = queue.SimpleQueue()  # from other threads, see `steer`

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                events = dict(poller.poll(100))
                if self.pull in events:
                    self._ingest()
                while self.router in events and self.router.poll(0):
                    self._request(self.router.recv_multipart())
                self._retry_held()
                while not self.control.empty():
                    k, reason, signals = self.control.get()
                    self.buffer.set_max_staleness(k, reason)
                    self.buffer.autopilot = signals
        finally:
            self.buffer.close()
            self.pull.close(linger=0)
            self.router.close(linger=0)
            if self.curve is not None:
                self.curve.stop()

    def stop(self) -> None:
        self.stopping.set()

    def steer(self, k: int, reason: str, signals: dict[str, float]) -> None:
        """From any thread: K for the buffer (`ReplayBuffer.set_max_staleness`) and the
        controller's signals to report (`autopilot/*`), taken up by the service's loop."""
        self.control.put((k, reason, signals))

    # ------------------------------------------------------------------ ingest
    def _ingest(self) -> None:
        accepted, ids = [], set()
        for _ in range(MAX_DRAIN):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                batch, lease = self._parse_group(frames)
                gid = batch.column("group_id")[0].as_py()
                if gid in ids:
                    raise InvalidGroup("duplicate", f"group {gid!r} sent twice")
            except (BadMessage, InvalidGroup) as e:
                self.buffer.reject(e.reason, str(e))
                continue
            ids.add(gid)
            accepted.append((batch, lease))
        self.buffer.append(accepted)

    def _parse_group(self, frames: list) -> tuple[pa.RecordBatch, str | None]:
        size = sum(len(f.buffer) if isinstance(f, zmq.Frame) else len(f) for f in frames)
        if size > self.max_bytes:
            raise BadMessage("size", f"{size} bytes, more than buffer.max_message_mib")
        message, payload = decode(frames, Group)
        try:
            batches = ipc_to_table(payload).combine_chunks().to_batches()
            if len(batches) != 1:
                raise BadMessage("arrow", "a group message must hold exactly one record batch")
            self.buffer.check(batches[0])
        except (BadMessage, InvalidGroup):
            # its lease will not be fulfilled: the prompt goes out again, no batch waits for it
            self.buffer.give_back(message.lease)
            raise
        return batches[0], message.lease

    # ------------------------------------------------------------------ requests
    def _reply(self, peer: bytes, reply: Reply, payload: bytes = b"") -> None:
        send(self.router, [peer, *encode(reply, payload)])

    def _request(self, frames: list[bytes]) -> None:
        peer, rest = frames[0], frames[1:]
        try:
            request, _ = decode(rest, *REQUESTS)
            if not self._answer(peer, request):
                wait_s = getattr(request, "wait_s", 0.0)
                self.held.append((self.buffer.clock() + wait_s, peer, request))
        except (BadMessage, ValueError) as e:
            self.buffer.reject(getattr(e, "reason", "request"), str(e))
            rid = request_id(rest[1]) if len(rest) == 3 else None
            self._reply(peer, Error(rid=rid, error=str(e)))

    def _retry_held(self) -> None:
        now, keep = self.buffer.clock(), []
        for deadline, peer, request in self.held:
            if self._answer(peer, request):
                continue
            if now >= deadline:
                self._reply(peer, Wait(rid=request.rid, metrics=self.buffer.metrics()))
            else:
                keep.append((deadline, peer, request))
        self.held = keep

    def _answer(self, peer: bytes, request: Request) -> bool:
        """Answer now and return True, or return False to hold the request."""
        b, rid = self.buffer, request.rid
        if isinstance(request, (Hello, Leave)):
            b.release(request.actor_id)
            self._reply(peer, Welcome(rid=rid, published=b.published))
        elif isinstance(request, Lease):
            count = min(request.count, MAX_LEASES)
            work = (request.running_rows, request.swaps_in_flight, request.reward_errors)
            grant = b.lease(request.actor_id, count=count, version=request.version, work=work)
            if grant is None:
                return False
            self._reply(peer, Leases(rid=rid, min_version=grant[0], leases=grant[1]))
        elif isinstance(request, Publish):
            b.set_published(request.version)
            self._reply(peer, Published(rid=rid))
        elif isinstance(request, Sample):
            return self._serve(peer, request)
        elif isinstance(request, Stats):
            self._reply(peer, Counters(rid=rid, metrics=self._counters()))
        return True

    def _serve(self, peer: bytes, request: Sample) -> bool:
        table = self.buffer.sample(request.version)
        if table is None:
            return False
        staleness = self.buffer.staleness(request.version)
        reply = Batch(
            rid=request.rid,
            staleness_mean=sum(staleness) / len(staleness),
            staleness_max=max(staleness),
            versions_in_use=self.buffer.versions_in_use(),
            metrics=self.buffer.metrics(),
        )
        self._reply(peer, reply, table_to_ipc(table))
        return True

    def _counters(self) -> dict[str, float]:
        rejected = {f"buffer/rejected/{k}": v for k, v in self.buffer.rejected.items()}
        denied = self.curve.denied if self.curve is not None else 0
        return {**self.buffer.metrics(), **rejected, "buffer/auth_denied": denied}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a run directory's replay buffer.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(message)s")
    cfg = load_config(RunPaths(args.run_dir).config)
    service = BufferService(cfg, args.run_dir)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    log.info("serving %s", service.addresses)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
