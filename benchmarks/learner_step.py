"""Learner step speed: `TrainStep` against a bare optimizer step, routing replay, weight publishing.

    python benchmarks/learner_step.py [--checkpoint DIR] [--prompts 8 --group-size 8
                                       --new-tokens 8 --rounds 30 --profile-steps 20]
                                      [--parts steps precision vocab]

One global batch of FP8 engine rollouts (the embedded engine, routing traces included) of the
arithmetic task's prompts (about 7 tokens) on the tiny model (`ModelConfig()`, fp32, one thread):
a freshly initialised model by default, whose completions mostly run the full `--new-tokens`;
`--checkpoint` uses a trained one instead (its completions are shorter). Rewards alternate 0/1
within a group so that every advantage is nonzero. Every variant gets its own copy of the
weights and its own AdamW; the variants are timed in rotating order, `--rounds` times each, after
one warm-up call; the table reports median times (CPU time of the single-threaded process for
the training steps, so that other processes on a shared machine do not count; wall-clock time
for publishing, which waits on the disk) and the median of the per-round ratios:

- `bare`: forward, -(1/B) sum A log pi over completion tokens, backward, AdamW step;
- `TrainStep none / r2 / r3`: the learner's global step, N = 1, MiniRL loss;
  goals: none <= 1.15 x bare; r2, r3 <= 1.05 x none (the R3 paper reports 3.45%); with the
  staleness autopilot's drift sample (one group's no-grad forward after the update, against
  mini-batch 1's own forward before it, `buffer.autopilot`) <= 1.10 x none;
- ranks: the large batch below trained by one process and by `--ranks` gloo ranks with FSDP2,
  by the wall clock (on this 2-core machine the ranks share the cores: reported, no goal);
- micro-batches: a global batch of `--micro-copies` copies of the rows in one forward, and in
  micro-batches of `learner.max_tokens_per_microbatch = --microbatch-tokens` positions (equal
  tokens), goal <= 1.10 x one shot; and with full activation checkpointing on top (a second
  forward per block in the backward: reported). A forward of the tiny model has a fixed cost
  of about 15 ms on this CPU, so small budgets pay for it many times over;
- `publish + announce`: `hf_state_dict` + `FsWeightStore.publish` (fsynced, manifest last) +
  `WeightAnnouncer.announce`, also with the actor's `fetch`, against `save_file` + `load_file`
  of the same tensors;
- precision (`--parts precision`): the same TrainStep with fp32 weights, with bf16 compute over
  fp32 masters (FSDP2 mixed precision over one process) and in pure bf16: CPU time, and the
  share of parameter entries one update at lr 1e-6 changes (goal: mixed >= 90%, as fp32);
- vocabulary (`--parts vocab`): log-probs of `--vocab-positions` positions over Qwen3's
  151,936 tokens (`--vocab-dim`), forward and backward, all at once (`token_logprobs` of the
  output layer's logits) against `learner.logprob_chunk` positions at a time
  (`VocabChunks`), each in a fresh process: CPU time and peak memory (the process's peak
  resident set during the call, over what it held before), goals: chunked <= 1.2x the time
  and <= 1/4 the peak memory.
A variant that misses its goal is profiled (cProfile, `--profile-steps` calls, top functions by
internal time).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from async_rl.choices import Dtype, RoutingReplay

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from actors.embedded import EmbeddedEngine  # noqa: E402
from actors.engine import SamplingParams  # noqa: E402
from async_rl.config import Config, ModelConfig, load_config  # noqa: E402
from async_rl.tasks.arithmetic import ArithmeticTask  # noqa: E402
from async_rl.tokenizer import Tokenizer  # noqa: E402
from async_rl.types import RoutingSpec, Trajectory, group_to_batch  # noqa: E402
from async_rl.weights import FsWeightStore, WeightAnnouncer  # noqa: E402
from learner.batch import PackedBatch, pack  # noqa: E402
from learner.hf import export_hf, hf_state_dict, import_hf  # noqa: E402
from learner.loss import MiniRL  # noqa: E402
from learner.model import (  # noqa: E402
    apply_activation_checkpointing,
    build_model,
    entropy,
    token_logprobs,
)
from learner.optim import build_optimizer  # noqa: E402
from learner.train import TrainStep  # noqa: E402

CFG = ModelConfig()


def rollouts(checkpoint: Path, num_prompts: int, group_size: int, new_tokens: int) -> PackedBatch:
    """A packed global batch of FP8 rollouts with routing traces (see the module docstring)."""
    tok, task = Tokenizer.arithmetic(), ArithmeticTask(seed=0)
    engine = EmbeddedEngine(checkpoint, quantization="fp8")
    prompts = [tok.encode_prompt(task.train_problem(i).prompt) for i in range(num_prompts)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=0)
    spec = RoutingSpec.of(CFG)
    batches = []
    groups = engine.generate(prompts, params, group_size)
    for p, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        rows = [
            Trajectory(
                sample_id=f"p{p}-{i}",
                group_id=f"p{p}",
                prompt_id=f"p{p}",
                actor_id="a0",
                engine="embedded",
                policy_version=0,
                policy_version_max=0,
                prompt_tokens=prompt,
                completion_tokens=gen.tokens,
                behavior_logprobs=gen.logprobs,
                token_versions=gen.versions,
                routing=gen.routing,
                reward=float(i % 2),  # nonzero advantages in every group
                finish_reason=gen.finish_reason,
                temperature=1.0,
                top_p=1.0,
                quantization="fp8",
            )
            for i, gen in enumerate(group)
        ]
        batches.append(group_to_batch(rows, spec))
    return pack(pa.Table.from_batches(batches), spec, tok.pad_id)


def tiled(batch: PackedBatch, copies: int) -> PackedBatch:
    """`copies` copies of a batch's rows, one after the other (whole groups stay whole)."""
    return PackedBatch(
        **{
            f.name: None
            if getattr(batch, f.name) is None
            else getattr(batch, f.name).repeat(copies, *[1] * (getattr(batch, f.name).dim() - 1))
            for f in dataclasses.fields(batch)
        }
    )


