"""The embedded engine's running rows: each in a slot of preallocated tensors.

Shape legend: B = running rows, C = slots (the capacity), P = prompts being admitted,
T = positions, S = cache positions, V = vocabulary, L = MoE layers, K = experts per token,
J = key/value heads, Dh = head size.

Running row b lives in slot b of the KV cache and of the per-row state (its experts at every
position, the uniform that draws the token at every position, its sampling parameters, the
positions cached and its next input): slots 0..B-1 are the batch, the rest are room to admit
rows into without copying. The capacity C doubles as rows arrive, up to `max_rows`. A finished
row's slot takes a row from the end, so neither an admission nor a departure moves the other
rows' cache. `actors.embedded` schedules the rows and samples their tokens; this module only
keeps them in their slots and runs their decode forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from actors.embedded_model import Cache, Model
from actors.engine import Generation, GroupRequest


@dataclass
class Row:
    """One completion being generated."""

    request: GroupRequest
    sample: int  # g, within its group
    limit: int  # most completion tokens
    uniforms: torch.Tensor  # [limit]: token i is drawn with uniforms[i] (zeros when greedy)
    routing: np.ndarray  # [P, L, K] while running; [P + C - 1, L, K] once finished
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def generation(self) -> Generation:
        return Generation(
            tokens=self.tokens,
            logprobs=self.logprobs,
            versions=self.versions,
            routing=self.routing,
            finish_reason=self.finish_reason,
        )


class RunningRows:
    """The running rows in their slots (module docstring): `rows[b]` is in slot b."""

    def __init__(self, max_rows: int, device: torch.device):
        self.max_rows, self.device = max_rows, device
        self.rows: list[Row] = []
        self.cache: Cache = []  # [C, J, S, Dh] per layer
        self.state: dict[str, torch.Tensor] = {}  # `_new_state`

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        model: Model,
        rows: list[Row],
        cache: Cache,
        index_B: torch.Tensor,
        routing_PTLK: torch.Tensor,
        temperature_B: torch.Tensor,
        top_p_B: torch.Tensor,
    ) -> None:
        """Rows that sampled their first token join the batch: row b's KV entries and prompt
        routing are `cache` and `routing_PTLK` at prompt `index_B[b]`."""
        first, last = len(self.rows), len(self.rows) + len(rows)
        self._reserve(model, last)
        for (k, v), (k_new, v_new) in zip(self.cache, cache, strict=True):
            k[first:last], v[first:last] = k_new[index_B], v_new[index_B]
        state = self.state
        state["routing"][first:last, : routing_PTLK.shape[1]] = routing_PTLK[index_B]
        for slot, row in enumerate(rows, start=first):
            prompt = len(row.request.prompt)
            state["uniform"][slot, prompt : prompt + row.limit] = row.uniforms
            state["length"][slot] = prompt
            state["next"][slot] = row.tokens[-1]
        state["temperature"][first:last] = temperature_B
        state["top_p"][first:last] = top_p_B
        self.rows += rows

    def replace_cache(self, cache: Cache) -> None:
        """The running rows' KV entries, computed again by new weights (`kv_on_swap`)."""
        n = len(self.rows)
        for (k, v), (k_new, v_new) in zip(self.cache, cache, strict=True):
            k[:n], v[:n] = k_new, v_new

    def forward(self, model: Model):
        """One decode forward of every running row's next input; what sampling its next token
        takes: logits `[B, V]`, temperatures, top-p and the uniforms `[B]`."""
        n, state = len(self.rows), self.state
        batch = [(k[:n], v[:n]) for k, v in self.cache]
        length_B, slots_B = state["length"][:n], torch.arange(n, device=self.device)
        hidden_B1D, routing_B1LK = model.forward(state["next"][:n, None], length_B[:, None], batch)
        state["routing"][slots_B, length_B] = routing_B1LK[:, 0].to(state["routing"].dtype)
        length_B += 1
        return (
            model.logits(hidden_B1D[:, 0]),
            state["temperature"][:n],
            state["top_p"][:n],
            state["uniform"][slots_B, length_B],
        )

    def advance(self, keep: list[int]) -> None:
        """After a decode step: the finished rows leave, with their routing traces; only the
        rows `keep` (ascending) go on, their next inputs the tokens they just sampled."""
        state = self.state
        if len(keep) < len(self.rows):
            for b, row in enumerate(self.rows):
                if row.finish_reason is not None:  # its trace leaves with it
                    span = len(row.request.prompt) + len(row.tokens) - 1
                    trace = state["routing"][b, :span].cpu().numpy()
                    row.routing = trace.astype(row.routing.dtype)
            self._compact(keep)
        nexts = [row.tokens[-1] for row in self.rows]
        state["next"][: len(nexts)] = torch.tensor(nexts, dtype=torch.long, device=self.device)

    def _new_state(self, model: Model, capacity: int) -> dict[str, torch.Tensor]:
        """Per slot: its experts at every position, the uniform that draws the token at every
        position, its sampling parameters, positions cached, and its next input."""
        spec, device = model.spec, self.device
        positions = (capacity, spec.max_positions)
        return {
            "routing": torch.zeros(
                (*positions, spec.num_layers, spec.top_k),
                dtype=spec.routing.torch_dtype,
                device=device,
            ),
            "uniform": torch.zeros(positions, device=device),
            "temperature": torch.zeros(capacity, device=device),
            "top_p": torch.zeros(capacity, device=device),
            "length": torch.zeros(capacity, dtype=torch.long, device=device),
            "next": torch.zeros(capacity, dtype=torch.long, device=device),
        }

    def _reserve(self, model: Model, rows: int) -> None:
        """Slots for at least `rows` running rows (doubling, up to `max_rows`)."""
        capacity = len(self.state["length"]) if self.state else 0
        if rows <= capacity:
            return
        capacity = min(self.max_rows, max(rows, 2 * capacity))
        n = len(self.rows)
        cache, state = model.new_cache(capacity), self._new_state(model, capacity)
        if n:
            for (k, v), (k_old, v_old) in zip(cache, self.cache, strict=True):
                k[:n], v[:n] = k_old[:n], v_old[:n]
            for name, t in state.items():
                t[:n] = self.state[name][:n]
        self.cache, self.state = cache, state

    def _compact(self, keep: list[int]) -> None:
        """Only the rows `keep` (ascending) go on: each finished row's slot below the new batch
        size takes a row from above it (moving a few slots, not the whole cache)."""
        kept = set(keep)
        holes = [b for b in range(len(keep)) if b not in kept]
        movers = [b for b in keep if b >= len(keep)]
        order = list(range(len(keep)))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            to = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for t in [*(t for kv in self.cache for t in kv), *self.state.values()]:
                t[to] = t[src]
        self.rows = [self.rows[b] for b in order]
