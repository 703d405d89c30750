"""Held-out accuracy of a policy: greedy and avg@k (the mean reward over k samples per prompt)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.sampler import sample
from async_rl.tasks import Task
from async_rl.tokenizer import Tokenizer


@dataclass
class EvalResult:
    greedy: float  # share of held-out prompts answered exactly by greedy decoding
    avg_at_k: float  # mean reward over k sampled completions per prompt
    k: int
    num_prompts: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
) -> EvalResult:
    """Greedy accuracy and avg@k on the task's held-out set (or its first `limit` problems)."""
    was_training = model.training
    model.eval()
    problems = task.heldout()[:limit]
    generator = torch.Generator().manual_seed(seed)
    greedy_hits, sampled_hits = 0.0, 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [tokenizer.encode_prompt(p.prompt) for p in chunk]
        for temp, repeats in ((0.0, 1), (temperature, k)):
            out = sample(
                model,
                [p for p in prompts for _ in range(repeats)],
                max_new_tokens=max_new_tokens,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                temperature=temp,
                generator=generator,
            )
            rewards = [
                task.reward(chunk[i // repeats], tokenizer.decode_completion(c))
                for i, c in enumerate(out.completions)
            ]
            if temp == 0.0:
                greedy_hits += sum(rewards)
            else:
                sampled_hits += sum(rewards) / k
    model.train(was_training)
    n = max(len(problems), 1)
    return EvalResult(greedy_hits / n, sampled_hits / n, k, len(problems))
