"""Metrics of a run: `runs/<name>/metrics.jsonl` (one line per global step), wandb, progress.

Names are part of the interface (docs/design.md section 8): `learner/*`, `rollout/*`, `buffer/*`,
plus `eval/accuracy` when the held-out set is evaluated. The learner writes the file; the
driver tails it into wandb (offline unless `logging.wandb_mode` says otherwise) and the
terminal, so nothing is lost when the driver restarts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from async_rl.paths import RunPaths, read_fleet_size


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete row of a run's metrics.jsonl (a torn last line is left out)."""
    return MetricsTail(RunPaths(run_dir).metrics).read()


def steps_logged(run_dir: Path) -> int:
    """The newest version in a run's metrics.jsonl (0 for none)."""
    rows = [r for r in read_rows(run_dir) if isinstance(r, dict)]
    return max((r.get("version", 0) for r in rows), default=0)


class MetricsWriter:
    """Appends rows to a run's metrics.jsonl (the learner's rank 0 does): each row gets the
    wall-clock `time` it was written; a killed writer's torn last line stays on a line of its
    own (readers skip it). `fleet(seen)` is the row's `rollout/actors`: the fleet the driver
    runs (`control/actors.json`), or without a driver `seen`, the actors the buffer saw
    lately; `nodes_lost()` is its `rollout/nodes_lost` (`control/placement.json`)."""

    def __init__(self, run_dir: Path):
        self.paths = RunPaths(run_dir)
        self.out = self.paths.metrics.open("a+b")
        if self.out.tell():
            self.out.seek(-1, os.SEEK_END)
            if self.out.read(1) != b"\n":
                self.out.write(b"\n")

    def fleet(self, seen: float) -> float:
        fleet = read_fleet_size(self.paths)
        return fleet if fleet is not None else seen

    def nodes_lost(self) -> int:
        """`rollout/nodes_lost`: the Ray nodes the driver saw the run lose (0 without one)."""
        try:
            return len(json.loads(self.paths.placement.read_bytes())["lost_nodes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def write(self, row: dict[str, Any]) -> None:
        row["time"] = time.time()
        self.out.write(json.dumps(row).encode() + b"\n")
        self.out.flush()

    def close(self) -> None:
        self.out.close()


class MetricsTail:
    """Reads the lines appended to a JSONL file since the last call (a torn last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


class WandbLogger:
    def __init__(self, cfg, run_dir: Path):
        self.run = None
        if cfg.logging.wandb_mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.run.name,
            id=_wandb_id(run_dir),
            resume="allow",
            dir=str(run_dir),
            mode=cfg.logging.wandb_mode,
            config=cfg.to_dict(),
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            metrics = {k: v for k, v in row.items() if k not in ("version", "time")}
            self.run.log(metrics, step=row["version"])

    def close(self) -> None:
        if self.run is None:
            return
        # On a full disk wandb's own log handlers fail on every line: that must not bury why
        # the run stopped under pages of "--- Logging error ---".
        raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
        try:
            self.run.finish()
        except OSError as e:
            print(f"wandb could not finish its run files: {e}", file=sys.stderr)
        finally:
            logging.raiseExceptions = raise_exceptions


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, kept across resumes."""
    file = RunPaths(run_dir).wandb_id
    if not file.exists():
        import uuid

        file.write_text(uuid.uuid4().hex[:12])
    return file.read_text().strip()


class ProgressDisplay:
    """Rich progress bar: step, reward, held-out accuracy, KL, staleness, actors, response
    lengths (median / 90th percentile), generation tokens/s, running rows and weights versions
    per completion (continuous batching and in-flight updates)."""

    def __init__(self, total: int, enabled: bool):
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, info="waiting for data")
        self.accuracy: float | None = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, row: dict[str, Any], actors: int) -> None:
        if "eval/accuracy" in row:
            self.accuracy = row["eval/accuracy"]
        acc = "-" if self.accuracy is None else f"{self.accuracy:.3f}"
        info = (
            f"reward {row.get('rollout/reward_mean', 0):.3f}  acc {acc}  "
            f"kl {row.get('learner/train_infer_kl', 0):.2e}  "
            f"stale {row.get('learner/staleness_mean', 0):.2f}  actors {actors}  "
            f"len {row.get('rollout/response_len_p50', 0):.0f}/"
            f"{row.get('rollout/response_len_p90', 0):.0f}  "
            f"{row.get('rollout/tokens_per_s', 0):.0f} gen tok/s"
        )
        if row.get("rollout/running_rows"):
            info += f"  rows {row['rollout/running_rows']:.0f}"
        if row.get("rollout/versions_per_completion", 1.0) > 1.0:
            info += f"  vers/compl {row['rollout/versions_per_completion']:.2f}"
        self.progress.update(self.task, completed=row["version"], info=info)

    def print(self, text: str) -> None:
        self.console.print(text)
