"""ZeroMQ data plane: frames, Arrow payloads, a request client, and the run's endpoint file.

Every message is three frames, `[kind, header, payload]`: `kind` a short ASCII word, `header` a
JSON object, `payload` Arrow IPC stream bytes (or empty). Nothing read from a socket is
unpickled; `decode()` checks the frame count, the kind and the header before anyone looks at
the payload.

Services bind to a free port on `run.bind_host` (loopback by default) and publish their
addresses in `<run_dir>/endpoints.json`, written atomically, so clients started anywhere in
the run find them without fixed ports.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import zmq

MAX_HEADER_BYTES = 64 * 1024


class BadMessage(ValueError):
    """A message that does not parse; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode(kind: str, header: dict[str, Any] | None = None, payload: bytes = b"") -> list[bytes]:
    return [kind.encode(), json.dumps(header or {}).encode(), payload]


def decode(frames: list, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any], Any]:
    """Check and split `[kind, header, payload]`; raise `BadMessage` naming what was wrong.

    Frames may be bytes or `zmq.Frame`s (received with `copy=False`); the payload is returned
    as it came, so a large Arrow payload is never copied.
    """
    if len(frames) != 3:
        raise BadMessage("frames", f"{len(frames)} frames, expected 3 (kind, header, payload)")
    raw_kind, raw_header = (f.bytes if isinstance(f, zmq.Frame) else f for f in frames[:2])
    payload = frames[2].buffer if isinstance(frames[2], zmq.Frame) else frames[2]
    kind = raw_kind.decode("ascii", errors="replace")
    if kind not in kinds:
        raise BadMessage("kind", f"unknown message kind {kind[:32]!r}; expected one of {kinds}")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise BadMessage("header", f"header of {len(raw_header)} bytes")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadMessage("header", f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadMessage("header", "header is not a JSON object")
    return kind, header, payload


def table_to_ipc(table: pa.Table | pa.RecordBatch) -> pa.Buffer:
    """Arrow IPC stream bytes, as a `pa.Buffer` zmq sends without another copy."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue()


def send(socket: zmq.Socket, frames: list) -> None:
    """Send a multipart message; large payloads go without a copy."""
    socket.send_multipart(frames, copy=len(frames[-1]) < 65536)


def ipc_to_table(payload, full: bool = True) -> pa.Table:
    """Read an Arrow IPC stream (zero-copy); raise `BadMessage` if it is not one.

    `full` validation checks every offset and is for untrusted input; `False` checks only the
    structure, for data a service of the run already validated.
    """
    try:
        table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
        table.validate(full=full)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise BadMessage("arrow", f"payload is not a valid Arrow IPC stream ({e})") from None
    return table


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

    A REQ socket is stuck after a timeout; a DEALER with a request id in the header is not.
    """

    def __init__(self, ctx: zmq.Context, address: str, curve=None):
        self.address = address
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.socket.connect(address)

    def request(
        self, kind: str, header: dict[str, Any], payload: bytes = b"", timeout_s: float = 10.0
    ) -> tuple[str, dict[str, Any], bytes]:
        rid = uuid.uuid4().hex
        send(self.socket, encode(kind, {**header, "rid": rid}, payload))
        deadline_ms = timeout_s * 1000
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while True:
            if not poller.poll(deadline_ms):
                raise TimeoutError(f"no reply to {kind!r} from {self.address} in {timeout_s:.0f}s")
            reply_kind, reply, body = decode(
                self.socket.recv_multipart(copy=False), ("ok", "batch", "wait", "error")
            )
            if reply.get("rid") != rid:
                continue  # the reply to an earlier request that timed out
            if reply_kind == "error":
                raise RuntimeError(f"{self.address} refused {kind!r}: {reply.get('error')}")
            return reply_kind, reply, body

    def close(self) -> None:
        self.socket.close(linger=0)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def actors_file(run_dir: Path) -> Path:
    """Where the driver says how many actors the fleet has (the learner logs it)."""
    return Path(run_dir) / "control" / "actors.json"


def publish_endpoints(run_dir: Path, service: str, addresses: dict[str, str]) -> None:
    """Record a service's addresses under `service` in `<run_dir>/endpoints/<service>.json`."""
    write_json_atomic(run_dir / "endpoints" / f"{service}.json", addresses)


def read_endpoints(run_dir: Path, service: str) -> dict[str, str] | None:
    path = run_dir / "endpoints" / f"{service}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected an object of addresses")
    return data
