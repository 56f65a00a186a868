"""Gradient screening on the real SmolLM2: the estimators agree with exact scores where their
approximation holds (a small perturbation), and `run_screen` writes its run folder. The
all-heads accuracy on JailbreakBench is a slow test (and a benchmark: benchmarks/screen_vs_exact.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from safetyheads import engine, scores
from safetyheads import screen as S
from safetyheads.data import load_prompts
from safetyheads.prompts import encode, format_prompts
from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

LAYERS = (0, 29)


def _encoded(loaded, n: int, fmt: str = "paper"):
    ps = load_prompts("maliciousinstruct", limit=n)
    return encode(loaded.tokenizer, format_prompts(loaded.tokenizer, list(ps.prompts), fmt))


def _exact(model, enc, heads, method, epsilon):
    cache = engine.prepare(model, enc)
    res = engine.sweep(cache, [[h] for h in heads], method, epsilon, want=("kl", "hidden"), progress=False)
    basis = scores.clean_subspace(res.clean_hidden, 1)
    angle = np.array([scores.generalized_ships(res.clean_hidden, res.hidden[c], 1, clean_basis=basis)
                      for c in range(len(heads))])
    return res.kl, angle


def test_small_perturbation_matches_exact(smollm2):
    """Scaling every head output by 0.97: the first-order angle (complete formula) and the
    second-order KL restricted to the probed Fisher directions track the exact values."""
    model, enc = smollm2.model, _encoded(smollm2, 3)
    heads = [(layer, h) for layer in LAYERS for h in range(9)]
    res = S.screen(model, enc, "scaling", 0.97, probes=8, random_probes=0, full_subspace=True, progress=False)
    kl, angle = _exact(model, enc, heads, "scaling", 0.97)
    est_angle = np.array([float(res.gships[a, b]) for a, b in heads])
    rel = np.abs(est_angle - angle) / angle
    assert np.median(rel) < 0.1, rel
    est_kl = torch.stack([res.ships[:, a, b] for a, b in heads], 1)  # [P, heads]
    # The probes keep part of tr(G): the estimate is a lower bound that ranks like the truth.
    assert float((est_kl <= kl.T * 1.2).float().mean()) > 0.9
    assert spearmanr(est_kl.flatten(), kl.T.flatten())[0] > 0.8


def test_run_screen_writes_run_folder(smollm2, tmp_path):
    out = tmp_path / "run"
    result = S.run_screen(smollm2, load_prompts("maliciousinstruct", limit=3), "paper", out=out, method="scaling",
                          target="gships", mode="auto", top_k=4, quiet=True)
    table = pd.read_csv(out / "screen.csv")
    assert list(table.columns) == ["layer", "head", "method", "score", "rank"] and len(table) == 270
    exact = pd.read_csv(out / "generalized_ships.csv")
    assert len(exact) == 4
    assert set(zip(exact["layer"], exact["head"])) == set(zip(table["layer"][:4], table["head"][:4]))
    assert (out / "manifest.json").is_file() and "Spearman" in result.note


@pytest.mark.slow
def test_ranking_on_jailbreakbench(smollm2):
    """All 270 heads, 8 JailbreakBench prompts (chat), undifferentiated attention: the screen's
    ranking agrees with the exact one (the thresholds sit below the benchmark's measured values)."""
    ps = load_prompts("jailbreakbench", limit=8)
    enc = encode(smollm2.tokenizer, format_prompts(smollm2.tokenizer, list(ps.prompts), "chat"))
    heads = [(a, b) for a in range(30) for b in range(9)]
    kl, angle = _exact(smollm2.model, enc, heads, "undifferentiated", 1e-5)
    res = S.screen(smollm2.model, enc, "undifferentiated", probes=3, progress=False)
    est_ships = np.array([float(res.head_scores("ships")[a, b]) for a, b in heads])
    est_gships = np.array([float(res.gships[a, b]) for a, b in heads])
    assert spearmanr(est_ships, kl.mean(1))[0] > 0.5
    assert spearmanr(est_gships, angle)[0] > 0.5
