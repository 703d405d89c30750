"""Replay-buffer ingest and serve speed against a plain pyarrow IPC write of the same batches.

    python benchmarks/buffer_ingest.py [--groups 64 --group-size 16 --prompt 128 --completion 512
                                        --layers 48 --top-k 8 --experts 128]

Defaults are Qwen3-30B-A3B-shaped traces (48 MoE layers, top-8 of 128 experts). Prints one table:
ingest MB/s and groups/s through the buffer service (a separate process, over ZeroMQ, with
validation and an fsync per commit) and through `pyarrow.ipc` writing the same record batches to
a file (fsynced once at the end), their ratio, and the latency of serving a global batch of
`--serve-completions` completions to the learner. Goal: service ingest >= 0.5x the raw write.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import zmq

ROOT = Path(__file__).resolve().parent.parent
PROFILE = os.environ.get("BENCH_PROFILE", "").split()
sys.path.insert(0, str(ROOT))

from async_rl.config import load_config, to_toml  # noqa: E402
from async_rl.types import RoutingSpec, Trajectory, group_to_batch  # noqa: E402
from async_rl.wire.clients import ZmqBatchSource, ZmqRolloutSink  # noqa: E402
from async_rl.wire.messages import Group, encode, table_to_ipc  # noqa: E402
from async_rl.wire.transport import send  # noqa: E402


def make_groups(args, spec: RoutingSpec, prefix: str) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(args.groups):
        prompt = rng.integers(0, 150_000, args.prompt).tolist()
        rows = []
        for i in range(args.group_size):
            n = int(rng.integers(args.completion // 2, args.completion + 1))
            rows.append(
                Trajectory(
                    sample_id=f"{prefix}{g}-{i}",
                    group_id=f"{prefix}{g}",
                    prompt_id=f"p{g}",
                    actor_id="bench",
                    engine="embedded",
                    policy_version=0,
                    policy_version_max=0,
                    prompt_tokens=prompt,
                    completion_tokens=rng.integers(0, 150_000, n).tolist(),
                    behavior_logprobs=(-rng.random(n)).tolist(),
                    token_versions=[0] * n,
                    routing=rng.integers(
                        0, spec.num_experts, (args.prompt + n - 1, spec.num_layers, spec.top_k)
                    ),
                    reward=float(rng.integers(0, 2)),
                    finish_reason="stop",
                    temperature=1.0,
                    top_p=1.0,
                    quantization="fp8",
                )
            )
        groups.append(group_to_batch(rows, spec))
    return groups


def raw_write(groups: list[pa.RecordBatch], path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, groups[0].schema) as writer:
            for b in groups:
                writer.write_batch(b)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--serve-completions", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    spec = RoutingSpec(args.layers, args.top_k, args.experts)
    batch_groups = args.serve_completions // args.group_size
    tmp = Path(tempfile.mkdtemp(prefix="buffer-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp}",
            "run.name=bench",
            "model.vocab_size=151936",
            f"model.num_layers={args.layers}",
            f"model.top_k={args.top_k}",
            f"model.num_experts={args.experts}",
            "model.max_seq_len=4096",
            f"algo.group_size={args.group_size}",
            f"algo.prompts_per_minibatch={batch_groups}",
            "buffer.max_staleness=1000",
        ],
    )
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.toml").write_text(to_toml(cfg))

    groups = make_groups(args, spec, "g")
    mb = sum(table_to_ipc(b).size for b in groups) / 1e6
    proc = subprocess.Popen(
        [sys.executable, *PROFILE, "-m", "async_rl.buffer.service", str(cfg.run_dir)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    raw, service, serve = [], [], []
    try:
        ctx = zmq.Context()
        client, source = ZmqRolloutSink(cfg.run_dir, ctx=ctx), ZmqBatchSource(cfg.run_dir, ctx=ctx)
        client.stats()  # connected and serving
        for rep in range(args.repeats):  # alternate, flushing the page cache between runs
            os.sync()
            raw.append(raw_write(groups, tmp / f"raw{rep}.arrows"))
            payloads = [encode(Group(), table_to_ipc(relabel(b, rep))) for b in groups]
            os.sync()
            start = time.perf_counter()
            for frames in payloads:
                send(client.push_socket, frames)
            while client.stats()["buffer/ingested"] < (rep + 1) * len(payloads):
                time.sleep(0.002)
            service.append(time.perf_counter() - start)
        for v in range(args.repeats * args.groups // batch_groups):
            t = time.perf_counter()
            table, _ = source.sample(v, wait_s=5)
            serve.append(time.perf_counter() - t)
            assert table is not None and table.num_rows == batch_groups * args.group_size
        client.close()
        source.close()
    finally:
        proc.terminate()
        proc.wait(30)

    print(
        f"{args.groups} groups x {args.group_size} completions, prompt {args.prompt}, "
        f"completion <= {args.completion} tokens, routing [T, {args.layers}, {args.top_k}]: "
        f"{mb:.1f} MB of Arrow IPC per run; median of {args.repeats} alternating runs"
    )
    raw_s, service_s = float(np.median(raw)), float(np.median(service))
    print(f"{'path':<40}{'MB/s':>8}{'groups/s':>10}")
    for name, secs in (
        ("pyarrow IPC stream write + fsync", raw_s),
        ("buffer service: zmq, validate, fsync", service_s),
    ):
        print(f"{name:<40}{mb / secs:>8.1f}{args.groups / secs:>10.1f}")
    print(f"ratio service / raw: {raw_s / service_s:.2f}  (goal >= 0.5)")
    print(
        f"serve a {batch_groups * args.group_size}-completion global batch to the learner: "
        f"median {np.median(serve) * 1000:.0f} ms, best {min(serve) * 1000:.0f} ms "
        f"({len(serve)} requests)"
    )


def relabel(batch: pa.RecordBatch, rep: int) -> pa.RecordBatch:
    """The same group under fresh ids (the buffer refuses a group id twice)."""
    columns = dict(zip(batch.schema.names, batch.columns, strict=True))
    for name in ("sample_id", "group_id"):
        columns[name] = pa.array([f"r{rep}-{x}" for x in columns[name].to_pylist()])
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=batch.schema)


if __name__ == "__main__":
    main()
