"""The embedded engine against the learner's torchtitan model (the independent reference).

Shape legend: C = completion tokens, V = vocabulary, L = MoE layers, K = experts per token.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.build import build_engine
from actors.embedded import EmbeddedEngine
from actors.embedded_model import Weight, linear
from actors.engine import EngineCapabilities, GroupRequest, SamplingParams
from async_rl.capabilities import ENGINE_CAPABILITIES
from async_rl.config import ActorConfig, ModelConfig
from async_rl.tokenizer import Tokenizer
from learner.hf import export_hf, hf_state_dict
from learner.model import build_model
from learner.routing import RoutingHooks
from tests.helpers import generate_with_logits

CFG = ModelConfig()  # the tiny default: vocab 32, 2 layers, 8 experts, top-2
PROMPTS = [[2, 5, 13, 6], [2, 7, 8, 9, 10, 11, 12, 4, 3], [2, 12], [2, 4, 4, 5, 6, 7]]


def _peaked_model(seed: int):
    """A fresh model made decisive, as a trained one is: spread router scores and logits."""
    model = build_model(CFG, seed=seed).eval()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.moe.router.gate.weight.mul_(20)
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two different checkpoints `(model, path)` exported by the learner."""
    root = tmp_path_factory.mktemp("ckpts")
    out = []
    for seed in (7, 8):
        model = _peaked_model(seed)
        out.append((model, export_hf(model, CFG, Tokenizer.arithmetic(), root / f"s{seed}")))
    return out


def _reference(model, prompt, gen):
    """The learner's logits `[C, V]` at the completion's tokens and its routing `[P+C-1, L, K]`."""
    hooks = RoutingHooks(model)
    try:
        with torch.no_grad(), hooks.record() as trace:
            logits = model(torch.tensor([prompt + gen.tokens[:-1]]))[0]
    finally:
        hooks.remove()
    return logits[len(prompt) - 1 :].double(), trace.experts[0].numpy()


def _mismatch(engine, model, params, num_samples=4):
    """Per-token KL(engine || learner), routing agreement and the pairs (engine, learner)."""
    groups, logits = generate_with_logits(engine, PROMPTS, params, num_samples)
    kls, agree, pairs = [], [], []
    for prompt, group, group_logits in zip(PROMPTS, groups, logits, strict=True):
        for gen, ours_CV in zip(group, group_logits, strict=True):
            ref_CV, ref_routing = _reference(model, prompt, gen)
            p_CV = torch.log_softmax(ours_CV.double(), -1)
            q_CV = torch.log_softmax(ref_CV, -1)
            kls.append((p_CV.exp() * (p_CV - q_CV)).sum(-1))
            assert gen.routing.shape == ref_routing.shape
            same = np.sort(gen.routing, -1) == np.sort(ref_routing, -1)
            agree.append(same.all(-1).ravel())
            pairs.append((prompt, gen, ref_CV))
    return torch.cat(kls), np.concatenate(agree), pairs


def test_fp32_matches_the_learner(ckpts):
    model, path = ckpts[0]
    engine = EmbeddedEngine(path, quantization="fp32")
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6, seed=0)
    kl, agree, pairs = _mismatch(engine, model, params)
    assert kl.max() < 1e-5
    assert agree.mean() >= 0.999
    for _, gen, ref_CV in pairs:
        expected = torch.log_softmax(ref_CV / 0.7, -1)[torch.arange(len(gen.tokens)), gen.tokens]
        torch.testing.assert_close(torch.tensor(gen.logprobs).double(), expected, atol=1e-4, rtol=0)


