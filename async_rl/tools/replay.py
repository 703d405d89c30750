"""`async-rl replay RUN [key=value ...]`: train again on a recorded run's data, with other
learner settings and no actors (counterfactual replay).

    recorded RUN/                               the replay, RUN-replay/ (`run.name`)
    ├─ config.toml          + learner overrides ─► config.toml, replay.json (what, from where)
    ├─ buffer/segment-*     linked (or copied) ──► buffer/segment-*
    ├─ buffer/consumed.jsonl  its served batches ► buffer/consumed.jsonl (versions 0..n-1)
    └─ the starting checkpoint ────────────────► the learner, version 0, as `train` starts it

The learner (`learner.run.Learner`, one process) takes the global batch of version v from the
replay's buffer copy: the groups the recorded learner trained at v, in the same order
(`consumed.jsonl`). It writes what `train` writes (metrics.jsonl, held-out evaluation,
weights, checkpoints), so `plot` and `diagnose` read the replay as they read a run. The data
stays the recorded policy's: the replayed learner moves away from it, and the importance
weights, clipping and staleness it reports are measured against the recorded behaviour
log-probs and policy versions. With the recorded settings the replay reproduces the recorded
learner's loss, grad norm and weights bit for bit on the same kind of machine (a test).

What may change (`REPLAYABLE`): `algo.*` but the group size (the data's), `N` with the
global batch kept (`algo.num_minibatches` alone sets `algo.prompts_per_minibatch` to the
recorded global batch / N), the optimizer's `learner.*` keys, and `run.name`, `output_dir`,
`num_steps` (at most the versions recorded), `eval_every`, `eval_k`, `logging.*`. A recorded run
of several learner ranks is replayed on one (the same updates up to float summation order).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from async_rl.buffer.segments import LOG, read_log, scan_segments
from async_rl.config import Config, ConfigError, load_config, parse_override, to_toml
from async_rl.paths import RunPaths, write_json_atomic
from async_rl.types import RoutingSpec, trajectory_schema
from async_rl.wire.messages import Batch, Wait

REPLAYABLE = {
    "algo": None,  # every key but group_size (checked below)
    "learner": {
        "lr",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "warmup_steps",
        "lr_schedule",
        "grad_clip",
        "master_dtype",
        "checkpoint_every",
        "max_tokens_per_microbatch",
        "logprob_chunk",
        "activation_checkpointing",
    },
    "run": {"name", "output_dir", "num_steps", "eval_every", "eval_k"},
    "logging": None,
}
# how the replay runs, whatever the recorded run did: one learner process, weights on disk
FIXED = ["learner.num_ranks=1", "learner.expert_parallel=1", "weights.store=fs"]
MARKER = "replay.json"


def replay_config(run: Path, overrides: list[str]) -> tuple[Config, Config]:
    """(recorded config, the replay's): the recorded run's resolved config with `overrides`,
    each checked against what a replay may change (`REPLAYABLE`)."""
    paths = RunPaths(run)
    if not paths.config.exists():
        raise ValueError(f"{paths.config}: not found; {run} is not a run directory")
    recorded = load_config(paths.config)
    keys = {}
    for item in overrides:
        section, name, _ = parse_override(item)
        allowed = REPLAYABLE.get(section, set())
        if section not in REPLAYABLE or (allowed is not None and name not in allowed):
            raise ConfigError(
                f"{section}.{name}",
                f"a replay trains on {run}'s recorded data and changes only the learner's "
                "settings (algo.*, learner.lr and the optimizer's keys, run.name, "
                "run.num_steps, run.eval_every, logging.*)",
            )
        keys[f"{section}.{name}"] = item
    if "algo.group_size" in keys:
        raise ConfigError(
            "algo.group_size",
            f"{run} recorded groups of {recorded.algo.group_size} completions; a replay "
            "trains on those groups",
        )
    derived = [f"run.name={recorded.run.name}-replay", f"run.output_dir={Path(run).parent}"]
    if "run.num_steps" not in keys:  # the versions it trained, of those it was to train
        derived.append(f"run.num_steps={min(recorded.run.num_steps, _recorded_steps(run))}")
    global_groups = recorded.global_batch_groups
    if "algo.num_minibatches" in keys and "algo.prompts_per_minibatch" not in keys:
        n = int(parse_override(keys["algo.num_minibatches"])[2])
        if global_groups % n:
            raise ConfigError(
                "algo.num_minibatches",
                f"{run}'s global batches of {global_groups} groups do not split into {n} "
                "mini-batches of whole groups",
            )
        derived.append(f"algo.prompts_per_minibatch={global_groups // n}")
    cfg = load_config(paths.config, [*FIXED, *derived, *overrides])
    if cfg.global_batch_groups != global_groups:
        raise ConfigError(
            "algo.prompts_per_minibatch",
            f"algo.prompts_per_minibatch x algo.num_minibatches = {cfg.global_batch_groups} "
            f"groups, but {run} trained global batches of {global_groups}",
        )
    if cfg.run_dir.resolve() == Path(run).resolve():
        raise ConfigError("run.name", f"the replay would overwrite {run}; choose another name")
    return recorded, cfg


def served_batches(run: Path, cfg: Config) -> dict[int, list[str]]:
    """The group ids the recorded learner trained at each version 0..run.num_steps-1, checked
    against what the recorded buffer holds and what `cfg` needs of the data."""
    buffer = RunPaths(run).buffer
    served = _served(run)
    recorded = _recorded_steps(run)
    if cfg.run.num_steps > recorded:
        raise ConfigError(
            "run.num_steps",
            f"{run} recorded the global batches of versions 0..{recorded - 1}; "
            f"replay at most {recorded} steps, got {cfg.run.num_steps}",
        )
    wanted = {v: served[v] for v in range(cfg.run.num_steps)}
    held = _groups(buffer)
    names = {gid for gids in wanted.values() for gid in gids}
    missing = names - held.keys()
    if missing:
        raise ValueError(
            f"{run}: its buffer lacks the segments of {len(missing)} group(s) it trained on, "
            f"e.g. {sorted(missing)[0]!r} (segments deleted or not copied); cannot replay"
        )
    schema = trajectory_schema(RoutingSpec.of(cfg.model))
    for gid in names:
        batch = held[gid]
        if not batch.schema.equals(schema):
            raise ValueError(f"{run}: group {gid!r} has another schema than this async-rl's")
        if batch.num_rows != cfg.algo.group_size:
            raise ConfigError(
                "algo.group_size",
                f"{run}'s group {gid!r} has {batch.num_rows} completions, not "
                f"{cfg.algo.group_size}",
            )
        if cfg.algo.routing_replay == "r3" and batch.column("routing").null_count:
            raise ConfigError(
                "algo.routing_replay",
                f"r3 replays the actors' routing, and {run} recorded none (group {gid!r} has "
                "no routing trace: its engine returned none); choose none or r2",
            )
    return wanted


def _served(run: Path) -> dict[int, list[str]]:
    buffer = RunPaths(run).buffer
    if not (buffer / LOG).exists():
        raise ValueError(f"{buffer / LOG}: not found; {run} has no recorded buffer to replay")
    return {e["version"]: e["served"] for e in read_log(buffer) if "served" in e}


def _recorded_steps(run: Path) -> int:
    """How many versions, from 0 on, the recorded learner was served a global batch for."""
    served, n = _served(run), 0
    while n in served:
        n += 1
    if n == 0:
        raise ValueError(f"{run}: its buffer served no global batch; nothing to replay")
    return n


def _groups(buffer: Path) -> dict[str, pa.RecordBatch]:
    return {
        b.column("group_id")[0].as_py(): b for _, batches in scan_segments(buffer) for b in batches
    }


def copy_buffer(run: Path, replay_dir: Path, served: dict[int, list[str]]) -> None:
    """The replay's own buffer: the recorded segments (closed ones hard-linked where the
    filesystem allows: they are never written again) and a log of the batches it replays."""
    source, target = RunPaths(run).buffer, RunPaths(replay_dir).buffer
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("segment-*")):
        if path.suffix not in (".arrow", ".open") or (target / path.name).exists():
            continue
        try:
            if path.suffix == ".open":
                raise OSError("an open segment may still grow: copied")
            os.link(path, target / path.name)
        except OSError:
            shutil.copyfile(path, target / path.name)
    lines = [json.dumps({"version": v, "served": gids}) for v, gids in sorted(served.items())]
    (target / LOG).write_text("".join(line + "\n" for line in lines))


class ReplaySource:
    """A `BatchSource` of the replay's buffer copy: version v's recorded global batch, in the
    recorded order; there is nobody to tell of new versions."""

    def __init__(self, replay_dir: Path, cfg: Config):
        buffer = RunPaths(replay_dir).buffer
        self.groups = _groups(buffer)
        self.served = {e["version"]: e["served"] for e in read_log(buffer) if "served" in e}
        self.schema = trajectory_schema(RoutingSpec.of(cfg.model))

    def sample(self, version: int, wait_s: float = 1.0) -> tuple[pa.Table | None, Batch | Wait]:
        if version not in self.served:
            raise ValueError(f"the replay has no recorded global batch for version {version}")
        batches = [self.groups[gid] for gid in self.served[version]]
        staleness = [version - min(b.column("policy_version").to_pylist()) for b in batches]
        reply = Batch(
            staleness_mean=sum(staleness) / len(staleness),
            staleness_max=max(staleness),
            versions_in_use=[],
            metrics={"buffer/actors_seen": 0.0},
        )
        return pa.Table.from_batches(batches, self.schema), reply

    def publish(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


def _start_of(run: Path, recorded: Config) -> Path:
    start = Path(recorded.run.init_checkpoint or RunPaths(run).sft_checkpoint)
    if not (start / "config.json").exists():
        raise ValueError(
            f"{start}: the starting checkpoint of {run} (run.init_checkpoint, else its cold "
            "start) is gone; a replay starts where the recorded run started"
        )
    return start


def _wall_time(run_dir: Path) -> float | None:
    """Seconds from the first metrics row to the last (the run's training, start-up aside)."""
    from async_rl.metrics import read_rows

    times = [r["time"] for r in read_rows(run_dir) if "time" in r]
    return times[-1] - times[0] if len(times) > 1 else None


def replay_variant(run: Path, overrides: list[str]) -> str:
    """The variant `plot` groups a replay under: the recorded run's variant (its sweep's, else
    its name) and the learner settings changed, so that the replays of a variant's seeds with
    the same settings are one line (`off-clip replay algo.clip=false`)."""
    from async_rl.tools.plots import variant_of

    changed = sorted(o for o in overrides if not o.startswith(("run.", "logging.")))
    return " ".join([variant_of(run), "replay", *changed])


def _open_replay(run: Path, overrides: list[str]) -> tuple[Config, Path, int]:
    """(the replay's config, the starting checkpoint, versions it already logged), all checked
    before anything is written; a new replay must not land on another directory."""
    from async_rl.metrics import steps_logged

    recorded, cfg = replay_config(run, overrides)
    served = served_batches(run, cfg)
    start = _start_of(run, recorded)
    root = cfg.run_dir
    marker = {"replay_of": str(run.resolve()), "overrides": list(overrides), "start": str(start)}
    if (root / MARKER).exists():
        before = json.loads((root / MARKER).read_text())
        if before != marker:
            raise ConfigError(
                "run.name",
                f"{root} is a replay of {before['replay_of']} with {before['overrides']}; "
                "choose another run.name",
            )
    elif root.exists() and any(root.iterdir()):
        raise ConfigError("run.name", f"{root} exists and is not this replay")
    done = steps_logged(root)
    if done < cfg.run.num_steps:
        root.mkdir(parents=True, exist_ok=True)
        RunPaths(root).config.write_text(to_toml(cfg))
        (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        write_json_atomic(RunPaths(root).variant, {"variant": replay_variant(run, overrides)})
        copy_buffer(run, root, served)
    return cfg, start, done


def replay(run: Path, overrides: list[str], say=print) -> dict[str, Any]:
    """Replay `run` with `overrides` (module docstring); a summary."""
    from async_rl.metrics import ProgressDisplay, WandbLogger
    from async_rl.run.evaluation import EngineEvaluator
    from async_rl.runtime import configure_torch
    from learner.run import Learner

    run = Path(run)
    cfg, start, done = _open_replay(run, overrides)
    root = cfg.run_dir
    if done >= cfg.run.num_steps:
        say(f"{root} already replayed {done} versions: nothing to do")
        return {"run_dir": str(root), "steps": done, "wall_time_s": 0.0}
    say(
        f"replaying {run} ({cfg.run.num_steps} versions) into {root}: the data stays the "
        "recorded policy's; importance weights and staleness are measured against its "
        "behaviour log-probs"
    )
    configure_torch(cfg.run.num_threads)
    evaluator = EngineEvaluator(cfg, start) if cfg.run.eval_every else None
    source = ReplaySource(root, cfg)  # the feed's and the publisher's
    learner = Learner(cfg, root, start, sources=lambda: source, evaluator=evaluator).start()
    began = time.monotonic()
    wandb = WandbLogger(cfg, root)
    try:
        with ProgressDisplay(cfg.run.num_steps, cfg.logging.progress) as display:

            def on_row(row: dict) -> None:
                wandb.log(row)
                display.update(row, 0)

            learner.run(on_row)
    finally:
        learner.close()
        wandb.close()
    summary = {
        "run_dir": str(root),
        "steps": learner.version,
        "wall_time_s": time.monotonic() - began,
        "replayed_wall_time_s": _wall_time(root),
        "recorded_wall_time_s": _wall_time(run),
    }
    took = summary["recorded_wall_time_s"]
    say(
        f"replayed {learner.version} versions in {summary['wall_time_s']:.0f}s"
        + (f" (the recorded run trained them in {took:.0f}s)" if took else "")
    )
    return summary