def bare_step(model: torch.nn.Module, cfg: Config) -> Callable[[PackedBatch], None]:
    """Forward, -(1/B) sum A log pi, backward, AdamW: the floor a training step cannot beat."""
    optimizer = build_optimizer(model, cfg.learner)

    def step(batch: PackedBatch) -> None:
        advantages_B = MiniRL(cfg.algo).advantages(batch.rewards_B)
        logp_BT = token_logprobs(model(batch.inputs_BT), batch.targets_BT)
        loss = -(advantages_B[:, None] * logp_BT * batch.mask_BT).sum() / batch.num_rows
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return step


@torch.no_grad()
def prox_pass(model: torch.nn.Module, batch: PackedBatch) -> None:
    """What `TrainStep` adds to a bare step at N = 1: a no-grad forward, log-probs, entropy."""
    logits_BTV = model.eval()(batch.inputs_BT)
    token_logprobs(logits_BTV, batch.targets_BT)
    entropy(logits_BTV)[batch.mask_BT].mean().item()


def train_step(
    model: torch.nn.Module,
    group_size: int,
    replay: str,
    microbatch: int = 0,
    ac: str = "none",
    drift: bool = False,
) -> TrainStep:
    """The learner's global step as `learner.run.Learner` builds it, N = 1; `microbatch`
    positions per forward (0: one forward), activation checkpointing `ac`, and with `drift`
    the staleness autopilot's drift sample (`buffer.autopilot`)."""
    overrides = [f"algo.group_size={group_size}", f"algo.routing_replay={replay}"]
    overrides += [f"learner.max_tokens_per_microbatch={microbatch}"]
    overrides += [f"buffer.autopilot={str(drift).lower()}"]
    cfg = load_config(None, [*overrides, "run.num_steps=10000"])
    apply_activation_checkpointing(model, ac)
    return TrainStep(model, build_optimizer(model, cfg.learner), cfg)


