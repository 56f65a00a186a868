"""Pure score functions on synthetic tensors: KL against a direct float64 formula, principal
angles against scipy, the tables' shapes, ordering and tie handling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from safetyheads import scores
from safetyheads.errors import UsageError


# ---------------------------------------------------------------- KL
def _direct_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def test_kl_matches_direct_float64_formula():
    gen = torch.Generator().manual_seed(0)
    logits_c = torch.randn(5, 300, generator=gen) * 3                   # [P, V]
    logits_a = logits_c + torch.randn(4, 5, 300, generator=gen) * 0.5   # [C, P, V]
    lp_c, lp_a = logits_c.log_softmax(-1), logits_a.log_softmax(-1)
    kl = scores.kl_from_logprobs(lp_c, lp_a)
    assert kl.shape == (4, 5) and kl.dtype == torch.float64
    p = torch.softmax(logits_c.double(), -1).numpy()
    q = torch.softmax(logits_a.double(), -1).numpy()
    # float32 log-probs carry ~1e-7 relative noise, which a small KL amplifies
    np.testing.assert_allclose(kl.numpy(), _direct_kl(p[None], q), rtol=1e-4)
    assert (kl > 0).all()
    exact = scores.kl_from_logprobs(logits_c.double().log_softmax(-1), logits_a.double().log_softmax(-1))
    np.testing.assert_allclose(exact.numpy(), _direct_kl(p[None], q), rtol=1e-10)


def test_kl_zero_for_identical_and_finite_for_underflowing_probabilities():
    logits = torch.tensor([[0.0, 200.0, -200.0]])
    lp = logits.log_softmax(-1)
    assert scores.kl_from_logprobs(lp, lp).item() == 0.0
    other = torch.tensor([[200.0, 0.0, -200.0]]).log_softmax(-1)
    kl = scores.kl_from_logprobs(lp, other).item()   # p_abl(token 1) = e^-200: float32 probs underflow
    assert math.isfinite(kl) and kl == pytest.approx(200.0, rel=1e-6)
    # the reference's smoothing caps the log ratio at log(1/1e-12) ~ 27.6
    smoothed = scores.kl_from_logprobs(lp, other, smoothed=True).item()
    assert smoothed == pytest.approx(-math.log(1e-12), rel=1e-3)


def test_smoothed_matches_reference_formula_when_nothing_underflows():
    gen = torch.Generator().manual_seed(1)
    lp_c = torch.randn(3, 50, generator=gen).log_softmax(-1)
    lp_a = torch.randn(3, 50, generator=gen).log_softmax(-1)
    p, q = lp_c.exp() + 1e-12, lp_a.exp() + 1e-12
    ref = (p * torch.log(p / q)).sum(-1)
    torch.testing.assert_close(scores.kl_from_logprobs(lp_c, lp_a, smoothed=True).float(), ref)
    torch.testing.assert_close(scores.kl_from_logprobs(lp_c, lp_a).float(), ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- principal angles
def _random_basis(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


@pytest.mark.parametrize("ka,kb", [(1, 1), (3, 3), (4, 2), (2, 5)])
def test_principal_angles_match_scipy(ka, kb):
    rng = np.random.default_rng(ka * 10 + kb)
    a, b = _random_basis(rng, 20, ka), _random_basis(rng, 20, kb)
    ours = np.sort(scores.principal_angles(a, b))
    ref = np.sort(scipy.linalg.subspace_angles(a, b))
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_tiny_angles_are_resolved():
    """arccos of the cosine of 1e-9 rad is exactly 0 in float64; the sine path gets it right."""
    rng = np.random.default_rng(3)
    a = _random_basis(rng, 30, 1)
    perp = rng.standard_normal((30, 1))
    perp -= a * (a.T @ perp)
    perp /= np.linalg.norm(perp)
    for theta in (1e-9, 1e-5, 0.3, 1.2):
        b = a * math.cos(theta) + perp * math.sin(theta)
        assert scores.principal_angles(a, b)[0] == pytest.approx(theta, rel=1e-6)
        ref = scipy.linalg.subspace_angles(a, b)[0]
        assert scores.principal_angles(a, b)[0] == pytest.approx(ref, rel=1e-6)


def test_generalized_ships_rank1_equals_reference_formula():
    gen = torch.Generator().manual_seed(4)
    clean = torch.randn(10, 64, generator=gen)                         # [P, D]
    ablated = clean + 0.3 * torch.randn(10, 64, generator=gen)
    u1 = np.linalg.svd(clean.double().numpy())[0][:, 0]
    u2 = np.linalg.svd(ablated.double().numpy())[0][:, 0]
    ref = math.degrees(math.acos(min(1.0, abs(float(u1 @ u2)))))
    assert scores.generalized_ships(clean, ablated, 1) == pytest.approx(ref, rel=1e-9)
    assert scores.generalized_ships(clean, clean, 1) == pytest.approx(0.0, abs=1e-9)


def test_generalized_ships_rank_r_is_sum_of_scipy_angles_and_batch_agrees():
    gen = torch.Generator().manual_seed(5)
    clean = torch.randn(12, 40, generator=gen)
    hidden = clean + 0.5 * torch.randn(3, 12, 40, generator=gen)      # [C, P, D]
    for center in (False, True):
        batch = scores.generalized_ships_batch(clean, hidden, rank=3, center=center)
        for c in range(3):
            mc, ma = clean.double().numpy(), hidden[c].double().numpy()
            if center:
                mc, ma = mc - mc.mean(0), ma - ma.mean(0)
            uc = np.linalg.svd(mc, full_matrices=False)[0][:, :3]
            ua = np.linalg.svd(ma, full_matrices=False)[0][:, :3]
            ref = np.degrees(scipy.linalg.subspace_angles(uc, ua)).sum()
            assert batch[c] == pytest.approx(ref, rel=1e-9)


def test_centering_changes_the_score():
    gen = torch.Generator().manual_seed(6)
    offset = 5 * torch.randn(1, 32, generator=gen)
    clean = offset + torch.randn(8, 32, generator=gen)
    ablated = offset + torch.randn(8, 32, generator=gen)
    assert scores.generalized_ships(clean, ablated, 1) != pytest.approx(
        scores.generalized_ships(clean, ablated, 1, center=True))


def test_rank_guards():
    clean = torch.randn(4, 16)
    with pytest.raises(UsageError, match="at least 1"):
        scores.generalized_ships(clean, clean, 0)
    with pytest.raises(UsageError, match="number of prompts"):
        scores.generalized_ships(clean, clean, 5)
    with pytest.raises(UsageError, match="minus one"):
        scores.generalized_ships(clean, clean, 4, center=True)
    degenerate = torch.ones(4, 16)                                     # rank 1
    with pytest.raises(UsageError, match="rank of the clean"):
        scores.clean_subspace(degenerate, 2)


def test_zero_ablated_matrix_counts_missing_directions_as_90_degrees():
    clean = torch.randn(6, 16)
    assert scores.generalized_ships(clean, torch.zeros(6, 16), 2) == 180.0
    rank1 = torch.randn(6, 1) @ torch.randn(1, 16)
    score = scores.generalized_ships(clean, rank1, 2)
    assert 90.0 <= score <= 180.0


# ---------------------------------------------------------------- tables
def test_ships_table_layout():
    heads = [(0, 0), (0, 1), (1, 0)]
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)  # [C, P]
    df = scores.ships_table(kl, heads, [7, 9], "scaling")
    assert list(df.columns) == scores.SHIPS_COLUMNS
    assert df["prompt_id"].tolist() == [7, 7, 7, 9, 9, 9]
    assert df["score"].tolist() == [0.1, 0.3, 0.5, 0.2, 0.4, 0.6]
    assert (df["method"] == "scaling").all()
    with pytest.raises(ValueError):
        scores.ships_table(kl, heads[:2], [7, 9], "scaling")


def test_ships_summary_counts_top_k_and_sorts():
    rng = np.random.default_rng(0)
    heads = [(layer, h) for layer in range(3) for h in range(5)]       # 15 heads
    kl = rng.random((15, 6))
    kl[7] += 10                                                        # head (1, 2) always on top
    df = scores.ships_table(kl, heads, list(range(6)), "undifferentiated")
    summary = scores.ships_summary(df, top=3)
    assert list(summary.columns) == scores.SUMMARY_COLUMNS
    assert (summary.iloc[0]["layer"], summary.iloc[0]["head"]) == (1, 2)
    assert summary.iloc[0]["top10_count"] == 6
    assert summary["top10_count"].sum() == 3 * 6
    # independent count: for each prompt, which heads are in its top 3
    expected = {h: 0 for h in heads}
    for p in range(6):
        for c in np.argsort(-kl[:, p])[:3]:
            expected[heads[c]] += 1
    got = {(r.layer, r.head): r.top10_count for r in summary.itertuples()}
    assert got == expected
    keys = list(zip(-summary["top10_count"], -summary["mean"]))
    assert keys == sorted(keys)
    row = summary[(summary["layer"] == 0) & (summary["head"] == 3)].iloc[0]
    assert row["mean"] == pytest.approx(kl[3].mean()) and row["median"] == pytest.approx(np.median(kl[3]))


def test_gships_table_ranks_and_ties():
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    df = scores.gships_table(heads, [1.0, 3.0, 3.0, 0.5], "undifferentiated")
    assert list(df.columns) == scores.GSHIPS_COLUMNS
    assert df["rank"].tolist() == [1, 2, 3, 4]
    assert list(zip(df["layer"], df["head"])) == [(0, 1), (1, 0), (0, 0), (1, 1)]
    both = pd.concat([df, scores.gships_table(heads, [4, 3, 2, 1], "scaling")])
    assert scores.top_heads(both, 2, method="scaling") == [(0, 0), (0, 1)]
    assert scores.top_heads(both, 1) == [(0, 0)]
