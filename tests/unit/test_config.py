"""Configuration: shipped files parse, overrides apply, every mistake names its key."""

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from async_rl.config import (
    MOVED,
    Config,
    ConfigError,
    load_config,
    reference,
    to_toml,
)
from async_rl.run.placement import placement_lines

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))  # run configs (sweeps: test_sweep.py)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_include_cpu_default_and_paper_setting():
    names = {p.name for p in SHIPPED}
    assert {"tiny.toml", "qwen3_30b_a3b_fp8.toml"} <= names


def test_paper_config_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "qwen3_30b_a3b_fp8.toml")
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.num_layers) == (128, 8, 48)
    assert (cfg.actor.engine, cfg.actor.quantization, cfg.model.dtype) == (
        "vllm",
        "fp8",
        "bfloat16",
    )
    assert (cfg.algo.group_size, cfg.algo.prompts_per_minibatch) == (16, 64)
    assert (cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.tis_cap) == (0.2, 0.27, 5.0)
    assert (cfg.learner.lr, cfg.learner.master_dtype) == (1e-6, "float32")  # fp32 masters


# What the CPU rehearsal may differ from the paper config in: depth, width, lengths, batch
# sizes, the CPU stand-ins (engine, devices, attention kernel, task) and the run's length.
CUT = {
    "run": {"name", "num_steps", "eval_every", "eval_k", "init_checkpoint"},
    "model": {"tokenizer", "dim", "num_layers", "moe_hidden_dim", "max_seq_len", "attn_backend"},
    "task": None,  # prompts: a file of math problems there, arithmetic here
    "actor": {
        "engine",
        "device",
        "num_actors",
        "min_actors",
        "max_actors",
        "max_new_tokens",
        "max_running_rows",
        "weight_update",
        "tensor_parallel_size",
        "gpu_memory_utilization",
    },
    "buffer": {"max_staleness"},
    "learner": {
        "device",
        "lr",
        "weight_decay",
        "checkpoint_every",
        "num_ranks",
        "expert_parallel",
        "max_tokens_per_microbatch",
        "activation_checkpointing",
    },
    "weights": set(),
    "sft": {"steps", "batch_size", "num_threads"},
    "algo": {"group_size", "prompts_per_minibatch"},
    "logging": {"wandb_project"},
}


def test_the_rehearsal_is_the_paper_config_cut_only_in_size():
    paper = load_config(ROOT / "configs" / "qwen3_30b_a3b_fp8.toml").to_dict()
    rehearsal = load_config(ROOT / "configs" / "qwen3_30b_a3b_rehearsal.toml").to_dict()
    for section, values in paper.items():
        if CUT[section] is None:
            continue
        differ = {k for k in values if values[k] != rehearsal[section][k]}
        assert differ <= CUT[section], (section, differ - CUT[section])
    assert rehearsal["model"]["vocab_size"] == 151936 and rehearsal["learner"]["num_ranks"] == 2
    assert rehearsal["actor"]["weight_update"] == "in_flight"  # the harder case of vLLM's


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        None,
        [
            "algo.num_minibatches=4",
            "algo.routing_replay=r3",
            "algo.clip=false",
            "learner.lr=1e-5",
            'task.ops=["+"]',
        ],
    )
    assert cfg.algo.num_minibatches == 4 and cfg.algo.routing_replay == "r3"
    assert cfg.algo.clip is False and cfg.learner.lr == 1e-5 and cfg.task.ops == ["+"]