def test_top_p_logprobs_are_those_of_the_renormalised_nucleus(ckpts):
    model, path = ckpts[0]
    engine = EmbeddedEngine(path, quantization="fp32")
    params = SamplingParams(temperature=1.5, top_p=0.7, max_new_tokens=6, seed=1)
    groups, _ = generate_with_logits(engine, PROMPTS, params, 4)
    truncated = 0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for gen in group:
            ref_CV, _ = _reference(model, prompt, gen)
            for t, token in enumerate(gen.tokens):
                probs = torch.softmax(ref_CV[t] / 1.5, -1)
                order = probs.argsort(descending=True).tolist()
                mass, nucleus = 0.0, []
                while mass < 0.7:  # the smallest most-likely set with mass >= top_p
                    nucleus.append(order[len(nucleus)])
                    mass += float(probs[nucleus[-1]])
                assert token in nucleus
                assert abs(gen.logprobs[t] - np.log(float(probs[token]) / mass)) < 1e-4
                truncated += len(nucleus) < CFG.vocab_size
    assert truncated > 10


@pytest.mark.parametrize("quantization", ["fp32", "fp8"])
def test_batched_equals_one_prompt_at_a_time(ckpts, quantization):
    engine = EmbeddedEngine(ckpts[0][1], quantization=quantization)
    greedy = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=6, seed=None)
    batched = engine.generate(PROMPTS, greedy, num_samples=2)
    for prompt, group in zip(PROMPTS, batched, strict=True):
        (alone,) = engine.generate([prompt], greedy, num_samples=1)
        for gen in group:
            assert gen.tokens == alone[0].tokens
            np.testing.assert_allclose(gen.logprobs, alone[0].logprobs, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(gen.routing, alone[0].routing)


def test_same_seed_same_samples(ckpts):
    engine = EmbeddedEngine(ckpts[0][1], quantization="fp8")

    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed)
        return [
            (g.tokens, g.logprobs) for group in engine.generate(PROMPTS, params, 4) for g in group
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_load_weights_swaps_to_the_new_checkpoint(ckpts):
    (model_a, path_a), (model_b, path_b) = ckpts
    engine = EmbeddedEngine(path_a, quantization="fp32")
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6, seed=0)
    kl_a, _, _ = _mismatch(engine, model_a, params)
    engine.load_weights(path_b, version=5)
    assert engine.version == 5
    kl_b, agree_b, _ = _mismatch(engine, model_b, params)
    kl_ab, _, _ = _mismatch(engine, model_a, params)
    assert kl_a.max() < 1e-5 and kl_b.max() < 1e-5 and agree_b.mean() >= 0.999
    assert kl_ab.mean() > 1e-2  # it no longer serves checkpoint a
    # Tensors by Hugging Face name (the Ray weight store's fetch) swap the same way.
    engine.load_weights(hf_state_dict(model_a, CFG), version=6)
    kl_a2, _, _ = _mismatch(engine, model_a, params)
    assert engine.version == 6 and kl_a2.max() < 1e-5
    partial = hf_state_dict(model_b, CFG)
    del partial["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        engine.load_weights(partial, version=7)
    assert engine.version == 6


def test_an_engine_from_the_start_files_alone_serves_the_first_tensors_it_loads(ckpts, tmp_path):
    """What an actor on another node gets of the starting checkpoint (`start_files`: its
    config.json and tokenizer, no tensors) builds an engine that serves nothing until the
    first version's tensors come from the weight store, and then serves exactly them."""
    from async_rl.run.workers import start_files

    model, path = ckpts[0]
    files = start_files(path)
    assert "config.json" in files and not [n for n in files if "safetensors" in n]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    engine = build_engine(ActorConfig(quantization="fp32"), tmp_path)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6, seed=0)
    with pytest.raises(RuntimeError, match="built without weights"):
        engine.submit(GroupRequest("g", PROMPTS[0], 2, params))
    engine.load_weights(hf_state_dict(model, CFG), version=3)
    kl, agree, _ = _mismatch(engine, model, params)
    assert engine.version == 3 and kl.max() < 1e-5 and agree.mean() >= 0.999


