"""`benchmarks/gpu_full_map.py --tiny` runs end to end on CPU, so the GPU benchmark cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_full_map.py"


def test_gpu_full_map_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FLOP/s achieved" in done.stdout and "peak memory" in done.stdout
    figures = json.loads(out.read_text())
    shape = figures["shape"]
    assert figures["configs"] == shape["layers"] * shape["heads"]
    assert set(figures["methods"]) == {"undifferentiated", "scaling"}
    for method, m in figures["methods"].items():
        assert m["finite"] and m["batch_size"] >= 1 and m["sweep_s"] > 0
        assert len(m["gships"]) == len(m["ships_mean"]) == figures["configs"]
        # Scores are angles in [0, 90*rank] and non-negative KLs, and ablations do change something.
        assert all(0.0 <= g <= 90.0 for g in m["gships"]) and max(m["gships"]) > 0
        assert all(k >= 0.0 for k in m["ships_mean"]) and max(m["ships_mean"]) > 0
    # The FLOP count follows the documented formula: recompute it independently here.
    L, H, KV, D, F, V = (shape[k] for k in ("layers", "heads", "kv_heads", "hidden", "intermediate", "vocab"))
    hd = D // H

    def layer(t):  # FLOPs of one decoder layer over a prompt of t tokens
        per_token = 2 * D * H * hd + 4 * D * KV * hd + 2 * H * hd * D + 2 * H * hd * (t + 1) + 6 * D * F
        return per_token * t

    lengths = figures["lengths"]
    one_pass = sum(layer(t) for t in lengths)
    lm_head = 2 * D * V * len(lengths)
    expected = L * one_pass + lm_head + sum(H * ((L - l) * one_pass + lm_head) for l in range(L))
    assert math.isclose(figures["flops_per_method"], expected, rel_tol=1e-12)
