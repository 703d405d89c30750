"""The device checks in one short run: what a session lent a GPU runs first.

    python benchmarks/gpu_smoke.py --device cuda   # the lent machine: benchmarks/device_check.sh
    python benchmarks/gpu_smoke.py --device cpu    # here: every row must pass

Each check prints one row (what, seconds, result) and stands alone: one that fails prints its
error and the others still run; the exit code is 1 if any failed. `--only NAME ...` runs some.

- `env`: Python, torch, CUDA device, torchtitan, and whether torchtitan needed the torch 2.11
  shim (`_torch_compat`);
- `embedded <precision>`: the embedded engine on the device generates 8 prompts x 8 samples
  of up to 32 tokens from the tiny model (a random init): tokens/s, and the mean |log mu -
  log pi| of its behaviour log-probs against the learner's fp32 model (FP8: the
  train-inference mismatch; fp32: ~1e-7);
- `embedded in-flight`: a weights swap between two decode steps of running rows: the share of
  completions that span two versions;
- `vllm <precision>`, `vllm in-flight`: the same with vLLM where it is installed (never on the
  lent machine: see README, "On GPUs");
- `learner fp32`: one `TrainStep` (R3, one mini-batch) of the golden batch
  (`tests/data/golden_batch.arrow`) on the device in fp32 with SDPA, next to the same step on
  the CPU from the same initial weights: loss and gradient norm of both, and their relative
  differences;
- `learner bf16`: the same step as the learner runs it at scale: bf16 forward and backward
  over fp32 masters (FSDP2 mixed precision over one process), on CUDA with flex attention and
  its mask (SDPA on the CPU: flex has no CPU backward); its loss and gradient norm against the
  fp32 CPU step's, and the first step's time (flex's compilation) against the second's;
- `vocab log-probs`: the output layer's log-probs over 151,936 tokens all at once against in
  chunks (`learner.model.VocabChunks`): their time ratio, their difference, and on CUDA the
  peak memory of each;
- `30B layers`: two layers at Qwen3-30B-A3B's widths (hidden 2,048, 32 query and 4 key/value
  heads of 128, 128 experts of 768, top-8, 151,936 tokens) in bf16 with flex attention, a
  forward and backward of the chunked log-probs of one 32,768-token row (on the CPU: 512
  tokens): the peak memory above the weights against `async-rl plan`'s activation estimate;
- `end to end`: a run in this process (buffer service, learner, one actor, in threads): a short
  cold start, then 3 versions with the learner in bf16 over fp32 masters and an FP8 embedded
  actor, both on the device, continuous batching with in-flight weight swaps: versions, swaps
  (and those under running rows), completions spanning two versions, the train-inference KL
  of the first step (version 0's samples: the FP8 mismatch alone, no staleness) and the
  learner's step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import get_args

import torch

from async_rl.choices import Device, Quantization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [[2, 4 + i, 14, 5 + i, 17] for i in range(8)]


def _torch_compat() -> str:
    """torchtitan 0.3.0 imports `DataParallelMeshDims` from `torch.distributed.fsdp`, which
    torch 2.13 added; the lent GPU machine has torch 2.11, where torchtitan fails to import on
    that name alone. The project pins torch 2.13; here, and only here, a placeholder stands in:
    torchtitan uses the name in signatures and passes one only for meshes the learner never
    builds (checked on a CPU with torch 2.11: the model, FSDP2 mixed precision, `TrainStep`,
    the chunked log-probs and an in-process run)."""
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims"):
        return "none needed"
    fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})
    return "DataParallelMeshDims placeholder"


SHIM = _torch_compat()

from actors.build import build_engine  # noqa: E402
from actors.engine import GroupRequest, SamplingParams  # noqa: E402
from async_rl.config import ActorConfig, ModelConfig, load_config  # noqa: E402
from async_rl.tokenizer import Tokenizer  # noqa: E402
from learner.hf import export_hf, hf_state_dict, import_hf  # noqa: E402
from learner.model import build_model  # noqa: E402

PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=0)


def environment(device: str) -> str:
    from importlib.metadata import version

    import torchtitan  # noqa: F401

    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, {gpu}, "
        f"torchtitan {version('torchtitan')}, shim: {SHIM}"
    )


# ---------------------------------------------------------------------- engines
def mismatch(model, groups) -> float:
    errors = []
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for g in group:
            seq = torch.tensor([prompt + g.tokens[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq)[0, len(prompt) - 1 :].double(), -1)
            ref = logp.gather(-1, torch.tensor(g.tokens)[:, None])[:, 0]
            errors.append((torch.tensor(g.logprobs, dtype=torch.float64) - ref).abs())
    return float(torch.cat(errors).mean())


def generation(engine_name: str, precision: str, device: str, path: Path, model) -> str:
    actor = ActorConfig(engine=engine_name, device=device, quantization=precision)
    engine = build_engine(actor, path)
    try:
        began = time.monotonic()
        groups = engine.generate(PROMPTS, PARAMS, 8)
        seconds = time.monotonic() - began
        tokens = sum(len(g.tokens) for group in groups for g in group)
        routing = groups[0][0].routing is not None
        error = mismatch(model, groups)
        text = f"{tokens / seconds:,.0f} tokens/s, mean |log mu - log pi| {error:.2e}"
        return text + (", routing traces" if routing else "")
    finally:
        engine.close()


def in_flight(engine_name: str, precision: str, device: str, path: Path, model) -> str:
    actor = ActorConfig(engine=engine_name, device=device, quantization=precision)
    engine = build_engine(actor, path)
    try:
        other = {k: v * 1.01 for k, v in hf_state_dict(model, ModelConfig()).items()}
        engine.submit(GroupRequest("g", PROMPTS[0], 8, PARAMS))
        done = engine.step() + engine.step()
        engine.load_weights(other, engine.version + 1)
        while engine.num_running:
            done += engine.step()
        ((_, group),) = done
        spanning = sum(len(set(g.versions)) > 1 for g in group)
        return f"{spanning}/{len(group)} completions span two versions"
    finally:
        engine.close()


# ---------------------------------------------------------------------- learner
_CPU_STEP: dict = {}


def train_step(device: str, dtype: str = "float32", attention: str = "sdpa") -> dict:
    """The metrics of one `TrainStep` of the golden batch, as the learner runs it: fp32
    masters computing in `dtype` (FSDP2 mixed precision over one process when that is bf16),
    the model initialised on the CPU (seed 0, the same weights on every device) and moved."""
    import pyarrow as pa

    from async_rl.types import RoutingSpec
    from learner.batch import pack
    from learner.model import DTYPES
    from learner.optim import build_optimizer
    from learner.parallel import DataParallel, apply_fsdp, shutdown
    from learner.train import TrainStep
    from tests.unit.test_golden import BATCH, config

    cfg = config("r3", 1)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=dtype, attn_backend=attention),
        learner=dataclasses.replace(cfg.learner, device=device),
    )
    batch = pack(pa.ipc.open_file(str(BATCH)).read_all(), RoutingSpec.of(cfg.model), pad_id=0)
    model = build_model(cfg.model, seed=0, dtype=torch.float32).to(device)
    try:
        apply_fsdp(model, DataParallel(device_type=device), compute_dtype=DTYPES[dtype])
        step = TrainStep(model, build_optimizer(model, cfg.learner), cfg)
        first = step(batch)
        began = time.perf_counter()
        second = step(batch)  # a second step: warm kernels (flex compiled by the first)
        _sync(device)
        return {
            **first,
            "first_s": first["step_time_s"],
            "warm_s": time.perf_counter() - began,
            "second_loss": second["loss"],
        }
    finally:
        shutdown()  # the one-process group of mixed precision, if it made one


def cpu_step() -> dict:
    if not _CPU_STEP:
        _CPU_STEP.update(train_step("cpu"))
    return _CPU_STEP


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def learner_fp32(device: str) -> str:
    ref = cpu_step()
    if device == "cpu":
        return f"loss {ref['loss']:.5f}, grad norm {ref['grad_norm']:.4f}, {ref['warm_s']:.2f} s"
    got = train_step(device)
    return (
        f"loss {got['loss']:.5f} (cpu {ref['loss']:.5f}, rel diff "
        f"{_rel(got['loss'], ref['loss']):.1e}), grad norm {got['grad_norm']:.4f} (cpu "
        f"{ref['grad_norm']:.4f}, rel diff {_rel(got['grad_norm'], ref['grad_norm']):.1e}), "
        f"{got['warm_s'] * 1000:.0f} ms warm"
    )


def learner_bf16(device: str) -> str:
    attention = "flex" if device == "cuda" else "sdpa"  # flex has no CPU backward
    ref, got = cpu_step(), train_step(device, "bfloat16", attention)
    return (
        f"{attention}: loss {got['loss']:.4f} (fp32 cpu {ref['loss']:.4f}, rel diff "
        f"{_rel(got['loss'], ref['loss']):.1e}), grad norm {got['grad_norm']:.4f} "
        f"(fp32 {ref['grad_norm']:.4f}); first step {got['first_s']:.2f} s, second "
        f"{got['warm_s'] * 1000:.0f} ms"
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def vocab_logprobs(device: str) -> str:
    """Log-probs of the sampled token over Qwen3's 151,936 tokens, forward and backward, all
    positions at once against `learner.logprob_chunk` at a time: time and peak memory (on
    CUDA the allocator's peak over what was held before; 4,096 positions of hidden size 2,048
    in bf16 there, a small case on the CPU)."""
    import torch.nn.functional as F

    from learner.model import VocabChunks, token_logprobs

    vocab, chunk = 151_936, load_config(None, []).learner.logprob_chunk
    n, d = (4096, 2048) if device == "cuda" else (256, 64)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (0.02 * torch.randn(vocab, d, generator=gen)).to(device, torch.bfloat16)
    w.requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    results = {}
    for name in ("full", "chunked"):
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        began = time.perf_counter()
        if name == "full":
            logp = token_logprobs(F.linear(h, w), targets)
        else:
            logp, _, _ = VocabChunks.apply(h, w, targets, 1.0, chunk, True, False)
        logp.sum().backward()
        grads = (h.grad.float(), w.grad.float())
        h.grad = w.grad = None
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - held if device == "cuda" else 0
        results[name] = (time.perf_counter() - began, peak, logp.detach().float(), grads)
    (t_full, m_full, lp_full, g_full), (t_chunk, m_chunk, lp_chunk, g_chunk) = results.values()
    error = max((a - b).abs().max().item() for a, b in zip(g_full, g_chunk, strict=True))
    text = (
        f"{n} positions x {vocab} (D {d}, bf16): chunked {t_chunk / t_full:.2f}x the time, "
        f"max |d log p| {(lp_full - lp_chunk).abs().max().item():.1e}, max |d grad| {error:.1e}"
    )
    if device == "cuda":
        text += f", peak {m_chunk / 2**30:.2f} vs {m_full / 2**30:.2f} GiB"
    return text


def layers_30b(device: str) -> str:
    """Peak memory of a forward and backward of two Qwen3-30B-A3B-wide layers on one row."""
    from async_rl.tools.plan import activation_bytes
    from learner.model import policy_logprobs

    tokens = 32_768 if device == "cuda" else 512
    cfg = ModelConfig(
        vocab_size=151_936, dim=2048, num_layers=2, num_heads=32, num_kv_heads=4, head_dim=128,
        moe_hidden_dim=768, num_experts=128, top_k=8, max_seq_len=tokens, dtype="bfloat16",
        attn_backend="flex" if device == "cuda" else "sdpa",
    )  # fmt: skip
    chunk = load_config(None, []).learner.logprob_chunk
    model = build_model(cfg, seed=0, device=device)
    gen = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, cfg.vocab_size, (1, tokens + 1), generator=gen).to(device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    began = time.perf_counter()
    logp, _, _ = policy_logprobs(model, tokens_BT[:, :-1], tokens_BT[:, 1:], chunk=chunk)
    logp.sum().backward()
    _sync(device)
    seconds = time.perf_counter() - began
    estimate = activation_bytes(cfg, tokens, "none", chunk)
    text = f"{tokens:,} tokens, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params"
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - held
        text += f": peak {peak / 2**30:.2f} GiB above the weights (gradients included)"
    return text + f", plan's activations {estimate / 2**30:.2f} GiB, {seconds:.1f} s"


# ---------------------------------------------------------------------- a run
def end_to_end(device: str) -> str:
    """A short cold start on the CPU, then 3 RL versions on `device` in this process."""
    from async_rl.tasks import task_from_config
    from learner.sft import run_sft
    from tests.helpers import pipeline_config, stored_groups, train_in_threads

    tmp = Path(tempfile.mkdtemp(prefix="gpu-smoke-run-"))
    cold = pipeline_config(tmp, "sft", "logging.wandb_mode=disabled")
    start = run_sft(
        cold, Tokenizer.arithmetic(), task_from_config(cold), tmp / "sft", log=lambda *_: None
    )
    cfg = pipeline_config(
        tmp, "e2e", "run.num_steps=3", "logging.wandb_mode=disabled",
        f"learner.device={device}", f"actor.device={device}", "actor.quantization=fp8",
        "actor.batching=continuous", "actor.weight_update=in_flight", "actor.max_new_tokens=8",
        "buffer.max_staleness=1", "algo.routing_replay=r3",
        *(["model.dtype=bfloat16"] if device == "cuda" else []),
    )  # fmt: skip
    rows, _, actor = train_in_threads(cfg, start)
    groups = stored_groups(cfg.run_dir)
    spanning = sum(len(set(v)) > 1 for b in groups for v in b.column("token_versions").to_pylist())
    completions = sum(b.num_rows for b in groups)
    step = sum(r["learner/step_time_s"] for r in rows) / len(rows)
    swaps = f"{actor.stats.weight_swaps} swaps ({actor.stats.swaps_in_flight} in flight)"
    return (
        f"versions {[r['version'] for r in rows]}, {swaps}, {spanning}/{completions} "
        f"completions span two versions, train-infer KL k3 at v0 "
        f"{rows[0]['learner/train_infer_kl_k3']:.1e}, step {step * 1000:.0f} ms "
        f"({cfg.model.dtype} over fp32 masters)"
    )


# ---------------------------------------------------------------------- the table
def checks(device: str, path: Path, model) -> list[tuple[str, object]]:
    """(name, a function of no arguments) for every row."""
    rows = [("env", lambda: environment(device))]
    for p in get_args(Quantization):
        rows.append((f"embedded {p}", lambda p=p: generation("embedded", p, device, path, model)))
    rows.append(("embedded in-flight", lambda: in_flight("embedded", "fp32", device, path, model)))
    try:
        import vllm  # noqa: F401

        precisions = ("fp8", "bf16") if device == "cuda" else ("bf16", "fp32")
        for p in precisions:
            rows.append((f"vllm {p}", lambda p=p: generation("vllm", p, device, path, model)))
        last = precisions[-1]
        rows.append(("vllm in-flight", lambda: in_flight("vllm", last, device, path, model)))
    except ImportError:
        rows.append(("vllm", lambda: "skipped: not installed here"))
    for name, fn in (
        ("learner fp32", learner_fp32),
        ("learner bf16", learner_bf16),
        ("vocab log-probs", vocab_logprobs),
        ("30B layers", layers_30b),
        ("end to end", end_to_end),
    ):
        rows.append((name, lambda fn=fn: fn(device)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=get_args(Device), default="cuda")
    parser.add_argument("--only", nargs="*", help="run only the rows whose names start so")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    load_config(None, [f"actor.device={args.device}"])  # the configuration accepts the device
    tmp = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    path = export_hf(build_model(ModelConfig(), seed=0), ModelConfig(), Tokenizer.arithmetic(), tmp)
    model, _ = import_hf(path, ModelConfig())
    failed = 0
    print(f"{'check':<20}{'seconds':>8}  result", flush=True)
    for name, fn in checks(args.device, path, model):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        began = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # every check reports; one failure does not stop the others
            failed += 1
            result = f"FAILED: {type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{name:<20}{time.monotonic() - began:>8.1f}  {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
