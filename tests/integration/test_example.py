"""The worked example (`examples/word_problems`) as a user runs it: `async-rl train` with a task
class and a reward function of the user's, by name, a byte-level BPE tokenizer with Qwen's
special tokens and chat template; then the checkpoint it wrote, read by `transformers` with
`apply_chat_template`, generating what `async-rl eval`'s engine generates and scoring the same."""

import json
import subprocess
import sys

import pytest
import torch

from actors.embedded import EmbeddedEngine
from actors.engine import engine_generate
from async_rl.config import load_config
from async_rl.run.evaluation import evaluate_checkpoint
from async_rl.tasks import task_from_config
from async_rl.tokenizer import tokenizer_from_config
from tests.helpers import ENV, ROOT, json_lines, stored_groups

pytestmark = pytest.mark.slow
STEPS = 4


def test_the_worked_example_trains_and_transformers_scores_its_checkpoint_the_same(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("math_verify")
    out = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "train", "--config",
         "examples/word_problems/config.toml", f"run.output_dir={tmp_path}",
         f"run.num_steps={STEPS}", "run.eval_every=0", "sft.steps=100",
         "sft.batch_size=32", "learner.checkpoint_every=2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = tmp_path / "word_problems"
    cfg = load_config(run / "config.toml", [])
    rows = json_lines(run / "metrics.jsonl")
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["rollout/reward_errors"] == 0 for r in rows)
    assert all(0 <= r["rollout/reward/format"] <= 1 for r in rows)  # the reward's own numbers
    assert all(r["rollout/reward/correct"] > 0 for r in rows)  # the cold start answers some

    # What the actors stored: prompts rendered through the chat template, completions ending
    # at one of Qwen's stops, the task's metadata, rewards as the user's function gives them.
    tokenizer, task = tokenizer_from_config(cfg), task_from_config(cfg)
    problems = {p.prompt_id: p for p in map(task.train_problem, range(task.num_train()))}
    stored = [row for g in stored_groups(run) for row in g.to_pylist()]
    assert stored
    for row in stored:
        problem = problems[row["prompt_id"]]
        assert row["prompt_tokens"] == tokenizer.encode_prompt(problem.prompt)
        assert json.loads(row["problem_metadata"]) == problem.metadata
        text = tokenizer.decode_completion(row["completion_tokens"])
        assert row["reward"] == pytest.approx(task.reward(problem, text), abs=1e-6)
        assert dict(row["reward_extras"]).keys() == {"correct", "format"}
        if row["finish_reason"] == "stop":  # <|im_end|> or <|endoftext|>
            assert row["completion_tokens"][-1] in tokenizer.stop_ids
    assert tokenizer.stop_ids == (2, 0) and tokenizer.bos_id is None
    assert any(row["finish_reason"] == "stop" for row in stored)

    # The newest weights, a Hugging Face checkpoint: transformers, greedy, through the template.
    checkpoint = sorted((run / "weights").glob("v*"))[-1]
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    heldout, limit = task.heldout()[:16], 16
    engine = EmbeddedEngine(checkpoint, quantization="fp32")
    generate = engine_generate(engine, cfg.actor.max_new_tokens, 0, tokenizer.stop_ids)
    ours = generate([tokenizer.encode_prompt(p.prompt) for p in heldout], 0.0, 1)
    theirs_score = 0.0
    for problem, (completion,) in zip(heldout, ours, strict=True):
        messages = [{"role": "user", "content": problem.prompt}]
        inputs = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out_ids = model.eval().generate(
                **inputs, max_new_tokens=cfg.actor.max_new_tokens, do_sample=False
            )
        theirs = out_ids[0, inputs["input_ids"].shape[1] :].tolist()
        assert theirs == completion  # the same ids, the stop token included
        theirs_score += task.reward(problem, hf_tok.decode(theirs, skip_special_tokens=True))
    evaluated = evaluate_checkpoint(cfg, checkpoint, limit=limit)
    assert evaluated.greedy == pytest.approx(theirs_score / limit, abs=1e-9)
    assert evaluated.greedy > 0.5  # a policy that answers, so that agreeing means something
