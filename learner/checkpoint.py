"""Learner checkpoints: model, optimizer, schedule position, version and RNG, without pickle.

`runs/<name>/checkpoints/learner/step-000010/` holds, for each rank r of the W ranks that wrote it,
`model-r00000.safetensors` and `optimizer-r00000.safetensors` (the rank's own shards of the
parameters, in torchtitan names, and of every optimizer state tensor; rank 0's also holds the
torch RNG state) and `shards-r00000.json` (for each tensor in them: the full tensor's shape
and the offset of the shard in it), then `state.json` (version, optimizer steps, param-group
settings, `world`, anything the caller adds).

Writing is torch.distributed.checkpoint's scheme without its pickled metadata: every rank
writes its own shards, on its own thread, while training goes on (no gather, no collective);
a shard that several ranks hold alike (a replicated placement) is written by one of them.
The ranks write into `.step-000010.<token>/`, a token their group shares; rank 0 waits for
every rank's index (written after its data), writes `state.json` and renames the directory,
so a checkpoint exists whole or not at all, and `latest_checkpoint` picks the newest whole one.
A directory of a group that died half-way carries another token and is removed later.

Loading gives every rank the part of each tensor it holds under the layout of now, read from
whichever shards overlap it (safetensors slices: nothing else is read): a checkpoint resumes
on any number of ranks. A checkpoint in the older one-file layout (`model.safetensors`,
`optimizer.safetensors`, written before shards) reads as one shard per tensor.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from async_rl.paths import write_json_atomic

STATE = "state.json"
KINDS = ("model", "optimizer")
RNG = "rng.torch"
COMMIT_TIMEOUT_S = 600.0  # how long rank 0 waits for the other ranks' shards


def new_token() -> str:
    """A token for one incarnation of a learner group (every rank must use the same)."""
    return secrets.token_hex(6)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _piece(t: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int]] | None:
    """This rank's shard of `t` (a CPU copy) and its offset in the full tensor; None where
    another rank writes the same values (a replica, or a plain tensor every rank holds)."""
    if not isinstance(t, DTensor):
        return (_cpu(t), [0] * t.dim()) if rank == 0 else None
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None or any(
        isinstance(p, Replicate) and c != 0 for p, c in zip(t.placements, coordinate, strict=True)
    ):
        return None
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return _cpu(t.to_local()), list(offset)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Snapshot:
    """This rank's shards of what a checkpoint holds, copied between steps; `write` later."""

    step: int
    rank: int
    world: int
    tensors: dict[str, dict[str, torch.Tensor]]  # kind -> name -> this rank's shard
    index: dict[str, dict[str, dict[str, list[int]]]]  # kind -> name -> shape, offset
    state: str  # state.json, already serialized

    @classmethod
    def take(
        cls, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> Snapshot:
        rank, world = _rank_world()
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        tensors: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        index: dict[str, dict[str, dict[str, list[int]]]] = {kind: {} for kind in KINDS}
        for kind, source in (("model", model.state_dict()), ("optimizer", opt_tensors)):
            for name, value in source.items():
                piece = _piece(value, rank)
                if piece is not None and piece[0].numel() > 0:
                    tensors[kind][name] = piece[0]
                    index[kind][name] = {"shape": list(value.shape), "offset": piece[1]}
        if rank == 0:
            rng = torch.get_rng_state()
            tensors["optimizer"][RNG] = rng
            index["optimizer"][RNG] = {"shape": list(rng.shape), "offset": [0]}
        state = {"step": step, "world": world, "optimizer": opt_meta, **extra}
        return cls(step, rank, world, tensors, index, json.dumps(state))

    def write(self, root: Path, keep: int = 2, token: str = "0") -> Path:
        """Write this rank's shards of `root/step-{step}`; rank 0 also commits it (waiting for
        the others) and keeps the newest `keep` checkpoints."""
        root = Path(root)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".{final.name}.{token}"
        tmp.mkdir(parents=True, exist_ok=True)
        tag = f"r{self.rank:05d}"
        mine = [tmp / f"{kind}-{tag}.safetensors" for kind in KINDS] + [tmp / f"shards-{tag}.json"]
        try:
            for kind, file in zip(KINDS, mine, strict=False):
                save_file(self.tensors[kind], file)
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
            write_json_atomic(mine[-1], self.index)  # after its data
            if self.rank != 0:
                return final
            self._wait_for_ranks(tmp)
            (tmp / STATE).write_text(self.state)
            with open(tmp / STATE, "rb") as fh:
                os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:  # a full disk, a rank that never came: nothing half-written stays
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            for file in mine:
                file.unlink(missing_ok=True)
            raise
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for dead in root.glob(".step-*"):  # half-written by a group that is gone
            if not dead.name.endswith(f".{token}"):
                shutil.rmtree(dead, ignore_errors=True)
        return final

    def _wait_for_ranks(self, tmp: Path) -> None:
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        while True:
            missing = [r for r in range(self.world) if not (tmp / f"shards-r{r:05d}.json").exists()]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"checkpoint step {self.step}: rank(s) {missing} wrote no shards within "
                    f"{COMMIT_TIMEOUT_S:.0f}s; it is not committed"
                )
            time.sleep(0.05)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `root/step-{step}` now (one process); keep the newest `keep` checkpoints."""
    return Snapshot.take(step, model, optimizer, extra).write(root, keep, new_token())


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in Path(root).glob("step-*") if (p / STATE).exists())
    return found[-1] if found else None


def _slices(lo: list[int], hi: list[int], origin: list[int]) -> tuple[slice, ...]:
    """The block lo..hi of a full tensor, in the coordinates of a block starting at `origin`."""
    return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))


class _Shards:
    """The shards of one kind in a checkpoint directory: name -> [(open file, offset, shape)]."""

    def __init__(self, path: Path, kind: str):
        self.chunks: dict[str, list[tuple[Any, list[int], list[int]]]] = {}
        self.shapes: dict[str, list[int]] = {}
        indexes = sorted(path.glob("shards-r*.json"))
        if not indexes:  # the one-file layout: every tensor whole
            f = safe_open(path / f"{kind}.safetensors", "pt")  # open (mapped) while loading
            for name in f.keys():
                shape = list(f.get_slice(name).get_shape())
                self._add(name, f, shape, [0] * len(shape), shape)
            return
        for index in indexes:
            tag = index.stem.removeprefix("shards-")
            f = safe_open(path / f"{kind}-{tag}.safetensors", "pt")
            for name, entry in json.loads(index.read_text())[kind].items():
                local = list(f.get_slice(name).get_shape())
                self._add(name, f, entry["shape"], entry["offset"], local)

    def _add(self, name, file, shape, offset, local) -> None:
        if self.shapes.setdefault(name, list(shape)) != list(shape):
            raise ValueError(f"{name}: shards of different full shapes")
        self.chunks.setdefault(name, []).append((file, list(offset), local))

    def region(self, name: str, shape: list[int], offset: list[int]) -> torch.Tensor:
        """The block of `name` of `shape` at `offset` in the full tensor."""
        out, covered = None, 0
        for file, chunk_offset, chunk_shape in self.chunks[name]:
            lo = [max(o, c) for o, c in zip(offset, chunk_offset, strict=True)]
            hi = [
                min(o + s, c + n)
                for o, s, c, n in zip(offset, shape, chunk_offset, chunk_shape, strict=True)
            ]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            source = _slices(lo, hi, chunk_offset)
            piece = file.get_slice(name)[source] if shape else file.get_tensor(name)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[_slices(lo, hi, offset)] = piece
            covered += piece.numel()
        if out is None or covered != math.prod(shape):
            raise ValueError(f"{name}: the shards do not cover {shape} at {offset}")
        return out

    def like(self, name: str, template: torch.Tensor | None) -> torch.Tensor:
        """`name` laid out as `template`: this rank's shard of a DTensor, else whole."""
        shape = self.shapes[name]
        if isinstance(template, DTensor) and list(template.shape) == shape:
            mesh, placements = template.device_mesh, template.placements
            local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
            if math.prod(local_shape) == 0:
                local = torch.empty(local_shape, dtype=template.dtype)
            else:
                local = self.region(name, list(local_shape), list(offset)).to(template.dtype)
            return DTensor.from_local(
                local.to(template.to_local().device),
                mesh,
                placements,
                shape=template.shape,
                stride=template.stride(),
            )
        return self.region(name, shape, [0] * len(shape))


def full_tensors(path: Path, kind: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's `kind` ("model" or "optimizer") whole, in one process,
    whatever the number of ranks that wrote it."""
    shards = _Shards(Path(path), kind)
    return {name: shards.like(name, None) for name in shards.shapes}


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and torch RNG in place; return `state.json`."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        model_shards, opt_shards = _Shards(path, "model"), _Shards(path, "optimizer")
        rng = opt_shards.like(RNG, None)
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable learner checkpoint ({e})") from None
    try:
        template = model.state_dict()
        if set(template) != set(model_shards.shapes):
            names = sorted(set(template) ^ set(model_shards.shapes))
            raise ValueError(f"parameters in one but not the other: {names[:5]}")
        model.load_state_dict({k: model_shards.like(k, t) for k, t in template.items()})
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tensors = {  # AdamW's moments are laid out as their parameter
            name: opt_shards.like(name, params[int(name.split(".")[1])])
            for name in opt_shards.shapes
            if name != RNG
        }
        optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: does not match this model or optimizer ({e})") from None
    torch.set_rng_state(rng)
    return state