def publishers(model: torch.nn.Module, store: FsWeightStore, announcer: WeightAnnouncer, root):
    """`publish + announce`, `... + fetch` and the plain safetensors round trip, as callables."""
    plain = root / "plain.safetensors"
    versions = iter(range(1, 1_000_000))

    def publish() -> int:
        version = next(versions)
        store.publish(version, hf_state_dict(model, CFG))
        announcer.announce(version)
        return version

    def publish_fetch() -> None:
        store.fetch(publish())

    def save_load() -> None:
        save_file(hf_state_dict(model, CFG), plain, metadata={"format": "pt"})
        load_file(plain)

    return {"publish": publish, "publish_fetch": publish_fetch, "save_load": save_load}


def time_rounds(
    variants: dict[str, Callable[[], object]], rounds: int, clock=time.perf_counter, between=None
) -> dict[str, list[float]]:
    """Seconds of every call of each variant: one warm-up, then `rounds` rotations of the order
    (the variants of a round run back to back, under about the same machine load)."""
    names = list(variants)
    for name in names:
        variants[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            variants[name]()
            times[name].append(clock() - start)
            if between is not None:
                between()
    return times


def profile(fn: Callable[[], object], calls: int, sort: str, restrict: tuple = ()) -> str:
    """cProfile of `calls` calls of `fn`, sorted by `sort`, restricted as `pstats` does."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(*restrict)
    text = out.getvalue()
    text = text[text.index("ncalls") :] if "ncalls" in text else text
    return "\n".join(line.replace(str(ROOT) + "/", "") for line in text.splitlines() if line)


# What a training step spends its time on, by cumulative time (a regex on pstats lines).
STEP_PARTS = (
    r"train.py|learner_step.py.*step|decoder.py.*forward|run_backward|optimizer.py.*wrapper"
    r"|clip_grad_norm_|minirl_loss|learner/model.py.*(policy_logprobs|forward|backward)"
    r"|routing.py",
)


PARTS = ("steps", "precision", "vocab")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="HF checkpoint (default: a fresh model)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the global batch")
    parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=8, help="longest completion")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per variant")
    parser.add_argument(
        "--microbatch-tokens", type=int, default=2048, help="learner.max_tokens_per_microbatch"
    )
    parser.add_argument(
        "--micro-copies", type=int, default=8, help="the micro-batch case's batch, in copies"
    )
    parser.add_argument("--profile-steps", type=int, default=20, help="calls per profile")
    parser.add_argument("--ranks", type=int, default=2, help="learner ranks to compare (1: skip)")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure"
    )
    parser.add_argument("--vocab-positions", type=int, default=4096, help="vocab part: positions")
    parser.add_argument("--vocab-dim", type=int, default=256, help="vocab part: hidden size")
    parser.add_argument(
        "--vocab-dtypes", nargs="+", default=list(get_args(Dtype)), help="vocab part: dtypes"
    )
    parser.add_argument("--vocab-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.vocab_worker:
        print(json.dumps(vocab_worker(*args.vocab_worker, args)))
        return
    with tempfile.TemporaryDirectory(prefix="learner_step.") as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint or export_hf(
            build_model(CFG, seed=0), CFG, Tokenizer.arithmetic(), root / "start"
        )
        batch = rollouts(checkpoint, args.prompts, args.group_size, args.new_tokens)
        tokens = int(batch.mask_BT.sum())
        print(
            f"tiny model (ModelConfig()), fp32, 1 thread; {args.prompts} prompts x G = "
            f"{args.group_size}: batch [B, T] = {list(batch.inputs_BT.shape)}, "
            f"{tokens} completion tokens ({tokens / batch.num_rows:.1f} per row), "
            f"{args.rounds} rounds"
        )
        if "steps" in args.parts:
            steps_report(batch, checkpoint, root, args)
        if "precision" in args.parts:
            print(precision_report(batch, checkpoint, args))
    if "vocab" in args.parts:
        print(vocab_report(args))


def steps_report(batch: PackedBatch, checkpoint: Path, root: Path, args) -> None:
    """The training-step, micro-batch, publishing and ranks tables (module docstring)."""
    cfg = load_config(None, [f"algo.group_size={args.group_size}"])

    def fresh() -> torch.nn.Module:
        return import_hf(checkpoint, CFG)[0]

    steps = {"bare": bare_step(fresh(), cfg)}
    for replay in get_args(RoutingReplay):
        steps[f"TrainStep {replay}"] = train_step(fresh(), args.group_size, replay)
    steps["drift"] = train_step(fresh(), args.group_size, "none", drift=True)
    calls = {name: functools.partial(fn, batch) for name, fn in steps.items()}
    # micro-batches: one global batch `--micro-copies` times as large, in one forward
    # and in micro-batches of `--microbatch-tokens` positions
    micro, large = args.microbatch_tokens, tiled(batch, args.micro_copies)
    for name, budget, ac in (("one shot", 0, "none"), ("micro", micro, "none")) + (
        ("micro ac", micro, "full"),
    ):
        step = train_step(fresh(), args.group_size, "none", budget, ac)
        calls[name] = functools.partial(step, large)
    calls["prox"] = functools.partial(prox_pass, fresh(), batch)
    # CPU time of this (single-threaded) process: what other processes on a shared machine
    # take is not counted. Publishing waits on the disk, so it is timed by the wall clock.
    step_s = time_rounds(calls, args.rounds, clock=time.process_time)

    ctx = zmq.Context()
    store = FsWeightStore(root / "weights", template=checkpoint, keep=2)
    announcer = WeightAnnouncer(ctx, "127.0.0.1")
    pub = publishers(fresh(), store, announcer, root)
    pub_s = time_rounds(pub, args.rounds, between=lambda: store.collect(set()))

    rows = [  # label, variant, baseline, goal
        ("bare fwd + bwd + AdamW", "bare", "bare", None),
        ("  no-grad forward + entropy alone", "prox", "bare", None),
        ("TrainStep N=1 none", "TrainStep none", "bare", 1.15),
        ("TrainStep N=1 r2", "TrainStep r2", "TrainStep none", 1.05),
        ("TrainStep N=1 r3", "TrainStep r3", "TrainStep none", 1.05),
        ("  + the autopilot's drift sample", "drift", "TrainStep none", 1.10),
        (f"TrainStep N=1 none x{args.micro_copies} rows", "one shot", "one shot", None),
        (f"  in micro-batches of {micro} positions", "micro", "one shot", 1.10),
        ("  ... + full activation ckpt", "micro ac", "micro", None),
        ("save_file + load_file", "save_load", "save_load", None),
        ("hf_state_dict + publish + announce", "publish", "save_load", None),
        ("  ... + fetch (the actor's load)", "publish_fetch", "save_load", None),
    ]
    times = {**step_s, **pub_s}
    print(f"\n{'variant':<36} {'median ms':>10} {'ratio':>7}  {'against':<16} goal")
    print("training steps: CPU time; publishing: wall-clock time")
    missed = []
    for label, name, against, goal in rows:
        # The median of per-round ratios: robust to load that drifts over the run.
        pairs = zip(times[name], times[against], strict=True)
        ratio = statistics.median(a / b for a, b in pairs)
        verdict = ""
        if goal is not None:
            verdict = f"<= {goal:.2f}  {'met' if ratio <= goal else 'MISSED'}"
            if ratio > goal:
                missed.append(name)
        ms = statistics.median(times[name]) * 1e3
        print(f"{label:<36} {ms:>10.2f} {ratio:>7.3f}  {against:<16} {verdict}")

    seconds = {name: statistics.median(t) for name, t in times.items()}
    rest = (seconds["TrainStep none"] - seconds["prox"]) / seconds["bare"]
    print(f"(TrainStep N=1 none - the no-grad forward alone) / bare = {rest:.3f}")
    for name in ["bare"] + missed if missed else []:
        print(f"\ncProfile of {name} ({args.profile_steps} calls), by cumulative time:")
        print(profile(calls[name], args.profile_steps, "cumulative", STEP_PARTS))
    print(f"\ncProfile of publish + announce ({args.profile_steps} calls), by internal time:")
    print(profile(pub["publish"], args.profile_steps, "tottime", (10,)))
    announcer.close()
    ctx.term()
    if args.ranks > 1:
        print(ranks_report(large, checkpoint, args))


def _rank_worker(rank: int, world: int, port: int, batch, checkpoint, args, out) -> None:
    """One learner rank: FSDP2 over `world` gloo ranks, `args.rounds` timed global steps."""
    from learner.parallel import apply_fsdp, join_group, shutdown

    torch.set_num_threads(1)
    dp = join_group(rank, world, "127.0.0.1", port, 120)
    model = apply_fsdp(import_hf(checkpoint, CFG)[0], dp)
    overrides = [f"algo.group_size={args.group_size}", "run.num_steps=10000"]
    cfg = load_config(None, [*overrides, f"learner.num_ranks={world}"])
    step = TrainStep(model, build_optimizer(model, cfg.learner), cfg, dp=dp)
    step(batch)  # warm-up
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    if dp.is_main:
        out.put(times)
    shutdown()


def ranks_report(batch: PackedBatch, checkpoint: Path, args) -> str:
    """The same global batch trained by one process and by `--ranks` gloo ranks (FSDP2), by
    the wall clock: the ranks share this machine's cores."""
    import socket

    import torch.multiprocessing as mp

    results = {}
    for world in (1, args.ranks):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        if world == 1:
            _rank_worker(0, 1, 0, batch, checkpoint, args, queue)
        else:
            mp.start_processes(
                _rank_worker,
                args=(world, port, batch, checkpoint, args, queue),
                nprocs=world,
                start_method="spawn",
                join=False,
            ).join()
        results[world] = statistics.median(queue.get())
    one, many = results[1], results[args.ranks]
    return (
        f"\nTrainStep N=1 none x{args.micro_copies} rows, wall clock: 1 process "
        f"{one * 1e3:.0f} ms, {args.ranks} ranks (FSDP2, gloo) {many * 1e3:.0f} ms: "
        f"{many / one:.2f}x ({os.cpu_count()} cores shared by the ranks)"
    )


PRECISIONS = {  # label: "model.dtype/learner.master_dtype"
    "fp32": "float32/float32",
    "bf16 compute, fp32 masters": "bfloat16/float32",
    "pure bf16": "bfloat16/bfloat16",
}


def precision_report(batch: PackedBatch, checkpoint: Path, args) -> str:
    """TrainStep in fp32, mixed precision and pure bf16: CPU time and the share of parameter
    entries one update at lr 1e-6 changes."""
    from learner.model import DTYPES
    from learner.parallel import DataParallel, apply_fsdp, shutdown

    steps, changed = {}, {}
    try:
        for label, (dtype, master) in ((k, v.split("/")) for k, v in PRECISIONS.items()):
            overrides = [f"model.dtype={dtype}", f"learner.master_dtype={master}"]
            overrides += [f"algo.group_size={args.group_size}", "learner.lr=1e-6"]
            cfg = load_config(None, [*overrides, "run.num_steps=10000"])
            model = import_hf(checkpoint, cfg.model, dtype=DTYPES[master])[0]
            apply_fsdp(model, DataParallel(), compute_dtype=DTYPES[dtype])
            step = TrainStep(model, build_optimizer(model, cfg.learner), cfg)
            before = _masters(model)
            step(batch)
            after = _masters(model)
            changed[label] = sum(int((after[k] != before[k]).sum()) for k in after) / sum(
                v.numel() for v in after.values()
            )
            steps[label] = functools.partial(step, batch)
        times = time_rounds(steps, args.rounds, clock=time.process_time)
    finally:
        shutdown()  # the one-process group of mixed precision
    lines = [
        "\nprecision: TrainStep N=1 none, the tiny model, lr 1e-6, CPU time",
        f"{'variant':<30} {'median ms':>10} {'x fp32':>7} {'entries changed by 1 update':>28}",
    ]
    for label, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times["fp32"], strict=True))
        goal = "  goal >= 90%: " + ("met" if changed[label] >= 0.9 else "MISSED")
        lines.append(
            f"{label:<30} {statistics.median(t) * 1e3:>10.2f} {ratio:>7.2f} "
            f"{changed[label]:>27.2%}" + (goal if "masters" in label else "")
        )
    return "\n".join(lines)


