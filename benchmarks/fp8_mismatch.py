"""Train-inference mismatch and speed of the embedded engine, per rollout precision.

    python benchmarks/fp8_mismatch.py --checkpoint runs/tiny/checkpoints/sft

For fp32, bf16 and fp8 rollouts of the arithmetic task's prompts, against the learner's model in
fp32 on the engine's own samples:
- `kl`: mean over completion tokens of the full-vocabulary KL(engine || learner), and its max;
- `k1`: mean of log mu - log pi at the sampled tokens (the learner's `train_infer_kl`, T = 1);
- `flipped`: share of (position, layer) pairs whose top-k expert *sets* differ between the
  engine's routing trace and the learner's, over every position the engine ran forward, overall
  and per MoE layer.
Then generation throughput (G completions of each of P prompts, one thread), and the FP8 matmul
kernel the engine uses (emulation) against `torch._scaled_mm` on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import get_args

from async_rl.choices import Quantization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers, as in benchmarks/soak.py


def score(model, hooks, sequences):
    """The learner's logits `[B, T, V]` and routing `[B, T, L, K]` of right-padded sequences."""
    import torch

    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    with torch.no_grad(), hooks.record() as trace:
        logits = model(tokens).double()
    return logits, trace.experts.numpy()


def mismatch(engine, model, hooks, prompts, num_samples, seed):
    import numpy as np
    import torch

    from actors.engine import SamplingParams
    from tests.helpers import generate_with_logits

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=seed)
    groups, logits = generate_with_logits(engine, prompts, params, num_samples)
    flat = [
        (p, g, lg)
        for p, group, group_logits in zip(prompts, groups, logits, strict=True)
        for g, lg in zip(group, group_logits, strict=True)
    ]
    ref_logits, ref_routing = score(model, hooks, [p + g.tokens[:-1] for p, g, _ in flat])
    kls, k1s, same = [], [], []
    for i, (prompt, gen, ours_CV) in enumerate(flat):
        n = len(prompt) + len(gen.tokens) - 1
        p_CV = torch.log_softmax(ours_CV.double(), -1)
        q_CV = torch.log_softmax(ref_logits[i, len(prompt) - 1 : n], -1)
        kls.append((p_CV.exp() * (p_CV - q_CV)).sum(-1))
        picked = torch.tensor(gen.tokens)[:, None]
        k1s.append((p_CV.gather(-1, picked) - q_CV.gather(-1, picked)).squeeze(-1))
        same.append(np.sort(gen.routing, -1) == np.sort(ref_routing[i, :n], -1))
    same_NL = np.concatenate(same).all(-1)  # [positions, L]
    kl = torch.cat(kls)
    return {
        "kl": kl.mean().item(),
        "kl_max": kl.max().item(),
        "k1": torch.cat(k1s).mean().item(),
        "flipped": 1 - same_NL.mean(),
        "per_layer": 1 - same_NL.mean(0),
        "tokens": len(kl),
        "pairs": same_NL.size,
    }


def throughput(engine, prompts, num_samples, repeats):
    from actors.engine import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    engine.generate(prompts, params, num_samples)  # warm-up
    times, tokens = [], 0
    for r in range(repeats):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=r)
        start = time.perf_counter()
        groups = engine.generate(prompts, params, num_samples)
        times.append(time.perf_counter() - start)
        tokens += sum(len(g.tokens) for group in groups for g in group)
    seconds = statistics.median(times)
    return len(prompts) * num_samples / seconds, tokens / repeats / seconds, seconds


def kernels(repeats=200):
    """Emulated W8A8 (dequantize, fp32 matmul) against torch._scaled_mm: time and max diff."""
    import torch

    from actors.embedded_model import Weight, linear

    rows = []
    for m, k, n in [(8, 128, 384), (64, 128, 384), (512, 128, 384), (64, 128, 256)]:
        gen = torch.Generator().manual_seed(0)
        weight, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
        w = Weight(weight, "fp8", torch.device("cpu"))
        x_scale = x.abs().amax(1, keepdim=True) / 448
        x_q = (x / x_scale).to(torch.float8_e4m3fn)
        w_t, w_scale = w.data.T, w.scale.T.contiguous()

        def scaled_mm(x_q=x_q, x_scale=x_scale, w_t=w_t, w_scale=w_scale):
            return torch._scaled_mm(
                x_q, w_t, scale_a=x_scale, scale_b=w_scale, out_dtype=torch.float32
            )

        timings = {}
        for name, fn in (("emulated", lambda x=x, w=w: linear(x, w)), ("_scaled_mm", scaled_mm)):
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            timings[name] = (time.perf_counter() - start) / repeats * 1e6
        diff = (linear(x, w) - scaled_mm()).abs().max().item()
        rows.append((f"{m}x{k} @ {k}x{n}", timings["emulated"], timings["_scaled_mm"], diff))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face Qwen3-MoE directory")
    parser.add_argument("--prompts", type=int, default=64, help="prompts for the mismatch")
    parser.add_argument("--samples", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per precision")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from actors.embedded import EmbeddedEngine
    from async_rl.tasks.arithmetic import ArithmeticTask
    from async_rl.tokenizer import Tokenizer
    from learner.hf import import_hf
    from learner.routing import RoutingHooks

    model, _ = import_hf(args.checkpoint)
    model.eval()
    hooks = RoutingHooks(model)
    tokenizer, task = Tokenizer.from_dir(args.checkpoint), ArithmeticTask(seed=args.seed)
    prompts = [tokenizer.encode_prompt(task.train_problem(i).prompt) for i in range(args.prompts)]
    engines = {q: EmbeddedEngine(args.checkpoint, quantization=q) for q in get_args(Quantization)}

    print(f"checkpoint {args.checkpoint}; learner in fp32; T = 1, top_p = 1, 8 new tokens")
    print(f"mismatch on {args.prompts} prompts x {args.samples} samples (engine's own samples)")
    print(
        f"{'precision':>9} {'kl mean':>10} {'kl max':>9} {'k1 mean':>10} {'flipped':>8}  per layer"
    )
    for name, engine in engines.items():
        m = mismatch(engine, model, hooks, prompts, args.samples, args.seed)
        layers = " ".join(f"{x:.4f}" for x in m["per_layer"])
        print(
            f"{name:>9} {m['kl']:10.2e} {m['kl_max']:9.2e} {m['k1']:10.2e} "
            f"{m['flipped']:8.4f}  {layers}   ({m['tokens']} tokens, {m['pairs']} pairs)"
        )

    print(f"\nthroughput: G = 8 x 8 prompts, 8 new tokens, 1 thread, median of {args.repeats}")
    print(f"{'precision':>9} {'completions/s':>14} {'tokens/s':>10} {'s/call':>8}")
    for name, engine in engines.items():
        completions, tokens, seconds = throughput(engine, prompts[:8], 8, args.repeats)
        print(f"{name:>9} {completions:14.0f} {tokens:10.0f} {seconds:8.4f}")

    print("\nFP8 matmul, microseconds per call: emulated (used; includes quantizing x per token)")
    print("vs torch._scaled_mm (given x already quantized), row-wise scales, on CPU")
    print(f"{'shape':>18} {'emulated':>9} {'_scaled_mm':>11} {'max |diff|':>11}")
    for shape, emulated, scaled, diff in kernels():
        print(f"{shape:>18} {emulated:9.1f} {scaled:11.1f} {diff:11.2e}")


if __name__ == "__main__":
    main()
