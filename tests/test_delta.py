"""Weight versions as sparse deltas: exact, checked against an independent comparison, and
refused when they would give anything but the version the learner published."""

import pytest
import torch

from async_rl.weights.delta import apply_delta, fingerprint, make_delta

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.gate.weight": (8, 32)}


def _versions(n: int, lr: float = 1e-4, seed: int = 0):
    """bf16 versions published from fp32 masters that take small steps (the learner's way)."""
    gen = torch.Generator().manual_seed(seed)
    masters = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    out = []
    for _ in range(n):
        out.append({k: m.to(torch.bfloat16) for k, m in masters.items()})
        for m in masters.values():
            m.add_(lr * torch.randn(m.shape, generator=gen))
    return out


def _bitwise_equal(a, b) -> bool:
    return all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_a_chain_of_deltas_rebuilds_every_version_bit_for_bit():
    versions = _versions(4)
    held = {k: v.clone() for k, v in versions[0].items()}
    mark = fingerprint(held)
    for v in range(1, 4):
        delta = make_delta(versions[v - 1], versions[v], v - 1, v, fingerprint(versions[v - 1]))
        # independently: entries whose bits differ, counted by torch
        changed = sum(
            int((versions[v][k].view(torch.int16) != versions[v - 1][k].view(torch.int16)).sum())
            for k in SHAPES
        )
        assert delta.changed == changed and 0 < delta.share < 0.2
        assert delta.entries == sum(a * b for a, b in SHAPES.values())
        for patch in delta.patches:  # vLLM's SparseWeightPatch coordinates: flat row-major
            if patch.indices is not None:
                flat = versions[v][patch.name].reshape(-1)
                assert torch.equal(
                    flat[patch.indices].view(torch.int16), patch.values.view(torch.int16)
                )
        mark = apply_delta(held, delta, v - 1, mark)
        assert _bitwise_equal(held, versions[v])
        assert mark == delta.fingerprint == fingerprint(versions[v])
    sparse = sum(p.nbytes for p in delta.patches)
    assert sparse < sum(t.numel() * 2 for t in versions[3].values())


def test_a_missed_wrong_or_corrupted_delta_is_refused_and_nothing_is_written():
    v0, v1, v2 = _versions(3)
    f0 = fingerprint(v0)
    d1 = make_delta(v0, v1, 0, 1, f0)
    d2 = make_delta(v1, v2, 1, 2, d1.fingerprint)
    held = {k: t.clone() for k, t in v0.items()}
    with pytest.raises(ValueError, match="delta 1->2: these weights are version 0, not 1"):
        apply_delta(held, d2, 0, f0)  # missed version 1
    with pytest.raises(ValueError, match="would not be version 2"):
        apply_delta(held, d2, 1, f0)  # weights that claim to be version 1 but are not
    patch = next(p for p in d1.patches if p.indices is not None)
    patch.values[0] = patch.values[0] + 1  # a flipped value in transit
    with pytest.raises(ValueError, match="would not be version 1"):
        apply_delta(held, d1, 0, f0)
    assert _bitwise_equal(held, v0)  # refused before anything was written
    patch.indices = patch.indices[:-1]
    with pytest.raises(ValueError, match="values for"):
        apply_delta(held, d1, 0, f0)


def test_bits_decide_and_a_mostly_changed_tensor_goes_whole():
    a = {"x": torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=torch.bfloat16)}
    b = {"x": torch.tensor([-0.0, float("nan"), 1.0, 2.0], dtype=torch.bfloat16)}
    delta = make_delta(a, b, 0, 1, fingerprint(a))
    assert delta.changed == 1 and delta.patches[0].indices.tolist() == [0]  # -0.0 is not 0.0
    c = {"x": torch.tensor([5.0, 6.0, 7.0, 2.0], dtype=torch.bfloat16)}
    whole = make_delta(a, c, 0, 1, fingerprint(a))
    assert whole.patches[0].indices is None and whole.changed == 3
    held = {"x": a["x"].clone()}
    assert apply_delta(held, whole, 0, fingerprint(a)) == fingerprint(c)
    assert torch.equal(held["x"], c["x"])
    with pytest.raises(ValueError, match="hold different tensors"):
        make_delta(a, {"y": c["x"]}, 0, 1, 0)


def test_a_run_measures_each_versions_delta_as_an_independent_comparison_counts_it(
    tmp_path, cold_start, train_in_threads
):
    """`learner.weight_deltas = "measure"`: bf16 versions from fp32 masters; the logged share is
    what comparing the stored versions entry by entry gives."""
    from safetensors.torch import load_file

    from tests.helpers import pipeline_config

    cfg = pipeline_config(
        tmp_path,
        "deltas",
        "run.num_steps=3",
        "model.dtype=bfloat16",
        "learner.lr=1e-5",
        "learner.weight_deltas=measure",
        "learner.keep_versions=9",
    )
    rows, _, _ = train_in_threads(cfg, cold_start)
    weights = cfg.run_dir / "weights"
    stored = [load_file(weights / f"v{v:06d}" / "model.safetensors") for v in range(4)]
    for row in rows:
        v = row["version"]
        old, new = stored[v - 1], stored[v]
        changed = sum(
            int((old[k].view(torch.int16) != new[k].view(torch.int16)).sum()) for k in new
        )
        entries = sum(t.numel() for t in new.values())
        assert new[next(iter(new))].dtype == torch.bfloat16
        assert row["learner/delta_share"] == pytest.approx(changed / entries)
        assert 0 < row["learner/delta_share"] < 0.5
        assert (
            row["learner/delta_mib"]
            < row["learner/version_mib"]
            == pytest.approx(entries * 2 / 2**20)
        )
