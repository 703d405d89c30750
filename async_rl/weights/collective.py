"""The collective weight path, `weights.store = "collective"`: each version goes from the
learner to the actors as buckets of tensors broadcast over a torch.distributed group of their own.

    learner                                              actor a3 (its receiver thread)
    store = CollectiveWeightStore(durable, sender=...)   store = CollectiveWeightStore(durable,
    store.publish(v, hf_state)                               member="a3", ...)
      durable copy every `durable_every` versions        store.latest()   newest received/durable
      and at checkpoints (`durable=True`)                with store.reading(v) as tensors: ...
      broadcast: header in the TCPStore, buckets over
      the group (`weights.bucket_mib`)

The learner's rank 0 serves a `TCPStore` (address in its endpoints, `weights_store`) and is rank 0
of every weight group. The group lives in epochs: epoch e is `ProcessGroupGloo` over
`PrefixStore("g<e>/")` with the members listed at `epoch/<e>` (ranks 1.. in that order; with
the number of events the learner had read, so that a member joins only an epoch made after
its own join: a restarted actor of the same name never takes its predecessor's place).

- Joining: an actor's receiver registers (`event/<n>` = `join:<id>`, `n` from the counter
  `events`) and waits for an epoch that lists it; one that closes leaves (`leave:<id>`), so a
  fleet that shrinks rebuilds the group without it and is no failure. Until it is in one,
  and whenever it misses versions, it has the durable store (`weights.durable_store`): a late
  joiner starts from its newest version without any barrier, and joins the group at the next
  version boundary.
- Messages of epoch e: the learner sets `g<e>/msg/<k>` (JSON) before the k-th transfer of the
  epoch: `{"version", "tensors": [[name, dtype, shape, bucket, offset]...]}` and then
  broadcasts the buckets, one at a time: a large tensor from its own memory, small ones packed
  at aligned offsets; the receiver's tensors are views of the buckets it received (no copy).
  Or `{"rebuild": e2}` (a new epoch that lists every member of this one and the new joiners:
  members move on without registering), or `{"rebuild": null}` (this epoch failed: every
  member registers again). Members wait for the key in the store (asking every 10 ms), so a
  receiver waits for the next version without holding a collective open, and notices when its
  learner is gone.
- Failure: every collective has `weights.collective_timeout_s`. A member that dies during a
  transfer makes the learner's broadcast fail or time out: the learner gives up this version's
  transfer (the actors get a later one, or the durable copy), ends the epoch with
  `{"rebuild": null}`, and the next version goes to the members that registered again. A member
  whose transfer fails registers again. Nothing waits longer than the timeout; nobody hangs.
- Weight deltas (`weights.deltas = "send"`): a version whose delta the learner made
  (`async_rl.weights.delta`) goes to an epoch's members as that delta, its header
  `{"version", "delta": {base, fingerprint, ...}, "tensors"}` planned like a version's, when
  every member holds its base (they received every transfer of the epoch since its first,
  which is whole); a new epoch, and every `weights.full_every` version, gets the version
  whole (with its `fingerprint`). A receiver keeps the newest whole version it received and
  the deltas after it (at most `full_every - 1`); the durable store keeps whole versions only.
- A version is complete before anyone can load it: the receiver stages it only when its last
  bucket arrived; the learner announces it (`WeightsReady`) only after the transfer, and an
  actor asking for a version its receiver is still staging waits for it (`settle`) rather
  than taking an older whole one from the durable store. Staleness
  rules are unchanged. Nothing is pickled: headers are JSON, tensors raw bytes.

Gloo carries the buckets on CPU and on CUDA alike (they are staged in host memory); the TCPStore
and gloo have no authentication, so a non-loopback `run.bind_host` needs
`weights.collective_trusted_network = true` (config validation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from async_rl.paths import RunPaths, read_endpoints
from async_rl.weights.buckets import bucket_sizes, pack_bucket, plan_buckets, unpack_bucket
from async_rl.weights.delta import Delta, from_tensors, to_tensors
from async_rl.weights.store import VersionGone
from async_rl.wire.transport import reachable_host

log = logging.getLogger(__name__)

# A receiver waiting for a key asks the store this often (a TCPStore `wait` that times out,
# to look at a stop flag, logs two C++ warnings each time: a waiting actor's log filled up).
POLL_S = 0.01
EVENT_WAIT_S = 1.0  # how long the learner waits for an event a member counted but not wrote


def _broadcast(group, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _event(store, event: str) -> int:
    """Append "join:<member>" or "leave:<member>" to the store's event log; its index."""
    index = store.add("events", 1) - 1
    store.set(f"event/{index}", event)
    return index


