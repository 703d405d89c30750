"""The replay buffer's storage: Arrow IPC segments on disk (`SegmentFiles`), and sampling by
learner version (`SegmentStore`, which indexes what the files hold).

Invariants of `SegmentStore` (each is a test):
- A trajectory is never trained on with staleness `v - policy_version > K` (`buffer.max_staleness`);
  staler groups are dropped, logged and counted, never served.
- Every accepted group is on disk before it counts as accepted, and survives a SIGKILL. A write
  that fails (disk full) is cut back to the last commit and raises `StorageError`: none of its
  groups counts as accepted, and the store is reopened (recovered) before it is used again.
- A group is served at most `buffer.reuse` times; the batch served for learner version v is
  logged before it is sent, and a repeated request for the same v (after a crash of the buffer
  or the learner) gets the same groups again, never others.

Layout of `runs/<name>/buffer/`:
    segment-000001.arrow     closed segments: Arrow IPC files (pyarrow, DuckDB, Polars read them)
    segment-000002.open      the segment being written: an Arrow IPC stream, fsynced per commit
    consumed.jsonl           one line per served batch, dropped group, published version or
                             block of reserved prompts, fsynced before the buffer replies
A closed segment is written to a temporary name, fsynced and renamed, so no reader sees a torn
file. At start-up, open segments left by a crash are closed from their complete messages.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from async_rl.types import (
    InvalidGroup,
    RoutingSpec,
    check_group,
    schema_diff,
    trajectory_schema,
)

log = logging.getLogger(__name__)

LOG = "consumed.jsonl"
LENGTH_BIN = 8  # `inspect` counts completion lengths in bins of this many tokens
# told (segment, record batch number, batch) of the groups a commit made durable
Committed = Callable[[list[tuple[int, int, pa.RecordBatch]]], None]


@dataclass
class Group:
    """Index entry of one accepted group; `batch` is kept in memory until the group retires."""

    group_id: str
    segment: int
    index: int  # record batch number within its segment
    policy_version: int
    num_rows: int
    reward_sum: float
    batch: pa.RecordBatch | None
    served: int = 0
    dropped: bool = False


class StorageError(OSError):
    """The buffer directory could not be written (disk full, I/O error)."""


def storage_error(path: Path, e: OSError) -> StorageError:
    cause = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "a write failed"
    return StorageError(
        f"cannot write {path}: {e.strerror or e} ({cause}); nothing of this write was accepted "
        "or served: free space, then resume the run"
    )


def _segment_path(root: Path, n: int, suffix: str) -> Path:
    return root / f"segment-{n:06d}{suffix}"


def read_stream_prefix(path: Path) -> list[pa.RecordBatch]:
    """Every complete record batch of an Arrow IPC stream file; a torn tail is ignored."""
    batches: list[pa.RecordBatch] = []
    try:
        with pa.OSFile(str(path)) as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("%s: stopped reading at a torn or bad message (%s)", path, e)
    return batches


def scan_segments(root: Path) -> list[tuple[int, list[pa.RecordBatch]]]:
    """Read-only view of every segment, closed and open, in order (used by `inspect`)."""
    found: dict[int, list[pa.RecordBatch]] = {}
    for path in sorted(root.glob("segment-*.open")):
        found[int(path.name[8:14])] = read_stream_prefix(path)
    for path in sorted(root.glob("segment-*.arrow")):
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            found[int(path.name[8:14])] = [
                reader.get_batch(i) for i in range(reader.num_record_batches)
            ]
    return sorted(found.items())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ConsumptionLog:
    """`consumed.jsonl`: appended and fsynced one entry at a time; a torn last line is dropped."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOG

    def entries(self) -> list[dict]:
        """Complete entries (a torn last line is ignored)."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_bytes().split(b"\n"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return [e for e in entries if isinstance(e, dict)]

    def repair(self) -> list[dict]:
        """The complete entries, with a torn tail cut off so that appends start a fresh line."""
        entries = self.entries()
        good = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
        if self.path.exists() and self.path.read_bytes() != good:
            self.path.write_bytes(good)
        return entries

    def append(self, entry: dict) -> None:
        try:
            with open(self.path, "ab") as f:
                f.write(json.dumps(entry).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a torn line is dropped by the next recovery
            raise storage_error(self.path, e) from None


def read_log(root: Path) -> list[dict]:
    """Complete entries of a buffer directory's consumption log."""
    return ConsumptionLog(root).entries()