def test_int_is_accepted_for_float_field():
    assert load_config(None, ["algo.tis_cap=2"]).algo.tis_cap == 2.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["algo.num_minibatches=2", "run.name=x"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["algo.tis_cpa=2"], "algo.tis_cpa", "algo.tis_cap"),  # closest valid name
        (["algoo.tis_cap=2"], "algoo", "algo"),
        (["algo.tis_cap=0"], "algo.tis_cap", "> 0"),
        (["algo.tis_cap=-1"], "algo.tis_cap", "> 0"),
        (["algo.tis_cap=high"], "algo.tis_cap", "number"),
        (["algo.num_minibatches=1.5"], "algo.num_minibatches", "integer"),
        (["algo.clip=1"], "algo.clip", "true or false"),
        (["algo.tis_mode=half"], "algo.tis_mode", "'decoupled'"),
        (["algo.eps_low=1.2"], "algo.eps_low", "< 1"),
        (["algo.is_correction=icepop", "algo.tis_mode=none"], "algo.is_correction", "full"),
        (["algo.is_correction=icepop", "algo.tis_cap=1"], "algo.tis_cap", "C > 1"),
        (["algo.is_correction=seq"], "algo.is_correction", "'seq_tis'"),
        (["algo.geo_mask_cap=1"], "algo.geo_mask_cap", "> 1"),
        (["model.top_k=9"], "model.top_k", "model.num_experts"),
        (["model.num_kv_heads=3"], "model.num_kv_heads", "divide"),
        (
            ["actor.engine=vllm", "actor.quantization=fp32", "algo.routing_replay=r3"],
            "algo.routing_replay",
            "routing",
        ),
        (["actor.engine=vllm"], "actor.quantization", "fp8"),  # vLLM on CPU has no FP8
        (
            [
                "actor.engine=vllm",
                "actor.quantization=fp32",
                "actor.batching=continuous",
                "actor.weight_update=in_flight",
                "actor.kv_on_swap=recompute",
            ],
            "actor.kv_on_swap",
            "keeps",
        ),
        (['task.ops=["/"]'], "task.ops", "'/'"),
        (["task.type=file"], "task.path", "required"),
        (["task.system_prompt=Be brief."], "task.system_prompt", "task.chat_template = true"),
        (["task.chat_template=true"], "task.chat_template", "arithmetic tokenizer has none"),
        (["actor.stop_tokens=3"], "actor.stop_tokens", "list of strings"),
        (["actor.num_actors=9"], "actor.num_actors", "max_actors"),
        (["actor.autoscale_fill_low=0.8"], "actor.autoscale_fill_low", "autoscale_fill_high"),
        (["run.bind_host=0.0.0.0"], "run.bind_host", "loopback"),
        (["tis_cap=2"], "tis_cap", "section.key"),
        (["learner.resources=3"], "learner.resources", "table of Ray resources"),
        (["actor.resources={GPU = 1}"], "actor.resources", "reserves CPU, GPU"),
        (["buffer.resources={head = 0}"], "buffer.resources", "number > 0"),
        (['buffer.resources={head = "x"}'], "buffer.resources", "number > 0"),
    ],
)
def test_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}:")
    assert words in str(err.value)


def test_resources_round_trip_and_show_in_the_placement():
    cfg = load_config(None, ['actor.resources={actor_node = 1, "node:10.0.0.5" = 0.5}'])
    assert cfg.actor.resources == {"actor_node": 1.0, "node:10.0.0.5": 0.5}
    again = ['actor.resources={"actor_node" = 1.0, "node:10.0.0.5" = 0.5}']
    assert load_config(None, again) == cfg
    assert tomllib.loads(to_toml(cfg))["actor"]["resources"] == cfg.actor.resources
    lines = placement_lines(cfg)
    assert lines[2].endswith("each needs CPU 1, actor_node 1, node:10.0.0.5 0.5")
    assert lines[0] == "buffer: 1 process, needs nothing (any node)"


def test_errors_in_files_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[algo]\nrouting_replay = "r5"\n')
    with pytest.raises(ConfigError, match="algo.routing_replay"):
        load_config(bad)
    bad.write_text("[algo]\nnum_minibatchs = 2\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*algo.num_minibatches"):
        load_config(bad)
    bad.write_text("[algo\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_every_field_is_documented():
    for line in reference().splitlines():
        if not line.startswith("      "):
            continue
        assert len(line.strip()) > 5


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert reference(markdown=True).strip() in readme, (
        "README config reference is stale: regenerate with `python -m async_rl.config --markdown`"
    )


def test_train_of_a_finished_run_says_so_and_starts_nothing(tmp_path, capsys):
    from async_rl.cli import main

    run = tmp_path / "done"
    run.mkdir()
    rows = [{"version": v, "learner/loss": 0.0} for v in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"vers')
    args = ["train", f"run.output_dir={tmp_path}", "run.name=done", "run.num_steps=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already reached version 5" in out and "run.num_steps" in out
    assert not (run / "config.toml").exists()  # nothing was started or rewritten


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_moved_key_is_refused_with_its_new_name(tmp_path, old, new):
    """A config written for the old sections must not silently change meaning."""
    section, name = old.split(".")
    with pytest.raises(ConfigError, match=f"now `{new}`") as e:
        load_config(None, [f"{old}=1"])
    assert e.value.key == old
    path = tmp_path / "old.toml"
    path.write_text(f"[{section}]\n{name} = 1\n")
    with pytest.raises(ConfigError, match=f"moved in {path}: it is now `{new}`"):
        load_config(path)


def test_the_weight_path_and_the_cold_start_have_sections_of_their_own():
    cfg = load_config(None, ["weights.store=collective", "weights.deltas=send", "sft.lr=1e-3"])
    assert (cfg.weights.store, cfg.weights.deltas, cfg.sft.lr) == ("collective", "send", 1e-3)
    assert not any(name.startswith("sft_") for name in vars(cfg.learner))
    assert {"weight_store", "publish_bucket_mib"}.isdisjoint(vars(cfg.learner))


def test_every_choice_field_defaults_to_one_of_its_choices():
    from async_rl.choices import choices
    from async_rl.config import SECTIONS, _section_fields

    for section in SECTIONS:
        for name, f in _section_fields(section).items():
            if allowed := choices(f.type):
                default = (
                    f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                )
                for value in default if isinstance(default, list) else [default]:
                    assert value in allowed, f"{section}.{name} = {value!r}"
