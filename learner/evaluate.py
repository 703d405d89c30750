"""Held-out accuracy of a policy: greedy and avg@k (the mean reward over k samples per prompt).

    evaluate(generate, tokenizer, task, k=4, temperature=1.0)   any way of generating
    evaluate_run(model, tokenizer, task, cfg)                   the learner's model itself

`generate(prompts, temperature, repeats)` returns `repeats` completions (token ids) of each
prompt. An inference engine with a KV cache is the fast way (`actors.engine.engine_generate`;
`async-rl train` and `async-rl eval` evaluate that way); the learner's model can also sample for
itself (`sample()`, `model_generate`), without an engine: batched autoregressive sampling that
recomputes the whole sequence at every step instead of keeping a KV cache, exact and simple,
and fast enough for prompts of about 10 tokens and completions of a few. Sequences are
right-padded: row i is `prompt_i + generated_i` followed by padding, so with a causal mask every
real token sees exactly its own prefix, whatever the other rows' lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from async_rl.config import Config
from async_rl.tasks import Task
from async_rl.tokenizer import Tokenizer

# (prompts, temperature, repeats) -> per prompt, `repeats` completions of token ids
Generate = Callable[[list[list[int]], float, int], list[list[list[int]]]]


@dataclass
class EvalResult:
    greedy: float  # share of held-out prompts answered exactly by greedy decoding
    avg_at_k: float  # mean reward over k sampled completions per prompt
    k: int
    num_prompts: int


def evaluate(
    generate: Generate,
    tokenizer: Tokenizer,
    task: Task,
    *,
    k: int,
    temperature: float,
    batch_size: int = 256,
    limit: int | None = None,
) -> EvalResult:
    """Greedy accuracy and avg@k on the task's held-out set (or its first `limit` problems)."""
    problems = task.heldout()[:limit]
    greedy_hits, sampled_hits = 0.0, 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [tokenizer.encode_prompt(p.prompt) for p in chunk]
        for temp, repeats in ((0.0, 1), (temperature, k)):
            completions = generate(prompts, temp, repeats)
            hits = sum(
                task.reward(problem, tokenizer.decode_completion(c))
                for problem, group in zip(chunk, completions, strict=True)
                for c in group
            )
            if temp == 0.0:
                greedy_hits += hits
            else:
                sampled_hits += hits / k
    n = max(len(problems), 1)
    return EvalResult(greedy_hits / n, sampled_hits / n, k, len(problems))


def model_generate(
    model: torch.nn.Module, tokenizer: Tokenizer, max_new_tokens: int, seed: int
) -> Generate:
    """The learner's model sampling for itself, one random stream for all the calls."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device

    def logits(tokens_BT: torch.Tensor) -> torch.Tensor:  # on the CPU, whatever the model's
        return model(tokens_BT.to(device)).cpu()

    def generate(prompts: list[list[int]], temperature: float, repeats: int):
        out = sample(
            logits,
            [p for p in prompts for _ in range(repeats)],
            max_new_tokens=max_new_tokens,
            stop_ids=tokenizer.stop_ids,
            pad_id=tokenizer.pad_id,
            temperature=temperature,
            generator=generator,
        )
        rows = out.completions
        return [rows[i * repeats : (i + 1) * repeats] for i in range(len(prompts))]

    return generate


@torch.no_grad()
def evaluate_run(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    cfg: Config,
    limit: int | None = None,
) -> EvalResult:
    """`evaluate` of the learner's model as a run's config sets it: `run.eval_k` samples at
    the actors' temperature and length, seeded by `run.seed`."""
    was_training = model.training
    model.eval()
    try:
        generate = model_generate(model, tokenizer, cfg.actor.max_new_tokens, cfg.run.seed)
        k, temperature = cfg.run.eval_k, cfg.actor.temperature
        return evaluate(generate, tokenizer, task, k=k, temperature=temperature, limit=limit)
    finally:
        model.train(was_training)


@dataclass
class Samples:
    """Completions of a batch of prompts (lists, one entry per prompt row)."""

    completions: list[list[int]]  # generated ids, eos included when it was sampled
    logprobs: list[list[float]]  # log-prob of each generated id under the sampled distribution
    finish_reasons: list[str]  # "stop" (eos sampled) or "length"


@torch.no_grad()
def sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample up to `max_new_tokens` ids after each prompt; `temperature = 0` is greedy.

    `logits_fn` maps right-padded tokens `[B, T]` to logits `[B, T, V]` (e.g. the policy model).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    num_rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((num_rows, int(lengths.max()) + max_new_tokens), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    rows = torch.arange(num_rows)
    done = torch.zeros(num_rows, dtype=torch.bool)
    completions: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        logits_BV = logits_fn(tokens[:, :width])[rows, lengths - 1].float()
        if temperature == 0:
            next_ids = logits_BV.argmax(-1)
            logp_BV = torch.log_softmax(logits_BV, dim=-1)
        else:
            logp_BV = torch.log_softmax(logits_BV / temperature, dim=-1)
            next_ids = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
        next_logp = logp_BV[rows, next_ids]
        for i in torch.nonzero(~done).flatten().tolist():
            completions[i].append(int(next_ids[i]))
            logprobs[i].append(float(next_logp[i]))
        tokens[rows[~done], lengths[~done]] = next_ids[~done]
        lengths = lengths + (~done).long()
        done |= torch.isin(next_ids, torch.tensor(stop_ids))
        if done.all():
            break
    finish = ["stop" if c and c[-1] in stop_ids else "length" for c in completions]
    return Samples(completions, logprobs, finish)
