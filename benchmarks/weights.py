"""Weights to actors: publish-to-all-actors-loaded time through `fs`, `ray` and `collective`.

    python benchmarks/weights.py [--actors 2] [--synthetic-gib 1.0] [--rounds 3]
    python benchmarks/weights.py --deltas [--versions 12]     whole versions against deltas

Two states: the tiny model's (`ModelConfig()`, Hugging Face names) and a synthetic one of
`--synthetic-gib` GiB (bf16 tensors of 64 MiB). The actors are Ray actors (one process each);
for every store and round the driver publishes a new version while each actor waits for it and
loads it whole into its memory (`fs`: `load_file` of the version's safetensors; `ray`: the
store's `fetch`; `collective`: the tensors its receiver staged), looking for it every 10 ms
(an actor looks once per generation step; looking much more often takes the cores the
transfer needs on a small machine). The time is from the call to `publish` to the last actor
holding the version. Next to it: a bare `broadcast` of the same
bytes (one uint8 tensor) from the driver to the same actors over a gloo group of the same
processes, the floor of any collective path (goal: collective <= 1.3 x bare). Medians over
`--rounds`; the first round of each store is a warm-up and is not counted.

Last, what the collective sender's copy of the last version (`WeightSender.last`, kept for late
joiners) costs rank 0 while the learner gathers the next version: the resident memory it holds,
kept (as before `forget`) and let go (`Publisher.before_gather`, now).

`--deltas` (no Ray, one process): for the rehearsal config (the paper's shapes, 48 M
parameters, bf16 versions of fp32 masters) at lr 1e-6 and 3e-5, and the tiny model at its
own lr (its versions are fp32), AdamW steps (random gradients: Adam's step is about lr per
entry whatever they are) make `--versions` versions; each is published whole, and as
`weights.deltas = send` does (a delta, whole too every 10th; whole alone where the delta
would not halve the bytes), to an `fs` store and through the `collective` path (its receiver a
thread of this process), and an FP8 embedded engine follows each of the four
(`VersionFollower.load`). Printed: the changed share, the bytes per version (stored; sent
through the group), and the publish-to-loaded time, medians, whole against delta.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import get_args

from async_rl.choices import DurableStoreKind

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from async_rl.paths import RunPaths, publish_endpoints  # noqa: E402
from async_rl.weights import FsWeightStore, RayWeightStore  # noqa: E402
from async_rl.weights.collective import (  # noqa: E402
    CollectiveWeightStore,
    WeightReceiver,
    WeightSender,
)

MIB = 2**20
MODES = ("off", "send")  # `weights.deltas`: whole versions, deltas
POLL_S = 0.01  # how often a reader looks for the version (an actor looks once per step)


class Reader:
    """One actor's side, in a Ray actor: waits for a version of a store and loads it."""

    def __init__(self, name: str, run_dir: str):
        torch.set_num_threads(1)
        self.name, self.run_dir, self.stores = name, run_dir, {}

    def open(self, kind: str, ray_name: str = "") -> None:
        from async_rl.weights.collective import WeightReceiver

        weights = RunPaths(self.run_dir).weights
        if kind == "fs":
            self.stores[kind] = FsWeightStore(weights)
        elif kind == "ray":
            self.stores[kind] = RayWeightStore(ray_name)
        else:
            receiver = WeightReceiver(self.run_dir, self.name, 60.0)
            durable = FsWeightStore(Path(self.run_dir) / "durable")
            self.stores[kind] = CollectiveWeightStore(durable, 10**9, None, receiver)

    def load(self, kind: str, version: int) -> float:
        """Wait for `version`, load it whole; the wall-clock time it was held."""
        store = self.stores[kind]
        while (store.latest() or -1) < version:
            time.sleep(POLL_S)
        with store.reading(version) as source:  # tensors by name, whichever the store
            tensors = dict(source)
        assert tensors
        return time.time()

    def join_bare(self, address: str, rank: int, size: int) -> None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
        self.bare = dist.ProcessGroupGloo(
            dist.PrefixStore("bare/", store), rank, size, timedelta(seconds=60)
        )
        self.bare_store = store

    def recv_bare(self, nbytes: int) -> float:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.bare.broadcast([buffer], opts).wait()
        return time.time()


def tiny_state() -> dict[str, torch.Tensor]:
    from async_rl.config import ModelConfig
    from learner.hf import hf_state_dict
    from learner.model import build_model

    return hf_state_dict(build_model(ModelConfig(), seed=0), ModelConfig())


def synthetic_state(gib: float) -> dict[str, torch.Tensor]:
    n = max(int(gib * 1024 / 64), 1)
    return {f"layer.{i}.weight": torch.ones(32 * MIB, dtype=torch.bfloat16) for i in range(n)}


