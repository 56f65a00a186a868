"""Fidelity: reproduce the reference implementation's scores on SmolLM2-135M-Instruct
(../shared/reference, see its README for the exact model, prompts and settings), through the public
API (`run_ships`, `run_gships`: encoding, sweep engine, scores, run folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from safetyheads.analyses import run_gships, run_ships
from safetyheads.data import PromptSet, load_prompts

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
METHODS = ("undifferentiated", "scaling")

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")


def _first_lines(n: int) -> list[str]:
    return load_prompts("maliciousinstruct", limit=n).prompts


def _no_bos(loaded, texts):
    """The reference model's tokenizer adds no BOS: neither may ours (a BOS shifts every score)."""
    from safetyheads.prompts import encode
    enc = encode(loaded.tokenizer, texts)
    assert enc.input_ids[0, 0].item() == loaded.tokenizer(texts[0], add_special_tokens=False).input_ids[0]


# The default run checks the heads of the last layers (cheap to replay: ~4 min on a loaded 2-core
# machine); the slow run checks all 270 heads and the Generalized Ships top-10 ranking.
FAST_LAYERS = "27-29"


def _ships(loaded, root, layers):
    prompts = load_prompts("maliciousinstruct", limit=3)
    _no_bos(loaded, prompts.prompts)
    return pd.concat([run_ships(loaded, prompts, "raw", out=root / m, method=m, epsilon=1e-5, layers=layers,
                                quiet=True).table for m in METHODS], ignore_index=True), prompts


def _gships(loaded, root, layers):
    texts = ["## Query:" + line + "\n## Answer:" for line in _first_lines(10)]   # no space after the colon
    prompts = PromptSet(name="maliciousinstruct-first10-query-answer", prompts=texts, ids=list(range(10)),
                        categories=[None] * 10, source="reference README", sha256=None)
    return {m: run_gships(loaded, prompts, "raw", out=root / m, method=m, rank=1, layers=layers, quiet=True).table
            for m in METHODS}


def _smoothed_kl(loaded, text, head, method):
    """The reference's smoothed KL for one (prompt, head), through the `ablated()` context."""
    from safetyheads.ablation import ablated
    from safetyheads.scores import kl_from_logprobs
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        clean = loaded.model(ids).logits[0, -1].float().log_softmax(-1)
        with ablated(loaded.model, [head], method, 1e-5):
            abl = loaded.model(ids).logits[0, -1].float().log_softmax(-1)
    return kl_from_logprobs(clean, abl, smoothed=True).item()


def check_ships(loaded, ours, prompts, method):
    ref = pd.read_csv(REFERENCE / "ships_maliciousinstruct_first3.csv")
    ref = ref[ref["method"] == method]
    ours = ours[ours["method"] == method]
    merged = ours.merge(ref, on=["prompt_id", "layer", "head", "method"], suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(ours) > 0
    diff = (merged["score"] - merged["score_ref"]).abs()
    rel = diff / merged["score_ref"].abs()
    small = merged["score_ref"].abs() < 1e-2
    ok = np.where(small, diff <= 1e-5, rel <= 0.01)
    print(f"\n{method}: {len(merged)} scores; max |diff| (ref < 1e-2) {diff[small].max():.3g}, "
          f"max rel diff (ref >= 1e-2) {rel[~small].max() if (~small).any() else 0:.3g}, "
          f"median rel diff {rel.median():.3g}")
    # Where the exact KL is off by more than 1%, the ablated distribution underflows and the
    # reference's 1e-12 smoothing caps its log ratio: the exact value must then be the larger one,
    # and our smoothed variant must reproduce the reference.
    for row in merged[~ok].itertuples():
        assert row.score > row.score_ref
        smoothed = _smoothed_kl(loaded, prompts.prompts[prompts.ids.index(row.prompt_id)], (row.layer, row.head),
                                method)
        print(f"  prompt {row.prompt_id} head {row.layer}-{row.head}: exact {row.score:.6g}, "
              f"smoothed {smoothed:.6g}, reference {row.score_ref:.6g}")
        assert smoothed == pytest.approx(row.score_ref, rel=1e-3)
    assert (~ok).sum() <= 3


def check_gships(ours, method, full):
    ref = pd.read_csv(REFERENCE / "gships_maliciousinstruct_first10.csv")
    ref = ref[ref["method"] == method]
    merged = ours.merge(ref, on=["layer", "head", "method"], suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(ours) > 0
    diff = (merged["score"] - merged["score_ref"]).abs()
    # The reference's float32 arccos reads angles below ~0.05 degrees as exactly 0; ours resolves them.
    zero_ref = merged["score_ref"] == 0.0
    assert (merged.loc[zero_ref, "score"] < 0.06).all()
    print(f"\n{method}: {len(merged)} heads; max |diff| {diff.max():.3g} deg "
          f"(where the reference is > 0: {diff[~zero_ref].max() if (~zero_ref).any() else 0:.3g})")
    assert diff.max() <= 0.1
    if full:
        # The ranking is only comparable over all heads: the last layers' reference angles are all
        # below 0.5 degrees, where its float32 arccos quantises them into ties.
        assert len(ours) == 270
        ref_top = ref.sort_values(["score", "layer", "head"], ascending=[False, True, True]).head(10)
        ours_top = ours.sort_values("rank").head(10)
        assert list(zip(ref_top["layer"], ref_top["head"])) == list(zip(ours_top["layer"], ours_top["head"]))


@pytest.fixture(scope="module")
def ships_fast(smollm2, tmp_path_factory):
    return _ships(smollm2, tmp_path_factory.mktemp("fidelity_ships"), FAST_LAYERS)


@pytest.fixture(scope="module")
def gships_fast(smollm2, tmp_path_factory):
    return _gships(smollm2, tmp_path_factory.mktemp("fidelity_gships"), FAST_LAYERS)


@pytest.mark.parametrize("method", METHODS)
def test_ships_matches_reference_last_layers(smollm2, ships_fast, method):
    table, prompts = ships_fast
    check_ships(smollm2, table, prompts, method)


@pytest.mark.parametrize("method", METHODS)
def test_generalized_ships_matches_reference_last_layers(gships_fast, method):
    check_gships(gships_fast[method], method, full=False)


@pytest.mark.slow
def test_ships_matches_reference_all_heads(smollm2, tmp_path):
    table, prompts = _ships(smollm2, tmp_path, None)
    for method in METHODS:
        check_ships(smollm2, table, prompts, method)


@pytest.mark.slow
def test_generalized_ships_matches_reference_all_heads(smollm2, tmp_path):
    runs = _gships(smollm2, tmp_path, None)
    for method in METHODS:
        check_gships(runs[method], method, full=True)