def _group(store, epoch: int, rank: int, size: int, timeout_s: float):
    return dist.ProcessGroupGloo(
        dist.PrefixStore(f"g{epoch}/", store), rank, size, timedelta(seconds=timeout_s)
    )


class WeightSender:
    """The learner's side (rank 0): the TCPStore, the epochs, and `send` of each version.

    It keeps the last version it sent, and a thread of its own hands it to actors that join
    while the learner has nothing new to send (a learner waiting for data from an actor that
    waits for weights would otherwise wait for ever); `forget` lets go of it when the learner
    starts gathering the next one, so that two versions are never held at once.
    """

    def __init__(self, host: str, timeout_s: float, bucket_bytes: int):
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
        )
        self.store.add("events", 0)
        self.address = f"{reachable_host(host)}:{self.store.port}"
        self.epoch, self.messages, self.events_seen = 0, 0, 0
        self.members: list[str] = []
        self.joining: set[str] = set()
        self.group = None
        self.lock = threading.Lock()  # one transfer at a time: `send` or the joiners' thread
        self.last: tuple[int, dict[str, torch.Tensor], int | None] | None = None
        self.holds: int | None = None  # the version every member of the epoch holds
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve_joiners, name="weights", daemon=True)
        self.thread.start()

    def _membership_changed(self) -> bool:
        """Read the joins and leaves since the last call; True if the group must change."""
        n, changed = self.store.add("events", 0), False
        for i in range(self.events_seen, n):
            try:  # set right after it was counted, unless its member died in between
                self.store.wait([f"event/{i}"], timedelta(seconds=EVENT_WAIT_S))
            except dist.DistStoreError:
                continue
            what, member = self.store.get(f"event/{i}").decode().split(":", 1)
            if what == "join":
                self.joining.add(member)
                changed = True
            else:
                self.joining.discard(member)
                changed |= member in self.members
                self.members = [m for m in self.members if m != member]
        self.events_seen = n
        return changed

    def _message(self, header: dict) -> None:
        self.store.set(f"g{self.epoch}/msg/{self.messages}", json.dumps(header))
        if self.messages >= 2:  # read by every member long ago
            self.store.delete_key(f"g{self.epoch}/msg/{self.messages - 2}")
        self.messages += 1

    def _rebuild(self) -> None:
        """A new epoch: the members of the old one (if it is healthy) and the joiners."""
        members = sorted(set(self.members if self.group is not None else []) | self.joining)
        self.joining = set()
        if self.group is not None:
            self._message({"rebuild": self.epoch + 1})
        self.epoch, self.messages, self.members, self.group = self.epoch + 1, 0, members, None
        self.holds = None
        listing = {"members": members, "events": self.events_seen}
        self.store.set(f"epoch/{self.epoch}", json.dumps(listing))
        self.store.set("epoch", str(self.epoch))
        if members:
            self.group = _group(self.store, self.epoch, 0, len(members) + 1, self.timeout_s)

    def _fail(self, error: Exception) -> None:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("weights epoch %d (%s) failed: %s", self.epoch, self.members, why)
        with contextlib.suppress(Exception):
            self._message({"rebuild": None})  # every member registers again
        self.group, self.members, self.holds = None, [], None

    def send(
        self,
        version: int,
        state: dict[str, torch.Tensor],
        delta: Delta | None = None,
        mark: int | None = None,
    ) -> int:
        """Broadcast `version` to the members (rebuilding the group first when actors joined
        or left, or the last transfer failed), as `delta` where every member holds its base,
        else whole (`mark`: its fingerprint, if known); the number of actors that received it."""
        with self.lock:
            self.last = (version, state, mark)
            try:
                changed = self._membership_changed()
            except (RuntimeError, dist.DistError) as e:  # the store: this transfer is lost
                self._fail(e)
                return 0
            return self._send(version, state, mark, delta, rebuild=changed)

    def forget(self) -> None:
        """Let go of the last version (the learner is gathering the next; joiners get that).
        A transfer to joiners under way keeps it until it ends."""
        self.last = None

    def _serve_joiners(self) -> None:
        while not self.stopping.wait(0.5):
            with self.lock:
                last = self.last
                try:
                    changed = last is not None and self._membership_changed()
                except (RuntimeError, dist.DistError):
                    continue
                if changed:
                    self._send(*last, None, rebuild=True)

    def _send(self, version: int, state, mark: int | None, delta: Delta | None, rebuild: bool):
        try:
            if rebuild:
                self._rebuild()
            if self.group is None:
                return 0
            if delta is not None and delta.base == self.holds:
                state, header = to_tensors(delta)
                header = {"version": version, "delta": header}
            else:
                known = None if mark is None else f"{mark:016x}"
                header = {"version": version, "fingerprint": known}
            tensors = plan_buckets(state, self.bucket_bytes)
            self._message({**header, "tensors": tensors})
            for index, size in enumerate(bucket_sizes(tensors)):  # one bucket at a time
                _broadcast(self.group, pack_bucket(tensors, index, size, state))
        except (RuntimeError, dist.DistError) as e:  # a member died, stalled or never came
            self._fail(e)
            return 0
        self.holds = version
        return len(self.members)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2 * self.timeout_s + 5)
        self.group = self.last = None