def timed(readers, kind: str, version: int, publish) -> float:
    pending = [r.load.remote(kind, version) for r in readers]
    time.sleep(0.2)  # every reader is waiting
    began = time.time()
    publish()
    return max(ray.get(pending)) - began


def measure(state, readers, stores, rounds: int, version: int) -> tuple[dict, int]:
    results = {}
    for kind, store in stores.items():
        times = []
        for _ in range(rounds + 1):
            version += 1
            publish = functools.partial(store.publish, version, state)
            times.append(timed(readers, kind, version, publish))
            store.collect(set())  # the older versions go (disk, object store)
        results[kind] = statistics.median(times[1:])
    return results, version


def bare_broadcast(state, readers, group, rounds: int) -> float:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    times = []
    for _ in range(rounds + 1):
        pending = [r.recv_bare.remote(nbytes) for r in readers]
        time.sleep(0.2)
        began = time.time()
        group.broadcast([buffer], opts).wait()
        times.append(max(ray.get(pending)) - began)
    return statistics.median(times[1:])


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sender_copy(gib: float, bucket_bytes: int) -> tuple[int, int]:
    """Resident bytes rank 0 holds for the last version sent while it gathers the next: kept by
    the sender, then after `forget` (module docstring)."""
    sender = WeightSender("127.0.0.1", 60.0, bucket_bytes)
    try:
        base = resident_bytes()
        sender.send(1, synthetic_state(gib))  # the learner drops its reference after publish
        kept = resident_bytes() - base
        sender.forget()
        return kept, resident_bytes() - base
    finally:
        sender.close()


