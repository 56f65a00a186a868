"""The issue-4 acceptance commands at CI size: `ships` (with Generalized Ships from the same sweep) and
`gships` on Qwen2.5-Coder-0.5B-Instruct, chat format, every one of its 336 heads, on the first 2 prompts
of JailbreakBench and of MaliciousInstruct (`--limit 2`). The full 100-prompt runs are
`scripts/acceptance.sh` (about 50 min each on 2 CPU cores; numbers in README.md)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from safetyheads.cli.main import main

QWEN = ["--model", "qwen2.5-coder-0.5b-instruct", "--format", "chat", "--limit", "2", "--quiet"]
N_LAYERS, N_HEADS = 24, 14


def _check_gships(table: pd.DataFrame, method: str) -> None:
    assert len(table) == N_LAYERS * N_HEADS
    assert set(zip(table["layer"], table["head"])) == {(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)}
    assert table["rank"].tolist() == list(range(1, N_LAYERS * N_HEADS + 1))
    assert set(table["method"]) == {method}
    assert np.isfinite(table["score"]).all() and (table["score"] >= 0).all() and table["score"].iloc[0] > 0


def test_ships_with_gships_all_heads_jailbreakbench(tmp_path):
    out = tmp_path / "jbb"
    assert main(["ships", *QWEN, "--dataset", "jailbreakbench", "--method", "undifferentiated", "--with-gships",
                 "--out", str(out)]) == 0
    ships = pd.read_csv(out / "ships.csv")
    assert len(ships) == 2 * N_LAYERS * N_HEADS and set(ships["prompt_id"]) == {0, 1}
    assert np.isfinite(ships["score"]).all() and (ships["score"] >= 0).all()
    summary = pd.read_csv(out / "ships_summary.csv")
    assert len(summary) == N_LAYERS * N_HEADS and summary["top10_count"].sum() == 2 * 10
    _check_gships(pd.read_csv(out / "generalized_ships.csv"), "undifferentiated")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["config"]["format"] == "chat" and manifest["config"]["n_scored_heads"] == 336


def test_gships_all_heads_maliciousinstruct(tmp_path):
    out = tmp_path / "mi"
    assert main(["gships", *QWEN, "--dataset", "maliciousinstruct", "--method", "scaling", "--out", str(out)]) == 0
    _check_gships(pd.read_csv(out / "generalized_ships.csv"), "scaling")
