"""Every message that crosses a process boundary, defined once, with its encoder and decoder.

A message is three ZeroMQ frames, `[kind, header, payload]`: `kind` a short ASCII word,
`header` a JSON object whose keys are exactly the fields of the message's dataclass below, and
`payload` Arrow IPC stream bytes or empty. `decode()` checks the frame count, the kind, the JSON
and every field's type and range before anyone looks at the payload, and raises `BadMessage`
with a short reason (the buffer counts rejects by it). Nothing read from a socket is unpickled.

    kind       from -> to (socket)                 header                          payload
    hello      actor -> buffer (DEALER/ROUTER)     actor_id                        -
    leave      actor -> buffer                     actor_id                        -
    lease      actor -> buffer                     actor_id, count, version?,      -
                                                   wait_s, running_rows,
                                                   swaps_in_flight
    group      actor -> buffer (PUSH/PULL)         lease?                          one group
    publish    learner -> buffer                   version                         -
    sample     learner -> buffer                   version, wait_s                 -
    stats      anyone -> buffer                    -                               -
    welcome    buffer -> actor, reply to hello     published                       -
               or leave
    leases     reply to lease                      min_version, leases             -
    published  reply to publish                    -                               -
    batch      reply to sample                     staleness_mean, staleness_max,  global batch
                                                   versions_in_use, metrics
    counters   reply to stats                      metrics                         -
    wait       reply to lease or sample: not yet   metrics                         -
    error      reply to any request                error                           -
    weights    learner -> actors (PUB/SUB)         version                         -

Over Ray the processes answer the driver's heartbeat with a `ProcessStatus`, and actors report
their counters as `ActorStats`.

Requests and replies carry `rid`, the request id a reply echoes (a DEALER client discards the
late reply to a request it gave up on). A request that cannot be answered yet is held by the
buffer for up to `wait_s` seconds, then answered `wait`.

Example:
    frames = encode(Lease(rid="7f3a", actor_id="a0", count=8, version=3, wait_s=0.5))
    message, payload = decode(frames, Lease)       # Lease(rid='7f3a', actor_id='a0', ...)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, get_type_hints

import pyarrow as pa
import zmq

MAX_HEADER_BYTES = 64 * 1024
MAX_WAIT_S = 3600.0


class BadMessage(ValueError):
    """A message that does not parse; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Message:
    KIND: ClassVar[str]


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    rid: str = field(default="", metadata={"empty": True})  # set by the client; replies echo it


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    # the request's id (None when the request had no readable one)
    rid: str | None = field(default=None, metadata={"empty": True})


def _wait(doc: str):
    return field(default=0.0, metadata={"max": MAX_WAIT_S, "doc": doc})


# ---------------------------------------------------------------------- actor -> buffer
@dataclass(frozen=True, kw_only=True)
class Hello(Request):
    """An actor (re)starts: leases an earlier incarnation left behind are released."""

    KIND = "hello"
    actor_id: str  # e.g. "a0"


@dataclass(frozen=True, kw_only=True)
class Leave(Request):
    """An actor leaves the fleet: its leases are released (the groups it was generating will
    not come; their prompts are handed out again and no global batch waits for them)."""

    KIND = "leave"
    actor_id: str


@dataclass(frozen=True, kw_only=True)
class Lease(Request):
    """Permission to generate up to `count` groups (held while actors must pause)."""

    KIND = "lease"
    actor_id: str
    count: int = 1  # groups wanted; the buffer grants at most 1024 at once
    version: int | None = None  # the weights version the actor holds (garbage collection)
    wait_s: float = _wait("how long the buffer may hold the request before answering `wait`")
    running_rows: int = 0  # rows the actor's engine is generating (continuous batching)
    swaps_in_flight: int = 0  # weight versions it loaded under running rows, since it started
    reward_errors: int = 0  # completions its reward failed on (scored 0), since it started


@dataclass(frozen=True, kw_only=True)
class Group(Message):
    """One group of G completions; payload: its Arrow record batch (`async_rl.types`)."""

    KIND = "group"
    lease: str | None = None  # the lease it was generated under


