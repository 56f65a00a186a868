"""Gradient screening (issue 7) on tiny random models, in float64 so that exact KLs and angles of
small perturbations are resolved: the estimators agree with the exact scores where their
approximations hold (small perturbations), and rank heads sensibly for real ablations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from safetyheads import screen as S
from safetyheads.ablation import ablated
from safetyheads.errors import UsageError
from safetyheads.prompts import Encoded
from safetyheads.scores import generalized_ships
from tiny_models import HEADS, LAYERS, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

PROMPT_LENGTHS = (9, 6, 9, 7, 8, 5)


def _encoded(seed: int = 0) -> Encoded:
    ids, mask, pos = left_pad([random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(PROMPT_LENGTHS)])
    return Encoded(ids, mask, pos)


def _model(arch: str = "llama", gqa: bool = True, weak_attention: bool = False):
    model = tiny_model(arch, gqa).double()
    if weak_attention:  # small queries: attention is already near uniform, so `uniform` is a small change
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(0.05)
    return model


@torch.no_grad()
def _exact(model, enc: Encoded, method: str, epsilon: float):
    """Per head: KL [P] (float64) and the rank-1 Generalized Ships angle, by plain ablated forwards."""
    def run():
        h = S._last_hidden(model, enc)
        return torch.log_softmax(model.get_output_embeddings()(h).double(), -1), h

    lp0, h0 = run()
    kl = torch.zeros(len(enc), LAYERS, HEADS, dtype=torch.float64)
    angle = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for layer in range(LAYERS):
        for head in range(HEADS):
            with ablated(model, [(layer, head)], method, epsilon):
                lp, h = run()
            kl[:, layer, head] = (lp0.exp() * (lp0 - lp)).sum(-1)
            angle[layer, head] = float(generalized_ships(h0, h, 1))
    return kl, angle


def _all_probes(model) -> int:
    return model.config.hidden_size  # every eigen-direction of the pulled-back Fisher matrix


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("qwen2", False)])
def test_small_scaling_matches_exact(arch, gqa):
    """ε = 0.98 scales every head output by 0.98: second-order KL and first-order angles hold."""
    model, enc = _model(arch, gqa), _encoded()
    res = S.screen(model, enc, "scaling", 0.98, probes=_all_probes(model), full_subspace=True, progress=False)
    kl, angle = _exact(model, enc, "scaling", 0.98)
    assert torch.allclose(res.fisher_captured, torch.ones_like(res.fisher_captured), atol=1e-9)
    assert float(kl.min()) > 0
    rel = (res.ships - kl).abs() / kl
    assert float(rel.median()) < 0.03 and float(rel.max()) < 0.15, rel
    rel_angle = (res.gships - angle).abs() / angle
    assert float(rel_angle.median()) < 0.03 and float(rel_angle.max()) < 0.15, rel_angle


def test_uniform_output_change_is_the_ablations():
    """`uniform` (attention over the visible prefix, padding excluded, sliding windows kept):
    with near-uniform attention already, the change is small and the estimate matches."""
    model, enc = _model("mistral", True, weak_attention=True), _encoded(1)
    res = S.screen(model, enc, "uniform", probes=_all_probes(model), targets=("ships",), progress=False)
    kl, _ = _exact(model, enc, "uniform", 1e-5)
    rel = (res.ships - kl).abs() / kl
    assert float(rel.median()) < 0.05, rel


def test_fewer_probes_underestimate_by_the_captured_share():
    """Truncating the Fisher matrix can only lose mass: each estimate shrinks monotonically."""
    model, enc = _model(), _encoded()
    few = S.screen(model, enc, "scaling", 0.98, probes=2, targets=("ships",), progress=False)
    full = S.screen(model, enc, "scaling", 0.98, probes=_all_probes(model), targets=("ships",), progress=False)
    assert bool((few.ships <= full.ships * (1 + 1e-9)).all())
    assert bool((few.fisher_captured < 1).all()) and bool((few.fisher_captured > 0).all())
    assert few.n_backward == 2 and full.n_backward == _all_probes(model)


def test_real_ablation_ranking_agrees():
    """ε = 1e-5 (the paper's setting) is far from linear; the ranking must still correlate."""
    model, enc = _model("llama", True), _encoded(2)
    res = S.screen(model, enc, "undifferentiated", 1e-5, probes=4, progress=False)
    kl, angle = _exact(model, enc, "undifferentiated", 1e-5)
    rho_ships = spearmanr(kl.mean(0).flatten(), res.head_scores("ships").flatten())[0]
    rho_gships = spearmanr(angle.flatten(), res.head_scores("gships").flatten())[0]
    assert rho_ships > 0.6, rho_ships
    assert rho_gships > 0.6, rho_gships


def test_batches_and_padding_do_not_change_estimates():
    model, enc = _model(), _encoded()
    one = S.screen(model, enc, "undifferentiated", probes=3, batch_size=len(enc), progress=False)
    split = S.screen(model, enc, "undifferentiated", probes=3, batch_size=2, progress=False)
    assert torch.allclose(one.ships, split.ships, rtol=1e-6, atol=1e-12)
    assert torch.allclose(one.gships, split.gships, rtol=1e-6, atol=1e-12)
    alone = S.screen(model, enc[1:2], "undifferentiated", probes=3, targets=("ships",), progress=False)
    assert torch.allclose(alone.ships[0], one.ships[1], rtol=1e-6, atol=1e-12)


def test_table_and_parameters_untouched():
    model, enc = _model(), _encoded()
    before = [p.requires_grad for p in model.parameters()]
    res = S.screen(model, enc, "scaling", probes=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    df = res.table("gships")
    assert list(df.columns) == ["layer", "head", "method", "score", "rank"]
    assert len(df) == LAYERS * HEADS and list(df["rank"]) == list(range(1, LAYERS * HEADS + 1))
    assert np.all(np.diff(df["score"].to_numpy()) <= 0)
    best = S.top_heads(res.head_scores("ships"), 3)
    assert best == [(int(r.layer), int(r.head)) for r in res.table("ships").head(3).itertuples()]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="mean"), "screen supports"),
    (dict(method="scaling", epsilon=1.5), "psilon|ε"),
    (dict(targets=("kl",)), "targets"),
    (dict(probes=0), "probes"),
    (dict(rank=6), "rank"),
])
def test_bad_arguments(kwargs, match):
    model, enc = _model(), _encoded()
    with pytest.raises(UsageError, match=match):
        S.screen(model, enc, progress=False, **kwargs)
