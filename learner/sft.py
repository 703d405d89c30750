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
import torch.nn.functional as F

from async_rl.config import Config
from async_rl.paths import RunPaths
from async_rl.tasks import Problem, Task
from async_rl.tokenizer import Tokenizer
from learner.hf import export_hf
from learner.model import build_model
from learner.optim import lr_multiplier

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


def run_sft(cfg: Config, tokenizer: Tokenizer, task: Task, out_dir: Path, log=print) -> Path:
    """Train from scratch for `cfg.learner.sft_steps`; the checkpoint exported to `out_dir`."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, seed=cfg.run.seed)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.learner.sft_lr, betas=(0.9, 0.98), weight_decay=0.0
    )
    metrics_file = RunPaths(cfg.run_dir).sft_metrics
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    bs, start, index = cfg.learner.sft_batch_size, time.monotonic(), 0
    with metrics_file.open("w") as metrics:
        for step in range(cfg.learner.sft_steps):
            problems = [task.train_problem(index + j) for j in range(bs)]
            index += bs
            inputs, targets, mask = sft_batch(tokenizer, task, problems, cfg.model.max_seq_len)
            logits = model(inputs)
            loss = F.cross_entropy(
                logits[mask].float(),
                targets[mask],
                label_smoothing=cfg.learner.sft_label_smoothing,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = cfg.learner.sft_lr * lr_multiplier(
                step, cfg.learner.sft_warmup_steps, cfg.learner.sft_steps, "cosine", LR_FLOOR
            )
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
            if (step + 1) % 100 == 0 or step + 1 == cfg.learner.sft_steps:
                log(
                    f"sft step {step + 1}/{cfg.learner.sft_steps}  loss {row['loss']:.4f}  "
                    f"lr {lr:.2e}  {row['elapsed_s']:.0f}s"
                )
    return export_hf(model, cfg.model, tokenizer, out_dir)