# ---------------------------------------------------------------------- learner -> buffer
@dataclass(frozen=True, kw_only=True)
class Publish(Request):
    """Weights `version` are complete and announced: admission may count on them."""

    KIND = "publish"
    version: int


@dataclass(frozen=True, kw_only=True)
class Sample(Request):
    """The global batch for learner `version` (the same groups if asked again)."""

    KIND = "sample"
    version: int
    wait_s: float = _wait("how long the buffer may hold the request before answering `wait`")


@dataclass(frozen=True, kw_only=True)
class Stats(Request):
    """The buffer's counters (tests, benchmarks, operators)."""

    KIND = "stats"


# ---------------------------------------------------------------------- replies
@dataclass(frozen=True, kw_only=True)
class Welcome(Reply):
    KIND = "welcome"
    published: int  # the newest version the buffer knows to be published


@dataclass(frozen=True, kw_only=True)
class Leases(Reply):
    KIND = "leases"
    min_version: int  # generate with weights of at least this version
    leases: list[tuple[str, int]]  # (lease id, training prompt index), e.g. [("9c1e", 17)]


@dataclass(frozen=True, kw_only=True)
class Published(Reply):
    KIND = "published"


@dataclass(frozen=True, kw_only=True)
class Batch(Reply):
    """The global batch for the requested version; payload: its Arrow table."""

    KIND = "batch"
    staleness_mean: float  # mean of learner version - policy_version over its groups
    staleness_max: int
    versions_in_use: list[int]  # weights versions actors reported recently (kept by the store)
    metrics: dict[str, float]  # the buffer's `buffer/*` metrics when it was served


@dataclass(frozen=True, kw_only=True)
class Counters(Reply):
    KIND = "counters"
    metrics: dict[str, float]  # `buffer/*`, rejects by reason, `buffer/auth_denied`


@dataclass(frozen=True, kw_only=True)
class Wait(Reply):
    """Not yet: actors must pause, or the global batch is not complete."""

    KIND = "wait"
    metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    KIND = "error"
    error: str  # why the request was refused


# ---------------------------------------------------------------------- learner -> actors
@dataclass(frozen=True, kw_only=True)
class WeightsReady(Message):
    """Weights `version` are complete in the run's `WeightStore`."""

    KIND = "weights"
    version: int


# ---------------------------------------------------------------------- processes -> driver
@dataclass(frozen=True)
class ProcessStatus:
    """A process's answer to the driver's heartbeat ping (a Ray actor method's return value).

    Example: `ProcessStatus(finished=False, error=None, pid=4242, node="3223d3...")`.
    """

    finished: bool  # its loop ended (an actor is then replaced; learner and buffer stop the run)
    error: str | None  # why the loop failed, e.g. "StorageError: cannot write ..."
    pid: int  # the process answering (a restarted process answers with a new one)
    node: str  # the Ray node it runs on (its pid means something only there)


@dataclass
class ActorStats:
    """An actor's counters since it started (a Ray actor method's return value; the actor
    keeps one and adds to it). Example: 120 groups, 4210 tokens, 14 swaps, 3.5 s paused."""

    groups: int = 0  # groups pushed
    tokens: int = 0  # completion tokens generated
    weight_swaps: int = 0  # weight versions loaded after the first
    swaps_in_flight: int = 0  # of those, loaded while rows were being generated
    reward_errors: int = 0  # completions scored 0 because their reward failed or timed out
    running_rows: int = 0  # rows the engine ran after its last step (continuous batching)
    paused_s: float = 0.0  # held back by admission (the buffer's staleness budget)
    weights_s: float = 0.0  # waiting for and loading weights
    generate_s: float = 0.0  # generating, scoring and pushing
    version: int = 0  # the weights version the engine serves


REQUESTS: tuple[type[Request], ...] = (Hello, Leave, Lease, Publish, Sample, Stats)
REPLIES: tuple[type[Reply], ...] = (Welcome, Leases, Published, Batch, Counters, Wait, Error)

