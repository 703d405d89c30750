"""Admission control: which actor may generate which prompt, from weights of which version.

Invariant (AReaL's staleness manager, in groups): with p the newest published version, B groups
per global batch and K = `buffer.max_staleness`, a lease is granted only while

    accepted + leased < (K + p + 1) * B

where `accepted` counts the groups already trained on or waiting (the `SegmentStore`'s) and
`leased` the leases outstanding. A lease carries `min_version = p`: its group is generated from
weights >= p, and serving the oldest weights first, with global batches that wait for leased
groups about to go stale (`async_rl.buffer.replay`), trains it by learner version K + p, so
it is never dropped as stale. With the learner caught up (v = p) this is the back-pressure rule
"pause above (K + 1) * B unconsumed groups"; with K = 0 and one mini-batch exactly one global
batch is generated per published version, from that version: synchronous RL, sample for sample.

- Training prompts are handed out once each, in order, whatever the size of the fleet; the
  prompt of an expired (`buffer.lease_timeout_s`) or released lease is handed out again. Prompt
  indices are reserved in blocks in the consumption log, so after a crash the run skips at most
  a block of prompts and never hands one out twice.
- The published version is logged too: a restarted buffer admits as before.
- `full_s` counts the seconds during which a lease was refused and not yet granted: the
  buffer's fill, the autoscaler's signal.
- `rollout/group_latency_s` (mean) and `rollout/group_latency_max_s`: seconds from a lease to
  its group's arrival, over the last global batch's worth of groups. A global step waits for
  its batch's slowest group, and K lets at most K + 1 batches be out: a latency above about K
  learner steps keeps the learner waiting however fast the actors generate.
- Actors report the weights version they hold with each lease; `versions_in_use()` is what the
  weight store must keep.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable

PROMPT_BLOCK = 1024
ACTOR_SEEN_S = 10.0  # an actor that leased within this many seconds counts as running


class Admission:
    """Leases, prompt indices and actor versions of one run. Single-threaded."""

    def __init__(
        self,
        *,
        global_batch_groups: int,
        max_staleness: int,
        lease_timeout_s: float,
        log: Callable[[dict], None],
        recovered: list[dict] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        """`log` appends an entry to the consumption log; `recovered` are its entries so far;
        `clock` gives the seconds that lease expiry, latencies and `full_s` count in."""
        self.clock = clock
        self.batch_groups, self.max_staleness = global_batch_groups, max_staleness
        self.lease_timeout_s, self.log = lease_timeout_s, log
        self.published = max((e["published"] for e in recovered if "published" in e), default=0)
        self.prompts_reserved = max(
            (e["prompts_reserved"] for e in recovered if "prompts_reserved" in e), default=0
        )
        self.next_prompt = self.prompts_reserved
        # id -> (actor, expiry, prompt, min_version)
        self.leases: dict[str, tuple[str, float, int, int]] = {}
        self.reissue: list[int] = []  # prompts of expired or released leases
        self.full_s, self.full_since = 0.0, None
        self.actor_versions: dict[str, tuple[int, float]] = {}  # actor -> (version, seen)
        # actor -> (running rows, swaps in flight, reward errors), as it last reported them
        self.actor_work: dict[str, tuple[int, int, int]] = {}
        # seconds from lease to group of the last global batch's worth of groups
        self.latencies: deque[float] = deque(maxlen=global_batch_groups)

    def set_published(self, version: int) -> None:
        if version > self.published:
            self.published = version
            self.log({"published": version})

    def lease(
        self,
        actor_id: str,
        accepted: int,
        count: int = 1,
        version: int | None = None,
        work: tuple[int, int, int] = (0, 0, 0),
    ) -> tuple[int, list[tuple[str, int]]] | None:
        """Up to `count` leases for `actor_id`, or None while actors must pause.

        `accepted` is the store's count of groups trained on or waiting. Returns the minimum
        weights version to generate with and, per lease, its id and the index of the training
        prompt to generate for. `version` is the weights version the actor holds; `work` its
        running rows, swaps in flight and reward errors so far.
        """
        now = self.clock()
        if version is not None:
            self.actor_versions[actor_id] = (version, now)
            self.actor_work[actor_id] = work
        self.expire()
        room = (self.max_staleness + self.published + 1) * self.batch_groups
        room -= accepted + len(self.leases)
        if room <= 0:
            if self.full_since is None:
                self.full_since = now
            return None
        if self.full_since is not None:
            self.full_s += now - self.full_since
            self.full_since = None
        granted = []
        for _ in range(min(count, room)):
            lease_id = uuid.uuid4().hex
            prompt = self.reissue.pop(0) if self.reissue else self._next_prompt()
            self.leases[lease_id] = (actor_id, now + self.lease_timeout_s, prompt, self.published)
            granted.append((lease_id, prompt))
        return self.published, granted

    def expire(self) -> None:
        """Forget leases older than `buffer.lease_timeout_s`; their prompts are handed out again."""
        now = self.clock()
        for lease_id, (_, expiry, prompt, _) in list(self.leases.items()):
            if expiry <= now:
                del self.leases[lease_id]
                self.reissue.append(prompt)

    def outstanding(self) -> list[int]:
        """The `min_version` of every lease whose group has not arrived (nor expired)."""
        self.expire()
        return [min_version for *_, min_version in self.leases.values()]

    def _next_prompt(self) -> int:
        if self.next_prompt >= self.prompts_reserved:
            self.prompts_reserved = self.next_prompt + PROMPT_BLOCK
            self.log({"prompts_reserved": self.prompts_reserved})
        self.next_prompt += 1
        return self.next_prompt - 1

    def fulfilled(self, lease_id: str | None) -> None:
        """The group of a lease was accepted: the lease is spent."""
        lease = self.leases.pop(lease_id or "", None)
        if lease is not None:
            self.latencies.append(self.clock() - (lease[1] - self.lease_timeout_s))

    def give_back(self, lease_id: str | None) -> None:
        """The group of a lease was refused: its prompt is handed out again."""
        lease = self.leases.pop(lease_id or "", None)
        if lease is not None:
            self.reissue.append(lease[2])

    def release(self, actor_id: str) -> None:
        """Drop an actor's leases (it restarted or left); their prompts are handed out again."""
        for lease_id, (owner, *_) in list(self.leases.items()):
            if owner == actor_id:
                self.give_back(lease_id)

    def versions_in_use(self) -> list[int]:
        """Weights versions that actors reported within the lease timeout."""
        now = self.clock()
        return sorted(
            {v for v, seen in self.actor_versions.values() if now - seen < self.lease_timeout_s}
        )

    def metrics(self) -> dict[str, float]:
        now = self.clock()
        full = self.full_s + (now - self.full_since if self.full_since is not None else 0.0)
        seen = [a for a, (_, s) in self.actor_versions.items() if now - s < ACTOR_SEEN_S]
        return {
            "buffer/leases": len(self.leases),
            "buffer/published": self.published,
            "buffer/full_s": full,
            "buffer/actors_seen": len(seen),
            # what the actors said of their engines with their last leases
            "rollout/running_rows": sum(self.actor_work.get(a, (0, 0, 0))[0] for a in seen),
            "rollout/swaps_in_flight": sum(w[1] for w in self.actor_work.values()),
            "rollout/reward_errors": sum(w[2] for w in self.actor_work.values()),
            **(
                {
                    "rollout/group_latency_s": sum(self.latencies) / len(self.latencies),
                    "rollout/group_latency_max_s": max(self.latencies),
                }
                if self.latencies
                else {}
            ),
        }
