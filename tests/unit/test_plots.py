"""The paper figure: panels, colours, markers and ticks drawn from synthetic run folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fixtures_runs.py
from fixtures_runs import make_eval_run, make_scores_run, make_study  # noqa: E402

from safetyheads.cli.main import main  # noqa: E402
from safetyheads.errors import UsageError  # noqa: E402
from safetyheads.plots import draw_figure, paper_figure  # noqa: E402
from safetyheads.results import load_study  # noqa: E402


def _top_cells(scores: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The k highest-scoring (layer, head) cells of a [layers, heads] array, computed independently."""
    flat = np.argsort(-scores, axis=None, kind="stable")[:k]
    return {tuple(int(i) for i in np.unravel_index(f, scores.shape)) for f in flat}


def _scatter_cells(ax) -> list[set[tuple[int, int]]]:
    return [{(int(round(x)), int(round(y))) for x, y in c.get_offsets()} for c in ax.collections]


def test_figure_panels_colours_and_markers(tmp_path):
    runs = make_study(tmp_path, n_layers=7, n_heads=5)
    fig = draw_figure(load_study([tmp_path]), top=4)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "Top 4 Safety Heads on JailbreakBench", "Top 4 Safety Heads on MaliciousInstruct"]
    for ax, dataset in zip(panels, ("jailbreakbench", "maliciousinstruct")):
        assert ax.get_xlabel() == "Layer" and ax.get_ylabel() == "Head"
        shown = ax.images[0].get_array()  # [heads, layers]
        np.testing.assert_allclose(shown, runs[(dataset, "undifferentiated")][1].T)
        circles, crosses = _scatter_cells(ax)
        assert circles == _top_cells(runs[(dataset, "undifferentiated")][1], 4)
        assert crosses == _top_cells(runs[(dataset, "scaling")][1], 4)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "Undifferentiated Attention", "Scaling Contribution"]
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "Generalized Ships"]
    assert len(colorbars) == 2


def test_method_color_and_dataset_choice(tmp_path):
    runs = make_study(tmp_path, n_layers=4, n_heads=3)
    fig = draw_figure(load_study([tmp_path]), color_method="scaling", datasets=["MaliciousInstruct"])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["Top 10 Safety Heads on MaliciousInstruct"]
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), runs[("maliciousinstruct", "scaling")][1].T)


@pytest.mark.parametrize("n_layers,n_heads", [(24, 14), (32, 32), (80, 64)])
def test_ticks_are_readable_integers(tmp_path, n_layers, n_heads):
    make_study(tmp_path, n_layers=n_layers, n_heads=n_heads)
    fig = draw_figure(load_study([tmp_path]))
    fig.draw_without_rendering()
    ax = fig.axes[0]
    for ticks, n in ((ax.get_xticks(), n_layers), (ax.get_yticks(), n_heads)):
        visible = [t for t in ticks if -0.5 <= t <= n - 0.5]
        assert all(float(t).is_integer() for t in visible)
        assert 4 <= len(visible) <= 15, visible  # neither crowded nor bare


def test_files_written_png_300dpi_svg_pdf(tmp_path):
    make_study(tmp_path / "runs", n_layers=6, n_heads=4)
    result = paper_figure([tmp_path / "runs"], tmp_path / "out" / "fig.png")
    assert [p.name for p in result.paths] == ["fig.png", "fig.svg", "fig.pdf"]
    with Image.open(result.paths[0]) as im:
        assert round(im.info["dpi"][0]) == 300
        assert im.width > 3000  # two panels at 300 dpi
    assert result.paths[1].read_text().lstrip().startswith("<?xml")
    assert result.paths[2].read_bytes()[:5] == b"%PDF-"


def test_same_runs_same_bytes(tmp_path):
    """The README's figure is committed: regenerating it from unchanged runs must not change the file."""
    make_study(tmp_path / "runs", n_layers=5, n_heads=3)
    first = paper_figure([tmp_path / "runs"], tmp_path / "a", formats=["svg"]).paths
    second = paper_figure([tmp_path / "runs"], tmp_path / "b", formats=["svg"]).paths
    for one, two in zip(first, second):
        assert one.read_bytes() == two.read_bytes()


def test_single_method_and_missing_optional_files(tmp_path):
    make_scores_run(tmp_path, dataset="jailbreakbench", method="undifferentiated", n_layers=5, n_heads=3)
    _, scores = make_scores_run(tmp_path, dataset="maliciousinstruct", method="scaling", summary=False,
                                sahara=False, manifest_sizes=False, n_layers=5, n_heads=3)
    notes: list[str] = []
    fig = draw_figure(load_study([tmp_path]), top=2, notes=notes, datasets=["maliciousinstruct"])
    assert fig.axes[0].images[0].get_array().shape == (3, 5)  # sizes read from the CSV
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), scores.T)  # coloured by what there is
    assert any("maliciousinstruct: no undifferentiated run" in n for n in notes)
    assert _scatter_cells(fig.axes[0]) == [_top_cells(scores, 2)]


def test_methods_in_one_csv_are_split(tmp_path):
    a, sa = make_scores_run(tmp_path, dataset="jailbreakbench", method="undifferentiated", seed=1)
    b, sb = make_scores_run(tmp_path, dataset="jailbreakbench", method="scaling", seed=2)
    both = pd.concat([pd.read_csv(a / "generalized_ships.csv"), pd.read_csv(b / "generalized_ships.csv")])
    both.to_csv(a / "generalized_ships.csv", index=False)
    (b / "generalized_ships.csv").unlink()
    grouped = load_study([a]).by_dataset()
    assert list(grouped["jailbreakbench"]) == ["undifferentiated", "scaling"]
    np.testing.assert_allclose(grouped["jailbreakbench"]["scaling"].grid(), sb.T)


def test_user_errors(tmp_path):
    with pytest.raises(UsageError, match="no such run folder"):
        paper_figure([tmp_path / "nope"], tmp_path / "f.png")
    make_eval_run(tmp_path / "evalonly")
    with pytest.raises(UsageError, match="no Generalized Ships"):
        paper_figure([tmp_path / "evalonly"], tmp_path / "f.png")
    make_study(tmp_path / "ok")
    with pytest.raises(UsageError, match="format"):
        paper_figure([tmp_path / "ok"], tmp_path / "f.png", formats=["jpg"])
    with pytest.raises(UsageError, match="--top"):
        paper_figure([tmp_path / "ok"], tmp_path / "f.png", top=0)
    with pytest.raises(UsageError, match="no mean runs"):
        paper_figure([tmp_path / "ok"], tmp_path / "f.png", color_method="mean")
    with pytest.raises(UsageError, match="advbench"):
        paper_figure([tmp_path / "ok"], tmp_path / "f.png", datasets=["advbench"])
    make_scores_run(tmp_path / "other", dataset="advbench", method="scaling", model="another-model")
    with pytest.raises(UsageError, match="different models"):
        paper_figure([tmp_path / "ok", tmp_path / "other"], tmp_path / "f.png")
    bad = tmp_path / "bad"
    make_scores_run(bad, dataset="advbench", method="scaling")
    run = next(bad.iterdir())
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        paper_figure([run], tmp_path / "f.png")


def test_cli_figure(tmp_path, capsys):
    make_study(tmp_path / "runs", n_layers=6, n_heads=4)
    out = tmp_path / "fig"
    assert main(["figure", str(tmp_path / "runs"), "--out", str(out), "--formats", "png", "--top", "3"]) == 0
    assert (tmp_path / "fig.png").exists() and not (tmp_path / "fig.svg").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["figure", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: no such run folder")