M = TypeVar("M", bound=Message)


# ---------------------------------------------------------------------- encode / decode
def encode(message: Message, payload: bytes | pa.Buffer = b"") -> list:
    """The frames of `message` (a payload only for `Group` and `Batch`)."""
    header = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return [message.KIND.encode(), json.dumps(header).encode(), payload]


def decode(frames: list, *expected: type[M]) -> tuple[M, Any]:
    """The message and payload of `[kind, header, payload]`, if its kind is one of `expected`;
    `BadMessage` naming what was wrong otherwise.

    Frames may be bytes or `zmq.Frame`s (received with `copy=False`); the payload is returned
    as it came, so a large Arrow payload is never copied.
    """
    if len(frames) != 3:
        raise BadMessage("frames", f"{len(frames)} frames, expected 3 (kind, header, payload)")
    raw_kind, raw_header = (f.bytes if isinstance(f, zmq.Frame) else f for f in frames[:2])
    payload = frames[2].buffer if isinstance(frames[2], zmq.Frame) else frames[2]
    kind = raw_kind.decode("ascii", errors="replace")
    kinds = {cls.KIND: cls for cls in expected}
    if kind not in kinds:
        raise BadMessage("kind", f"unknown message kind {kind[:32]!r}; expected {list(kinds)}")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise BadMessage("header", f"header of {len(raw_header)} bytes")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadMessage("header", f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadMessage("header", "header is not a JSON object")
    return _build(kinds[kind], header), payload


def request_id(header_frame: bytes) -> str | None:
    """The `rid` of a request whose header is JSON but not valid (so the error can be routed)."""
    try:
        rid = json.loads(header_frame).get("rid")
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def _build(cls: type[M], header: dict[str, Any]) -> M:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(header.keys() - fields.keys())
    if unknown:
        raise BadMessage("header", f"{cls.KIND}: unknown field(s) {unknown}")
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in header:
            if f.default is dataclasses.MISSING:
                raise BadMessage("header", f"{cls.KIND}: missing {name!r}")
            continue
        values[name] = _check(f"{cls.KIND}.{name}", header[name], hints[name], f.metadata)
    return cls(**values)


def _check(key: str, value: Any, typ: Any, meta) -> Any:
    """`value` as the field type `typ`; `BadMessage` if it is not one."""
    if typ == str | None or typ == int | None:
        return None if value is None else _check(key, value, typ.__args__[0], meta)
    if typ is str:
        if not isinstance(value, str) or not (value or meta.get("empty")):
            raise BadMessage("header", f"{key!r} must be a non-empty string")
        return value
    if typ is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadMessage("header", f"{key!r} must be a non-negative integer")
        return value
    if typ is float:
        top = meta.get("max", math.inf)
        if not _number(value) or not math.isfinite(value) or not 0 <= value <= top:
            raise BadMessage("header", f"{key!r} must be a number in 0..{top}, got {value!r}")
        return float(value)
    if typ == list[int]:
        if not isinstance(value, list):
            raise BadMessage("header", f"{key!r} must be a list of integers")
        return [_check(key, v, int, meta) for v in value]
    if typ == list[tuple[str, int]]:
        if not isinstance(value, list) or not all(
            isinstance(v, list) and len(v) == 2 for v in value
        ):
            raise BadMessage("header", f"{key!r} must be a list of [id, index] pairs")
        return [(_check(key, a, str, meta), _check(key, b, int, meta)) for a, b in value]
    if typ == dict[str, float]:
        if not isinstance(value, dict) or not all(_number(v) for v in value.values()):
            raise BadMessage("header", f"{key!r} must map names to numbers")
        return value
    raise AssertionError(f"{key}: no rule for field type {typ}")  # a type added above


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------- Arrow payloads
def table_to_ipc(table: pa.Table | pa.RecordBatch) -> pa.Buffer:
    """Arrow IPC stream bytes, as a `pa.Buffer` zmq sends without another copy."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue()


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
