"""Hugging Face checkpoints: transformers loads them and agrees with the learner's model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from async_rl.config import ModelConfig
from async_rl.tokenizer import Tokenizer
from learner.hf import export_hf, import_hf, model_config_from_hf
from learner.model import build_model, token_logprobs

CFG = ModelConfig()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model(CFG, seed=7).eval()
    # Spread the router scores so routing is decisive, as in a trained model.
    with torch.no_grad():
        for layer in model.layers.values():
            layer.moe.router.gate.weight.mul_(20)
    path = export_hf(model, CFG, Tokenizer.arithmetic(), tmp_path_factory.mktemp("ckpt") / "hf")
    return model, path


def test_checkpoint_files(exported):
    _, path = exported
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    keys = load_file(path / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys  # per-expert Hub layout
    assert "model.layers.1.mlp.gate.weight" in keys
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 2)


def test_transformers_gives_the_same_logprobs(exported):
    transformers = pytest.importorskip("transformers")
    model, path = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    tokens = torch.randint(0, CFG.vocab_size, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = token_logprobs(model(tokens)[:, :-1], tokens[:, 1:])
        theirs = token_logprobs(hf(input_ids=tokens).logits[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("12+345=")["input_ids"] == Tokenizer.arithmetic().encode_prompt("12+345=")


def test_import_of_export_round_trips_every_tensor(exported, tmp_path):
    model, path = exported
    loaded, cfg = import_hf(path)
    assert cfg == ModelConfig(tokenizer=str(path))
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    again = export_hf(loaded, cfg, Tokenizer.from_dir(path), tmp_path / "again")
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_replaces_existing_checkpoint_atomically(exported, tmp_path):
    model, _ = exported
    target = tmp_path / "ckpt"
    export_hf(model, CFG, Tokenizer.arithmetic(), target)
    export_hf(model, CFG, Tokenizer.arithmetic(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_bad_checkpoints_are_clear_errors(exported, tmp_path):
    _, path = exported
    with pytest.raises(ValueError, match="config.json"):
        model_config_from_hf(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_config_from_hf(broken)
    config = json.loads((path / "config.json").read_text())
    del config["num_experts"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_experts"):
        model_config_from_hf(broken)
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="safetensors"):
        import_hf(broken)
    weights = load_file(path / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="norm.weight"):
        import_hf(broken)


def test_plain_transformers_reproduces_async_rl_eval(cold_start, tmp_path):
    """A user's own greedy evaluation of an exported checkpoint (the usual `tokenizer(prompt)`,
    `generate`, no project code but the task's problems and reward) scores what `async-rl eval`
    scores: the exported tokenizer adds the bos the project's prompts start with."""
    transformers = pytest.importorskip("transformers")
    from async_rl.run.evaluation import evaluate_checkpoint
    from async_rl.tasks import task_from_config
    from tests.helpers import pipeline_config

    cfg = pipeline_config(tmp_path, "eval", "task.heldout_size=40")
    problems = task_from_config(cfg).heldout()
    ours = evaluate_checkpoint(cfg, cold_start)

    tok = transformers.AutoTokenizer.from_pretrained(cold_start, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(cold_start, dtype=torch.float32)
    batch = tok([p.prompt for p in problems], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(
            **batch, do_sample=False, max_new_tokens=cfg.actor.max_new_tokens
        )
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    task = task_from_config(cfg)
    theirs = sum(task.reward(p, t) for p, t in zip(problems, texts, strict=True)) / len(problems)
    assert 0.1 < ours.greedy < 1.0  # a policy that is right on some problems, not all
    assert theirs == pytest.approx(ours.greedy, abs=1 / len(problems))
