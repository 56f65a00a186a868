"""The HTML report in a real headless chromium: loads offline without console errors, draws an
L x H heatmap, and hovering a cell shows that head's scores and ranks. Saves a screenshot to
test-artifacts/report.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fixtures_runs.py
from fixtures_runs import make_eval_run, make_study  # noqa: E402

from safetyheads.report import build_report  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
N_LAYERS, N_HEADS = 24, 14  # Qwen2.5-0.5B's shape; L != H so a transposed grid fails


def _rank(scores: np.ndarray, layer: int, head: int) -> int:
    return int((scores > scores[layer, head]).sum()) + 1


def test_report_in_headless_chromium(tmp_path, chromium):
    runs = make_study(tmp_path / "runs", n_layers=N_LAYERS, n_heads=N_HEADS)
    make_eval_run(tmp_path / "runs")
    report = build_report([tmp_path / "runs"], tmp_path / "report.html").path

    page = chromium.new_page()
    for domain in ("Runtime", "Log", "Page"):
        page.send(f"{domain}.enable")
    page.send("Emulation.setDeviceMetricsOverride", width=1300, height=1000, deviceScaleFactor=1, mobile=False)
    page.send("Page.navigate", url=report.as_uri())
    page.wait_event("Page.loadEventFired")
    page.wait_for("window.Plotly && document.querySelectorAll('.sh-heatmap .js-plotly-plot').length === 4"
                  " && [...document.querySelectorAll('.js-plotly-plot')].every(g => g._fullLayout)")

    # The first heatmap (JailbreakBench, coloured by Undifferentiated Attention) has L x H cells.
    grid = page.evaluate("""(() => {
        const box = document.querySelector('.heatmap-box');
        const gd = box.querySelector('.js-plotly-plot');
        const z = gd.calcdata[0][0].z;
        return {dataset: box.dataset.dataset, method: box.dataset.method, rows: z.length,
                cols: z.map(r => r.length), image: !!gd.querySelector('g.hm image')};
    })()""")
    assert (grid["dataset"], grid["method"]) == ("jailbreakbench", "undifferentiated")
    assert grid["rows"] == N_HEADS and set(grid["cols"]) == {N_LAYERS}
    assert grid["image"], "plotly drew no heatmap image"

    # Hover one cell with a real mouse event at its pixel centre; read plotly's hover label.
    layer, head = 17, 9
    page.evaluate("document.querySelector('.heatmap-box').scrollIntoView({block: 'center'})")
    x, y = page.evaluate(f"""(() => {{
        const gd = document.querySelector('.heatmap-box .js-plotly-plot');
        const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p({layer}), r.top + fl._size.t + fl.yaxis.l2p({head})];
    }})()""")
    page.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    label = page.wait_for("(document.querySelector('.hoverlayer .hovertext') || {}).textContent")
    undiff = runs[("jailbreakbench", "undifferentiated")][1]
    scaling = runs[("jailbreakbench", "scaling")][1]
    assert f"Layer {layer}, Head {head}" in label
    assert f"Undifferentiated Attention: {undiff[layer, head]:.4g} (rank {_rank(undiff, layer, head)})" in label
    assert f"Scaling Contribution: {scaling[layer, head]:.4g} (rank {_rank(scaling, layer, head)})" in label

    page.screenshot(ARTIFACTS / "report.png")
    # The ASR chart rendered too (bars present), and nothing went wrong on the way.
    assert page.evaluate("document.querySelectorAll('#asr-datasets .bars path').length") > 0
    assert page.errors == [], json.dumps(page.errors, indent=1)
