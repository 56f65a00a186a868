"""`summarize_runs` / `safetyheads summary` on real run folders written by the analyses on a tiny
model: the listed top heads are the run files' own rankings, unfinished runs are listed with their
saved chunks, and evaluation runs contribute their overall ASR rows."""

from __future__ import annotations

import pandas as pd
import pytest

from safetyheads import analyses
from safetyheads.cli.main import main as cli_main
from safetyheads.data import PromptSet
from safetyheads.errors import UsageError
from safetyheads.models import LoadedModel
from safetyheads.results import summarize_runs

from fixtures_runs import make_eval_run
from tiny_chat import tiny_model, tiny_tokenizer
from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    loaded = LoadedModel(model=tiny_model("llama", layers=3, heads=4, kv_heads=2, seed=3),
                         tokenizer=tiny_tokenizer(), spec="tiny-llama", revision=None, weights_sha256=None,
                         source="memory")
    prompts = PromptSet(name="jailbreakbench", prompts=list(PROMPTS), ids=list(range(len(PROMPTS))),
                        categories=[None] * len(PROMPTS), source="memory", sha256=None)
    analyses.run_ships(loaded, prompts, "raw", out=root / "ships", method="scaling", with_gships=True, quiet=True)
    analyses.run_sahara(loaded, prompts, "raw", out=root / "sahara", group_size=2, candidates="top3", quiet=True)
    # an interrupted run: its first chunk is on disk, no final files
    import safetyheads.engine as engine
    real = engine.sweep
    calls = []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    engine.sweep = stop_second
    try:
        with pytest.raises(KeyboardInterrupt):
            analyses.run_gships(loaded, prompts, "raw", out=root / "cut", chunk_rows=1, quiet=True)
    finally:
        engine.sweep = real
    make_eval_run(root)
    return root


def test_top_heads_are_the_runs_own_rankings(runs):
    table = summarize_runs([runs], top=4).rankings
    ships = table[table["run"] == str(runs / "ships")].set_index("ranking")
    gships = pd.read_csv(runs / "ships" / "generalized_ships.csv").sort_values("rank")
    expected = ",".join(f"{a}-{b}" for a, b in zip(gships["layer"][:4], gships["head"][:4]))
    assert ships.loc["Generalized Ships", "top_heads"] == expected
    summary = pd.read_csv(runs / "ships" / "ships_summary.csv")              # already in ranking order
    assert ships.loc["Ships (top-10 count)", "top_heads"] == \
        ",".join(f"{a}-{b}" for a, b in zip(summary["layer"][:4], summary["head"][:4]))
    assert set(ships["status"]) == {"finished"} and set(ships["method"]) == {"scaling"}
    assert set(ships["prompts"]) == {len(PROMPTS)} and set(ships["dataset"]) == {"jailbreakbench"}
    assert all(t.endswith(" s") for t in ships["time"])                   # from compute_seconds
    sahara = table[(table["run"] == str(runs / "sahara")) & (table["ranking"] == "Sahara group")]
    steps = pd.read_csv(runs / "sahara" / "sahara.csv")
    assert sahara["top_heads"].item() == ",".join(f"{a}-{b}" for a, b in zip(steps["layer"], steps["head"]))


def test_unfinished_runs_and_asr_are_listed(runs):
    result = summarize_runs([runs])
    cut = result.rankings[result.rankings["run"] == str(runs / "cut")]
    assert cut["status"].item() == "unfinished: 1 chunks saved" and cut["top_heads"].item() == ""
    asr = result.asr
    assert len(asr) == 2 * 3                                              # 2 datasets x (baseline + 2 ablations)
    assert set(asr["condition"]) == {"baseline", "ablated"}
    assert asr["asr"].between(0, 1).all()


def test_cli_prints_both_tables_and_rejects_bad_input(runs, capsys):
    assert cli_main(["summary", str(runs), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Generalized Ships" in out and "attack success rate:" in out and "unfinished: 1 chunks saved" in out
    assert cli_main(["summary", str(runs), "--csv"]) == 0
    first = capsys.readouterr().out.split("\n\n")[0]
    assert first.splitlines()[0].startswith("run,command,model,dataset")
    with pytest.raises(UsageError, match="--top"):
        summarize_runs([runs], top=0)
    with pytest.raises(UsageError, match="no such run folder"):
        summarize_runs([runs / "missing"])


def test_time_of_a_resumed_run_is_its_compute_time_not_the_calendar_span(tmp_path):
    """A run started, interrupted overnight and resumed: summary and report show compute_seconds."""
    import json

    from fixtures_runs import make_scores_run
    from safetyheads.report import build_report

    run, _ = make_scores_run(tmp_path, dataset="jailbreakbench", method="scaling")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(started="2026-11-28T20:00:00Z", resumed=["2026-11-29T09:00:00Z"],
                    finished="2026-11-29T09:30:00Z", compute_seconds=3725.4)
    (run / "manifest.json").write_text(json.dumps(manifest))
    table = summarize_runs([run]).rankings
    assert set(table["time"]) == {"1 h 02 min"}
    html = build_report([run], tmp_path / "r.html").path.read_text()
    assert "2026-11-28 20:00 (1 h 02 min)" in html
    del manifest["compute_seconds"]                   # older manifests: the calendar span, said to be one
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert set(summarize_runs([run]).rankings["time"]) == {"13 h 30 min (calendar span: resumed, no compute_seconds)"}


def test_folders_of_folders_of_runs_are_found(tmp_path):
    """`report RUNS` / `summary RUNS` on a tree of runs (scripts/acceptance.sh writes RUNS/dose/<run>):
    every run folder below is found once, none of a run's own subfolders is taken for a run."""
    from fixtures_runs import make_scores_run

    from safetyheads.results import find_run_dirs

    a, _ = make_scores_run(tmp_path / "dose", dataset="advbench", method="scaling")
    b, _ = make_eval_run(tmp_path / "dose" / "more")
    (a / "chunks").mkdir()
    c, _ = make_scores_run(tmp_path, dataset="jailbreakbench", method="undifferentiated")
    assert find_run_dirs([tmp_path]) == sorted([a, b, c], key=lambda p: p.relative_to(tmp_path).parts)
    with pytest.raises(UsageError, match="not a run folder"):
        find_run_dirs([a / "chunks"])