def _masters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    whole = lambda p: p.full_tensor() if isinstance(p, DTensor) else p  # noqa: E731
    return {n: whole(p).detach().clone() for n, p in model.named_parameters()}


def vocab_worker(variant: str, dtype: str, args) -> dict[str, float]:
    """In a fresh process: log-probs of the sampled token over 151,936 tokens, forward and
    backward, `variant` = full or chunked; CPU time of the second call and the peak resident
    set over what the process held before the first."""
    import torch.nn.functional as F

    from learner.model import DTYPES, VocabChunks

    vocab, n, d = 151_936, args.vocab_positions, args.vocab_dim
    chunk = load_config(None, []).learner.logprob_chunk
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).to(DTYPES[dtype]).requires_grad_()
    w = (0.05 * torch.randn(vocab, d, generator=gen)).to(DTYPES[dtype]).requires_grad_()
    targets, upstream = torch.randint(0, vocab, (n,), generator=gen), torch.randn(n, generator=gen)

    def call():
        h.grad = w.grad = None
        if variant == "full":
            logp = token_logprobs(F.linear(h, w), targets)
        else:
            logp, _, _ = VocabChunks.apply(h, w, targets, 1.0, chunk, False, False)
        (logp * upstream).sum().backward()

    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    call()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held
    start = time.process_time()
    call()
    return {"seconds": time.process_time() - start, "peak": peak, "chunk": chunk}


