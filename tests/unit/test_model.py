"""The policy model and its routing record/replay hooks, against independent float64 math."""

import pytest
import torch
import torch.nn.functional as F

from async_rl.config import ModelConfig
from learner.model import (
    VocabChunks,
    build_model,
    entropy,
    moe_routers,
    policy_logprobs,
    token_logprobs,
)
from learner.routing import RoutingHooks

CFG = ModelConfig()  # the tiny default: 2 layers, 8 experts, top-2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG, seed=0).eval()


def _tokens(batch=3, length=12, seed=1):
    return torch.randint(
        0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def _moe_reference(moe, x_TD, ids_TK):
    """One MoE layer in float64: softmax router scores gathered at `ids`, renormalised, SwiGLU."""
    x = x_TD.double()
    scores = torch.softmax(x @ moe.router.gate.weight.double().T, dim=-1)
    gates = scores.gather(-1, ids_TK)
    gates = gates / gates.sum(-1, keepdim=True)
    experts = moe.routed_experts.inner_experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            w1, w2, w3 = (w[e].double() for w in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD))
            out[t] += gates[t, k] * (w2 @ (F.silu(w1 @ x[t]) * (w3 @ x[t])))
    return out


def test_record_shape_and_dtype(model):
    hooks = RoutingHooks(model)
    try:
        with hooks.record() as trace:
            model(_tokens())
        assert trace.experts.shape == (3, 12, CFG.num_layers, CFG.top_k)
        assert trace.experts.dtype == torch.uint8
        # top-k ids are distinct per token and layer
        ids = trace.experts.long().sort(-1).values
        assert (ids[..., 1:] != ids[..., :-1]).all()
    finally:
        hooks.remove()


def test_replaying_recorded_routing_reproduces_logits_exactly(model):
    hooks = RoutingHooks(model)
    tokens = _tokens()
    try:
        with hooks.record() as trace:
            free = model(tokens)
        with hooks.replay(trace.experts):
            replayed = model(tokens)
        assert torch.equal(free, replayed)
    finally:
        hooks.remove()


def test_moe_layer_matches_float64_reference_free_and_replayed(model):
    """Experts compute in fp32 (stock torchtitan would use bf16 and miss by ~1e-3)."""
    moe = model.layers["0"].moe
    x = torch.randn(1, 10, CFG.dim, generator=torch.Generator().manual_seed(3))
    hooks = RoutingHooks(model)
    try:
        with torch.no_grad(), hooks.record() as trace:
            free = moe(x)
        free_ids = trace.per_layer[0][0].long()  # only layer 0 ran
        torch.testing.assert_close(
            free[0].double(), _moe_reference(moe, x[0], free_ids), rtol=1e-5, atol=1e-6
        )
        # replay experts the router would not pick: the layer uses exactly those
        forced = torch.stack([torch.randperm(CFG.num_experts)[: CFG.top_k] for _ in range(10)])
        replay = forced[None, :, None, :].expand(1, 10, CFG.num_layers, CFG.top_k)
        with torch.no_grad(), hooks.replay(replay.to(torch.uint8)):
            out = moe(x)
        torch.testing.assert_close(
            out[0].double(), _moe_reference(moe, x[0], forced), rtol=1e-5, atol=1e-6
        )
    finally:
        hooks.remove()


def test_replay_survives_router_perturbation_and_router_gets_gradient():
    model = build_model(CFG, seed=0)
    hooks = RoutingHooks(model)
    tokens = _tokens(batch=4, length=16)
    try:
        with torch.no_grad(), hooks.record() as before:
            model(tokens)
        with torch.no_grad():
            for router in moe_routers(model):
                router.gate.weight.add_(torch.randn_like(router.gate.weight) * 0.05)
        with torch.no_grad(), hooks.record() as free:
            free_logits = model(tokens)
        changed = (free.experts.sort(-1).values != before.experts.sort(-1).values).any(-1)
        assert changed.any(), "perturbing the routers should change some free routing choices"

        model.zero_grad()
        with hooks.replay(before.experts), hooks.record() as replayed:
            logits = model(tokens)
            token_logprobs(logits[:, :-1], tokens[:, 1:]).sum().backward()
        assert torch.equal(replayed.experts, before.experts)
        assert not torch.equal(logits.detach(), free_logits)
        for router in moe_routers(model):
            assert router.gate.weight.grad is not None
            assert router.gate.weight.grad.abs().sum() > 0
    finally:
        hooks.remove()


def test_replay_rejects_bad_traces(model):
    hooks = RoutingHooks(model)
    try:
        with pytest.raises(ValueError, match="must be"):
            with hooks.replay(torch.zeros(2, 5, CFG.num_layers + 1, CFG.top_k, dtype=torch.uint8)):
                pass
        with pytest.raises(ValueError, match="0..7"):
            with hooks.replay(torch.full((2, 5, CFG.num_layers, CFG.top_k), 8, dtype=torch.uint8)):
                pass
        with pytest.raises(ValueError, match="tokens"):
            distinct = torch.arange(CFG.top_k, dtype=torch.uint8)  # a valid trace, too short
            with hooks.replay(distinct.expand(1, 5, CFG.num_layers, CFG.top_k)):
                model(_tokens())
    finally:
        hooks.remove()