def test_trace_shape_dtype_and_finish_reasons(ckpts, tmp_path):
    path = ckpts[0][1]
    greedy = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=6, seed=None)
    first = EmbeddedEngine(path, quantization="fp32").generate(PROMPTS[:1], greedy, 1)[0][0]
    # The same weights with eos = the third token greedy decoding produces: it stops there.
    eos = first.tokens[2]
    stops = tmp_path / "eos"
    shutil.copytree(path, stops)
    config = json.loads((stops / "config.json").read_text())
    (stops / "config.json").write_text(json.dumps(config | {"eos_token_id": eos}))
    engine = EmbeddedEngine(stops, quantization="fp32")
    (gen,) = engine.generate(PROMPTS[:1], greedy, 1)[0]
    assert gen.finish_reason == "stop" and gen.tokens == first.tokens[: first.tokens.index(eos) + 1]
    # Rows that do not stop run to max_new_tokens; the context (64 positions) also stops a row.
    prompts = [[2, 3, 4], [2] + [5] * 61]
    for prompt, (gen,) in zip(prompts, engine.generate(prompts, greedy, 1), strict=True):
        assert gen.routing.shape == (len(prompt) + len(gen.tokens) - 1, CFG.num_layers, CFG.top_k)
        assert gen.routing.dtype == np.uint8
        assert (gen.routing < CFG.num_experts).all()
        assert (np.diff(np.sort(gen.routing, -1), axis=-1) > 0).all()  # distinct ids
        if eos not in gen.tokens:
            limit = min(6, CFG.max_seq_len - len(prompt))
            assert gen.finish_reason == "length" and len(gen.tokens) == limit
    assert len(engine.generate(prompts[1:], greedy, 1)[0][0].tokens) <= 2


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    end = next(i for i, t in enumerate(tokens) if t in stops)
    return tokens[: end + 1]


def test_generation_config_eos_list_and_request_stop_ids_end_a_row(ckpts, tmp_path):
    """Qwen's way: `generation_config.json` lists several eos ids; a request adds its own."""
    path = ckpts[0][1]
    greedy = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=6, seed=None)
    first = EmbeddedEngine(path, quantization="fp32").generate(PROMPTS[:1], greedy, 1)[0][0]
    listed = tmp_path / "listed"
    shutil.copytree(path, listed)
    (listed / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [1, first.tokens[3]]})
    )
    engine = EmbeddedEngine(listed, quantization="fp32")
    (gen,) = engine.generate(PROMPTS[:1], greedy, 1)[0]
    assert gen.finish_reason == "stop" and gen.tokens == _cut(first.tokens, {first.tokens[3]})
    stopping = SamplingParams(0, 1.0, 6, None, stop_ids=(first.tokens[1],))
    (gen,) = engine.generate(PROMPTS[:1], stopping, 1)[0]
    both = {first.tokens[1], first.tokens[3]}
    assert gen.finish_reason == "stop" and gen.tokens == _cut(first.tokens, both)


def test_routing_trace_is_uint16_above_256_experts(tmp_path):
    cfg = ModelConfig(num_layers=1, num_experts=300, top_k=3, dim=16, moe_hidden_dim=8)
    path = export_hf(build_model(cfg, seed=0), cfg, Tokenizer.arithmetic(), tmp_path / "wide")
    engine = EmbeddedEngine(path, quantization="fp32")
    (gen,) = engine.generate([[2, 3, 4]], SamplingParams(1.0, 1.0, 3, 0), 1)[0]
    assert gen.routing.dtype == np.uint16 and gen.routing.shape == (2 + len(gen.tokens), 1, 3)
    assert (gen.routing < 300).all()


