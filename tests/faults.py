"""Fault injection for real runs, and the audit of a run directory after the faults.

Used by `tests/integration/test_faults.py` and `benchmarks/soak.py` (with the process helpers of
`tests/helpers.py`):
- `state()`, `alive()`: what /proc says about a process (a SIGSTOPped one is `T`);
- `tmpfs()`: a small filesystem under a path (disk full), `fill()` takes all its free space;
- `FaultProxy`: a ZeroMQ proxy between clients and the buffer that drops, delays and corrupts;
- `audit()`: the invariants of a run directory, read with pyarrow and json only.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import zmq

from async_rl.types import InvalidGroup, RoutingSpec, check_group
from async_rl.wire.messages import REPLIES, REQUESTS, BadMessage, Lease, Leases, decode
from tests.helpers import json_lines


# ---------------------------------------------------------------------- processes
def state(pid: int | None) -> str | None:
    """The process state letter (`R`, `S`, `T` stopped, `Z` zombie), None if there is none."""
    if pid is None:
        return None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    return state(pid) not in (None, "Z")


# ---------------------------------------------------------------------- disk
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` (e.g. "4m") on `path`; raise PermissionError if not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode:
        raise PermissionError(done.stderr.decode().strip() or "mount failed")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem under `directory` with one file; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


# ---------------------------------------------------------------------- zmq
class FaultProxy:
    """Forwards a run's buffer traffic, dropping, delaying or corrupting some of it.

    Group messages (PUSH) may be dropped, delayed by `delay_s` seconds (so they arrive out of
    order and late), or followed by a corrupted copy (bit flips or a truncated payload); lease
    requests and lease replies may be dropped (`drop_leases`). Everything else passes. `counts`
    says what was done. The proxy binds random ports; point clients at `addresses`.
    """

    def __init__(
        self,
        target: dict[str, str],
        seed: int = 0,
        drop: float = 0.1,
        delay: float = 0.1,
        delay_s: tuple[float, float] = (2.0, 6.0),
        corrupt: float = 0.1,
        drop_leases: float = 0.05,
    ):
        self.target, self.rng = target, random.Random(seed)
        self.drop, self.delay, self.delay_s, self.corrupt = drop, delay, delay_s, corrupt
        self.drop_leases = drop_leases
        self.ctx = zmq.Context()
        self.pull, self.push = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        self.router = self.ctx.socket(zmq.ROUTER)
        for s in (self.pull, self.push, self.router):
            s.setsockopt(zmq.LINGER, 0)
        self.push.connect(target["ingest"])
        self.addresses = {
            "ingest": f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}",
            "requests": f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}",
        }
        self.backends: dict[bytes, zmq.Socket] = {}  # one DEALER per client, as it would be
        self.leases: set[str] = set()  # ids of lease requests passed on
        self.later: list[tuple[float, int, list[bytes]]] = []
        self.counts: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(10)
        self.ctx.destroy(linger=0)

    def _chance(self, p: float) -> bool:
        return self.rng.random() < p

    def _group(self, frames: list[bytes]) -> None:
        if self._chance(self.corrupt):
            self.counts["group/corrupted"] += 1
            payload = bytearray(frames[2])
            if self._chance(0.5):
                payload = payload[: self.rng.randrange(len(payload))]
            else:
                for _ in range(8):
                    payload[self.rng.randrange(len(payload))] ^= 1 << self.rng.randrange(8)
            self.push.send_multipart([frames[0], frames[1], bytes(payload)])
        if self._chance(self.drop):
            self.counts["group/dropped"] += 1
        elif self._chance(self.delay):
            self.counts["group/delayed"] += 1
            due = time.monotonic() + self.rng.uniform(*self.delay_s)
            heapq.heappush(self.later, (due, self.counts["group/delayed"], frames))
        else:
            self.counts["group/passed"] += 1
            self.push.send_multipart(frames)

    def _request(self, frames: list[bytes]) -> None:
        peer, rest = frames[0], frames[1:]
        is_lease = False
        with contextlib.suppress(BadMessage):  # what does not decode goes on as it came
            request, _ = decode(rest, *REQUESTS)
            if isinstance(request, Lease):
                self.leases.add(request.rid)
                is_lease = True
        if is_lease and self._chance(self.drop_leases):
            self.counts["lease/request_dropped"] += 1
            return
        if peer not in self.backends:
            backend = self.backends[peer] = self.ctx.socket(zmq.DEALER)
            backend.setsockopt(zmq.LINGER, 0)
            backend.connect(self.target["requests"])
            self.poller.register(backend, zmq.POLLIN)
        self.backends[peer].send_multipart(rest)

    def _reply(self, peer: bytes, frames: list[bytes]) -> None:
        with contextlib.suppress(BadMessage):
            reply, _ = decode(frames, *REPLIES)
            if isinstance(reply, Leases) and reply.rid in self.leases:
                self.leases.discard(reply.rid)
                if self._chance(self.drop_leases):
                    self.counts["lease/reply_dropped"] += 1
                    return
        self.router.send_multipart([peer, *frames])

    def _run(self) -> None:
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.router, zmq.POLLIN)
        while not self.stopping.is_set():
            events = dict(self.poller.poll(50))
            if self.pull in events:
                self._group(self.pull.recv_multipart())
            if self.router in events:
                self._request(self.router.recv_multipart())
            for peer, backend in list(self.backends.items()):
                if backend in events:
                    self._reply(peer, backend.recv_multipart())
            while self.later and self.later[0][0] <= time.monotonic():
                self.push.send_multipart(heapq.heappop(self.later)[2])


# ---------------------------------------------------------------------- the audit
def segment_batches(buffer_dir: Path) -> list[pa.RecordBatch]:
    """Every record batch of the buffer's segments, in arrival order (pyarrow only).

    Closed segments are Arrow IPC files; an open one (the buffer is running, or was killed) is a
    stream whose complete messages count and whose torn tail does not.
    """
    paths: dict[int, Path] = {}
    for path in sorted(buffer_dir.glob("segment-*.open")) + sorted(buffer_dir.glob("*.arrow")):
        paths[int(path.name[8:14])] = path  # a closed segment wins over its stale .open
    batches = []
    for _, path in sorted(paths.items()):
        if path.suffix == ".arrow":
            batches += pa.ipc.open_file(pa.memory_map(str(path))).read_all().to_batches()
            continue
        with contextlib.suppress(pa.ArrowInvalid, OSError):
            for batch in pa.ipc.open_stream(pa.memory_map(str(path))):
                batches.append(batch)
    return batches


def audit(run_dir: Path, spec: RoutingSpec, group_size: int, max_staleness: int) -> dict:
    """The invariants of a run directory after faults; `problems` lists every broken one.

    - every group on disk is whole (`check_group`) and stored once;
    - every group the buffer reported as stored (`buffer/stored`, the most it ever reported in
      metrics.jsonl) is still on disk, and so is every group the consumption log names;
    - no group was trained with staleness > K, and no version was served two batches;
    - metrics.jsonl has every version 1..n; a version repeats only where the learner restarted
      from an older checkpoint (then the versions continue from there, no gap);
    - per actor, the `policy_version` of its groups in the order it made them (`created_at`)
      never goes down: an actor's weights never go backwards.
    """
    problems: list[str] = []
    buffer_dir = run_dir / "buffer"
    groups: dict[str, pa.RecordBatch] = {}
    stored_twice = invalid = 0
    for batch in segment_batches(buffer_dir):
        try:
            check_group(batch, spec, group_size)
        except InvalidGroup as e:
            invalid += 1
            problems.append(f"a stored group is not whole: {e}")
            continue
        gid = batch.column("group_id")[0].as_py()
        if gid in groups:
            stored_twice += 1
            problems.append(f"group {gid} is stored twice")
        groups[gid] = batch
    version_of = {gid: min(b.column("policy_version").to_pylist()) for gid, b in groups.items()}

    served: Counter[str] = Counter()
    served_versions: Counter[int] = Counter()
    dropped, staleness = set(), Counter()
    log = buffer_dir / "consumed.jsonl"
    for entry in json_lines(log):
        for gid in entry.get("served", []):
            served[gid] += 1
            if gid not in version_of:
                problems.append(f"trained group {gid} is not on disk")
                continue
            staleness[entry["version"] - version_of[gid]] += 1
        if "served" in entry:
            served_versions[entry["version"]] += 1
        dropped.update(entry.get("dropped", []))
    if staleness and max(staleness) > max_staleness:
        problems.append(f"trained with staleness {max(staleness)} > K = {max_staleness}")
    problems += [f"group {g} was served {n} times" for g, n in served.items() if n > 1]
    problems += [f"version {v} was served {n} batches" for v, n in served_versions.items() if n > 1]

    rows = json_lines(run_dir / "metrics.jsonl")
    steps = [r["version"] for r in rows if "learner/loss" in r]
    restarts = sum(1 for a, b in zip(steps, steps[1:], strict=False) if b <= a)
    for a, b in zip(steps, steps[1:], strict=False):
        if b > a + 1:
            problems.append(f"metrics.jsonl skips from version {a} to {b}")
    if steps and sorted(set(steps)) != list(range(1, max(steps) + 1)):
        problems.append(f"metrics.jsonl versions are not 1..{max(steps)}")
    reported = max((r.get("buffer/stored", 0) for r in rows), default=0)
    lost = max(0, reported - len(groups)) + sum(1 for g in served if g not in version_of)
    if reported > len(groups):
        problems.append(f"the buffer reported {reported} groups stored; {len(groups)} on disk")

    by_actor: dict[str, list[tuple[int, int]]] = {}
    for b in groups.values():
        created = min(b.column("created_at").cast(pa.int64()).to_pylist())
        actor = b.column("actor_id")[0].as_py()
        by_actor.setdefault(actor, []).append(
            (created, min(b.column("policy_version").to_pylist()))
        )
    backwards = 0
    for actor, made in by_actor.items():
        made.sort()
        for (_, v0), (_, v1) in zip(made, made[1:], strict=False):
            if v1 < v0:
                backwards += 1
                problems.append(f"actor {actor} went back from weights {v0} to {v1}")
    return {
        "groups_on_disk": len(groups),
        "groups_reported_stored": reported,
        "groups_lost": lost,
        "stored_twice": stored_twice,
        "not_whole": invalid,
        "trained_groups": len(served),
        "dropped_stale": len(dropped),
        "staleness_histogram": dict(sorted(staleness.items())),
        "steps": max(steps, default=0),
        "learner_restarts_seen": restarts,
        "actors": sorted(by_actor),
        "versions_backwards": backwards,
        "rejected": max((r.get("buffer/rejected", 0) for r in rows), default=0),
        "problems": problems,
    }
