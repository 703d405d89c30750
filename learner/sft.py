"""Supervised cold start: teach the fresh policy the task's answer format before RL.

The paper starts RL from a cold-started model; here the tiny Qwen3-MoE is trained with
cross-entropy on correct completions (`task.sft_completion`) of the task's training stream,
loss on completion tokens and eos only. The result is written as a Hugging Face checkpoint to
`runs/<run.name>/checkpoints/sft/`, the starting weights (version 0) of RL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from async_rl.config import Config
from async_rl.paths import RunPaths
from async_rl.tasks import Problem, Task
from async_rl.tokenizer import Tokenizer
from learner.hf import export_hf
from learner.model import DTYPES, build_model, policy_logprobs
from learner.optim import lr_multiplier
from learner.parallel import DataParallel, apply_fsdp, clip_gradients, shutdown

LR_FLOOR = 0.1  # the cosine decay ends at this share of the peak


def sft_batch(
    tokenizer: Tokenizer, task: Task, problems: list[Problem], max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs `[B, T]`, next-token targets `[B, T]` and a loss mask `[B, T]`."""
    seqs, starts = [], []
    for p in problems:
        prompt = tokenizer.encode_prompt(p.prompt)
        full = prompt + tokenizer.encode(task.sft_completion(p)) + [tokenizer.eos_id]
        if len(full) > max_seq_len + 1:
            raise ValueError(
                f"problem {p.prompt_id} needs {len(full) - 1} tokens, more than "
                f"model.max_seq_len ({max_seq_len})"
            )
        seqs.append(full)
        starts.append(len(prompt) - 1)  # first target that is a completion token
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full_like(inputs, tokenizer.pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, : len(s) - 1] = torch.tensor(s[1:])
        mask[i, start : len(s) - 1] = True
    return inputs, targets, mask


def sft_loss(model: torch.nn.Module, batch, label_smoothing: float, chunk: int) -> torch.Tensor:
    """Cross-entropy of the completion tokens (mean), with label smoothing as
    `F.cross_entropy` defines it: (1 - eps) * (-log p(y)) + eps * mean over the vocabulary of
    -log p(v); the vocabulary `chunk` positions at a time, at the completion's positions only
    (`policy_logprobs`)."""
    inputs, targets, mask = batch
    logp_BT, _, mean_BT = policy_logprobs(
        model, inputs, targets, chunk=chunk, with_mean=label_smoothing > 0, mask_BT=mask
    )
    loss_N = -logp_BT[mask]
    if label_smoothing > 0:
        loss_N = (1 - label_smoothing) * loss_N - label_smoothing * mean_BT[mask]
    return loss_N.mean()


def run_sft(cfg: Config, tokenizer: Tokenizer, task: Task, out_dir: Path, log=print) -> Path:
    """Train from scratch for `cfg.sft.steps`; the checkpoint exported to `out_dir`.
    Precision as the RL learner's: masters and AdamW in `learner.master_dtype`, forward and
    backward in `model.dtype` (FSDP2 mixed precision over one process, `apply_fsdp`)."""
    torch.manual_seed(cfg.run.seed)
    master, compute = DTYPES[cfg.learner.master_dtype], DTYPES[cfg.model.dtype]
    model = build_model(cfg.model, seed=cfg.run.seed, dtype=master)
    model.train()
    try:
        apply_fsdp(model, DataParallel(), compute_dtype=compute)
        _train(cfg, model, tokenizer, task, log)
        return export_hf(model, cfg.model, tokenizer, out_dir)
    finally:
        shutdown()  # the process group of one that mixed precision made, if it did


def _train(cfg: Config, model: torch.nn.Module, tokenizer: Tokenizer, task: Task, log) -> None:
    sft = cfg.sft
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, betas=(0.9, 0.98), weight_decay=0.0)
    metrics_file = RunPaths(cfg.run_dir).sft_metrics
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    bs, start, index = sft.batch_size, time.monotonic(), 0
    with metrics_file.open("w") as metrics:
        for step in range(sft.steps):
            problems = [task.train_problem(index + j) for j in range(bs)]
            index += bs
            batch = sft_batch(tokenizer, task, problems, cfg.model.max_seq_len)
            loss = sft_loss(model, batch, sft.label_smoothing, cfg.learner.logprob_chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model, 1.0)
            lr = sft.lr * lr_multiplier(step, sft.warmup_steps, sft.steps, "cosine", LR_FLOOR)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            row = {
                "step": step + 1,
                "loss": loss.item(),
                "grad_norm": grad_norm.item(),
                "lr": lr,
                "elapsed_s": round(time.monotonic() - start, 2),
            }
            metrics.write(json.dumps(row) + "\n")
            if (step + 1) % 100 == 0 or step + 1 == sft.steps:
                log(
                    f"sft step {step + 1}/{sft.steps}  loss {row['loss']:.4f}  "
                    f"lr {lr:.2e}  {row['elapsed_s']:.0f}s"
                )
