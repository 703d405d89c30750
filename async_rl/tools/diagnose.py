"""`async-rl diagnose RUN`: how good the first-order approximation is on a run's own data.

The paper's token-level objective (eq. 4) is a first-order approximation of the sequence-level
one (eq. 2), valid while every token's ratio `pi_theta / mu_old = 1 + delta_t` stays near 1. For
the groups the actors generated with version u (`policy_version`), and the learner's weights
of versions u (`pi_old`, the rollout policy recomputed by the learner's model in fp32) and
u + k (`pi_theta`, k = `--staleness`), per routing replay mode (`none`: each forward routes
for itself; `r2`: pi_theta replays pi_old's routing; `r3`: both replay the actor's trace),
it measures:

- `delta_t` and its factors (eqs. 5/6): train-inference `pi_old / mu_old` (`tif`) and
  staleness `pi_theta / pi_old` (`stale`), as mean |x - 1| over completion tokens
  (`mean abs delta`, `mean abs tif-1`, `mean abs stale-1`);
- the sequence weight `W = prod_t (1 + delta_t)` against its first-order form
  `F = 1 + sum_t delta_t`: the relative gap `|W - F| / W` per completion (median, 90th pct);
- the cosine between the gradients of the token surrogate `sum_seq A sum_t r_t` (eq. 4) and
  of the sequence objective `sum_seq A W` (eq. 2), with the MiniRL advantage `A` of each
  group, over all parameters and over the router weights alone;
- the mechanism of routing replay (`learner.mismatch`): the share of (position, layer) pairs
  whose top-k set differs between the actor's trace and pi_old's forward (`flip infer`; 0
  under r3) and between pi_old's and pi_theta's forwards (`flip stale`; 0 under r2 and r3),
  the share of completion tokens whose routing flipped in any layer against the actor
  (`flipped tokens`), the 99th percentile of |log pi_old / mu_old| over those tokens and over
  the others, and the effective sample size of the weights pi_old / mu_old (`ess`).

Weights of version v come from `weights/v000v/` (what the run still keeps:
`weights.keep_versions`) or a learner checkpoint `checkpoints/learner/step-v/`
(`learner.checkpoint_every`). `--out fig.png` writes a figure (gap by response length, cosine by
staleness) and the table as `fig.md`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import torch

from async_rl.buffer.segments import scan_segments
from async_rl.choices import RoutingReplay
from async_rl.config import Config
from async_rl.paths import RunPaths
from async_rl.types import RoutingSpec
from learner.batch import PackedBatch, pack
from learner.checkpoint import full_tensors
from learner.hf import import_hf
from learner.loss import MiniRL
from learner.mismatch import Mismatch, flipped_BTL
from learner.model import build_model, policy_logprobs
from learner.routing import RoutingHooks

REPLAYS: tuple[RoutingReplay, ...] = get_args(RoutingReplay)
COLUMNS = (
    "version",
    "k",
    "replay",
    "precision",
    "tokens",
    "mean abs delta",
    "mean abs tif-1",
    "mean abs stale-1",
    "gap median",
    "gap p90",
    "cos all",
    "cos router",
    "flip infer",
    "flip stale",
    "flipped tokens",
    "p99 abs log rho flipped",
    "p99 abs log rho steady",
    "ess",
)


@dataclass
class Measured:
    """One (data version, staleness, replay) cell: the table's row and per-completion arrays."""

    row: dict
    lengths: np.ndarray  # completion tokens of each completion
    gaps: np.ndarray  # |W - F| / W of each completion


def kept(run_dir: Path, version: int) -> Path | None:
    """Where the run keeps the weights of `version`: a weight version, else a learner
    checkpoint; None if neither."""
    paths = RunPaths(run_dir)
    hf = paths.weights / f"v{version:06d}"
    if (hf / "manifest.json").exists():
        return hf
    step = paths.learner_checkpoints / f"step-{version:06d}"
    return step if (step / "state.json").exists() else None


def model_at(run_dir: Path, version: int, cfg: Config) -> torch.nn.Module | None:
    """The learner's weights of `version` (`kept`), as an fp32 model."""
    path = kept(run_dir, version)
    if path is None:
        return None
    if path.parent == RunPaths(run_dir).weights:
        model, _ = import_hf(path, cfg.model)
    else:
        model = build_model(cfg.model, seed=0)
        model.load_state_dict(full_tensors(path))
    return model.float()


