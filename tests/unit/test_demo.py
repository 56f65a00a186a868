"""The demo wires every stage together: scores for both methods and datasets, figure, evaluation, report.

Runs on a tiny random chat model with the real datasets (from SAFETYHEADS_DATA_DIR, see conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from tiny_chat import tiny_model, tiny_tokenizer  # noqa: E402

from safetyheads.demo import DEMO_DATASETS, DEMO_METHODS, DemoSizes, run_demo  # noqa: E402
from safetyheads.models import LoadedModel  # noqa: E402


def _loaded():
    return LoadedModel(model=tiny_model(), tokenizer=tiny_tokenizer(), spec="tiny-random-llama", revision=None,
                       weights_sha256="tiny-seed-0", source="test")


def test_demo_end_to_end_and_resume(tmp_path):
    sizes = DemoSizes(gships_prompts=3, exact_top_k=4, eval_prompts=2, harmless_prompts=2, max_new_tokens=3)
    lines: list[str] = []
    out = run_demo(_loaded(), out=tmp_path / "demo", sizes=sizes, quiet=True, log=lines.append)
    root = tmp_path / "demo"
    for ds in DEMO_DATASETS:
        for m in DEMO_METHODS:
            run = root / f"gships-{ds}-{m}"
            screen = pd.read_csv(run / "screen.csv")
            assert len(screen) == 2 * 4                         # every head of the 2x4 model screened
            exact = pd.read_csv(run / "generalized_ships.csv")
            assert len(exact) == 4 and list(exact["rank"]) == [1, 2, 3, 4]
            assert (exact["score"] >= 0).all()
    assert (root / "figure.png").stat().st_size > 10_000
    html = (root / "report.html").read_text()
    assert "Top 10" in html or "heatmap" in html.lower()
    asr = pd.read_csv(root / "evaluate" / "asr.csv")
    overall = asr[asr["category"] == "all"]
    assert set(overall["dataset"]) == set(DEMO_DATASETS)
    assert set(overall["condition"]) == {"baseline", "ablated"}
    # top-1 and top-3 and the random draws for each method, on each dataset, plus the baseline
    per_method = len(sizes.top) + len(sizes.random) * sizes.repeats
    assert len(overall) == len(DEMO_DATASETS) * (1 + per_method * len(DEMO_METHODS))
    random_rows = overall[overall["ranking"] == "random"]
    assert sorted(set(random_rows["k"])) == sorted(sizes.random) and set(random_rows["draw"]) == {1, 2}
    # the demo's dose-response figure: found heads vs the random band
    assert out["dose_response"] == str(root / "evaluate" / "dose_response.png")
    assert (root / "evaluate" / "dose_response.png").stat().st_size > 10_000
    assert any("report:" in line for line in lines)
    assert out["timings"]["total"] > 0

    # a second run resumes every stage and gives the same tables
    again = run_demo(_loaded(), out=root, sizes=sizes, quiet=True, log=lambda *_: None)
    pd.testing.assert_frame_equal(again["asr"], out["asr"])
    assert again["top_heads"] == out["top_heads"]
