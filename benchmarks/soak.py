"""Soak: the CPU default training for a bounded time while actors are killed, added and removed.

    python benchmarks/soak.py [--minutes 30] [--interval 120] [--sample 5] [--start CHECKPOINT]
                              [key=value ...]     e.g. weights.store=collective

Drives `async-rl train` (a subprocess; configs/tiny.toml with `run.eval_every=0` and two
actors, up to three) from a random-init start checkpoint unless `--start` names one. Every
`--interval` seconds it SIGKILLs a random actor, and half an interval later asks for a new fleet
size with `async-rl scale RUN --actors N`. Every `--sample` seconds it reads the resident memory
of every process of the run from /proc (the driver and everything below it: the buffer, learner
and actors named by `control/pids/`, Ray's own processes by name). At the end (Ctrl-C to end
early) it stops the run like Ctrl-C and prints: steps done, groups stored, trained and dropped
stale, groups lost (reported stored by the buffer but missing from disk, or trained but missing:
must be 0), the other invariants of `tests/faults.audit`, the longest stall (the longest time
between two consecutive learner steps, as seen by polling metrics.jsonl every second), the
faults injected, the unplanned deaths (what the driver replaced or restarted that the soak did
not kill: an actor whose loop failed, a process hung past the heartbeat, a learner restart), and
a table of each process's peak RSS per time window with its growth from the first to the last
window. It exits 1 when a group was lost, an invariant broke or anything died unplanned.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

from async_rl.config import ModelConfig, load_config  # noqa: E402
from async_rl.types import RoutingSpec  # noqa: E402
from tests import faults, helpers  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def processes(root_pid: int, run_dir: Path) -> dict[int, str]:
    """pid -> name of `root_pid` and all its descendants."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    named = {}
    for path in (run_dir / "control" / "pids").glob("*.pid"):
        try:
            named[int(path.read_text())] = path.stem
        except ValueError:
            continue
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found[pid] = "driver" if pid == root_pid else named.get(pid) or _label(pid, comm)
        todo += children.get(pid, [])
    return found


