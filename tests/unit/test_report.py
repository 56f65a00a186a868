"""The HTML report: self-contained, every section fed from the run files, user text escaped,
missing optional files skipped with a note. (Interaction is tested in tests/browser.)"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fixtures_runs.py
from fixtures_runs import make_eval_run, make_scores_run, make_study  # noqa: E402

from safetyheads.cli.main import main  # noqa: E402
from safetyheads.errors import UsageError  # noqa: E402
from safetyheads.report import build_report, render_report  # noqa: E402
from safetyheads.results import load_study  # noqa: E402


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs = make_study(root, n_layers=6, n_heads=4)
    evals = [make_eval_run(root, seed=1), make_eval_run(root, method="scaling", heads="3-1", seed=2)]
    result = build_report([root], root / "out" / "report.html", top=5)
    return root, runs, evals, result, result.path.read_text(encoding="utf-8")


def _figures(text: str) -> dict[str, list]:
    """div id -> the data traces plotly is given for it, parsed back from the page."""
    out = {}
    for match in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*(\[.*?\]),\s*\{', text, flags=re.S):
        out[match.group(1)] = json.loads(match.group(2))
    return out


def test_self_contained(full_report):
    *_, text = full_report
    assert not re.search(r"<script[^>]+src=", text)  # every script inlined
    assert not re.search(r"<link[^>]+href=['\"]?https?:", text)
    assert text.count("<script type='text/javascript'>") == 1  # plotly.js once, in the head
    import plotly
    assert f"plotly.js v{plotly.__version__}".lower()[:11] in text.lower()  # the library itself is in the page


def test_heatmaps_carry_scores_and_ranks_of_every_method(full_report):
    _, runs, _, _, text = full_report
    figures = _figures(text)
    for dataset in ("jailbreakbench", "maliciousinstruct"):
        for method in ("undifferentiated", "scaling"):
            heat = figures[f"heatmap-{dataset}-{method}"][0]
            scores = runs[(dataset, method)][1]  # [layers, heads]
            assert heat["type"] == "heatmap"
            assert len(heat["z"]) == 4 and len(heat["z"][0]) == 6  # [heads, layers]
            assert heat["z"][2][5] == pytest.approx(scores[5, 2])
            # hover: this head's score and rank under both methods
            other = "scaling" if method == "undifferentiated" else "undifferentiated"
            cell = heat["customdata"][2][5]
            order = {"undifferentiated": 0, "scaling": 1}
            assert cell[order[method]].startswith(f"{scores[5, 2]:.4g} (rank ")
            assert cell[order[other]].startswith(f"{runs[(dataset, other)][1][5, 2]:.4g} (rank ")
            assert "Layer %{x}, Head %{y}" in heat["hovertemplate"]


def test_asr_and_helpfulness_numbers_come_from_the_files(full_report):
    root, _, evals, _, text = full_report
    figures = _figures(text)
    bars = figures["asr-datasets"]
    labels = [e.label for e in load_study([root]).evals]
    assert [b["name"] for b in bars] == ["baseline (no ablation)"] + [f"ablated: {l}" for l in labels]
    for run, asr in evals:
        overall = asr[asr["category"] == ""]
        for condition, trace in (("baseline", bars[0]), ("ablated", bars[1 + labels.index(_label(run))])):
            assert trace["y"] == pytest.approx(overall[overall["condition"] == condition]["asr"].tolist())
    assert "asr-jailbreakbench-categories" in figures
    assert "asr-maliciousinstruct-categories" not in figures  # no categories there
    help_rate = pd.read_csv(evals[1][0] / "helpfulness.csv").iloc[0]["value"]
    assert f"{help_rate:.4g}" in text


def _label(run: Path) -> str:
    config = json.loads((run / "manifest.json").read_text())["config"]
    return f"{config['method']} {config['heads']}"


def test_differing_baselines_get_a_bar_each(tmp_path):
    a, _ = make_eval_run(tmp_path, seed=1)
    b, _ = make_eval_run(tmp_path, method="scaling", seed=2)
    asr = pd.read_csv(b / "asr.csv", keep_default_na=False)
    asr.loc[asr["condition"] == "baseline", "asr"] = 1.0
    asr.to_csv(b / "asr.csv", index=False)
    bars = _figures(render_report(load_study([tmp_path]))[0])["asr-datasets"]
    assert sum(t["name"].startswith("baseline") for t in bars) == 2


def test_user_text_is_escaped_and_examples_pair_before_after(full_report):
    *_, text = full_report
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "&lt;harmful request" in text
    assert text.count("class='example'") == 2 * 2 * 5  # 2 runs x 2 datasets x --examples 5


def test_rankings_sahara_and_manifest(full_report):
    _, runs, _, result, text = full_report
    scores = runs[("jailbreakbench", "undifferentiated")][1]
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    assert f"<td>{layer}-{head}</td>" in text
    assert "Final group:" in text and "sahara-steps" in text
    assert "weights_sha256" in text and "transformers" in text
    assert result.notes == []


def test_missing_sections_become_notes(tmp_path):
    make_scores_run(tmp_path / "s", dataset="advbench", method="scaling", summary=False, sahara=False)
    text, notes = render_report(load_study([tmp_path / "s"]))
    assert any("asr.csv" in n for n in notes) and any("sahara.csv" in n for n in notes)
    assert "No evaluation results" in text and "heatmap-advbench-scaling" in text
    make_eval_run(tmp_path / "e", helpfulness=False)
    text, notes = render_report(load_study([tmp_path / "e"]))
    assert any("generalized_ships.csv" in n for n in notes) and any("helpfulness.csv" in n for n in notes)
    assert "asr-datasets" in text


def test_errors_and_cli(tmp_path, capsys):
    with pytest.raises(UsageError):
        build_report([tmp_path / "absent"], tmp_path / "r.html")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="not a run folder"):
        build_report([empty], tmp_path / "r.html")
    make_study(tmp_path / "runs", n_layers=3, n_heads=2)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.html"), "--top", "2"]) == 0
    assert (tmp_path / "r.html").stat().st_size > 1_000_000  # plotly.js inlined
    assert "wrote" in capsys.readouterr().out