class WeightReceiver:
    """An actor's side: a thread that joins the learner's weight groups and stages the
    newest version it received whole, and the deltas it received after it."""

    def __init__(self, run_dir: Path, member: str, timeout_s: float):
        self.paths, self.member, self.timeout_s = RunPaths(run_dir), member, timeout_s
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)  # notified when a transfer ends
        self.incoming: int | None = None  # the version being received, header read
        self.staged: tuple[int, dict[str, torch.Tensor], int | None] | None = None
        self.deltas: dict[int, Delta] = {}  # received after the staged version, in order
        self.received = 0  # versions received through the group
        self.current = None  # the learner's store of now
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"weights-{member}", daemon=True)
        self.thread.start()

    def newest(self) -> int | None:
        with self.lock:
            return self._newest()

    def _newest(self) -> int | None:
        if self.deltas:
            return max(self.deltas)
        return None if self.staged is None else self.staged[0]

    def settle(self, version: int) -> None:
        """Wait while `version` is being received (its header read, buckets still coming), up
        to `timeout_s`. The learner announces a version once its broadcast returned, which may
        be a moment before this member staged it: an actor that heard the announcement asks
        here first, and gets the version it was sent instead of missing it."""
        with self.settled:
            self.settled.wait_for(lambda: self.incoming != version, self.timeout_s)

    def tensors(self, version: int) -> dict[str, torch.Tensor] | None:
        with self.lock:
            if self.staged is not None and self.staged[0] == version:
                return self.staged[1]
            return None

    def delta(self, version: int) -> Delta | None:
        with self.lock:
            return self.deltas.get(version)

    def known(self, version: int) -> tuple[int | None, int | None, int | None]:
        """Bytes of `version` whole and as a delta as received (None where not), and its
        fingerprint if the learner said."""
        with self.lock:
            whole = mark = None
            if self.staged is not None and self.staged[0] == version:
                whole = sum(t.numel() * t.element_size() for t in self.staged[1].values())
                mark = self.staged[2]
            delta = self.deltas.get(version)
            if delta is not None:
                mark = delta.fingerprint
            return whole, None if delta is None else delta.nbytes, mark

    def _stage(self, header: dict, state: dict[str, torch.Tensor]) -> None:
        """A version received: whole, or a delta on the newest one held (a delta on another
        base, which a healthy epoch never sends, is dropped: the actor loads a later one)."""
        version = int(header["version"])
        with self.lock:
            self.received += 1
            if "delta" not in header:
                mark = header.get("fingerprint")
                self.staged = (version, state, None if mark is None else int(mark, 16))
                self.deltas = {}
                return
            delta = from_tensors(state, header["delta"], f"weights group delta {version}")
            if delta.base != self._newest():
                log.warning(
                    "%s: delta on %d, not on %s: dropped", self.member, delta.base, self._newest()
                )
                return
            self.deltas[version] = delta

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._serve()
            except (RuntimeError, dist.DistError, OSError, ValueError, KeyError) as e:
                if not self.stopping.is_set():
                    log.info("%s: weights group: %s; joining again", self.member, e)
            self.stopping.wait(0.2)

    def _store(self):
        """The learner's store of now; None until the learner has published its address."""
        endpoints = read_endpoints(self.paths, "learner") or {}
        if "weights_store" not in endpoints:
            return None
        host, port = endpoints["weights_store"].rsplit(":", 1)
        timeout = timedelta(seconds=self.timeout_s)
        return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)

    def _wait(self, store, key: str) -> bytes | None:
        """The value of `key` once it is set (asked every `POLL_S`); None when the receiver
        stops. Raises when the learner's store is gone."""
        while not self.stopping.is_set():
            if store.check([key]):
                return store.get(key)
            self.stopping.wait(POLL_S)
        return None

    def _placed(self, store, epoch: int, joined: int = -1) -> tuple[int, int] | None:
        """This member's rank and the group's size in `epoch`, if it lists this member and
        was made after its join event `joined` (an older epoch that lists it is another
        incarnation's)."""
        listing = json.loads(store.get(f"epoch/{epoch}"))
        members = listing["members"]
        if self.member not in members or listing["events"] <= joined:
            return None
        return members.index(self.member) + 1, len(members) + 1

    def _serve(self) -> None:
        """Register with the learner of now, then receive until an epoch ends or fails."""
        store = self.current = self._store()
        if store is None:
            return
        joined = _event(store, f"join:{self.member}")
        epoch, placed = 0, None
        while placed is None:  # an epoch made after this join that lists this member
            if self._wait(store, "epoch") is None:
                return
            epoch = int(store.get("epoch"))
            placed = self._placed(store, epoch, joined)
            if placed is None and self.stopping.wait(0.1):
                return
        while placed is not None and not self.stopping.is_set():
            group = _group(store, epoch, *placed, self.timeout_s)
            k, placed = 0, None
            while (raw := self._wait(store, f"g{epoch}/msg/{k}")) is not None:
                header = json.loads(raw)
                k += 1
                if "rebuild" in header:
                    if header["rebuild"] is not None:
                        epoch = header["rebuild"]
                        placed = self._placed(store, epoch)
                    break
                self._receive(group, header)

    def _receive(self, group, header: dict) -> None:
        """One version's buckets, then staged; `incoming` names it meanwhile (`settle`)."""
        with self.lock:
            self.incoming = int(header["version"])
        try:
            state = {}
            for index, size in enumerate(bucket_sizes(header["tensors"])):
                bucket = torch.empty(size, dtype=torch.uint8)
                _broadcast(group, bucket)
                state |= unpack_bucket(header["tensors"], index, bucket)
            self._stage(header, state)
        finally:
            with self.settled:
                self.incoming = None
                self.settled.notify_all()

    def close(self) -> None:
        """Stop receiving; the learner takes this member out of its group (a fleet that
        shrinks is no failure)."""
        self.stopping.set()
        if self.current is not None:
            with contextlib.suppress(RuntimeError, dist.DistError):
                _event(self.current, f"leave:{self.member}")
        self.thread.join(self.timeout_s + 5)