def test_logprob_and_entropy_helpers_match_float64():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    probs = torch.softmax(logits / 0.7, -1)
    expected_lp = probs.gather(-1, targets[..., None]).squeeze(-1).log()
    torch.testing.assert_close(
        token_logprobs(logits.float(), targets, 0.7).double(), expected_lp, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        entropy(logits.float(), 0.7).double(), -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-6
    )


def test_bfloat16_model_builds_and_runs():
    cfg = ModelConfig(dtype="bfloat16")
    model = build_model(cfg, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(_tokens()).shape == (3, 12, CFG.vocab_size)


def test_flex_attention_forward_equals_sdpa_on_rows_of_different_lengths():
    """torchtitan's flex attention with the mask `build_model` gives it (its trainer's
    `get_attention_masks`) against SDPA's causal attention: the same weights, right-padded rows
    of 150, 131 and 9 tokens (past flex's 128-position blocks), fp32, every real position.
    Only the forward: flex has no CPU backward (the GPU check runs one)."""
    cfg = ModelConfig(max_seq_len=160)
    sdpa = build_model(cfg, seed=0).eval()
    flex = build_model(ModelConfig(max_seq_len=160, attn_backend="flex"), seed=None).eval()
    flex.load_state_dict(sdpa.state_dict())
    lengths = (150, 131, 9)
    tokens = _tokens(batch=len(lengths), length=max(lengths), seed=4)
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0  # padding
    with torch.no_grad():
        expected, got = sdpa(tokens), flex(tokens)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], expected[row, :n], atol=1e-5, rtol=0)


def _vocab_reference(h_ND, w_VD, targets_N, temperature):
    """log p(targets), entropy and mean log-prob in float64, all positions at once."""
    logp_NV = torch.log_softmax((h_ND @ w_VD.T) / temperature, dim=-1)
    logp_N = logp_NV.gather(-1, targets_N[:, None]).squeeze(-1)
    return logp_N, -(logp_NV.exp() * logp_NV).sum(-1), logp_NV.mean(-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_logprobs_and_their_gradients_match_float64(chunk):
    """`VocabChunks` in float32, any chunk size, against one float64 computation: values,
    the input and weight gradients (of log-probs and of the mean log-prob) to 1e-6."""
    gen = torch.Generator().manual_seed(chunk)
    n, d, v = 50, 16, 300
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,), generator=gen)
    g_logp, g_mean = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = _vocab_reference(h64, w64, targets, 0.7)
    (want[0] @ g_logp.double() + want[2] @ g_mean.double()).backward()
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    got = VocabChunks.apply(h32, w32, targets, 0.7, chunk, True, True)
    (got[0] @ g_logp + got[2] @ g_mean).backward()
    for ours, theirs in (*zip(got, want, strict=True), (h32.grad, h64.grad), (w32.grad, w64.grad)):
        scale = theirs.abs().max().item()
        assert (ours.double() - theirs.detach()).abs().max().item() <= 1e-6 * max(scale, 1.0)
    assert not got[1].requires_grad  # the entropy is a metric


def test_chunked_logprobs_in_one_chunk_are_the_full_computation_bit_for_bit():
    """A batch that fits one chunk gets exactly `token_logprobs(model(x))`: values, entropy and
    every parameter's gradient (the golden trace relies on it); in several chunks the same
    to float32 roundoff."""
    tokens, targets = _tokens(4, 20, seed=3), _tokens(4, 20, seed=4)
    upstream = torch.randn(4, 20, generator=torch.Generator().manual_seed(5))

    def run(chunk):
        model = build_model(CFG, seed=0)
        if chunk is None:
            logits = model(tokens)
            logp, ent = token_logprobs(logits, targets, 0.7), entropy(logits.detach(), 0.7)
        else:
            logp, ent, _ = policy_logprobs(model, tokens, targets, 0.7, chunk, with_entropy=True)
        (logp * upstream).sum().backward()
        return logp.detach(), ent, {n: p.grad for n, p in model.named_parameters()}

    full, one, seven = run(None), run(80), run(7)
    assert torch.equal(full[0], one[0]) and torch.equal(full[1], one[1])
    assert all(torch.equal(full[2][k], one[2][k]) for k in full[2])
    torch.testing.assert_close(seven[0], full[0], rtol=0, atol=1e-6)
    for k, grad in full[2].items():
        assert (seven[2][k] - grad).abs().max() <= 1e-6 * grad.abs().max(), k


def test_chunked_logprobs_hold_one_chunk_of_logits_not_the_batch():
    """What the forward saves for the backward holds no `[positions x vocab]` tensor: the
    largest is the output layer's own weight `[V, D]` (here half the batch's logits)."""
    cfg = ModelConfig(vocab_size=4096)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 2 * cfg.dim // 4))  # 2 D positions
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _, _ = policy_logprobs(model, tokens, tokens, chunk=16)
    logp.sum().backward()
    assert max(saved) == cfg.vocab_size * cfg.dim < tokens.numel() * cfg.vocab_size
