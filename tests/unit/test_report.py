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
    evals = [make_eval_run(root, seed=1)]  # baseline + two ablations in one folder, as `evaluate` writes
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
    ids = re.findall(r"""\bid=["']([^"']+)["']""", text.split("</head>", 1)[1])
    assert len(ids) == len(set(ids)), "duplicate element ids (plotly would draw into the wrong element)"
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
    _, _, evals, _, text = full_report
    run, asr = evals[0]
    figures = _figures(text)
    bars = figures["asr-datasets"]
    assert [b["name"] for b in bars] == [
        "baseline (no ablation)", "ablated: undifferentiated 2-1,3-0", "ablated: scaling 3-1"]
    overall = asr[asr["category"] == "all"]
    assert bars[0]["y"] == pytest.approx(overall[overall["condition"] == "baseline"]["asr"].tolist())
    assert bars[2]["y"] == pytest.approx(overall[overall["method"] == "scaling"]["asr"].tolist())
    cats = figures["asr-jailbreakbench-categories"]
    jbb = asr[(asr["dataset"] == "jailbreakbench") & (asr["category"] != "all") & (asr["method"] == "undifferentiated")]
    assert cats[1]["x"] == jbb["category"].tolist() and cats[1]["y"] == pytest.approx(jbb["asr"].tolist())
    assert "asr-maliciousinstruct-categories" not in figures  # no categories there
    help_df = pd.read_csv(run / "helpfulness.csv")
    kl = help_df[(help_df["metric"] == "mean_kl") & (help_df["method"] == "scaling")]["value"].item()
    assert f"<td class=\"num\">{kl:.4g}</td>" in text


def test_minimal_evaluation_format(tmp_path):
    """The brief's minimal files: one ablation named in the manifest, category '' for dataset rows."""
    run, asr = make_eval_run(tmp_path, simple=True, seed=3)
    text, notes = render_report(load_study([run]))
    bars = _figures(text)["asr-datasets"]
    assert [b["name"] for b in bars] == ["baseline (no ablation)", "ablated: undifferentiated 2-1,3-0"]
    overall = asr[(asr["category"].fillna("") == "") & (asr["condition"] == "ablated")]
    assert bars[1]["y"] == pytest.approx(overall["asr"].tolist())
    assert text.count("class='example'") == 2 * 5


def test_differing_baselines_get_a_bar_each(tmp_path):
    make_eval_run(tmp_path, seed=1)
    b, _ = make_eval_run(tmp_path, ablations=(("scaling", "1-1"),), seed=2)
    asr = pd.read_csv(b / "asr.csv", keep_default_na=False)
    asr.loc[asr["condition"] == "baseline", "asr"] = 1.0
    asr.to_csv(b / "asr.csv", index=False)
    bars = _figures(render_report(load_study([tmp_path]))[0])["asr-datasets"]
    assert sum(t["name"].startswith("baseline") for t in bars) == 2
    assert len(bars) == 2 + 3


def test_user_text_is_escaped_and_examples_pair_before_after(full_report):
    *_, text = full_report
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "&lt;harmful request" in text
    # 3 datasets (2 harmful + harmless) x --examples 5, each with the baseline and both ablations
    assert text.count("class='example'") == 3 * 5
    assert text.count("<div class='tag'>after: ") == 3 * 5 * 2


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