def test_fp8_is_w8a8_with_per_channel_weights_and_per_token_activations(ckpts):
    engine = EmbeddedEngine(ckpts[0][1], quantization="fp8")
    layer = engine.model.layers[0]
    for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
        assert w.data.dtype == torch.float8_e4m3fn
    for kept in (layer.gate, layer.attn_norm, engine.model.embed, engine.model.lm_head):
        assert kept.dtype == torch.float32
    # One linear against torch._scaled_mm with row-wise scales (an independent FP8 kernel).
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(48, 64, generator=gen), torch.randn(5, 64, generator=gen) * 3
    w = Weight(weight, "fp8", torch.device("cpu"))
    w_scale = weight.abs().amax(1, keepdim=True) / 448
    torch.testing.assert_close(w.scale, w_scale)
    x_scale = x.abs().amax(1, keepdim=True) / 448
    expected = torch._scaled_mm(
        (x / x_scale).to(torch.float8_e4m3fn),
        (weight / w_scale).to(torch.float8_e4m3fn).T,
        scale_a=x_scale,
        scale_b=w_scale.T.contiguous(),
        out_dtype=torch.float32,
    )
    torch.testing.assert_close(linear(x, w), expected, rtol=1e-5, atol=1e-5)
    assert (linear(x, w) - x @ weight.T).abs().max() > 1e-2  # and it is not the fp32 product


def test_fp8_mismatch_is_larger_and_flips_routing(ckpts):
    model, path = ckpts[0]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0)
    kl32, agree32, _ = _mismatch(EmbeddedEngine(path, quantization="fp32"), model, params, 8)
    kl8, agree8, _ = _mismatch(EmbeddedEngine(path, quantization="fp8"), model, params, 8)
    assert kl8.mean() > 1e-5 and kl8.mean() > 100 * kl32.abs().mean()
    assert agree8.mean() < agree32.mean()


