"""The paper's shape on the CPU, shortened: `async-rl train --config
configs/qwen3_30b_a3b_rehearsal.toml` for a few steps, so that no change breaks the real
vocabulary, 128 experts of top-8, mixed precision, two expert-parallel ranks, R2 with N = 2,
in-flight updates and the collective weight store unnoticed. The full run (README, "The
paper's shape on a CPU") is the same command without the overrides below. And the paper's MoE
shape on the long task (`configs/tiny_moe.toml`), two steps in threads of this process."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors import safe_open

from tests.helpers import ENV, ROOT, json_lines

CONFIG = ROOT / "configs" / "qwen3_30b_a3b_rehearsal.toml"


def dtypes(path) -> set[str]:
    with safe_open(path, "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_a_few_steps_of_the_30b_rehearsal_train_end_to_end(tmp_path):
    overrides = [
        f"run.output_dir={tmp_path}",
        "run.name=rehearsal",
        "run.num_steps=3",
        "run.eval_every=3",
        "task.heldout_size=8",
        "sft.steps=4",
        "learner.checkpoint_every=2",
        "logging.progress=false",
    ]
    command = [sys.executable, "-m", "async_rl.cli", "train", "--config", str(CONFIG)]
    done = subprocess.run(
        [*command, *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "rehearsal"
    rows = json_lines(run / "metrics.jsonl")
    steps = [r for r in rows if "learner/loss" in r]
    assert [r["version"] for r in steps] == [1, 2, 3]
    assert all(r["learner/num_ranks"] == 2 for r in steps)
    assert all(0 < r["learner/routing_agreement"] <= 1 for r in steps)  # top-8 of 128, FP8
    assert all(r["learner/entropy"] > 0 for r in steps)
    assert [r["version"] for r in rows if "eval/accuracy" in r] == [0, 3]
    # the Hugging Face checkpoint actors load: the real shapes, in the compute dtype
    config = json.loads((run / "checkpoints" / "sft" / "config.json").read_text())
    assert (config["vocab_size"], config["num_experts"], config["num_experts_per_tok"]) == (
        151936,
        128,
        8,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (32, 4)
    assert dtypes(run / "checkpoints" / "sft" / "model.safetensors") == {"BF16"}
    # the learner's checkpoints: each of the two ranks' shards of the fp32 masters and moments
    step = run / "checkpoints" / "learner" / "step-000003"
    assert json.loads((step / "state.json").read_text())["world"] == 2
    for rank in range(2):
        assert dtypes(step / f"model-r{rank:05d}.safetensors") == {"F32"}
        assert "F32" in dtypes(step / f"optimizer-r{rank:05d}.safetensors")
    # the collective path with the Ray object store behind it: no weights on disk
    assert not (run / "weights").exists() or not any((run / "weights").iterdir())


def test_the_128_expert_config_trains_and_logs_the_routing_mechanism(tmp_path, train_in_threads):
    """configs/tiny_moe.toml with N = 2: FP8 actors flip some of the learner's top-8 of 128
    (and not all); every step logs the mechanism (README, "Routing replay, measured")."""
    from async_rl.config import load_config, to_toml
    from async_rl.tokenizer import Tokenizer
    from learner.hf import export_hf
    from learner.model import build_model

    overrides = [f"run.output_dir={tmp_path}", "run.num_steps=1", "run.eval_every=0"]
    overrides += ["algo.num_minibatches=2", "algo.prompts_per_minibatch=2", "algo.group_size=4"]
    overrides += ["actor.max_new_tokens=8", "task.heldout_size=8"]
    cfg = load_config(ROOT / "configs" / "tiny_moe.toml", overrides)
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.actor.quantization) == (128, 8, "fp8")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
    model = build_model(cfg.model, seed=0)
    start = export_hf(model, cfg.model, Tokenizer.arithmetic(), tmp_path / "start")
    rows, _, _ = train_in_threads(cfg, start)
    assert len(rows) == 1
    for row in rows:
        assert 0 < row["learner/routing_flip_infer"] < 0.5
        assert 0 < row["learner/flipped_token_frac"] <= 1 and 0 < row["learner/is_ess"] <= 1
        assert row["learner/routing_flip_update"] >= 0