def groups_by_version(run_dir: Path) -> dict[int, list[pa.RecordBatch]]:
    """The stored groups of a run, by the version that generated them (its oldest token's)."""
    out: dict[int, list[pa.RecordBatch]] = {}
    for _, batches in scan_segments(RunPaths(run_dir).buffer):
        for batch in batches:
            out.setdefault(int(batch.column("policy_version")[0].as_py()), []).append(batch)
    return out


def _logprobs(model, hooks, batch: PackedBatch, replay_BTLK, temperature: float):
    """Token log-probs `[B, T]` (with grad) and the routing this forward used."""
    context = contextlib.nullcontext() if replay_BTLK is None else hooks.replay(replay_BTLK)
    with context, hooks.record() as trace:
        logp_BT, _, _ = policy_logprobs(model, batch.inputs_BT, batch.targets_BT, temperature)
    return logp_BT, trace.experts


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
    flat_a, flat_b = flat_a.double(), flat_b.double()
    denom = flat_a.norm() * flat_b.norm()
    return float(flat_a @ flat_b / denom) if denom > 0 else float("nan")


def measure(
    old: torch.nn.Module,
    new: torch.nn.Module,
    batch: PackedBatch,
    replay: str,
    advantages_B: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[dict, np.ndarray]:
    """The numbers of one cell (module docstring) and the gap of every completion."""
    old_hooks, new_hooks = RoutingHooks(old), RoutingHooks(new)
    try:
        actor = batch.routing_BTLK if replay == "r3" else None
        with torch.no_grad():
            old_BT, old_routing = _logprobs(old, old_hooks, batch, actor, temperature)
        replay_new = {"none": None, "r2": old_routing, "r3": actor}[replay]
        new.zero_grad(set_to_none=True)
        new_BT, new_routing = _logprobs(new, new_hooks, batch, replay_new, temperature)
    finally:
        old_hooks.remove()
        new_hooks.remove()
    mask, mu = batch.mask_BT, batch.behavior_logprobs_BT
    log_ratio = torch.where(mask, new_BT - mu, 0.0)
    ratio = torch.where(mask, log_ratio.exp(), 0.0)
    seq_log_w = log_ratio.sum(1)
    tokens = int(mask.sum())
    with torch.no_grad():
        delta = ratio - mask.float()
        w = seq_log_w.double().exp()
        first = 1 + delta.double().sum(1)
        gaps = ((w - first).abs() / w).numpy()
        tif = torch.where(mask, (old_BT - mu).exp() - 1, 0.0)
        stale = torch.where(mask, (new_BT.detach() - old_BT).exp() - 1, 0.0)
    params = [p for p in new.parameters() if p.requires_grad]
    router = [p for n, p in new.named_parameters() if "router" in n]
    token_objective = (ratio.sum(1) * advantages_B).sum()
    seq_objective = (seq_log_w.exp() * advantages_B).sum()
    g_tok = torch.autograd.grad(token_objective, params, retain_graph=True, allow_unused=True)
    g_seq = torch.autograd.grad(seq_objective, params, allow_unused=True)
    g_tok = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_tok, strict=True)]
    g_seq = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_seq, strict=True)]
    ids = {id(p) for p in router}
    pick = [i for i, p in enumerate(params) if id(p) in ids]
    row = {
        "tokens": tokens,
        "mean abs delta": float(delta.abs().sum()) / max(tokens, 1),
        "mean abs tif-1": float(tif.abs().sum()) / max(tokens, 1),
        "mean abs stale-1": float(stale.abs().sum()) / max(tokens, 1),
        "gap median": float(np.median(gaps)),
        "gap p90": float(np.quantile(gaps, 0.9)),
        "cos all": _cosine(g_tok, g_seq),
        "cos router": _cosine([g_tok[i] for i in pick], [g_seq[i] for i in pick]),
    }
    return row | _routing_row(batch, old_BT, old_routing, new_routing), gaps


