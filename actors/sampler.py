"""Batched autoregressive sampling from a causal LM, for evaluation and tests.

`sample()` recomputes the whole (short) sequence at every step instead of keeping a KV cache:
exact and simple, and fast enough for the tiny task's prompts (about 10 tokens) and completions
(a few tokens). The rollout engines of the actor fleet live beside it in `actors/`.

Sequences are right-padded: row i is `prompt_i + generated_i` followed by padding, so with a
causal mask every real token sees exactly its own prefix, whatever the other rows' lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    eos_id: int,
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
        done |= next_ids == eos_id
        if done.all():
            break
    finish = ["stop" if c and c[-1] == eos_id else "length" for c in completions]
    return Samples(completions, logprobs, finish)