def vocab_report(args) -> str:
    """Full against chunked log-probs over the vocabulary, each in its own process."""
    lines = [
        f"\nvocabulary: log-probs of {args.vocab_positions} positions over 151,936 tokens "
        f"(hidden size {args.vocab_dim}), forward + backward, CPU time, one process each",
        f"{'variant':<34} {'seconds':>8} {'peak GiB':>9} {'time x':>7} {'memory x':>9}  goals",
    ]
    for dtype in args.vocab_dtypes:
        got = {}
        for variant in ("full", "chunked"):
            command = [sys.executable, __file__, "--vocab-worker", variant, dtype]
            command += ["--vocab-positions", str(args.vocab_positions)]
            command += ["--vocab-dim", str(args.vocab_dim)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            got[variant] = json.loads(out.strip().splitlines()[-1])
        full, chunked = got["full"], got["chunked"]
        time_x, memory_x = chunked["seconds"] / full["seconds"], chunked["peak"] / full["peak"]
        verdict = (
            f"<= 1.2x {'met' if time_x <= 1.2 else 'MISSED'}, "
            f"<= 0.25x {'met' if memory_x <= 0.25 else 'MISSED'}"
        )
        for variant, r in got.items():
            label = f"{dtype} {variant}" + (
                f" ({r['chunk']} positions)" if variant != "full" else ""
            )
            ratios = f"{time_x:>7.2f} {memory_x:>9.3f}  {verdict}" if variant != "full" else ""
            lines.append(f"{label:<34} {r['seconds']:>8.2f} {r['peak'] / 2**30:>9.2f} {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