def _label(pid: int, comm: str) -> str:
    """A name for a process without a pid file: a worker not yet started, or Ray's own."""
    for prefix, name in (("ray::Actor", "actor starting"), ("ray::Learner", "learner starting")):
        if comm.startswith(prefix):
            return name
    if comm.startswith("ray::Buffer"):
        return "buffer starting"
    if comm.startswith("python"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[1:]
            script = [a for a in argv if a and not a.startswith("-")]
            return Path(script[0]).name if script else comm
        except (FileNotFoundError, ProcessLookupError, UnicodeDecodeError):
            return comm
    return comm


def rss_mib(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def memory_table(samples: list[tuple[float, str, float]], minutes: float, windows: int) -> str:
    width = minutes * 60 / windows
    peak: dict[str, list[float | None]] = defaultdict(lambda: [None] * windows)
    for t, name, mib in samples:
        w = min(int(t / width), windows - 1)
        peak[name][w] = max(peak[name][w] or 0.0, mib)
    head = f"{'process':<16}" + "".join(f"{(w + 1) * width / 60:>7.1f}m" for w in range(windows))
    lines = ["peak RSS (MiB) per window, by end of window", head + "   growth"]
    for name in sorted(peak, key=lambda n: (n[0] != "d", n)):
        row = peak[name]
        cells = "".join(f"{'-':>8}" if v is None else f"{v:>8.0f}" for v in row)
        seen = [v for v in row if v is not None]
        growth = f"{100 * (seen[-1] / seen[0] - 1):+6.1f}%" if len(seen) > 1 else "      -"
        lines.append(f"{name:<16}{cells}  {growth}")
    return "\n".join(lines)


# What the driver prints when it replaces or restarts a process that the soak did not kill (an
# injected SIGKILL is a crash that Ray restarts without a word).
UNPLANNED = (": replacing it", ": restarting the learner", "did not answer for")


def unplanned_deaths(log_text: str) -> list[str]:
    return [line.strip() for line in log_text.splitlines() if any(u in line for u in UNPLANNED)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=120.0, help="seconds between kills")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--windows", type=int, default=10, help="columns of the memory table")
    parser.add_argument("--start", type=Path, default=None, help="start checkpoint (HF dir)")
    parser.add_argument("--out", type=Path, default=None, help="where the run goes (temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides of the run (key=value)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    start = args.start
    if start is None:
        from async_rl.tokenizer import Tokenizer
        from learner.hf import export_hf
        from learner.model import build_model

        start = export_hf(
            build_model(ModelConfig(), 0), ModelConfig(), Tokenizer.arithmetic(), out / "start"
        )
    settings = [
        f"run.output_dir={out}",
        "run.name=soak",
        f"run.init_checkpoint={start}",
        "run.num_steps=1000000",
        "run.eval_every=0",
        "actor.num_actors=2",
        "actor.max_actors=3",
        "logging.progress=false",
        *args.overrides,
    ]
    cfg = load_config(None, settings)
    run_dir, log = cfg.run_dir, out / "soak.log"
    rng = random.Random(args.seed)
    proc = helpers.launch(log, *settings)
    print(f"soak: {args.minutes:g} min, run {run_dir}, log {log}", flush=True)
    began = time.monotonic()
    samples, seen_at, injected = [], {}, []
    next_sample = next_kill = began
    next_scale, fleet = began + args.interval / 2, cfg.actor.num_actors
    next_kill += args.interval
    try:
        while time.monotonic() - began < args.minutes * 60 and proc.poll() is None:
            now = time.monotonic()
            for v in helpers.versions(run_dir):
                seen_at.setdefault(v, now - began)
            if now >= next_sample:
                for pid, name in processes(proc.pid, run_dir).items():
                    if (mib := rss_mib(pid)) is not None:
                        samples.append((now - began, name, mib))
                next_sample += args.sample
            if now >= next_kill:
                ours = processes(proc.pid, run_dir)  # the run's processes, by pid
                live = [(n, pid) for pid, n in ours.items() if n[:1] == "a" and n[1:].isdigit()]
                if live:
                    name, pid = rng.choice(sorted(live))
                    os.kill(pid, signal.SIGKILL)
                    injected.append(f"{now - began:6.0f}s  SIGKILL {name} (pid {pid})")
                next_kill += args.interval
            if now >= next_scale:
                fleet = rng.choice([n for n in range(1, cfg.actor.max_actors + 1) if n != fleet])
                scale = [sys.executable, "-m", "async_rl.cli", "scale", str(run_dir)]
                subprocess.run(
                    [*scale, "--actors", str(fleet)],
                    env=helpers.ENV,
                    check=True,
                    capture_output=True,
                )
                injected.append(f"{now - began:6.0f}s  scale to {fleet} actor(s)")
                next_scale += args.interval
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        elapsed = time.monotonic() - began
        code = helpers.stop(proc)
    report = faults.audit(
        run_dir, RoutingSpec.of(cfg.model), cfg.algo.group_size, cfg.buffer.max_staleness
    )
    times = [seen_at[v] for v in sorted(seen_at)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    text = log.read_text()
    print(f"\nsoak of {elapsed / 60:.1f} min; driver exit code {code}")
    print(f"steps done                 {report['steps']}")
    print(f"groups stored (on disk)    {report['groups_on_disk']}")
    print(f"groups trained             {report['trained_groups']}")
    print(f"groups dropped stale       {report['dropped_stale']}")
    print(f"groups lost                {report['groups_lost']}")
    print(f"staleness when trained     {report['staleness_histogram']}")
    print(
        f"longest stall              {max(gaps, default=0):.1f}s "
        f"(first step at {times[0] if times else float('nan'):.0f}s)"
    )
    print(f"actors seen                {', '.join(report['actors'])}")
    print(f"faults injected            {len(injected)}")
    for line in injected:
        print("   " + line)
    unplanned = unplanned_deaths(text)
    print(f"unplanned deaths           {len(unplanned)}")
    for line in unplanned[:20]:
        print("   " + line)
    print("invariants                 " + ("all hold" if not report["problems"] else ""))
    for problem in report["problems"][:20]:
        print("   BROKEN: " + problem)
    print()
    print(memory_table(samples, elapsed / 60, args.windows))
    record = {"report": report, "injected": injected, "unplanned": unplanned}
    (out / "soak.json").write_text(json.dumps(record, indent=1))
    return 0 if not report["problems"] and report["groups_lost"] == 0 and not unplanned else 1


if __name__ == "__main__":
    sys.exit(main())
