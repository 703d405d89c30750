"""`async-rl`: the command line. Thin: parse, resolve the config, build components, run.

Heavy imports (torch, torchtitan, ray) happen after argument parsing, so `--help` and
`--dry-run` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

from async_rl.choices import RoutingReplay
from async_rl.config import (
    Config,
    ConfigError,
    load_config,
    precision_warning,
    reference,
    to_toml,
)
from async_rl.paths import RunPaths
from async_rl.run.placement import placement_lines


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="TOML run configuration (default: configs/tiny.toml, the CPU default)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides, e.g. algo.num_minibatches=4 algo.routing_replay=r3",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-rl",
        description="Asynchronous off-policy RL for Mixture-of-Experts LLMs "
        "(MiniRL, Routing Replay R2/R3).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """The commands that take a run configuration: train, sft, eval."""
    epilog = "configuration keys (section.key = default):\n" + reference()

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _add_config_args(p)
        return p

    train = command("train", "train a policy (CPU default with no arguments)")
    train.add_argument(
        "--ray-address", default=None, help="join this Ray cluster instead of starting one"
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR with its own config.toml (overrides still apply)",
    )
    command("sft", "supervised cold start; writes runs/<name>/checkpoints/sft")
    plan = command("plan", "placement and per-GPU memory of a run, and whether it fits")
    plan.add_argument("--nodes", type=int, default=1, help="nodes of the cluster")
    plan.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node (0: CPU processes)"
    )
    plan.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU")
    plan.add_argument(
        "--bandwidth-gbps", type=float, default=100.0, help="learner-to-actor bandwidth, Gb/s"
    )
    plan.add_argument(
        "--delta-share",
        type=float,
        default=0.003,
        help="share of a version's entries that change, for its size as a delta (default "
        "0.003: bf16 versions of fp32 masters at lr 1e-6)",
    )
    ev = command("eval", "held-out accuracy of a checkpoint (greedy and avg@k)")
    ev.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")


def _add_tool_commands(sub) -> None:
    """The commands around runs: buffer inspect, keys, sweep, plot, scale."""
    buffer = sub.add_parser("buffer", help="look into a run's replay buffer")
    buffer_sub = buffer.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    inspect = buffer_sub.add_parser(
        "inspect", help="counts by version, staleness histogram, reward mean, bytes on disk"
    )
    inspect.add_argument("run_dir", type=Path, help="the run directory, e.g. runs/tiny")
    keys = sub.add_parser(
        "keys", help="make CURVE keys for a run that binds a non-loopback address"
    )
    keys.add_argument("directory", type=Path, help="where to write the keys (created 0700)")
    sweep = sub.add_parser("sweep", help="run a grid of variants x seeds from a sweep file")
    sweep.add_argument("file", type=Path, help="sweep file, e.g. configs/sweeps/offpolicy.toml")
    plot = sub.add_parser("plot", help="figures and a summary table from run directories")
    plot.add_argument("runs", type=Path, nargs="+", help="run directories or sweep directories")
    plot.add_argument("--out", type=Path, required=True, help="the PNG to write (and .md table)")
    plot.add_argument("--title", default="", help="figure title")
    plot.add_argument(
        "--baseline", default=None, help="the variant the table measures the others against"
    )
    plot.add_argument(
        "--panels", nargs="+", default=[], help="more metrics to draw, e.g. buffer/max_staleness"
    )
    diagnose = sub.add_parser(
        "diagnose", help="the first-order approximation on a run's data: ratios, gaps, cosines"
    )
    diagnose.add_argument("run_dir", type=Path, help="the run directory, e.g. runs/tiny")
    diagnose.add_argument(
        "--versions", type=int, nargs="+", default=None, help="data versions (default: newest)"
    )
    diagnose.add_argument(
        "--staleness", type=int, nargs="+", default=[0, 1], help="k: weights of version + k"
    )
    diagnose.add_argument(
        "--replay", nargs="+", default=list(get_args(RoutingReplay)), help="modes"
    )
    diagnose.add_argument("--groups", type=int, default=32, help="groups per version at most")
    diagnose.add_argument("--out", type=Path, default=None, help="a PNG to write (and .md)")
    replay = sub.add_parser(
        "replay",
        help="train again on a recorded run's data with other learner settings (no actors)",
        description="Retrain from RUN's buffer, in the order its learner consumed it, from its "
        "starting checkpoint, with other algo.* / learner optimizer settings; writes a run "
        "directory (default RUN-replay) that plot and diagnose read. The data stays the "
        "recorded policy's.",
    )
    replay.add_argument("run_dir", type=Path, help="the recorded run directory, e.g. runs/tiny")
    replay.add_argument(
        "overrides",
        nargs="*",
        help="e.g. algo.clip=false algo.routing_replay=r2 learner.lr=2e-5 run.name=noclip",
    )
    scale = sub.add_parser("scale", help="change the number of actors of a running run")
    scale.add_argument("run_dir", type=Path, help="the run directory, e.g. runs/tiny")
    scale.add_argument("--actors", type=int, required=True, help="the fleet size wanted")


def _setup(cfg: Config):
    """Threads, tokenizer and task of a run (imports torch)."""
    from async_rl.runtime import configure_torch
    from async_rl.tasks import task_from_config
    from async_rl.tokenizer import tokenizer_from_config

    configure_torch(cfg.run.num_threads)
    return tokenizer_from_config(cfg), task_from_config(cfg)


def _print_eval(label: str, result) -> None:
    print(
        f"{label}: greedy accuracy {result.greedy:.3f}, avg@{result.k} {result.avg_at_k:.3f} "
        f"on {result.num_prompts} held-out prompts"
    )


def cmd_sft(cfg: Config) -> Path:
    from async_rl.run.evaluation import evaluate_checkpoint
    from async_rl.runtime import configure_torch
    from learner.sft import run_sft

    tokenizer, task = _setup(cfg)
    out_dir = RunPaths(cfg.run_dir).sft_checkpoint
    start = time.monotonic()
    configure_torch(cfg.sft.num_threads or cfg.run.num_threads)  # it runs alone
    try:
        run_sft(cfg, tokenizer, task, out_dir)
        print(f"cold start done in {time.monotonic() - start:.0f}s; checkpoint: {out_dir}")
        _print_eval("held-out", evaluate_checkpoint(cfg, out_dir))
    finally:
        configure_torch(cfg.run.num_threads)  # the run's processes share the cores from here
    return out_dir


def cmd_eval(cfg: Config, checkpoint: str, limit: int | None) -> None:
    from async_rl.run.evaluation import evaluate_checkpoint

    _setup(cfg)
    start = time.monotonic()
    result = evaluate_checkpoint(cfg, checkpoint, limit=limit)
    _print_eval(f"{checkpoint} ({time.monotonic() - start:.0f}s)", result)


def cmd_train(cfg: Config, ray_address: str | None) -> None:
    from async_rl.metrics import steps_logged
    from async_rl.run.cluster import check_placement
    from async_rl.tools.plan import Cluster, make_plan

    check_placement(cfg, ray_address)  # before the cold start and Ray
    print(make_plan(cfg, Cluster.local(cfg)).summary())
    if warning := precision_warning(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    done = steps_logged(cfg.run_dir)
    if done >= cfg.run.num_steps:
        print(
            f"{cfg.run_dir} already reached version {done} (run.num_steps = "
            f"{cfg.run.num_steps}): nothing to train. Raise run.num_steps to continue it, "
            "or choose another run.name."
        )
        return
    if done:
        print(f"continuing {cfg.run_dir} from its newest checkpoint ({done} versions logged)")
    paths = RunPaths(cfg.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(to_toml(cfg))
    start = cfg.run.init_checkpoint
    if not start:
        cached = paths.sft_checkpoint
        if (cached / "config.json").exists():
            print(f"reusing cold start {cached}")
        else:
            cmd_sft(cfg)
        start = str(cached)
    print(f"starting checkpoint (version 0): {start}")
    from async_rl.run.driver import train

    summary = train(cfg, Path(start), ray_address)
    accuracy = summary["accuracy"]
    print(
        f"{'interrupted' if summary['interrupted'] else 'done'}: {summary['steps']} global "
        f"steps in {summary['wall_time_s']:.0f}s; run directory {summary['run_dir']}"
    )
    if accuracy:
        print(f"held-out accuracy (avg@{cfg.run.eval_k}): {accuracy[0]:.3f} -> {accuracy[-1]:.3f}")
    if summary["interrupted"]:
        print(f"resume with: async-rl train --resume {summary['run_dir']}")


def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    """Print the plan of `cfg` on the cluster the arguments describe; 1 if it does not fit."""
    from async_rl.tools.plan import Cluster, make_plan

    cluster = Cluster(
        args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.bandwidth_gbps, args.delta_share
    )
    plan = make_plan(cfg, cluster)
    print(plan.report())
    return 0 if plan.fits else 1


def cmd_scale(run_dir: Path, actors: int) -> None:
    from async_rl.paths import request_fleet

    paths = RunPaths(run_dir)
    cfg = load_config(paths.config)
    if not cfg.actor.min_actors <= actors <= cfg.actor.max_actors:
        raise ValueError(
            f"--actors {actors} is outside actor.min_actors..actor.max_actors "
            f"({cfg.actor.min_actors}..{cfg.actor.max_actors}) of {run_dir}"
        )
    request_fleet(paths, actors)
    print(f"asked {run_dir} for {actors} actor(s)")


def cmd_buffer_inspect(run_dir: Path) -> None:
    from async_rl.buffer.segments import inspect

    info = inspect(RunPaths(run_dir).buffer)
    print(f"buffer of {run_dir}")
    print(
        f"  groups {info['groups']}  trajectories {info['trajectories']}  "
        f"reward mean {info['reward_mean']:.3f}"
    )
    print(
        f"  trained on {info['trained_groups']}  waiting {info['waiting_groups']}  "
        f"dropped stale {info['dropped_stale']}"
    )
    print(
        f"  segments {info['segments']} closed, {info['open_segments']} open; "
        f"{info['bytes_on_disk'] / 2**20:.2f} MiB on disk"
    )
    print("  groups by policy version:  " + _histogram(info["groups_by_version"]))
    print("  staleness when trained:    " + _histogram(info["staleness_histogram"]))
    lengths = _histogram(info["response_length_histogram"])
    print(f"  completion lengths (from): {lengths}")
    print("  versions per completion:   " + _histogram(info["versions_per_completion"]))


def _histogram(counts: dict[int, int], bins: int = 10) -> str:
    """`key: count` pairs; more than `bins` keys are summed into `bins` equal ranges."""
    if len(counts) > bins:
        low, high = min(counts), max(counts)
        width = -(-(high - low + 1) // bins)  # ceil
        summed: dict[str, int] = {}
        for k, v in sorted(counts.items()):
            start = low + (k - low) // width * width
            label = f"{start}-{min(start + width - 1, high)}"
            summed[label] = summed.get(label, 0) + v
        return "  ".join(f"{k}: {v}" for k, v in summed.items())
    return "  ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


TOOLS = ("buffer", "scale", "keys", "plot", "sweep", "diagnose", "replay")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in TOOLS:
        try:
            _run_tool(args)
        except (ValueError, FileNotFoundError, ConfigError, RuntimeError) as e:
            print(f"async-rl: error: {e}", file=sys.stderr)
            return 2
        return 0
    return _run_configured(args)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from async_rl.tools import diagnose

    paths = RunPaths(args.run_dir)
    if not paths.config.exists():
        raise ValueError(f"{paths.config}: not found; {args.run_dir} is not a run directory")
    cfg = load_config(paths.config, [])
    _setup(cfg)
    if unknown := set(args.replay) - set(diagnose.REPLAYS):
        raise ValueError(f"--replay: {sorted(unknown)} not in {diagnose.REPLAYS}")
    cells = diagnose.diagnose(
        args.run_dir, cfg, args.versions, args.staleness, tuple(args.replay), args.groups
    )
    text = diagnose.table(cells)
    print(text, end="")
    if args.out is not None:
        diagnose.figure(cells, args.out, str(args.run_dir))
        args.out.with_suffix(".md").write_text(text)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def _run_tool(args: argparse.Namespace) -> None:
    if args.command == "sweep":
        from async_rl.tools.sweep import run_sweep

        specs = run_sweep(args.file)
        print(f"sweep done: {len(specs)} runs under {specs[0].run_dir.parent}")
    elif args.command == "plot":
        from async_rl.tools.plots import plot

        figure, table = plot(args.runs, args.out, args.title, args.baseline, args.panels)
        print(f"wrote {figure} and {table}")
        print(table.read_text(), end="")
    elif args.command == "buffer":
        cmd_buffer_inspect(args.run_dir)
    elif args.command == "diagnose":
        cmd_diagnose(args)
    elif args.command == "replay":
        from async_rl.tools.replay import replay

        replay(args.run_dir, args.overrides)
    elif args.command == "keys":
        from async_rl.wire.security import create_keys

        where = create_keys(args.directory)
        print(f"keys written to {where}; set run.curve_keys = {str(where)!r}")
    else:
        cmd_scale(args.run_dir, args.actors)


def _run_configured(args: argparse.Namespace) -> int:
    """train, sft or eval: resolve the config, then run; the exit code."""
    config = args.config
    if getattr(args, "resume", None) is not None:
        config = RunPaths(args.resume).config
        if not config.exists():
            print(f"async-rl: error: {config} not found: nothing to resume", file=sys.stderr)
            return 2
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as e:
        print(f"async-rl: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # the config, and the placement by role as TOML comments
        print(to_toml(cfg), end="")
        print("\n".join(f"# placement: {line}" for line in placement_lines(cfg)))
        return 0
    try:
        if args.command == "train":
            cmd_train(cfg, args.ray_address)
        elif args.command == "sft":
            cmd_sft(cfg)
        elif args.command == "plan":
            return cmd_plan(cfg, args)
        elif args.command == "eval":
            cmd_eval(cfg, args.checkpoint, args.limit)
    except (ValueError, FileNotFoundError) as e:
        print(f"async-rl: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a process of the run failed; the run directory is resumable
        print(f"async-rl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("async-rl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