def test_bad_checkpoints_are_clear_errors(ckpts, tmp_path):
    path = ckpts[0][1]
    with pytest.raises(ValueError, match="config.json"):
        EmbeddedEngine(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        EmbeddedEngine(bad)
    (bad / "config.json").write_text(json.dumps(config | {"num_experts": 9}))
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.mlp.experts.8"):
        EmbeddedEngine(bad)
    (bad / "config.json").write_text(json.dumps(config))
    weights = load_file(path / "model.safetensors")
    save_file(weights | {"model.norm.weight": torch.ones(3)}, bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        EmbeddedEngine(bad)
    weights.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_norm.weight"):
        EmbeddedEngine(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        EmbeddedEngine(bad)
    # A failed swap keeps serving the old weights and version.
    engine = EmbeddedEngine(path, quantization="fp32")
    with pytest.raises(ValueError):
        engine.load_weights(bad, version=1)
    assert engine.version == 0 and engine.generate([[2, 3]], SamplingParams(0, 1, 2, 0), 1)


def test_bad_requests_and_engine_choice(ckpts):
    engine = EmbeddedEngine(ckpts[0][1], quantization="fp32")
    ok = SamplingParams(1.0, 1.0, 4, 0)
    for prompts, params, match in [
        ([[]], ok, "prompts"),
        ([[2, 40]], ok, "prompts"),
        ([[2, 3]], SamplingParams(1.0, 1.5, 4, 0), "top_p"),
        ([[2, 3]], SamplingParams(-1.0, 1.0, 4, 0), "temperature"),
        ([[2, 3]], SamplingParams(1.0, 1.0, 0, 0), "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.generate(prompts, params, 2)
    with pytest.raises(ValueError, match="quantization"):
        EmbeddedEngine(ckpts[0][1], quantization="int4")
    with pytest.raises(ValueError, match="vllm"):
        build_engine(ActorConfig(engine="vllm"), ckpts[0][1])
    built = build_engine(ActorConfig(quantization="bf16"), ckpts[0][1])
    caps = ENGINE_CAPABILITIES[("embedded", "cpu")]
    assert built.capabilities == EngineCapabilities(caps["routing"], caps["quantization"])
    assert built.quantization == "bf16" and built.version == 0


@pytest.mark.parametrize("quantization, atol", [("fp32", 1e-5), ("fp8", 1e-2)])
def test_a_continuous_batch_gives_each_row_the_tokens_it_gets_alone(ckpts, quantization, atol):
    """Rows join and leave a batch of at most 6 rows; each group samples what it samples alone.
    (FP8 rounds the activations per token: a value at a rounding boundary may round the other
    way in a batch, so its log-probs agree to 1e-2, fp32's to 1e-5.)"""
    engine = EmbeddedEngine(ckpts[0][1], quantization=quantization, max_running_rows=6)
    requests = [
        GroupRequest(
            f"r{i}", PROMPTS[i % 4], 2 + i % 3, SamplingParams(1.0, 0.9, 3 + 2 * i, 50 + i)
        )
        for i in range(8)
    ]
    for request in requests:
        engine.submit(request)
    got, most_running = {}, 0
    while engine.num_running or engine.num_waiting:
        got.update(engine.step())
        most_running = max(most_running, engine.num_running)
    assert most_running <= 6 and len(got) == len(requests)
    joined_late = 0
    for r in requests:
        (alone,) = EmbeddedEngine(ckpts[0][1], quantization=quantization).generate(
            [r.prompt], r.params, r.num_samples
        )
        for gen, ref in zip(got[r.request_id], alone, strict=True):
            assert gen.tokens == ref.tokens and gen.versions == [0] * len(gen.tokens)
            np.testing.assert_allclose(gen.logprobs, ref.logprobs, atol=atol, rtol=0)
            if quantization == "fp32":
                np.testing.assert_array_equal(gen.routing, ref.routing)
        joined_late += r.request_id not in ("r0", "r1")
    assert joined_late  # groups were admitted while others ran


def _swap_mid_completion(path_a, path_b, kv_on_swap, decode_steps=3):
    """A group of 3 that runs `decode_steps` steps on checkpoint a, then on b (in flight)."""
    engine = EmbeddedEngine(path_a, quantization="fp32", kv_on_swap=kv_on_swap)
    request = GroupRequest("g", PROMPTS[1], 3, SamplingParams(1.0, 1.0, 10, seed=7))
    engine.submit(request)
    finished = []
    for _ in range(decode_steps):
        finished += engine.step()
    engine.load_weights(path_b, version=1)
    assert engine.num_running == 3  # the swap happened in flight
    while engine.num_running:
        finished += engine.step()
    ((_, group),) = finished
    return group


def test_a_completion_across_a_swap_carries_both_versions_with_kept_kv(ckpts):
    """kv_on_swap = keep: every token's log-prob is that of its own version's weights, attending
    to the KV entries the weights of their time computed (teacher-forced, float64 comparison)."""
    from tests.helpers import kept_kv_logprobs

    (_, path_a), (_, path_b) = ckpts
    group = _swap_mid_completion(path_a, path_b, "keep")
    for gen in group:
        k = gen.versions.index(1)  # the first token drawn by the new weights
        assert gen.versions == [0] * k + [1] * (len(gen.tokens) - k) and k == 4
        expected = kept_kv_logprobs({0: path_a, 1: path_b}, PROMPTS[1], gen.tokens, gen.versions)
        torch.testing.assert_close(torch.tensor(gen.logprobs).double(), expected, atol=1e-5, rtol=0)


def test_a_completion_across_a_swap_with_recomputed_kv_matches_the_learner(ckpts):
    """kv_on_swap = recompute: tokens after the swap are those of the new weights over the whole
    sequence, as the learner's torchtitan model computes them (an independent implementation)."""
    (model_a, path_a), (model_b, path_b) = ckpts
    group = _swap_mid_completion(path_a, path_b, "recompute")
    prompt = PROMPTS[1]
    for gen in group:
        k = gen.versions.index(1)
        seq = torch.tensor([prompt + gen.tokens[:-1]])
        with torch.no_grad():
            logp = [torch.log_softmax(m(seq)[0].double(), -1) for m in (model_a, model_b)]
        for t, (token, version) in enumerate(zip(gen.tokens, gen.versions, strict=True)):
            expected = logp[version][len(prompt) - 1 + t, token].item()
            assert abs(gen.logprobs[t] - expected) < 1e-4, (t, k)
