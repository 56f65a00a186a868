"""run_ships / run_gships / run_sahara on a tiny random model: files and columns, scores against an
independent path (the `ablated()` context + a plain forward of the stock model), resume, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from safetyheads import analyses
from safetyheads.ablation import ablated
from safetyheads.data import PromptSet
from safetyheads.errors import UsageError
from safetyheads.models import LoadedModel
from safetyheads.prompts import encode, format_prompts

from tiny_chat import tiny_model, tiny_tokenizer
from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

N_LAYERS, N_HEADS = 3, 4
PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?", "hi"]


@pytest.fixture(scope="module")
def loaded():
    model = tiny_model("qwen2", layers=N_LAYERS, heads=N_HEADS, kv_heads=2, seed=1)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), spec="tiny-qwen2", revision=None,
                       weights_sha256=None, source="memory")


@pytest.fixture
def prompts():
    return PromptSet(name="tiny", prompts=list(PROMPTS), ids=list(range(10, 10 + len(PROMPTS))),
                     categories=[None] * len(PROMPTS), source="memory", sha256=None)


def _reference_last(loaded, texts, heads=(), method="undifferentiated", epsilon=1e-5):
    """Last-position log-probs [P, V] and final-norm hidden states [P, D] from a stock forward."""
    enc = encode(loaded.tokenizer, texts)
    with torch.no_grad(), ablated(loaded.model, list(heads), method, epsilon):
        out = loaded.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           position_ids=enc.position_ids, output_hidden_states=True)
    return out.logits[:, -1].double().log_softmax(-1), out.hidden_states[-1][:, -1].double()


def test_ships_scores_files_and_values(loaded, prompts, tmp_path):
    res = analyses.run_ships(loaded, prompts, "chat", out=tmp_path / "run", method="scaling", quiet=True)
    table = pd.read_csv(tmp_path / "run" / "ships.csv")
    assert list(table.columns) == ["prompt_id", "layer", "head", "method", "score"]
    assert len(table) == len(PROMPTS) * N_LAYERS * N_HEADS
    assert set(table["prompt_id"]) == set(prompts.ids)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "ships.parquet"), res.table, check_dtype=False)
    summary = pd.read_csv(tmp_path / "run" / "ships_summary.csv")
    assert list(summary.columns) == ["layer", "head", "method", "mean", "median", "top10_count"]
    assert len(summary) == N_LAYERS * N_HEADS
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "ships" in json.dumps(manifest)
    assert manifest["config"]["dtype"] == "float32"  # part of the run's identity: no bf16/fp32 mix on resume
    from safetyheads.engine import shared_prefix_length
    tokens = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"]
              for t in format_prompts(loaded.tokenizer, PROMPTS, "chat")]
    assert manifest["shared_prefix_tokens"] == shared_prefix_length(loaded.model, tokens) >= 4  # the chat header

    texts = format_prompts(loaded.tokenizer, PROMPTS, "chat")
    clean, _ = _reference_last(loaded, texts)
    for head in [(0, 1), (2, 3)]:
        abl, _ = _reference_last(loaded, texts, [head], "scaling")
        expected = (clean.exp() * (clean - abl)).sum(-1).numpy()            # [P]
        got = table[(table["layer"] == head[0]) & (table["head"] == head[1])].sort_values("prompt_id")["score"]
        np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-3, atol=1e-7)


def test_gships_ranking_matches_scipy_angles(loaded, prompts, tmp_path):
    res = analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "g", method="undifferentiated",
                              rank=2, quiet=True)
    table = pd.read_csv(tmp_path / "g" / "generalized_ships.csv")
    assert list(table.columns) == ["layer", "head", "method", "score", "rank"]
    assert table["rank"].tolist() == list(range(1, N_LAYERS * N_HEADS + 1))
    assert table["score"].is_monotonic_decreasing
    texts = format_prompts(loaded.tokenizer, PROMPTS, "raw")
    _, clean = _reference_last(loaded, texts)
    uc = np.linalg.svd(clean.numpy(), full_matrices=False)[0][:, :2]
    for head in [(0, 0), (1, 2)]:
        _, abl = _reference_last(loaded, texts, [head])
        ua = np.linalg.svd(abl.numpy(), full_matrices=False)[0][:, :2]
        expected = math.degrees(scipy.linalg.subspace_angles(uc, ua).sum())
        got = res.table[(res.table["layer"] == head[0]) & (res.table["head"] == head[1])]["score"].item()
        assert got == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("smoothed", [False, True])
def test_ships_with_gships_equals_the_two_separate_runs(loaded, prompts, tmp_path, smoothed):
    """The acceptance runs use one sweep for both scores (`ships --with-gships`): its files must be
    those of `ships` and `gships` run apart (the smoothed path slices the sweep differently)."""
    both = analyses.run_ships(loaded, prompts, "raw", out=tmp_path / "both", method="undifferentiated",
                              with_gships=True, rank=2, smoothed=smoothed, quiet=True)
    ships = analyses.run_ships(loaded, prompts, "raw", out=tmp_path / "ships", method="undifferentiated",
                               smoothed=smoothed, quiet=True)
    gships = analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "g", method="undifferentiated", rank=2,
                                 quiet=True)
    pd.testing.assert_frame_equal(both.table, ships.table, rtol=1e-6)
    pd.testing.assert_frame_equal(both.summary, ships.summary, rtol=1e-6)
    combined = pd.read_csv(tmp_path / "both" / "generalized_ships.csv")
    alone = pd.read_csv(tmp_path / "g" / "generalized_ships.csv")
    assert len(combined) == N_LAYERS * N_HEADS
    pd.testing.assert_frame_equal(combined, alone, rtol=1e-6)
    manifest = json.loads((tmp_path / "both" / "manifest.json").read_text())
    assert manifest["summary"]["gships_top_heads"] == [f"{a}-{b}" for a, b in zip(alone["layer"][:10], alone["head"][:10])]


def test_sahara_greedy_steps(loaded, prompts, tmp_path):
    res = analyses.run_sahara(loaded, prompts, "raw", out=tmp_path / "s", method="scaling", group_size=2,
                              layers="1-2", quiet=True)
    steps = pd.read_csv(tmp_path / "s" / "sahara.csv")
    assert list(steps.columns) == ["step", "layer", "head", "score"]
    assert steps["step"].tolist() == [1, 2]
    assert all(layer in (1, 2) for layer in steps["layer"])
    cands = pd.read_csv(tmp_path / "s" / "sahara_candidates.csv")
    assert (cands["step"] == 1).sum() == 2 * N_HEADS and (cands["step"] == 2).sum() == 2 * N_HEADS - 1
    for step, row in steps.iterrows():
        of_step = cands[cands["step"] == row["step"]]
        assert row["score"] == of_step["score"].max()                     # greedy: the best candidate
    group = [tuple(h) for h in json.loads((tmp_path / "s" / "sahara.json").read_text())["group"]]
    assert group == res.group == list(zip(steps["layer"], steps["head"]))
    # step 2's score is Generalized Ships of the two heads ablated together
    texts = format_prompts(loaded.tokenizer, PROMPTS, "raw")
    _, clean = _reference_last(loaded, texts)
    _, abl = _reference_last(loaded, texts, group, "scaling")
    u1 = np.linalg.svd(clean.numpy())[0][:, 0]
    u2 = np.linalg.svd(abl.numpy())[0][:, 0]
    expected = math.degrees(math.acos(min(1.0, abs(float(u1 @ u2)))))
    assert steps["score"].iloc[1] == pytest.approx(expected, abs=0.05)


def test_sahara_topk_candidates_come_from_step1_or_a_gships_run(loaded, prompts, tmp_path):
    res = analyses.run_sahara(loaded, prompts, "raw", out=tmp_path / "s", group_size=2, candidates="top3",
                              quiet=True)
    step1 = res.candidates[res.candidates["step"] == 1].sort_values("score", ascending=False)
    top3 = set(zip(step1["layer"][:3], step1["head"][:3]))
    step2 = res.candidates[res.candidates["step"] == 2]
    assert set(zip(step2["layer"], step2["head"])) == top3 - {res.group[0]}
    g = analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "g", quiet=True)
    from_run = analyses.run_sahara(loaded, prompts, "raw", out=tmp_path / "s2", group_size=2, candidates="top3",
                                   gships_from=tmp_path / "g", quiet=True)
    first = from_run.candidates[from_run.candidates["step"] == 1]
    assert set(zip(first["layer"], first["head"])) == set(zip(g.table["layer"][:3], g.table["head"][:3]))
    assert from_run.group[0] == res.group[0]


def test_resume_skips_done_chunks_and_gives_identical_files(loaded, prompts, tmp_path, monkeypatch):
    full = tmp_path / "full"
    analyses.run_ships(loaded, prompts, "raw", out=full, chunk_rows=1, quiet=True)
    part = tmp_path / "part"
    import safetyheads.engine as engine
    real_sweep, calls, interrupt = engine.sweep, [], [True]

    class Interrupted(Exception):
        pass

    def failing_sweep(cache, configs, *a, **k):
        calls.append(configs)
        if interrupt[0] and len(calls) == 2:
            raise Interrupted                                             # interrupted in the second chunk
        return real_sweep(cache, configs, *a, **k)

    monkeypatch.setattr(engine, "sweep", failing_sweep)
    with pytest.raises(Interrupted):
        analyses.run_ships(loaded, prompts, "raw", out=part, chunk_rows=1, quiet=True)
    assert not (part / "ships.csv").exists()
    with pytest.raises(UsageError):                                       # same run, no --resume: refused
        analyses.run_ships(loaded, prompts, "raw", out=part, chunk_rows=1, quiet=True)
    calls.clear()
    interrupt[0] = False
    analyses.run_ships(loaded, prompts, "raw", out=part, chunk_rows=1, quiet=True, resume=True)
    assert [c[0][0][0] for c in calls] == [1, 2]                          # layer 0 was not recomputed
    for name in ("ships.csv", "ships_summary.csv"):
        assert (part / name).read_bytes() == (full / name).read_bytes()


def test_bad_input(loaded, prompts, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(UsageError, match="epsilon"):
        analyses.run_ships(loaded, prompts, "raw", out=out, epsilon=1.5, quiet=True)
    with pytest.raises(UsageError, match="epsilon"):
        analyses.run_gships(loaded, prompts, "raw", out=out, epsilon=0.0, quiet=True)
    with pytest.raises(UsageError):
        analyses.run_ships(loaded, prompts, "raw", out=out, heads="1-9", quiet=True)   # 4-head model
    with pytest.raises(UsageError):
        analyses.run_ships(loaded, prompts, "raw", out=out, layers="0-7", quiet=True)  # 3-layer model
    with pytest.raises(UsageError, match="rank"):
        analyses.run_gships(loaded, prompts, "raw", out=out, rank=0, quiet=True)
    with pytest.raises(UsageError, match="rank"):
        analyses.run_gships(loaded, prompts, "raw", out=out, rank=len(PROMPTS) + 1, quiet=True)
    with pytest.raises(UsageError, match="group-size"):
        analyses.run_sahara(loaded, prompts, "raw", out=out, group_size=N_LAYERS * N_HEADS + 1, quiet=True)
    with pytest.raises(UsageError, match="group-size"):
        analyses.run_sahara(loaded, prompts, "raw", out=out, group_size=3, layers="0-0", heads="0-0,0-1",
                            quiet=True)
    with pytest.raises(UsageError, match="candidates"):
        analyses.run_sahara(loaded, prompts, "raw", out=out, candidates="best", quiet=True)
    empty = PromptSet(name="empty", prompts=[], ids=[], categories=[], source="memory", sha256=None)
    with pytest.raises(UsageError, match="no prompts"):
        analyses.run_ships(loaded, empty, "raw", out=out, quiet=True)
    assert not out.exists()                                              # nothing written on bad input
    # a folder that holds a different run
    analyses.run_gships(loaded, prompts, "raw", out=out, layers="2", quiet=True)
    with pytest.raises(UsageError):
        analyses.run_gships(loaded, prompts, "raw", out=out, layers="1", quiet=True)
    with pytest.raises(UsageError):
        analyses.run_gships(loaded, prompts, "raw", out=out, layers="1", resume=True, quiet=True)
    res = analyses.run_gships(loaded, prompts, "raw", out=out, layers="1", force=True, quiet=True)
    assert set(res.table["layer"]) == {1}


def _bar_states(stderr: str, desc: str) -> list[str]:
    """The successive renderings of one tqdm bar (tqdm redraws with carriage returns)."""
    return [s for s in re.split(r"[\r\n]", stderr) if s.startswith(desc)]


def _percent(state: str) -> int:
    return int(re.search(r"(\d+)%", state).group(1))


def test_progress_bar_counts_compute_and_starts_at_the_resumed_work(loaded, prompts, tmp_path, capsys, monkeypatch):
    analyses.run_ships(loaded, prompts, "raw", out=tmp_path / "full", method="scaling", chunk_rows=1)
    states = _bar_states(capsys.readouterr().err, "ships scaling")
    assert states and _percent(states[-1]) == 100 and "12/12 heads" in states[-1]
    percents = [_percent(s) for s in states]
    assert percents == sorted(percents) and len(set(percents)) > 2     # it moved, forward only

    # interrupted after layer 0: a layer-0 head replays 3 layers, a layer-1 head 2, a layer-2 head 1,
    # so layer 0 is half the work (3 / (3 + 2 + 1)); the resumed bar starts there, not at 0
    import safetyheads.engine as engine
    real_sweep, calls = engine.sweep, []

    def failing_sweep(cache, configs, *a, **k):
        calls.append(configs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sweep(cache, configs, *a, **k)

    monkeypatch.setattr(engine, "sweep", failing_sweep)
    with pytest.raises(KeyboardInterrupt):
        analyses.run_ships(loaded, prompts, "raw", out=tmp_path / "part", method="scaling", chunk_rows=1, quiet=True)
    monkeypatch.setattr(engine, "sweep", real_sweep)
    capsys.readouterr()
    analyses.run_ships(loaded, prompts, "raw", out=tmp_path / "part", method="scaling", chunk_rows=1, resume=True)
    states = _bar_states(capsys.readouterr().err, "ships scaling")
    assert _percent(states[0]) == 50 and "4/12 heads" in states[0]
    assert _percent(states[-1]) == 100 and "12/12 heads" in states[-1]


def test_sahara_progress_bar_ends_full_across_steps(loaded, prompts, tmp_path, capsys):
    analyses.run_sahara(loaded, prompts, "raw", out=tmp_path / "s", group_size=2, candidates="top3")
    states = _bar_states(capsys.readouterr().err, "sahara undifferentiated")
    assert _percent(states[-1]) == 100 and "step 2/2" in states[-1]
    assert "14/14 heads tried" in states[-1]                             # 12 at step 1, then 2 of the top 3


def test_chunks_hold_whole_layers_and_enough_rows():
    from safetyheads.pipeline import chunk_key, plan_chunks
    heads = [(layer, h) for layer in range(5) for h in range(3)]
    # 3 heads x 4 prompts = 12 rows per layer: 25 rows need 3 layers; the rest is one short chunk
    chunks = plan_chunks(list(reversed(heads)), 4, 25)
    assert chunks == [heads[:9], heads[9:]]
    assert [chunk_key("g_L", c) for c in chunks] == ["g_L000-002", "g_L003-004"]
    assert plan_chunks(heads, 4, 1) == [heads[i:i + 3] for i in range(0, 15, 3)]  # one layer each
    assert chunk_key("g_L", plan_chunks(heads, 4, 1)[2]) == "g_L002"
    assert plan_chunks(heads, 100, 25) == [heads[i:i + 3] for i in range(0, 15, 3)]
    with pytest.raises(UsageError, match="--chunk-rows"):
        plan_chunks(heads, 4, 0)


def test_bad_chunk_rows_is_refused_before_the_run_folder(loaded, prompts, tmp_path):
    with pytest.raises(UsageError, match="--chunk-rows"):
        analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "g", chunk_rows=0, quiet=True)
    assert not (tmp_path / "g").exists()
