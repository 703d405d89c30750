"""The replay buffer as a service: ZeroMQ sockets around `ReplayBuffer`, and its clients.

    actors --PUSH "group" [Arrow IPC, one group]--> PULL  ┐
    actors --DEALER "hello" / "lease" ------------> ROUTER ├ BufferService (one thread)
    learner --DEALER "publish" / "sample" ---------> ROUTER ┘      │
                                                                 └─ ReplayBuffer (disk)

Requests that cannot be answered yet (a lease while actors must pause, a global batch that is
not ready) are held and answered as soon as they can be, or with `wait` when the time the
client allowed runs out; the client then asks again. Bad messages are counted by reason and
logged; the service keeps serving.

Run on its own: `python -m async_rl.buffer_service RUN_DIR` (reads `RUN_DIR/config.toml`).
The service binds the ports it bound before, when it restarts on the same run directory, so
clients reconnect to it without being told.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import zmq

from async_rl.buffer import ReplayBuffer
from async_rl.config import Config, load_config
from async_rl.security import Curve, curve_for
from async_rl.transport import (
    BadMessage,
    Client,
    bind,
    decode,
    encode,
    ipc_to_table,
    publish_endpoints,
    read_endpoints,
    send,
    table_to_ipc,
)
from async_rl.types import InvalidGroup, RoutingSpec

log = logging.getLogger(__name__)

REQUESTS = ("hello", "lease", "publish", "sample", "stats")
MAX_DRAIN = 512


def open_buffer(cfg: Config, run_dir: Path) -> ReplayBuffer:
    return ReplayBuffer(
        run_dir / "buffer",
        RoutingSpec.of(cfg.model),
        group_size=cfg.algo.group_size,
        global_batch_groups=cfg.global_batch_groups,
        max_staleness=cfg.buffer.max_staleness,
        reuse=cfg.buffer.reuse,
        segment_groups=cfg.buffer.segment_groups,
        lease_timeout_s=cfg.buffer.lease_timeout_s,
        vocab_size=cfg.model.vocab_size,
    )


class BufferService:
    def __init__(self, cfg: Config, run_dir: Path, ctx: zmq.Context | None = None):
        self.buffer = open_buffer(cfg, run_dir)
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
        previous = read_endpoints(run_dir, "buffer") or {}
        host = cfg.run.bind_host
        self.addresses = {
            "ingest": bind(self.pull, host, previous.get("ingest")),
            "requests": bind(self.router, host, previous.get("requests")),
        }
        publish_endpoints(run_dir, "buffer", self.addresses)
        self.held: list[tuple[float, bytes, str, dict[str, Any]]] = []  # deadline, peer, kind, hdr
        self.stopping = threading.Event()

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
        finally:
            self.buffer.close()
            self.pull.close(linger=0)
            self.router.close(linger=0)
            if self.curve is not None:
                self.curve.stop()

    def stop(self) -> None:
        self.stopping.set()

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

    def _parse_group(self, frames: list[bytes]) -> tuple[pa.RecordBatch, str | None]:
        size = sum(len(f.buffer) if isinstance(f, zmq.Frame) else len(f) for f in frames)
        if size > self.max_bytes:
            raise BadMessage("size", f"{size} bytes, more than buffer.max_message_mib")
        _, header, payload = decode(frames, ("group",))
        table = ipc_to_table(payload)
        batches = table.combine_chunks().to_batches()
        if len(batches) != 1:
            raise BadMessage("arrow", "a group message must hold exactly one record batch")
        self.buffer.check(batches[0])
        lease = header.get("lease")
        return batches[0], lease if isinstance(lease, str) else None

    # ------------------------------------------------------------------ requests
    def _reply(self, peer: bytes, kind: str, header: dict, payload: bytes = b"") -> None:
        send(self.router, [peer, *encode(kind, header, payload)])

    def _request(self, frames: list[bytes]) -> None:
        peer, rest, header = frames[0], frames[1:], {}
        try:
            kind, header, _ = decode(rest, REQUESTS)
            if not isinstance(header.get("rid"), str):
                raise BadMessage("header", "request without a string 'rid'")
            wait_s = float(header.get("wait_s", 0.0))
            if not 0 <= wait_s <= 3600:
                raise BadMessage("header", f"wait_s {wait_s} outside 0..3600")
            if not self._answer(peer, kind, header):
                self.held.append((time.monotonic() + wait_s, peer, kind, header))
        except (BadMessage, ValueError, TypeError, KeyError) as e:
            self.buffer.reject(getattr(e, "reason", "request"), str(e))
            self._reply(peer, "error", {"rid": header.get("rid"), "error": str(e)})

    def _retry_held(self) -> None:
        now, keep = time.monotonic(), []
        for deadline, peer, kind, header in self.held:
            if self._answer(peer, kind, header):
                continue
            if now >= deadline:
                self._reply(peer, "wait", {"rid": header["rid"], **self.buffer.metrics()})
            else:
                keep.append((deadline, peer, kind, header))
        self.held = keep

    def _answer(self, peer: bytes, kind: str, header: dict[str, Any]) -> bool:
        """Answer now and return True, or return False to hold the request."""
        rid, b = header["rid"], self.buffer
        if kind == "hello":
            b.release(_str(header, "actor_id"))
            self._reply(peer, "ok", {"rid": rid, "published": b.published})
        elif kind == "lease":
            version = header.get("version")
            grant = b.lease(
                _str(header, "actor_id"),
                count=min(_int(header, "count", 1), 1024),
                version=_int(header, "version") if version is not None else None,
            )
            if grant is None:
                return False
            self._reply(peer, "ok", {"rid": rid, "min_version": grant[0], "leases": grant[1]})
        elif kind == "publish":
            b.set_published(_int(header, "version"))
            self._reply(peer, "ok", {"rid": rid})
        elif kind == "sample":
            version = _int(header, "version")
            table = b.sample(version)
            if table is None:
                return False
            staleness = b.staleness(version)
            info = {
                "rid": rid,
                "versions_in_use": b.versions_in_use(),
                "staleness_mean": sum(staleness) / len(staleness),
                "staleness_max": max(staleness),
                **b.metrics(),
            }
            self._reply(peer, "batch", info, table_to_ipc(table))
        elif kind == "stats":
            metrics = {**b.metrics(), **{f"buffer/rejected/{k}": v for k, v in b.rejected.items()}}
            metrics["buffer/auth_denied"] = self.curve.denied if self.curve is not None else 0
            self._reply(peer, "ok", {"rid": rid, **metrics})
        return True


def _str(header: dict, key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str) or not value:
        raise BadMessage("header", f"{key!r} must be a non-empty string")
    return value


def _int(header: dict, key: str, default: int | None = None) -> int:
    value = header.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadMessage("header", f"{key!r} must be a non-negative integer")
    return value


# ---------------------------------------------------------------------- clients
def wait_for_endpoints(run_dir: Path, service: str, timeout_s: float = 60.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while (found := read_endpoints(run_dir, service)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service} did not publish its endpoints in {run_dir}")
        time.sleep(0.05)
    return found


class BufferClient:
    """What actors and the learner call. Thread-unsafe: one per thread.

    A request without a reply (the buffer restarting, or stopped) is asked again for up to
    `retry_s` seconds, or until `stopping` is set; every request is safe to repeat (a repeated
    `sample(v)` gets the same groups, a repeated lease's grant expires unused).
    """

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
        addresses = wait_for_endpoints(Path(run_dir), "buffer", timeout_s)
        self.requests = Client(self.ctx, addresses["requests"], curve)
        self.push_socket = self.ctx.socket(zmq.PUSH)
        self.push_socket.setsockopt(zmq.LINGER, 5000)
        if curve is not None:
            curve.connect(self.push_socket)
        self.push_socket.connect(addresses["ingest"])

    def push(self, batch: pa.RecordBatch, lease: str | None = None) -> None:
        send(self.push_socket, encode("group", {"lease": lease}, table_to_ipc(batch)))

    def _ask(self, kind: str, header: dict, timeout_s: float = 10.0) -> tuple[str, dict, Any]:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return self.requests.request(kind, header, timeout_s=timeout_s)
            except TimeoutError as e:
                if time.monotonic() >= deadline or (self.stopping and self.stopping.is_set()):
                    raise
                log.warning("%s; asking again", e)
                # a new socket: the unanswered request is not delivered a second time later
                self.requests.close()
                self.requests = Client(self.ctx, self.requests.address, self.curve)

    def hello(self, actor_id: str) -> int:
        return self._ask("hello", {"actor_id": actor_id})[1]["published"]

    def lease(
        self, actor_id: str, count: int = 1, version: int | None = None, wait_s: float = 1.0
    ) -> tuple[int, list[tuple[str, int]]] | None:
        """(minimum weights version, [(lease id, prompt index), ...]), or None: pause for now."""
        header = {"actor_id": actor_id, "count": count, "wait_s": wait_s}
        if version is not None:
            header["version"] = version
        kind, reply, _ = self._ask("lease", header, timeout_s=wait_s + 10)
        if kind != "ok":
            return None
        return reply["min_version"], [(lease, prompt) for lease, prompt in reply["leases"]]

    def publish(self, version: int) -> None:
        self._ask("publish", {"version": version})

    def sample(self, version: int, wait_s: float = 1.0) -> tuple[pa.Table | None, dict]:
        """The global batch for `version` and the buffer's metrics, or (None, metrics)."""
        kind, header, payload = self._ask(
            "sample", {"version": version, "wait_s": wait_s}, timeout_s=wait_s + 30
        )
        header.pop("rid", None)
        return (ipc_to_table(payload, full=False) if kind == "batch" else None), header

    def stats(self) -> dict:
        header = self._ask("stats", {})[1]
        header.pop("rid", None)
        return header

    def close(self) -> None:
        self.requests.close()
        self.push_socket.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a run directory's replay buffer.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(message)s")
    cfg = load_config(args.run_dir / "config.toml")
    service = BufferService(cfg, args.run_dir)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    log.info("serving %s", service.addresses)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