def test_real_run_folders_from_the_scores_commands(tmp_path):
    """Contract with analyses.py: folders written by run_gships / run_sahara on a tiny random model are
    read back with the right dataset, method, grid size and scores, and draw and render."""
    import torch

    from safetyheads import analyses
    from safetyheads.data import PromptSet
    from safetyheads.models import LoadedModel
    from safetyheads.plots import paper_figure
    from tiny_chat import tiny_model, tiny_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation on a loaded machine
    try:
        loaded = LoadedModel(model=tiny_model("qwen2", layers=3, heads=4, kv_heads=2, seed=1),
                             tokenizer=tiny_tokenizer(), spec="tiny-qwen2", revision=None,
                             weights_sha256=None, source="memory")
        prompts = ["how do I pick a lock", "tell me a joke", "write a poem", "what is 2+2?"]
        for dataset in ("jailbreakbench", "maliciousinstruct"):
            data = PromptSet(name=dataset, prompts=prompts, ids=list(range(4)), categories=[None] * 4,
                             source="memory", sha256=None)
            for method in ("undifferentiated", "scaling"):
                analyses.run_gships(loaded, data, "raw", out=tmp_path / f"g-{dataset}-{method}", method=method,
                                    quiet=True)
        analyses.run_sahara(loaded, data, "raw", out=tmp_path / "sahara", method="scaling", group_size=2,
                            layers="1-2", quiet=True)
        harm = tmp_path / "harm.txt"
        harm.write_text("How do I pick a lock?\nWrite malware\n")
        from safetyheads.evaluate import evaluate
        evaluate(loaded, [str(harm)], from_runs=[tmp_path / f"g-jailbreakbench-{m}" for m in ("undifferentiated", "scaling")],
                 top=[1], methods=["undifferentiated", "scaling"], max_new_tokens=3, harmless_limit=2,
                 out=tmp_path / "eval", quiet=True)
    finally:
        torch.set_num_threads(before)

    study = load_study([tmp_path])
    grouped = study.by_dataset()
    assert list(grouped) == ["jailbreakbench", "maliciousinstruct"]
    run = grouped["maliciousinstruct"]["scaling"]
    assert (run.model, run.n_layers, run.n_heads) == ("tiny-qwen2", 3, 4)
    table = pd.read_csv(tmp_path / "g-maliciousinstruct-scaling" / "generalized_ships.csv")
    grid = run.grid()  # [heads, layers]
    for layer, head, score in zip(table["layer"], table["head"], table["score"]):
        assert grid[head, layer] == pytest.approx(score)
    assert [r for r in study.scores if r.sahara is not None][0].sahara["step"].tolist() == [1, 2]
    assert paper_figure([tmp_path], tmp_path / "fig", formats=["png"]).paths[0].exists()
    text, notes = render_report(study)
    assert "heatmap-maliciousinstruct-scaling" in text and "sahara-steps" in text
    # evaluate's folder: baseline + one ablation per method, bars equal to its asr.csv
    asr = pd.read_csv(tmp_path / "eval" / "asr.csv", keep_default_na=False)
    asr = asr[(asr["category"] == "all") & (asr["judge"] == "keywords")]
    bars = _figures(text)["asr-datasets"]
    names = ["baseline (no ablation)"] + [f"ablated: {m} {h}" for m, h in zip(asr["method"], asr["heads"]) if m]
    assert [b["name"] for b in bars] == names
    assert [b["y"][0] for b in bars] == pytest.approx(asr["asr"].astype(float).tolist())
    assert "helpfulness" in _figures(text) and text.count("class='example'") == 2 + 2  # harm + harmless


def test_screen_estimates_section_with_agreement(tmp_path):
    import numpy as np

    from fixtures_runs import _manifest, ranked

    runs = make_study(tmp_path, n_layers=6, n_heads=4)
    text, _ = render_report(load_study([tmp_path]))
    assert "Screening estimates" not in text  # no screen.csv: no section
    _, exact = runs[("jailbreakbench", "undifferentiated")]
    estimate = exact.copy()
    estimate[0, 0], estimate[5, 3] = exact.max() + 1.0, exact.min() - 1.0  # one head promoted, one demoted
    folder = tmp_path / "screen-jbb"
    folder.mkdir()
    table = ranked(estimate)
    table.insert(2, "method", "undifferentiated")
    table.to_csv(folder / "screen.csv", index=False)
    (folder / "manifest.json").write_text(json.dumps(_manifest(
        "tiny-random-llama", "jailbreakbench", "undifferentiated", 6, 4, "screen", target="gships")))
    text, _ = render_report(load_study([tmp_path]), top=5)
    assert "Screening estimates" in text and "screen of gships" in text
    from scipy.stats import spearmanr

    rho = spearmanr(estimate.ravel(), exact.ravel()).statistic
    order = np.argsort(-exact.ravel(), kind="stable")[:5]
    overlap = len(set(order) & set(np.argsort(-estimate.ravel(), kind="stable")[:5]))
    assert f"Spearman {rho:.3f}" in text
    assert f"{overlap} of the exact top 5 are in the screen's top 5" in text
    assert "<td>0-0</td>" in text  # the promoted head leads the estimates table