def delta_versions(config: str, lr: float | None, versions: int):
    """(measures of the whole store, of the delta store, changed shares): module docstring."""
    from actors.embedded import EmbeddedEngine
    from actors.versions import VersionFollower
    from async_rl.config import load_config
    from async_rl.tokenizer import Tokenizer
    from async_rl.weights.delta import DeltaMeter, worth_sending
    from learner.hf import export_hf, hf_state_dict
    from learner.model import build_model

    cfg = load_config(ROOT / config, [] if lr is None else [f"learner.lr={lr}"])
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = build_model(cfg.model, seed=0, dtype=torch.float32)
    root = Path(tempfile.mkdtemp(prefix="delta-bench-"))
    start = export_hf(model, cfg.model, Tokenizer.arithmetic(), root / "start")
    masters = {k: v.float().requires_grad_() for k, v in hf_state_dict(model, cfg.model).items()}
    opt = torch.optim.AdamW(masters.values(), lr=cfg.learner.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ways = {f"{kind} {mode}": (kind, mode) for kind in ("fs", "collective") for mode in MODES}
    out = {way: {"mib": [], "s": []} for way in ways}
    meter, shares, closing = DeltaMeter(), [], []
    for way, (kind, mode) in ways.items():
        follower_cfg = load_config(None, [f"weights.deltas={mode}"])
        store = reader = FsWeightStore(root / way, template=start, keep=3)
        if kind == "collective":  # the actor's receiver a thread of this process
            run_dir = root / way.replace(" ", "-")
            store = CollectiveWeightStore(reader, 10**9, WeightSender("127.0.0.1", 60.0, 2**28))
            publish_endpoints(RunPaths(run_dir), "learner", store.endpoints())
            reader = CollectiveWeightStore(reader, 10**9, None, WeightReceiver(run_dir, "a", 60))
            closing += [store, reader]
        engine = EmbeddedEngine(start, "fp8", keep_host=mode == "send")
        ways[way] = (store, reader, engine, VersionFollower(follower_cfg, reader, None))
    for v in range(versions):
        state = {k: m.detach().to(dtype, copy=True) for k, m in masters.items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        meter.measure(v, state)
        shares += [meter.delta.share] if meter.delta is not None else []
        for way, (store, reader, engine, follower) in ways.items():
            send = way.endswith("send")
            delta = meter.delta if send else None
            if delta is not None and not worth_sending(delta, nbytes):  # as `Publisher`
                delta = None
            whole = delta is None or v % 10 == 0
            mark = meter.fingerprint if send else None
            began = time.perf_counter()
            store.publish(v, state, delta=delta, fingerprint=mark, whole=whole)
            while staged(reader) != v:  # the collective receiver staging it
                time.sleep(0.001)
            follower.load(engine, v)
            if v > 0:  # version 0 is every engine's start
                out[way]["s"].append(time.perf_counter() - began)
                out[way]["mib"].append(moved_bytes(root / way, reader, v) / MIB)
            store.collect({v})
        for m in masters.values():
            m.grad = torch.randn(m.shape, generator=gen)
        opt.step()
    for store in closing:
        store.close()
    return out, shares


def staged(reader) -> int | None:
    """The newest version a reader holds: received (`collective`), stored (`fs`)."""
    if isinstance(reader, CollectiveWeightStore):
        return reader.receiver.newest()
    return reader.latest()


def moved_bytes(root: Path, reader, version: int) -> int:
    """Bytes a version took: its files (`fs`), what the group sent (`collective`)."""
    if isinstance(reader, CollectiveWeightStore):
        whole, delta = reader.sizes(version)
        return delta if delta is not None else whole
    return sum(f.stat().st_size for f in (root / f"v{version:06d}").iterdir())


def delta_main(versions: int) -> int:
    print(f"whole versions against deltas, {versions} versions each, medians per version")
    columns = ("changed", 9), ("MiB whole", 11), ("MiB delta", 11), ("s whole", 9)
    print(
        f"{'model, lr':<28}{'store':<12}"
        + "".join(f"{c:>{w}}" for c, w in columns)
        + "  s delta  speedup"
    )
    for config, lr, label in (
        ("configs/qwen3_30b_a3b_rehearsal.toml", 1e-6, "rehearsal (bf16), lr 1e-6"),
        ("configs/qwen3_30b_a3b_rehearsal.toml", 3e-5, "rehearsal (bf16), lr 3e-5"),
        ("configs/tiny.toml", None, "tiny (fp32), its lr 1e-4"),
    ):
        out, shares = delta_versions(config, lr, versions)
        med = {w: {k: statistics.median(v) for k, v in out[w].items()} for w in out}
        for kind in ("fs", "collective"):
            whole, delta = med[f"{kind} off"], med[f"{kind} send"]
            print(
                f"{label:<28}{kind:<12}{statistics.median(shares):>8.2%}{whole['mib']:>11.2f}"
                f"{delta['mib']:>11.2f}{whole['s']:>9.3f}{delta['s']:>9.3f}"
                f"{whole['s'] / delta['s']:>8.2f}x"
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--synthetic-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=256)
    parser.add_argument("--deltas", action="store_true", help="whole versions against deltas")
    parser.add_argument("--versions", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.deltas:
        return delta_main(args.versions)
    ray.init(
        address="local",
        num_cpus=args.actors + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        object_store_memory=int((4 * args.synthetic_gib + 1) * 2**30),
    )
    run_dir = Path(tempfile.mkdtemp(prefix="weights-bench-"))
    paths = RunPaths(run_dir)
    sender = WeightSender("127.0.0.1", 60.0, args.bucket_mib * MIB)
    publish_endpoints(paths, "learner", {"weights_store": sender.address})
    stores = {
        "fs": FsWeightStore(paths.weights, keep=1),
        "ray": RayWeightStore("bench-weights", keep=1, create=True),
        "collective": CollectiveWeightStore(
            FsWeightStore(run_dir / "durable", keep=1), 10**9, sender
        ),
    }
    readers = [
        ray.remote(num_cpus=1)(Reader).remote(f"a{i}", str(run_dir)) for i in range(args.actors)
    ]
    ray.get([r.open.remote(kind, "bench-weights") for r in readers for kind in stores])
    bare_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    address = f"127.0.0.1:{bare_store.port}"
    size = args.actors + 1
    joins = [r.join_bare.remote(address, i + 1, size) for i, r in enumerate(readers)]
    group = dist.ProcessGroupGloo(
        dist.PrefixStore("bare/", bare_store), 0, size, timedelta(seconds=60)
    )
    ray.get(joins)
    version = 0
    deadline = time.monotonic() + 120
    while stores["collective"].publish(0, tiny_state()) or sender.members != sorted(
        f"a{i}" for i in range(args.actors)
    ):  # every reader in the weights group before timing
        assert time.monotonic() < deadline, "the readers never joined the weights group"
        time.sleep(0.5)
    print(f"{args.actors} actor process(es), medians of {args.rounds} rounds (after a warm-up)")
    head = f"{'state':<28}{'fs':>9}{'ray':>9}{'collective':>12}{'bare bcast':>12}"
    print(head + f"{'coll/bare':>11}")
    for label, state in (
        ("tiny model", tiny_state()),
        (f"synthetic {args.synthetic_gib:g} GiB", synthetic_state(args.synthetic_gib)),
    ):
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        results, version = measure(state, readers, stores, args.rounds, version)
        bare = bare_broadcast(state, readers, group, args.rounds)
        ratio = results["collective"] / bare
        cells = "".join(f"{results[k]:>8.3f}s" for k in get_args(DurableStoreKind))
        print(
            f"{label + f' ({nbytes / MIB:.0f} MiB)':<28}{cells}{results['collective']:>11.3f}s"
            f"{bare:>11.3f}s{ratio:>10.2f}x"
        )
    print("goal: collective <= 1.3 x bare broadcast")
    kept, forgotten = sender_copy(args.synthetic_gib, args.bucket_mib * MIB)
    print(
        f"rank 0 while gathering the next version: the sender's copy of the last one holds "
        f"{kept / MIB:.0f} MiB kept, {forgotten / MIB:.0f} MiB after forget"
    )
    for store in stores.values():
        store.close()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
