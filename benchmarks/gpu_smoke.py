"""The device checks in one short run: what a session lent a GPU runs first.

    python benchmarks/gpu_smoke.py --device cuda
    python benchmarks/gpu_smoke.py --device cpu

On the tiny model (`ModelConfig()`, a random init exported to a temporary checkpoint), each
check prints one row (what, result, seconds); a check that fails prints its error and the
others still run; the exit code is 1 if any failed.

- `embedded <precision>`: the embedded engine on the device generates 8 prompts x 8 samples
  of up to 32 tokens: tokens/s, and the mean |log mu - log pi| of its behaviour log-probs
  against the learner's fp32 model (FP8: the train-inference mismatch; fp32: ~1e-7);
- `embedded in-flight`: a weights swap between two decode steps of running rows, on the
  device: the share of completions that span two versions;
- `vllm <precision>`: the same with vLLM where it is installed (FP8 with routing traces on
  CUDA, bf16/fp32 on CPU), then a reload from tensors and an in-flight swap;
- `learner step`: one `TrainStep` (R3, one mini-batch) of the golden batch
  (`tests/data/golden_batch.arrow`) on the device in fp32 with SDPA, its loss, gradient norm
  and time; on CUDA next to the same step on the CPU (they agree to float tolerance), and a
  bf16 step with flex attention (`learner.device = cuda`, `model.attn_backend = flex`), bf16
  computing over fp32 masters as the learner does (FSDP2 mixed precision over one process);
- `vocab log-probs`: the output layer's log-probs over 151,936 tokens all at once against in
  chunks (`learner.model.VocabChunks`): their time ratio, their difference, and on CUDA the
  peak memory of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.build import build_engine  # noqa: E402
from actors.engine import GroupRequest, SamplingParams  # noqa: E402
from async_rl.config import ActorConfig, ModelConfig, load_config  # noqa: E402
from async_rl.tokenizer import Tokenizer  # noqa: E402
from learner.hf import export_hf, hf_state_dict, import_hf  # noqa: E402
from learner.model import build_model  # noqa: E402

PROMPTS = [[2, 4 + i, 14, 5 + i, 17] for i in range(8)]
PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, seed=0)


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


def train_step(device: str, dtype: str = "float32", attention: str = "sdpa") -> dict:
    """The metrics of one `TrainStep` of the golden batch, the model built on `device` as the
    learner builds it: fp32 masters computing in `dtype` (FSDP2 mixed precision over one
    process when that is bf16)."""
    import dataclasses

    import pyarrow as pa

    from async_rl.types import RoutingSpec
    from learner.batch import pack
    from learner.model import DTYPES
    from learner.optim import build_optimizer
    from learner.parallel import DataParallel, apply_fsdp, shutdown
    from learner.train import TrainStep
    from tests.test_golden import BATCH, config

    cfg = config("r3", 1)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=dtype, attn_backend=attention),
        learner=dataclasses.replace(cfg.learner, device=device),
    )
    batch = pack(pa.ipc.open_file(str(BATCH)).read_all(), RoutingSpec.of(cfg.model), pad_id=0)
    model = build_model(cfg.model, seed=0, device=device, dtype=torch.float32)
    try:
        apply_fsdp(model, DataParallel(device_type=device), compute_dtype=DTYPES[dtype])
        return TrainStep(model, build_optimizer(model, cfg.learner), cfg)(batch)
    finally:
        shutdown()  # the one-process group of mixed precision, if it made one


def learner_step(device: str) -> str:
    cpu = train_step("cpu")
    ms = lambda m: f"{m['step_time_s'] * 1000:.0f} ms"  # noqa: E731
    if device == "cpu":
        return f"loss {cpu['loss']:.5f}, grad norm {cpu['grad_norm']:.4f}, {ms(cpu)}"
    gpu, flex = train_step(device), train_step(device, "bfloat16", "flex")
    return (
        f"fp32 loss {gpu['loss']:.5f} (cpu {cpu['loss']:.5f}), grad norm "
        f"{gpu['grad_norm']:.4f} (cpu {cpu['grad_norm']:.4f}), {ms(gpu)}; bf16 + flex loss "
        f"{flex['loss']:.4f}, grad norm {flex['grad_norm']:.4f}, {ms(flex)}"
    )


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
        if device == "cuda":
            torch.cuda.synchronize()
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
        if device == "cuda":
            torch.cuda.synchronize()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    load_config(None, [f"actor.device={args.device}"])  # the configuration accepts the device
    tmp = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    path = export_hf(build_model(ModelConfig(), seed=0), ModelConfig(), Tokenizer.arithmetic(), tmp)
    model, _ = import_hf(path, ModelConfig())
    checks = [(f"embedded {p}", generation, "embedded", p) for p in ("fp8", "bf16", "fp32")]
    checks.append(("embedded in-flight", in_flight, "embedded", "fp32"))
    try:
        import vllm  # noqa: F401

        precisions = ("fp8", "bf16") if args.device == "cuda" else ("bf16", "fp32")
        checks += [(f"vllm {p}", generation, "vllm", p) for p in precisions]
        checks.append(("vllm in-flight", in_flight, "vllm", precisions[-1]))
    except ImportError:
        print("vllm: not installed here; its checks are skipped")
    failed = 0
    print(f"{'check':<22}{'seconds':>8}  result")
    for name, fn, engine, precision in checks:
        began = time.monotonic()
        try:
            result = fn(engine, precision, args.device, path, model)
        except Exception as e:  # every check reports; one failure does not stop the others
            failed += 1
            result = f"FAILED: {type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{name:<22}{time.monotonic() - began:>8.1f}  {result}", flush=True)
    for name, fn in (("learner step", learner_step), ("vocab log-probs", vocab_logprobs)):
        began = time.monotonic()
        try:
            result = fn(args.device)
        except Exception as e:
            failed += 1
            result = f"FAILED: {type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{name:<22}{time.monotonic() - began:>8.1f}  {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
