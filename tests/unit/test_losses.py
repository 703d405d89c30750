"""The MiniRL loss against a plain float64 reference of docs/design.md section 2, every switch."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from async_rl.config import AlgoConfig
from learner.loss import MiniRL, group_advantages, minirl_loss


def reference(logp, prox, mu, rewards, lengths, G, cfg):
    """docs/design.md section 2 written out token by token in Python floats."""
    B = len(rewards)
    adv = []
    for g in range(B // G):
        rs = rewards[g * G : (g + 1) * G]
        mean = sum(rs) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (G - 1))
        adv += [(r - mean) / (std + 1e-6) if cfg.adv_std_norm else r - mean for r in rs]
    total, grad = 0.0, [[0.0] * len(row) for row in logp]
    counts = dict(clip=0, trunc=0, masked=0, tokens=0, kl=0.0, k3=0.0, extreme=0)
    C = cfg.tis_cap
    for i in range(B):
        n_i = lengths[i]
        # rho_t, the ratio the correction weighs: pi_theta/mu ("full") or pi_prox/mu
        rho = [
            math.exp((logp[i][t] if cfg.tis_mode == "full" else prox[i][t]) - mu[i][t])
            for t in range(n_i)
        ]
        seq_ratio = math.prod(rho)
        geo_mean = seq_ratio ** (1 / n_i) if n_i else 1.0
        s = 0.0
        for t in range(n_i):
            r = math.exp(logp[i][t] - prox[i][t])
            prox_is = math.exp(prox[i][t] - mu[i][t])
            trunc = keep = False
            if cfg.tis_mode == "none":
                w, keep = 1.0, True
            elif cfg.is_correction == "token_tis":
                w, trunc, keep = min(rho[t], C), rho[t] > C, True
            elif cfg.is_correction == "icepop":
                w, keep = rho[t], 1 / C <= rho[t] <= C
            elif cfg.is_correction == "seq_mask_tis":
                w, trunc = min(rho[t], C), rho[t] > C
                keep = 1 / cfg.geo_mask_cap <= geo_mean <= cfg.geo_mask_cap
            else:  # seq_tis
                w, trunc, keep = min(seq_ratio, C), seq_ratio > C, True
            if cfg.tis_mode == "decoupled":
                w *= r
            m = 1.0 if keep else 0.0
            clipped = cfg.clip and (
                (adv[i] > 0 and r > 1 + cfg.eps_high) or (adv[i] < 0 and r < 1 - cfg.eps_low)
            )
            if clipped:
                m = 0.0
            norm = n_i if cfg.length_norm else 1
            s += m * w * adv[i] * logp[i][t] / norm
            grad[i][t] = -m * w * adv[i] / norm / B
            counts["clip"] += bool(clipped)
            counts["trunc"] += trunc
            counts["masked"] += not keep
            counts["tokens"] += 1
            counts["kl"] += mu[i][t] - prox[i][t]
            counts["k3"] += prox_is - 1 - math.log(prox_is)
            counts["extreme"] += max(prox_is, 1 / prox_is) > 2
        total += s
    n = counts["tokens"]
    metrics = {
        "clip_frac": counts["clip"] / n,
        "tis_trunc_frac": counts["trunc"] / n,
        "is_mask_frac": counts["masked"] / n,
        "train_infer_kl": counts["kl"] / n,
        "train_infer_kl_k3": counts["k3"] / n,
        "extreme_token_frac": counts["extreme"] / n,
    }
    return -total / B, grad, metrics


def random_case(seed, B=8, T=6, G=4, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    mu = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    prox = mu + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = prox + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    return logp, prox, mu, rewards, mask, lengths.tolist(), G


SWITCHES = list(
    itertools.product(("full", "decoupled", "none"), (True, False), (True, False), (True, False))
)


def _check_against_reference(cfg, seeds=range(3), spread=0.6):
    metrics_seen = []
    for seed in seeds:
        logp, prox, mu, rewards, mask, lengths, G = random_case(seed, spread=spread)
        adv = group_advantages(rewards, G, cfg.adv_std_norm).double()
        logp = logp.clone().requires_grad_(True)
        loss, metrics = minirl_loss(logp, prox, mu, adv, mask, cfg)
        loss.backward()
        as_list = lambda t: [[float(x) for x in row] for row in t.detach()]  # noqa: E731
        ref_loss, ref_grad, ref_metrics = reference(
            as_list(logp), as_list(prox), as_list(mu), rewards.tolist(), lengths, G, cfg
        )
        assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
        grad = torch.tensor(ref_grad, dtype=torch.float64)
        assert torch.allclose(logp.grad, grad, rtol=1e-9, atol=1e-12)
        assert (logp.grad[~mask] == 0).all()
        assert metrics.keys() == ref_metrics.keys()
        for key, value in ref_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        metrics_seen.append(metrics)
    return metrics_seen


@pytest.mark.parametrize("tis_mode, clip, length_norm, std_norm", SWITCHES)
def test_loss_gradient_and_metrics_match_the_reference(tis_mode, clip, length_norm, std_norm):
    cfg = replace(
        AlgoConfig(), tis_mode=tis_mode, clip=clip, length_norm=length_norm, adv_std_norm=std_norm
    )
    _check_against_reference(cfg)


# caps chosen so that on the random cases each correction both keeps and drops some tokens
CORRECTIONS = {
    "icepop": dict(tis_cap=2.0),
    "seq_mask_tis": dict(tis_cap=2.0, geo_mask_cap=1.4),
    "seq_tis": dict(tis_cap=2.0),
}


@pytest.mark.parametrize(
    "correction, tis_mode, clip, length_norm",
    list(itertools.product(CORRECTIONS, ("full", "decoupled"), (True, False), (True, False))),
)
def test_each_correction_matches_the_reference(correction, tis_mode, clip, length_norm):
    cfg = replace(
        AlgoConfig(),
        is_correction=correction,
        tis_mode=tis_mode,
        clip=clip,
        length_norm=length_norm,
        **CORRECTIONS[correction],
    )
    seen = _check_against_reference(cfg, seeds=range(4), spread=0.8)
    masked = [m["is_mask_frac"] for m in seen]
    truncated = [m["tis_trunc_frac"] for m in seen]
    if correction == "seq_tis":
        assert max(masked) == 0 and 0 < max(truncated) < 1
    else:
        assert 0 < max(masked) < 1
    if correction == "icepop":
        assert max(truncated) == 0


def test_the_corrections_on_a_hand_worked_case():
    """One response of 2 tokens, A = 1, on policy (pi_theta = pi_prox): rho = (3, 0.5)."""
    mu = torch.log(torch.tensor([[0.2, 0.8]]))
    pi = torch.log(torch.tensor([[0.6, 0.4]]))
    expected = {  # correction -> (weights, masked share, truncated share) with C = 2
        "token_tis": ([2.0, 0.5], 0.0, 0.5),
        "icepop": ([0.0, 0.5], 0.5, 0.0),  # 3 > C: dropped; 0.5 = 1/C: kept
        "seq_tis": ([1.5, 1.5], 0.0, 0.0),  # prod = 1.5 < C
        "seq_mask_tis": ([0.0, 0.0], 1.0, 0.5),  # geometric mean sqrt(1.5) = 1.22 > 1.2
    }
    for correction, (w, masked, truncated) in expected.items():
        cfg = replace(AlgoConfig(), is_correction=correction, tis_cap=2.0, geo_mask_cap=1.2)
        logp = pi.clone().requires_grad_(True)
        loss, m = minirl_loss(logp, pi, mu, torch.ones(1), torch.ones(1, 2), cfg)
        loss.backward()
        assert logp.grad.flatten().tolist() == pytest.approx([-x for x in w]), correction
        assert (m["is_mask_frac"], m["tis_trunc_frac"]) == (masked, truncated), correction
    cfg = replace(AlgoConfig(), is_correction="seq_mask_tis", tis_cap=2.0, geo_mask_cap=1.25)
    logp = pi.clone().requires_grad_(True)
    _, m = minirl_loss(logp, pi, mu, torch.ones(1), torch.ones(1, 2), cfg)
    assert m["is_mask_frac"] == 0.0  # 1.22 <= 1.25: the response is kept


def test_the_switches_are_exercised_by_the_random_cases():
    cfg = AlgoConfig()
    logp, prox, mu, rewards, mask, _, G = random_case(0, spread=1.0)
    _, m = minirl_loss(logp, prox, mu, group_advantages(rewards, G, False), mask, cfg)
    assert 0 < m["clip_frac"] < 1 and 0 < m["tis_trunc_frac"] < 1
    assert 0 < m["extreme_token_frac"] < 1 and m["train_infer_kl_k3"] > 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_on_policy_the_mask_is_all_ones_and_full_equals_decoupled(dtype):
    logp, _, mu, rewards, mask, _, G = random_case(1)
    adv = group_advantages(rewards, G, False)
    results = {}
    for mode in ("full", "decoupled"):
        x = logp.to(dtype).clone().requires_grad_(True)
        loss, m = minirl_loss(
            x, logp.to(dtype), mu, adv, mask, replace(AlgoConfig(), tis_mode=mode)
        )
        loss.backward()
        assert m["clip_frac"] == 0.0
        results[mode] = (loss.item(), x.grad)
    assert results["full"][0] == pytest.approx(results["decoupled"][0], rel=1e-6)
    assert torch.allclose(results["full"][1], results["decoupled"][1], rtol=1e-6)


def test_a_hand_worked_case():
    """Two responses of one group, rewards 1 and 0: A = +0.5 and -0.5."""
    cfg = AlgoConfig()  # full TIS, C = 5, eps 0.2 / 0.27
    mu = torch.log(torch.tensor([[0.1, 0.5], [0.5, 0.5]]))
    prox = torch.log(torch.tensor([[0.6, 0.5], [0.5, 0.5]]))  # token (0,0): pi/mu = 6 -> capped
    pi = torch.log(torch.tensor([[0.6, 0.7], [0.3, 0.5]]))  # (0,1): r = 1.4 > 1.27 with A > 0
    logp = pi.clone().requires_grad_(True)  # (1,0): r = 0.6 < 0.8 with A < 0
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, False)
    assert adv.tolist() == [0.5, -0.5]
    loss, m = minirl_loss(logp, prox, mu, adv, mask, cfg)
    # kept: (0,0) w=5, A=.5; (1,1) w=1, A=-.5 -> L = -(5*.5*log .6 + 1*(-.5)*log .5) / 2
    expected = -(5 * 0.5 * math.log(0.6) - 0.5 * math.log(0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_frac"] == 0.5 and m["tis_trunc_frac"] == 0.25
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.25, 0.0, 0.0, 0.25], rel=1e-6)


def test_decoupled_caps_only_the_discrepancy():
    """One response, A = 1, mu = .1, pi_prox = .6, pi_theta = .72: pi/mu = 7.2, r = 1.2 kept."""
    mu, prox, pi = (torch.log(torch.tensor([[p]])) for p in (0.1, 0.6, 0.72))
    expected_w = {"full": 5.0, "decoupled": 5.0 * 1.2, "none": 1.0}
    for mode, w in expected_w.items():
        logp = pi.clone().requires_grad_(True)
        cfg = replace(AlgoConfig(), tis_mode=mode)
        loss, m = minirl_loss(logp, prox, mu, torch.ones(1), torch.ones(1, 1), cfg)
        loss.backward()
        assert loss.item() == pytest.approx(-w * math.log(0.72), rel=1e-6), mode
        assert logp.grad.item() == pytest.approx(-w, rel=1e-6), mode
        assert m["tis_trunc_frac"] == (0.0 if mode == "none" else 1.0)
        assert m["clip_frac"] == 0.0


def test_metrics_against_numpy():
    logp, prox, mu, rewards, mask, _, G = random_case(4, B=16, T=9, spread=0.8)
    adv = group_advantages(rewards, G, False)
    _, m = minirl_loss(logp.float(), prox.float(), mu.float(), adv, mask, AlgoConfig())
    v = mask.numpy()
    lp, lq, lm, a = logp.numpy()[v], prox.numpy()[v], mu.numpy()[v], adv.numpy()[:, None]
    a = np.broadcast_to(a, v.shape)[v]
    rho, r = np.exp(lq - lm), np.exp(lp - lq)
    assert m["train_infer_kl"] == pytest.approx(np.mean(lm - lq), rel=1e-5)
    assert m["train_infer_kl_k3"] == pytest.approx(np.mean(rho - 1 - np.log(rho)), rel=1e-5)
    assert m["extreme_token_frac"] == pytest.approx(np.mean(np.maximum(rho, 1 / rho) > 2))
    assert m["tis_trunc_frac"] == pytest.approx(np.mean(np.exp(lp - lm) > 5.0))
    clipped = ((a > 0) & (r > 1.27)) | ((a < 0) & (r < 0.8))
    assert m["clip_frac"] == pytest.approx(np.mean(clipped))


def test_padding_may_hold_anything_and_huge_ratios_do_not_overflow():
    logp, prox, mu, rewards, mask, _, G = random_case(2)
    adv = group_advantages(rewards, G, False)
    for mode in ("full", "decoupled", "none"):
        cfg = replace(AlgoConfig(), tis_mode=mode)
        x = logp.float().clone().requires_grad_(True)
        clean, m_clean = minirl_loss(x, prox.float(), mu.float(), adv, mask, cfg)
        clean.backward()
        dirty = [t.float().masked_fill(~mask, v) for t, v in ((logp, -math.inf), (prox, math.nan))]
        y = dirty[0].clone().requires_grad_(True)
        mu_dirty = mu.float().masked_fill(~mask, 1e30)
        loss, m = minirl_loss(y, dirty[1], mu_dirty, adv, mask, cfg)
        loss.backward()
        assert loss.item() == clean.item() and m == m_clean
        assert torch.equal(y.grad, x.grad)
    # pi_theta / mu = e^200 overflows float32 unless the cap is applied in log space
    far = torch.tensor([[0.0, -1.0]], requires_grad=True)
    mu_far = torch.tensor([[-200.0, -1.0]])
    loss, m = minirl_loss(far, far.detach(), mu_far, torch.ones(1), torch.ones(1, 2), AlgoConfig())
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and far.grad.tolist() == [[-5.0, -1.0]]
    assert m["tis_trunc_frac"] == 0.5 and math.isfinite(m["train_infer_kl_k3"])


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert group_advantages(r, 3, False).tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]
    )
    # sample std of (1, 0, 0) is sqrt(1/3); the population std sqrt(2/9) would give other numbers
    s = math.sqrt(1 / 3) + 1e-6
    assert group_advantages(r, 3, True).tolist() == pytest.approx(
        [2 / 3 / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s]
    )
    assert group_advantages(r.view(2, 3), 3, False).shape == (2, 3)
    assert group_advantages(torch.ones(4), 2, True).tolist() == [0, 0, 0, 0]
    assert group_advantages(r.double(), 3, False).dtype == torch.float64
    with pytest.raises(ValueError, match="rewards_G_or_NG"):
        group_advantages(r, 4, False)
    with pytest.raises(ValueError, match="rewards_G_or_NG"):
        group_advantages(r.view(3, 2), 3, False)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0, False)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1, True)


def test_bad_shapes_and_modes_name_the_argument():
    x, m, a, cfg = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2), AlgoConfig()
    bad = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="logprobs_BT"):
        minirl_loss(torch.zeros(6), x, x, a, m, cfg)
    with pytest.raises(ValueError, match="prox_logprobs_BT"):
        minirl_loss(x, bad, x, a, m, cfg)
    with pytest.raises(ValueError, match="behavior_logprobs_BT"):
        minirl_loss(x, x, bad, a, m, cfg)
    with pytest.raises(ValueError, match="mask_BT"):
        minirl_loss(x, x, x, a, bad, cfg)
    with pytest.raises(ValueError, match="advantages_B"):
        minirl_loss(x, x, x, torch.zeros(3), m, cfg)
    with pytest.raises(ValueError, match="algo.tis_mode: 'sequence' is not one of"):
        MiniRL(replace(cfg, tis_mode="sequence"))  # once, as the objective is built
    with pytest.raises(ValueError, match="algo.is_correction"):
        MiniRL(replace(cfg, is_correction="tis"))
