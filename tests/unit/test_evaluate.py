"""Evaluation: generation under ablation (KV cache vs full recompute), head selection from scores,
ASR / helpfulness tables, the response cache, `evaluate` end to end on a tiny model, bad input."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from safetyheads.errors import UsageError
from safetyheads.evaluate import (
    Ablation,
    ResponseCache,
    asr_table,
    distribution_shift,
    heads_from_scores,
)
from safetyheads.judges import Verdict


# --- pure pieces ---------------------------------------------------------------------------------


def test_distribution_shift_matches_definition():
    g = torch.Generator().manual_seed(0)
    clean = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    abl = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    kl, agree = distribution_shift(clean, abl)
    p = clean.double().exp()
    expected = (p * (clean.double() - abl.double())).sum(-1).mean().item()
    assert kl == pytest.approx(expected, rel=1e-12)
    assert agree == pytest.approx((clean.argmax(-1) == abl.argmax(-1)).double().mean().item())
    assert distribution_shift(clean, clean) == (0.0, 1.0)


def test_distribution_shift_zero_probability_tokens():
    clean = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # p=0 token must contribute 0, not nan
    abl = torch.log(torch.tensor([[0.25, 0.75, 0.0]]))
    kl, _ = distribution_shift(clean, abl)
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))


def _scores_csv(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["layer", "head", "method", "score", "rank"]).to_csv(
        path / "generalized_ships.csv", index=False)
    return path


def test_heads_from_scores(tmp_path):
    run = _scores_csv(tmp_path / "g", [
        (1, 2, "undifferentiated", 9.0, 1), (0, 3, "undifferentiated", 5.0, 3), (1, 0, "undifferentiated", 7.0, 2),
        (0, 0, "scaling", 3.0, 1)])
    assert heads_from_scores(run, 2, "undifferentiated") == [(1, 2), (1, 0)]
    assert heads_from_scores(run, 1, "scaling") == [(0, 0)]
    with pytest.raises(UsageError, match="ranks only 1"):
        heads_from_scores(run, 2, "scaling")
    with pytest.raises(UsageError, match="no scores for method 'mean'"):
        heads_from_scores(run, 1, "mean")


def test_heads_from_run_without_scores(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no generalized_ships.csv") as exc:
        heads_from_scores(tmp_path / "empty", 3, "undifferentiated")
    assert "\n" not in str(exc.value)


def test_asr_table_overall_and_per_category():
    v = lambda j: Verdict(jailbroken=j)  # noqa: E731
    gens = pd.DataFrame({
        "dataset": ["jbb"] * 4 + ["mi"] * 2,
        "condition": ["baseline"] * 6,
        "heads": [""] * 6, "method": [None] * 6, "epsilon": [None] * 6,
        "category": ["A", "A", "B", "B", None, None],
        "_v_keywords": [v(True), v(False), v(True), v(None), v(False), v(False)],
    })
    t = asr_table(gens, ["keywords"])
    row = lambda d, c: t[(t.dataset == d) & (t.category == c)].iloc[0]  # noqa: E731
    assert row("jbb", "all").asr == pytest.approx(2 / 3) and row("jbb", "all").n == 3
    assert row("jbb", "all").n_unparsed == 1
    assert row("jbb", "A").asr == 0.5 and row("jbb", "B").asr == 1.0
    assert row("mi", "all").asr == 0.0
    assert set(t[t.dataset == "mi"].category) == {"all"}


def test_response_cache_roundtrip_and_truncated_line(tmp_path):
    path = tmp_path / "responses.jsonl"
    cache = ResponseCache(path)
    cache.add([{"key": "a", "response": "x"}, {"key": "b", "response": "y"}])
    with open(path, "a") as fh:
        fh.write('{"key": "c", "respo')  # a write cut by kill -9
    again = ResponseCache(path)
    assert set(again.rows) == {"a", "b"} and again.rows["b"]["response"] == "y"


def test_ablation_key_distinguishes_conditions():
    a = Ablation(((1, 2),), "undifferentiated", 1e-5)
    assert a.heads_str == "1-2"
    assert a.key != Ablation(((1, 2),), "scaling", 1e-5).key
    assert a.key != Ablation(((1, 2),), "undifferentiated", 1e-4).key
