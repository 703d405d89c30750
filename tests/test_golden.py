"""The learner's golden trace: 20 fixed-seed global steps on a fixed recorded batch.

    python -m tests.test_golden        # records tests/data/golden_trace.json (and the batch once)

The batch (8 groups of 4 completions, FP8 rollouts of the embedded engine with routing traces,
synthetic 0/1 rewards) is written once and kept; the trace is every metric of `TrainStep` but
its timings, for routing replay none / r2 / r3 and N = 1 / 4. The test replays it and requires
it bit for bit: a refactor of the learner must not change a single number.
Regenerate the trace only for a change that is meant to change the numbers, and say so.
The trace was recorded before the architecture refactor (issue 13) and is unchanged by it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch

HERE = Path(__file__).resolve().parent / "data"
BATCH, TRACE = HERE / "golden_batch.arrow", HERE / "golden_trace.json"
STEPS, G, GROUPS = 20, 4, 8
VARIANTS = [(replay, n) for replay in ("none", "r2", "r3") for n in (1, 4)]
TIMINGS = ("step_time_s",)


def config(replay: str, n: int):
    from async_rl.config import load_config

    return load_config(
        None,
        [
            f"algo.group_size={G}",
            f"algo.num_minibatches={n}",
            f"algo.prompts_per_minibatch={GROUPS // n}",
            f"algo.routing_replay={replay}",
            "learner.lr=1e-3",
            "learner.warmup_steps=3",
            "learner.lr_schedule=cosine",
            f"run.num_steps={STEPS}",
        ],
    )


def record_batch() -> None:
    from actors.embedded import EmbeddedEngine
    from actors.engine import SamplingParams
    from async_rl.config import ModelConfig
    from async_rl.tasks import ArithmeticTask
    from async_rl.tokenizer import Tokenizer
    from async_rl.types import RoutingSpec, Trajectory, group_to_batch
    from learner.hf import export_hf
    from learner.model import build_model

    cfg, tok = ModelConfig(), Tokenizer.arithmetic()
    task = ArithmeticTask(seed=0, heldout_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_hf(build_model(cfg, seed=0), cfg, tok, Path(tmp) / "ckpt")
        engine = EmbeddedEngine(path, quantization="fp8")
        problems = [task.train_problem(i) for i in range(GROUPS)]
        prompts = [tok.encode_prompt(p.prompt) for p in problems]
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
        generations = engine.generate(prompts, params, G)
    batches = []
    for g, (problem, prompt, group) in enumerate(zip(problems, prompts, generations, strict=True)):
        rows = [
            Trajectory(
                sample_id=f"g{g}-{i}",
                group_id=f"g{g}",
                prompt_id=problem.prompt_id,
                actor_id="a0",
                engine="embedded",
                policy_version=g % 2,
                policy_version_max=g % 2,
                prompt_tokens=prompt,
                completion_tokens=gen.tokens,
                behavior_logprobs=gen.logprobs,
                token_versions=[g % 2] * len(gen.tokens),
                routing=gen.routing,
                reward=float((3 * g + i) % 3 == 0),
                finish_reason=gen.finish_reason,
                temperature=1.0,
                top_p=1.0,
                quantization="fp8",
                created_at_ms=0,
            )
            for i, gen in enumerate(group)
        ]
        batches.append(group_to_batch(rows, RoutingSpec.of(cfg)))
    with pa.OSFile(str(BATCH), "wb") as f, pa.ipc.new_file(f, batches[0].schema) as writer:
        for b in batches:
            writer.write_batch(b)


def run_variant(replay: str, n: int) -> list[dict[str, float]]:
    """The metrics of 20 global steps of a fresh seeded learner."""
    from async_rl.types import RoutingSpec
    from learner.batch import pack
    from learner.model import build_model
    from learner.optim import build_optimizer
    from learner.train import TrainStep

    cfg = config(replay, n)
    batch = pack(pa.ipc.open_file(str(BATCH)).read_all(), RoutingSpec.of(cfg.model), pad_id=0)
    model = build_model(cfg.model, seed=0)
    step = TrainStep(model, build_optimizer(model, cfg.learner), cfg)
    out = []
    for _ in range(STEPS):
        metrics = step(batch)
        out.append({k: v for k, v in sorted(metrics.items()) if k not in TIMINGS})
    return out


@pytest.mark.parametrize("replay,n", VARIANTS)
def test_twenty_learner_steps_reproduce_the_golden_trace_bit_for_bit(replay, n):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recording's threads: reductions split the same way
    try:
        got = run_variant(replay, n)
    finally:
        torch.set_num_threads(threads)
    expected = json.loads(TRACE.read_text())[f"{replay}-n{n}"]
    for step, (row, want) in enumerate(zip(got, expected, strict=True)):
        assert row == want, f"{replay} N={n}: global step {step + 1} differs"


def main() -> int:
    torch.set_num_threads(1)
    if not BATCH.exists() or "--new-batch" in sys.argv:
        record_batch()
    trace = {f"{replay}-n{n}": run_variant(replay, n) for replay, n in VARIANTS}
    TRACE.write_text(json.dumps(trace, indent=1) + "\n")
    print(f"wrote {TRACE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
