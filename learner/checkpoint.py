"""Learner checkpoints: model, optimizer, schedule position, version and RNG, without pickle.

`runs/<name>/checkpoints/step-000010/` holds `model.safetensors` (torchtitan names),
`optimizer.safetensors` (every optimizer state tensor, and the torch RNG state) and
`state.json` (version, optimizer steps, param-group settings, anything the caller adds). The
directory is written under a temporary name and renamed, so a checkpoint either exists whole or
not at all; `latest_checkpoint` picks the newest complete one. A `Snapshot` is taken between
steps and can be written while the next steps train (torchtitan's asynchronous checkpointing).

With several learner ranks (FSDP2), every rank takes the snapshot (the shards are gathered to
full tensors) and rank 0 writes it; loading gives every rank its shard of the full tensors.
A checkpoint therefore holds the same tensors whatever the number of ranks that wrote it, and
resumes on any number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

STATE = "state.json"


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy; a DTensor shard is gathered first (collective: every rank calls it)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def _like(value: torch.Tensor, template) -> torch.Tensor:
    """`value` (a full tensor) laid out as `template`: this rank's shard of a DTensor."""
    if isinstance(template, DTensor):
        value = value.to(template.dtype)
        return distribute_tensor(value, template.device_mesh, template.placements)
    return value


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = _copy(value)
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Snapshot:
    """A copy of what a checkpoint holds, taken between steps; written later by `write`."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: str  # state.json, already serialized

    @classmethod
    def take(
        cls, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> Snapshot:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        return cls(
            step,
            {k: _copy(v) for k, v in model.state_dict().items()},
            opt_tensors,
            json.dumps({"step": step, "optimizer": opt_meta, **extra}),
        )

    def write(self, root: Path, keep: int = 2) -> Path:
        """Write `root/step-{step}`; keep the newest `keep` checkpoints."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            save_file(self.model, tmp / "model.safetensors")
            save_file(self.optimizer, tmp / "optimizer.safetensors")
            (tmp / STATE).write_text(self.state)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `root/step-{step}` now; keep the newest `keep` checkpoints."""
    return Snapshot.take(step, model, optimizer, extra).write(root, keep)


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in Path(root).glob("step-*") if (p / STATE).exists())
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and torch RNG in place; return `state.json`."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        model_state = load_file(path / "model.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable learner checkpoint ({e})") from None
    try:
        template = model.state_dict()
        model.load_state_dict({k: _like(v, template.get(k)) for k, v in model_state.items()})
        params = [p for group in optimizer.param_groups for p in group["params"]]
        opt_state = _unflatten_optimizer(opt_tensors, state["optimizer"])
        for idx, entry in opt_state["state"].items():
            for key, value in entry.items():  # AdamW's moments are laid out as their parameter
                if isinstance(value, torch.Tensor) and value.shape == params[idx].shape:
                    entry[key] = _like(value, params[idx])
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: does not match this model or optimizer ({e})") from None
    torch.set_rng_state(opt_tensors["rng.torch"])
    return state