def _routing_row(batch: PackedBatch, old_BT, old_routing, new_routing) -> dict:
    """The mechanism columns (module docstring); "-" where the data has no actor trace."""
    valid, flipped_BT = batch.valid_BT, None
    row = {"flip stale": float(flipped_BTL(old_routing, new_routing)[valid].float().mean())}
    if batch.routing_BTLK is not None:
        flips_BTL = flipped_BTL(batch.routing_BTLK, old_routing)
        row["flip infer"] = float(flips_BTL[valid].float().mean())
        flipped_BT = flips_BTL.any(-1)
    mismatch = Mismatch()
    mismatch.add(old_BT, batch.behavior_logprobs_BT, batch.mask_BT, flipped_BT)
    got = mismatch.metrics()
    row["ess"] = got["is_ess"]
    row["flipped tokens"] = got.get("flipped_token_frac", "-")
    row["p99 abs log rho flipped"] = got.get("abs_log_rho_p99_flipped", "-")
    row["p99 abs log rho steady"] = got.get("abs_log_rho_p99_steady", got["abs_log_rho_p99"])
    return {"flip infer": "-"} | row


def diagnose(
    run_dir: Path,
    cfg: Config,
    versions: list[int] | None,
    staleness: list[int],
    replays: tuple[str, ...] = REPLAYS,
    max_groups: int = 32,
) -> list[Measured]:
    """Every (version, k, replay) cell that the run's data and kept weights allow."""
    by_version = groups_by_version(run_dir)
    spec = RoutingSpec.of(cfg.model)
    if versions is None:  # the newest version whose data and weights (u, u + max k) are here
        ks = max(staleness)
        versions = [
            max(
                (v for v in by_version if kept(run_dir, v) and kept(run_dir, v + ks)),
                default=None,
            )
        ]
        if versions[0] is None:
            raise ValueError(
                f"{run_dir}: no version u with stored groups and the weights of u and u + {ks} "
                "(raise weights.keep_versions or set learner.checkpoint_every to keep them)"
            )
    out = []
    for u in versions:
        if u not in by_version:
            raise ValueError(f"{run_dir}: no stored groups generated by version {u}")
        table = pa.Table.from_batches(by_version[u][:max_groups])
        batch = pack(table, spec, pad_id=0)
        precision = table.column("quantization")[0].as_py()
        adv = MiniRL(cfg.algo).advantages(batch.rewards_B)
        old = model_at(run_dir, u, cfg)
        if old is None:
            raise ValueError(f"{run_dir}: the weights of version {u} are not kept")
        lengths = batch.mask_BT.sum(1).numpy()
        for k in staleness:
            new = model_at(run_dir, u + k, cfg)
            if new is None:
                raise ValueError(f"{run_dir}: the weights of version {u + k} are not kept")
            for replay in replays:
                if replay == "r3" and batch.routing_BTLK is None:
                    continue
                row, gaps = measure(old, new, batch, replay, adv, cfg.actor.temperature)
                head = {"version": u, "k": k, "replay": replay, "precision": precision}
                out.append(Measured(head | row, lengths, gaps))
    return out


def table(cells: list[Measured]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cell in cells:
        values = []
        for key in COLUMNS:
            v = cell.row[key]
            values.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def figure(cells: list[Measured], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for cell in cells:
        if cell.row["replay"] != cells[0].row["replay"]:
            continue
        edges = np.unique(np.quantile(cell.lengths, np.linspace(0, 1, 6)))
        bins = np.clip(np.digitize(cell.lengths, edges[1:-1]), 0, len(edges) - 2)
        centres = [cell.lengths[bins == b].mean() for b in range(len(edges) - 1)]
        medians = [np.median(cell.gaps[bins == b]) for b in range(len(edges) - 1)]
        left.plot(centres, medians, marker="o", label=f"v{cell.row['version']} k={cell.row['k']}")
    left.set(xlabel="completion tokens", ylabel="median |W - F| / W", yscale="log")
    left.set_title(f"first-order gap by length (replay {cells[0].row['replay']})")
    left.legend(fontsize=7)
    for version, replay in dict.fromkeys((c.row["version"], c.row["replay"]) for c in cells):
        mine = [c for c in cells if (c.row["version"], c.row["replay"]) == (version, replay)]
        ks, cos = [c.row["k"] for c in mine], [c.row["cos all"] for c in mine]
        right.plot(ks, cos, "o-", label=f"v{version} {replay}")
    right.set(xlabel="staleness k (versions)", ylabel="cos(grad token, grad sequence)")
    right.set_title("token vs sequence gradient")
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