class CollectiveWeightStore:
    """The `WeightStore` of the collective path (module docstring): on the learner it holds a
    `WeightSender`, on an actor a `WeightReceiver`; `durable` is the fs or ray store."""

    def __init__(
        self,
        durable,
        durable_every: int,
        sender: WeightSender | None = None,
        receiver: WeightReceiver | None = None,
    ):
        self.durable, self.durable_every = durable, durable_every
        self.sender, self.receiver = sender, receiver
        self.sent: int | None = None
        self.last_receivers = 0

    def before_gather(self) -> None:
        if self.sender is not None:
            self.sender.forget()

    def publish(
        self,
        version: int,
        hf_state: dict[str, torch.Tensor],
        durable=False,
        delta: Delta | None = None,
        fingerprint: int | None = None,
        whole: bool = True,
    ) -> None:
        """The durable copy (whole) every `durable_every` versions, at checkpoints and first;
        the group gets `delta` unless the version goes `whole` (module docstring)."""
        if durable or version % self.durable_every == 0 or self.sent is None:  # first: durable
            self.durable.publish(version, hf_state, fingerprint=fingerprint)
        if self.sender is not None:
            delta = None if whole else delta
            self.last_receivers = self.sender.send(version, hf_state, delta, fingerprint)
        self.sent = version

    def latest(self) -> int | None:
        known = [self.durable.latest(), self.sent]
        if self.receiver is not None:
            known.append(self.receiver.newest())
        known = [v for v in known if v is not None]
        return max(known) if known else None

    def _settle(self, version: int) -> None:
        if self.receiver is not None:
            self.receiver.settle(version)

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator:
        self._settle(version)
        staged = None if self.receiver is None else self.receiver.tensors(version)
        if staged is not None:
            yield staged
            return
        with self.durable.reading(version) as source:
            yield source

    def _known(self, version: int) -> tuple[int | None, int | None, int | None]:
        self._settle(version)
        return (None, None, None) if self.receiver is None else self.receiver.known(version)

    def sizes(self, version: int) -> tuple[int | None, int | None]:
        """Bytes of the version whole (received, or in the durable store) and as a received
        delta; `VersionGone` where neither holds it."""
        whole, delta, _ = self._known(version)
        if whole is None:
            with contextlib.suppress(VersionGone):
                whole = self.durable.sizes(version)[0]
        if whole is None and delta is None:
            raise VersionGone(f"weights version {version}: neither received nor durable")
        return whole, delta

    def fingerprint(self, version: int) -> int | None:
        mark = self._known(version)[2]
        if mark is None:
            with contextlib.suppress(VersionGone):
                mark = self.durable.fingerprint(version)
        return mark

    def read_delta(self, version: int) -> Delta:
        self._settle(version)
        delta = None if self.receiver is None else self.receiver.delta(version)
        if delta is None:
            raise VersionGone(f"weights version {version}: no delta received")
        return delta

    def collect(self, in_use: set[int]) -> list[int]:
        return self.durable.collect(in_use)

    def endpoints(self) -> dict[str, str]:
        return {} if self.sender is None else {"weights_store": self.sender.address}

    def stats(self) -> dict[str, float]:
        """`weights_receivers`: actors that got the last version through the group."""
        return {"weights_receivers": float(self.last_receivers)}

    def close(self) -> None:
        for part in (self.sender, self.receiver):
            if part is not None:
                part.close()