class SegmentFiles:
    """The segment files of a buffer directory (the module docstring's layout): the open
    segment, appended to and fsynced per commit, closed into an Arrow IPC file when full, and
    a stored group read back. Knows files, not groups: `SegmentStore` indexes what it wrote."""

    def __init__(self, root: Path, schema: pa.Schema, segment_groups: int):
        self.root, self.schema, self.segment_groups = root, schema, segment_groups
        self.segment = 0  # the newest segment's number; the open one's while one is open
        self._file = self._writer = None
        self._segment_count = 0  # groups written to the open segment
        self._committed = 0  # bytes of the open segment that are fsynced

    def close_open_segments(self) -> None:
        """Close the segments a crash left open, from their complete messages; drop temporary
        files a crash left behind."""
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink()
        for path in sorted(self.root.glob("segment-*.open")):
            n = int(path.name[8:14])
            if not _segment_path(self.root, n, ".arrow").exists():
                self._write_closed(n, read_stream_prefix(path))
            path.unlink()

    def read(self, segment: int, index: int) -> pa.RecordBatch:
        """Record batch `index` of `segment`, open or closed."""
        if segment == self.segment and self._writer is not None:
            return read_stream_prefix(_segment_path(self.root, segment, ".open"))[index]
        with pa.memory_map(str(_segment_path(self.root, segment, ".arrow"))) as source:
            return pa.ipc.open_file(source).get_batch(index)

    def append(self, batches: list[pa.RecordBatch], committed: Committed) -> None:
        """Write `batches` durably: one fsync for the lot, and one more for each segment they
        fill. `committed` is told `(segment, index, batch)` of what each fsync made durable,
        before anything else is written. A write that fails is cut back to the last commit
        and raises `StorageError`."""
        try:
            self._append(batches, committed)
        except OSError as e:
            self._abandon_segment()
            raise storage_error(_segment_path(self.root, self.segment, ".open"), e) from None

    def _append(self, batches: list[pa.RecordBatch], committed: Committed) -> None:
        written: list[tuple[int, int, pa.RecordBatch]] = []
        for batch in batches:
            if self._writer is None or self._segment_count >= self.segment_groups:
                if self._writer is not None:
                    self._commit()
                    committed(written)
                    written = []
                    self.close_segment()
                self._open_segment()
            self._writer.write_batch(batch)
            written.append((self.segment, self._segment_count, batch))
            self._segment_count += 1
        self._commit()
        committed(written)

    def _commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._committed = self._file.tell()

    def _write_closed(self, n: int, batches: list[pa.RecordBatch]) -> None:
        tmp = _segment_path(self.root, n, ".arrow.tmp")
        with open(tmp, "wb") as f:
            with pa.ipc.new_file(f, self.schema) as writer:
                for b in batches:
                    writer.write_batch(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _segment_path(self.root, n, ".arrow"))
        _fsync_dir(self.root)

    def _open_segment(self) -> None:
        self.segment += 1
        self._segment_count = self._committed = 0
        self._file = open(_segment_path(self.root, self.segment, ".open"), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)

    def _abandon_segment(self) -> None:
        """After a failed write: cut the open segment back to its last commit, stop writing it.

        What was committed stays a readable stream prefix, closed by the next recovery.
        """
        if self._file is None:
            return
        try:
            self._file.close()  # flushes what it can; that tail is cut off below
        except OSError:
            pass
        os.truncate(_segment_path(self.root, self.segment, ".open"), self._committed)
        self._writer = self._file = None

    def close_segment(self) -> None:
        """Turn the open segment into a closed Arrow IPC file (done when full and at shutdown)."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        path = _segment_path(self.root, self.segment, ".open")
        self._write_closed(self.segment, read_stream_prefix(path))
        path.unlink()


class SegmentStore:
    """Durable storage and staleness-controlled sampling of accepted groups (module docstring).

    Single-threaded. `num_accepted` (trained on or waiting) is what admission budgets against.
    """

    def __init__(
        self,
        root: Path,
        spec: RoutingSpec,
        *,
        group_size: int,
        global_batch_groups: int,
        max_staleness: int,
        reuse: int = 1,
        segment_groups: int = 256,
        vocab_size: int | None = None,
    ):
        self.root = Path(root)
        self.spec, self.schema = spec, trajectory_schema(spec)
        self.group_size, self.batch_groups = group_size, global_batch_groups
        self.max_staleness, self.reuse = max_staleness, reuse
        self.vocab_size = vocab_size
        self.by_id: dict[str, Group] = {}  # every accepted group, in arrival order
        self.live: list[Group] = []  # groups that may still be served, in arrival order
        self.num_trained = self.num_pending = 0
        self.served_at: dict[int, list[str]] = {}  # learner version -> group ids
        self.counters: Counter[str] = Counter()
        self.root.mkdir(parents=True, exist_ok=True)
        self.files = SegmentFiles(self.root, self.schema, segment_groups)
        self.log = ConsumptionLog(self.root)
        self.recovered = self._recover()

    @property
    def num_accepted(self) -> int:
        """Groups trained on or still waiting (dropped ones no longer count)."""
        return self.num_trained + self.num_pending

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> list[dict]:
        """Close segments a crash left open, index every group, replay the log; return it."""
        self.files.close_open_segments()
        for n, batches in scan_segments(self.root):
            if batches and not batches[0].schema.equals(self.schema):
                raise ValueError(
                    f"{_segment_path(self.root, n, '.arrow')}: its trajectories have another "
                    f"schema ({schema_diff(batches[0].schema, self.schema)}): written by "
                    "another version of async-rl; continue it with that version, or start a "
                    "new run (run.name)"
                )
            for i, batch in enumerate(batches):
                self._index(batch, n, i)
            self.files.segment = max(self.files.segment, n)
        entries = self.log.repair()
        unknown = {gid for e in entries for gid in e.get("served", []) + e.get("dropped", [])}
        unknown -= self.by_id.keys()
        if unknown:
            raise ValueError(
                f"{self.log.path}: names {len(unknown)} group(s) that no segment holds, e.g. "
                f"{sorted(unknown)[0]!r}; the buffer directory is not consistent"
            )
        for e in entries:
            if "served" in e:
                self.served_at[e["version"]] = e["served"]
                for gid in e["served"]:
                    self._serve(self.by_id[gid])
            for gid in e.get("dropped", []):
                self._drop(self.by_id[gid])
        self._prune()
        return entries

    def _index(self, batch: pa.RecordBatch, segment: int, index: int) -> Group:
        versions = batch.column("policy_version").to_pylist()
        g = Group(
            group_id=batch.column("group_id")[0].as_py(),
            segment=segment,
            index=index,
            policy_version=min(versions),
            num_rows=batch.num_rows,
            reward_sum=float(sum(batch.column("reward").to_pylist())),
            batch=batch,
        )
        self.by_id[g.group_id] = g
        self.live.append(g)
        self.num_pending += 1
        return g

    def _serve(self, g: Group) -> None:
        if g.served == 0:
            self.num_pending -= 1
            self.num_trained += 1
        g.served += 1

    def _drop(self, g: Group) -> None:
        if g.served == 0:
            self.num_pending -= 1
        g.dropped = True
        self.counters["dropped_stale"] += 1

    def _prune(self) -> None:
        for g in self.live:
            if g.dropped or g.served >= self.reuse:
                g.batch = None
        self.live = [g for g in self.live if g.batch is not None]

    # ---------------------------------------------------------------- ingest
    def check(self, batch: pa.RecordBatch) -> None:
        """Raise `InvalidGroup` unless `batch` may be stored."""
        check_group(batch, self.spec, self.group_size)
        gid = batch.column("group_id")[0].as_py()
        if gid in self.by_id:
            raise InvalidGroup("duplicate", f"group {gid!r} was already accepted")
        if self.vocab_size is not None:
            for name in ("prompt_tokens", "completion_tokens"):
                ids = batch.column(name).flatten().to_numpy(zero_copy_only=False)
                if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                    raise InvalidGroup("tokens", f"{name} outside the vocabulary")

    def append(self, batches: list[pa.RecordBatch]) -> None:
        """Store checked groups durably (one fsync for the lot), then index them."""
        if batches:
            self.files.append(batches, self._finish_index)

    def _finish_index(self, written: list[tuple[int, int, pa.RecordBatch]]) -> None:
        for segment, index, batch in written:
            self._index(batch, segment, index)
            self.counters["ingested"] += 1
            self.counters["bytes_written"] += batch.nbytes
            self.counters["completion_tokens"] += len(batch.column("completion_tokens").flatten())

    # ---------------------------------------------------------------- sampling
    def _load(self, g: Group) -> pa.RecordBatch:
        return g.batch if g.batch is not None else self.files.read(g.segment, g.index)

    def sample(self, version: int) -> pa.Table | None:
        """The global batch for learner `version`, or None while not enough fresh groups wait.

        Oldest groups first (lowest `policy_version`, then arrival); groups with
        `version - policy_version > K` are dropped on the way.
        """
        if version in self.served_at:
            groups = [self.by_id[gid] for gid in self.served_at[version]]
            return pa.Table.from_batches([self._load(g) for g in groups], self.schema)
        if self.served_at and version < max(self.served_at):
            raise ValueError(
                f"version {version} is older than the last served version "
                f"{max(self.served_at)} and was never served"
            )
        chosen, stale = [], []
        # the oldest weights first (then arrival): a long completion that arrives after newer
        # short ones is trained before it goes stale (continuous batching reorders arrivals)
        for g in sorted(self.live, key=lambda g: g.policy_version):
            if version - g.policy_version > self.max_staleness:
                stale.append(g)
            elif len(chosen) < self.batch_groups:
                chosen.append(g)
        if stale:
            self.log.append({"version": version, "dropped": [g.group_id for g in stale]})
            for g in stale:
                self._drop(g)
            self._prune()
        if len(chosen) < self.batch_groups:
            return None
        self.log.append({"version": version, "served": [g.group_id for g in chosen]})
        self.served_at[version] = [g.group_id for g in chosen]
        table = pa.Table.from_batches([g.batch for g in chosen], self.schema)
        for g in chosen:
            self._serve(g)
        self._prune()
        return table

    def ready(self, version: int) -> bool:
        """Whether `sample(version)` would serve a new batch now (the fresh groups fill one)."""
        fresh = sum(version - g.policy_version <= self.max_staleness for g in self.live)
        return fresh >= self.batch_groups

    def staleness(self, version: int) -> list[int]:
        """`version - policy_version` of each group served for `version`."""
        return [version - self.by_id[gid].policy_version for gid in self.served_at[version]]

    def metrics(self) -> dict[str, float]:
        return {
            "buffer/size": sum(g.num_rows for g in self.live if g.served == 0),
            "buffer/groups": self.num_pending,
            "buffer/ingested": self.counters["ingested"],
            "buffer/stored": len(self.by_id),
            "buffer/dropped_stale": self.counters["dropped_stale"],
            "buffer/bytes_written": self.counters["bytes_written"],
            "buffer/completion_tokens": self.counters["completion_tokens"],
        }

    def close(self) -> None:
        self.files.close_segment()


def inspect(root: Path) -> dict:
    """What a buffer directory holds, read-only (safe while the service runs)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no buffer directory")
    by_version: Counter[int] = Counter()
    lengths: Counter[int] = Counter()  # completion lengths, in bins of LENGTH_BIN tokens
    spans: Counter[int] = Counter()  # weights versions per completion
    versions: dict[str, int] = {}
    rows = reward_sum = 0.0
    for _, batches in scan_segments(root):
        for b in batches:
            low = b.column("policy_version").to_pylist()
            versions[b.column("group_id")[0].as_py()] = min(low)
            by_version[min(low)] += 1
            rows += b.num_rows
            reward_sum += sum(b.column("reward").to_pylist())
            offsets = b.column("completion_tokens").offsets.to_numpy()
            lengths.update(int(n) // LENGTH_BIN * LENGTH_BIN for n in offsets[1:] - offsets[:-1])
            high = b.column("policy_version_max").to_pylist()
            spans.update(h - v + 1 for v, h in zip(low, high, strict=True))
    staleness: Counter[int] = Counter()
    served, dropped = Counter(), set()
    for e in read_log(root):
        for gid in e.get("served", []):
            served[gid] += 1
            staleness[e["version"] - versions.get(gid, e["version"])] += 1
        dropped.update(e.get("dropped", []))
    return {
        "groups": len(versions),
        "trajectories": int(rows),
        "reward_mean": reward_sum / rows if rows else float("nan"),
        "groups_by_version": dict(sorted(by_version.items())),
        "staleness_histogram": dict(sorted(staleness.items())),
        "response_length_histogram": dict(sorted(lengths.items())),
        "versions_per_completion": dict(sorted(spans.items())),
        "trained_groups": len(served),
        "dropped_stale": len(dropped),
        "waiting_groups": len(versions.keys() - served.keys() - dropped),
        "segments": len(list(root.glob("segment-*.arrow"))),
        "open_segments": len(list(root.glob("segment-*.open"))),
        "bytes_on_disk": sum(p.stat().st_size for p in root.iterdir() if p.is_file()),
    }
