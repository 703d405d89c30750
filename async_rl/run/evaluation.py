"""Held-out evaluation through the embedded engine: a KV cache, so long completions are cheap.

    evaluator = EngineEvaluator(cfg, start)     an fp32 engine with the run's model
    evaluator(weights)                          the learner's weights of now (Hugging Face
                                                names, `hf_state_dict`): EvalResult
    evaluate_checkpoint(cfg, "runs/tiny/weights/v000100")

The counting is `learner.evaluate.evaluate` (greedy accuracy, avg@k at the actors'
temperature); the learner's model sampling for itself recomputes every sequence at every step
(no KV cache), which costs too much for completions of a hundred tokens. The engine runs in
fp32: evaluation measures the policy, not the rollout precision.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.embedded import EmbeddedEngine
from actors.engine import engine_generate
from async_rl.config import Config
from async_rl.tasks import task_from_config
from async_rl.tokenizer import tokenizer_from_config
from learner.evaluate import EvalResult, evaluate


class EngineEvaluator:
    """Evaluates a learner model's weights of the moment (module docstring)."""

    def __init__(self, cfg: Config, checkpoint: str | Path, limit: int | None = None):
        self.cfg, self.limit = cfg, limit
        self.engine = EmbeddedEngine(
            checkpoint,
            quantization="fp32",
            device=cfg.actor.device,
            max_running_rows=cfg.actor.max_running_rows,
        )
        self.tokenizer = tokenizer_from_config(cfg, checkpoint)
        self.task = task_from_config(cfg)

    def __call__(self, weights: dict[str, torch.Tensor] | None = None) -> EvalResult:
        """The held-out accuracy of `weights` (None: the checkpoint's own)."""
        if weights is not None:
            self.engine.load_weights(weights, self.engine.version)
        cfg = self.cfg
        generate = engine_generate(
            self.engine, cfg.actor.max_new_tokens, cfg.run.seed, self.tokenizer.stop_ids
        )
        return evaluate(
            generate,
            self.tokenizer,
            self.task,
            k=cfg.run.eval_k,
            temperature=cfg.actor.temperature,
            limit=self.limit,
        )


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, limit: int | None = None):
    """The held-out accuracy of a Hugging Face checkpoint directory."""
    return EngineEvaluator(cfg, checkpoint, limit)()
