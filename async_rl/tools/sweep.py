"""`async-rl sweep FILE`: a grid of variants x seeds, each a normal run directory, resumable.

A sweep file (TOML):

    name = "offpolicy"                 # runs go to <output_dir>/<name>/<variant>-s<seed>/
    config = "configs/tiny.toml"       # the base run configuration
    seeds = [0, 1]
    parallel = 1                       # runs at once (each run uses about two processes)
    overrides = ["run.num_steps=40"]   # applied to every run

    [[variant]]                        # explicit variants ...
    name = "N2-noclip"
    overrides = ["algo.num_minibatches=2", "algo.clip=false"]

    [grid]                             # ... and/or a grid: the product of the lists
    "algo.num_minibatches" = [1, 2, 4]
    "algo.routing_replay" = ["none", "r3"]

The cold start runs once per sweep (`<name>/_cold_start`) and every run starts from it; sweeps
of the same `name` share it (and their directory). Runs go seed by seed (every variant at the
first seed, then the next), `parallel` at a time. A run whose `metrics.jsonl` already reaches
`run.num_steps` is skipped, a started one is resumed, so rerunning the same command finishes an
interrupted sweep.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from async_rl.config import ConfigError, load_config
from async_rl.metrics import steps_logged
from async_rl.paths import RunPaths

CLI = [sys.executable, "-m", "async_rl.cli"]


@dataclass
class RunSpec:
    variant: str
    seed: int
    overrides: list[str]
    run_dir: Path


def _fail(path: Path, msg: str):
    raise ValueError(f"{path}: {msg}")


def _override_value(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list) else str(value).lower()


def _read(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        _fail(path, f"cannot read the sweep file ({e})")
    unknown = set(data) - {"name", "config", "seeds", "parallel", "overrides", "variant", "grid"}
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        _fail(path, "'name' must be a plain directory name")
    seeds = data.setdefault("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        _fail(path, "'seeds' must be a non-empty list of integers")
    return data


def _variants(path: Path, data: dict) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every variant: the [[variant]] tables, then the [grid]'s product."""
    variants: list[tuple[str, list[str]]] = []
    for v in data.get("variant", []):
        if not isinstance(v.get("name"), str) or not isinstance(v.get("overrides", []), list):
            _fail(path, "each [[variant]] needs a 'name' and a list of 'overrides'")
        variants.append((v["name"], [str(o) for o in v.get("overrides", [])]))
    grid = data.get("grid", {})
    keys = list(grid)
    if not all(isinstance(grid[k], list) and grid[k] for k in keys):
        _fail(path, "every [grid] entry must be a non-empty list")
    for values in itertools.product(*(grid[k] for k in keys)) if keys else ():
        pairs = list(zip(keys, values, strict=True))
        label = "-".join(f"{k.split('.')[-1]}={_override_value(v)}" for k, v in pairs)
        variants.append((label, [f"{k}={_override_value(v)}" for k, v in pairs]))
    if not variants:
        _fail(path, "no variants: give [[variant]] tables or a [grid]")
    return variants


def load_sweep(path: Path) -> tuple[dict, list[RunSpec]]:
    """The sweep's settings and its runs; every run's config is checked before any starts."""
    path = Path(path)
    data = _read(path)
    base = data.get("config", "configs/tiny.toml")
    common = [str(o) for o in data.get("overrides", [])]
    root = load_config(base, common).run_dir.parent / data["name"]
    specs = []  # seed by seed: an interrupted sweep has every variant at its first seeds
    variants = _variants(path, data)
    for seed in data["seeds"]:
        for label, overrides in variants:
            run_name = f"{label}-s{seed}".replace("/", "_")
            every = [
                *common,
                *overrides,
                f"run.seed={seed}",
                f"run.output_dir={root}",
                f"run.name={run_name}",
            ]
            try:
                load_config(base, every)
            except ConfigError as e:
                _fail(path, f"variant {label!r}: {e}")
            specs.append(RunSpec(label, seed, every, root / run_name))
    meta = {
        "name": data["name"],
        "config": base,
        "root": root,
        "common": common,
        "parallel": int(data.get("parallel", 1)),
    }
    return meta, specs


def _cold_start(meta: dict, log) -> Path:
    """The sweep's one cold start (made once), which every run starts from."""
    root: Path = meta["root"]
    root.mkdir(parents=True, exist_ok=True)
    cold = RunPaths(root / "_cold_start").sft_checkpoint
    if not (cold / "config.json").exists():
        log(f"cold start for the sweep -> {cold}")
        cmd = [*CLI, "sft", "--config", meta["config"], *meta["common"]]
        subprocess.run([*cmd, f"run.output_dir={root}", "run.name=_cold_start"], check=True)
    return cold


def _pending(meta: dict, specs: list[RunSpec], log) -> list[RunSpec]:
    """The runs not finished yet (each with its variant.json written)."""
    pending = []
    for spec in specs:
        cfg = load_config(meta["config"], spec.overrides)
        if steps_logged(spec.run_dir) >= cfg.run.num_steps:
            log(f"done already: {spec.run_dir.name}")
            continue
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        RunPaths(spec.run_dir).variant.write_text(
            json.dumps({"variant": spec.variant, "seed": spec.seed, "overrides": spec.overrides})
        )
        pending.append(spec)
    return pending


def run_sweep(path: Path, log=print) -> list[RunSpec]:
    """Run every unfinished run of the sweep, `parallel` at a time; raise if any failed."""
    meta, specs = load_sweep(path)
    cold = _cold_start(meta, log)
    pending = _pending(meta, specs, log)
    running: list[tuple[RunSpec, subprocess.Popen]] = []
    failed = []
    while pending or running:
        while pending and len(running) < meta["parallel"]:
            spec = pending.pop(0)
            cmd = [*CLI, "train", "--config", meta["config"], *spec.overrides]
            cmd += [f"run.init_checkpoint={cold}", "logging.progress=false"]
            log(f"start {spec.run_dir.name}")
            out = open(RunPaths(spec.run_dir).train_log, "a")
            running.append((spec, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)))
        time.sleep(1.0)
        for spec, proc in list(running):
            if proc.poll() is not None:
                running.remove((spec, proc))
                status = "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"
                log(f"{status}: {spec.run_dir.name}")
                if proc.returncode:
                    failed.append(spec)
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) failed, see their train.log: "
            + ", ".join(str(s.run_dir) for s in failed)
        )
    return specs
