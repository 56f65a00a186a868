"""Run folders: manifest provenance, refusal/resume/force rules, atomic chunks, and byte-identical results
after a run is killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safetyheads.errors import UsageError
from safetyheads.runs import RunDir, _atomic, to_json_text

CONFIG = {"model": {"model": "m", "dtype": "float32"}, "dataset": "d", "heads": (1, 2), "epsilon": 1e-5}


def test_manifest_has_provenance(tmp_path):
    class FakeLoaded:
        def describe(self):
            return {"spec": "m", "weights_sha256": "ab" * 32, "revision": None}

    run = RunDir.open(tmp_path / "r", CONFIG, command="ships", model=FakeLoaded())
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["config"] == {**CONFIG, "heads": [1, 2]}
    assert m["command"] == "ships" and m["model"]["weights_sha256"] == "ab" * 32
    assert m["versions"]["torch"] and m["versions"]["transformers"] and m["versions"]["safetyheads"]
    assert m["machine"]["cpu_count"] >= 1 and "hostname" in m["machine"] and isinstance(m["machine"]["gpus"], list)
    assert m["started"].endswith("Z") and "finished" not in m
    if m["git"] is not None:  # the package is in a git checkout here
        assert len(m["git"]["commit"]) == 40
    run.finish({"top_heads": ["1-2"]}, outputs=["x.csv"])
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["summary"] == {"top_heads": ["1-2"], "outputs": ["x.csv"]} and m["finished"] >= m["started"]


def test_compute_seconds_add_up_over_resumed_sessions(tmp_path, monkeypatch):
    """`compute_seconds` counts each session up to its last saved chunk (or its finish), summed over
    resumes; the pause between sessions is not counted. A controlled clock makes it exact."""
    import safetyheads.runs as runs

    clock = [100.0]
    monkeypatch.setattr(runs.time, "monotonic", lambda: clock[0])
    path = tmp_path / "r"
    run = RunDir.open(path, CONFIG)
    clock[0] = 130.0
    run.write_chunk("a", pd.DataFrame({"x": [1]}))
    clock[0] = 150.0                                  # killed while computing chunk b: 20 s not counted
    assert json.loads((path / "manifest.json").read_text())["compute_seconds"] == 30.0
    clock[0] = 5000.0                                 # resumed much later
    run = RunDir.open(path, CONFIG, resume=True)
    clock[0] = 5010.0
    run.write_chunk("b", pd.DataFrame({"x": [2]}))
    clock[0] = 5015.0
    run.finish()
    m = json.loads((path / "manifest.json").read_text())
    assert m["compute_seconds"] == 45.0
    clock[0] = 6000.0
    assert RunDir.open(path, CONFIG, force=True).manifest.get("compute_seconds") is None  # a new run


def test_existing_run_rules(tmp_path):
    path = tmp_path / "r"
    run = RunDir.open(path, CONFIG)
    run.write_chunk("a", pd.DataFrame({"x": [1]}))
    with pytest.raises(UsageError, match="already holds the same run; pass --resume"):
        RunDir.open(path, CONFIG)
    other = {**CONFIG, "epsilon": 0.5}
    with pytest.raises(UsageError, match="already holds a different run"):
        RunDir.open(path, other)
    with pytest.raises(UsageError, match="different config; --resume needs the same options"):
        RunDir.open(path, other, resume=True)
    with pytest.raises(UsageError, match="contradict"):
        RunDir.open(path, CONFIG, resume=True, force=True)
    resumed = RunDir.open(path, {**CONFIG, "heads": [1, 2]}, resume=True)  # tuple vs list: same config
    assert resumed.chunk_done("a") and len(resumed.manifest["resumed"]) == 1
    fresh = RunDir.open(path, other, force=True)
    assert not fresh.chunk_done("a") and fresh.manifest["config"]["epsilon"] == 0.5


def test_never_wipes_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a run folder"):
        RunDir.open(tmp_path, CONFIG, force=True)
    assert (tmp_path / "precious.txt").exists()
    with pytest.raises(UsageError, match="is a file"):
        RunDir.open(tmp_path / "precious.txt", CONFIG)


def test_resume_of_new_folder_starts_it(tmp_path):
    run = RunDir.open(tmp_path / "new", CONFIG, resume=True)
    assert (run.path / "manifest.json").is_file()


def test_chunks_round_trip_in_key_order(tmp_path):
    run = RunDir.open(tmp_path / "r", CONFIG)
    rng = np.random.default_rng(0)
    frames = {f"s_{i:03d}": pd.DataFrame({"i": [i] * 3, "v": rng.normal(size=3)}) for i in (2, 0, 1)}
    for k, df in frames.items():
        assert not run.chunk_done(k)
        run.write_chunk(k, df)
        assert run.chunk_done(k)
    run.write_chunk("other_000", pd.DataFrame({"i": [9]}))
    got = run.read_chunks("s_")
    expected = pd.concat([frames[k] for k in sorted(frames)], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)  # floats exactly equal
    assert run.chunk_keys() == ["other_000", "s_000", "s_001", "s_002"]
    assert run.read_chunks("none_").empty
    with pytest.raises(ValueError, match="bad chunk key"):
        run.write_chunk("../escape", frames["s_000"])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t.csv"

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic(target, crash)
    assert list(tmp_path.iterdir()) == []


def test_tables_and_json_are_deterministic(tmp_path):
    df = pd.DataFrame({"layer": [0, 1], "head": [3, 4], "score": [0.1 + 0.2, 1e-9]}, index=[5, 7])
    a, b = RunDir.open(tmp_path / "a", CONFIG), RunDir.open(tmp_path / "b", CONFIG)
    for run in (a, b):
        run.write_table("t", df)
        run.write_json("j", {"b": 1, "a": [np.float64(0.5), float("nan")], "c": np.arange(2)})
    for name in ("t.csv", "t.parquet", "j.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    assert (a.path / "t.csv").read_text() == "layer,head,score\n0,3,0.30000000000000004\n1,4,1e-09\n"
    pd.testing.assert_frame_equal(pd.read_parquet(a.path / "t.parquet"), df.reset_index(drop=True))
    assert json.loads((a.path / "j.json").read_text()) == {"a": [0.5, None], "b": 1, "c": [0, 1]}
    assert to_json_text({"b": 1, "a": 2}).startswith('{\n  "a": 2')


WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pandas as pd
    from safetyheads.runs import RunDir

    out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    run = RunDir.open(out, {"n": 12, "seed": 3}, resume=resume)
    for i in range(12):
        key = f"part_{i:03d}"
        if run.chunk_done(key):
            continue
        rng = np.random.default_rng(1000 + i)  # each chunk depends only on its key, as in a real sweep
        df = pd.DataFrame({"prompt_id": np.arange(50), "layer": i, "score": rng.gamma(1.0, size=50)})
        time.sleep(delay)
        run.write_chunk(key, df)
        print(key, flush=True)
    table = run.read_chunks("part_").sort_values(["layer", "prompt_id"], kind="stable")
    run.write_table("scores", table)
    run.write_json("summary", {"mean": float(table.score.mean()), "n": len(table)})
    run.finish({"n": len(table)})
    """
)


def test_killed_then_resumed_run_gives_identical_files(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "full"), "0", "0"], check=True, env=env)

    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cut"), "0", "0.3"], env=env,
                            stdout=subprocess.PIPE, text=True)
    seen = [proc.stdout.readline() for _ in range(3)]  # three chunks written, the fourth in progress
    assert all(s.startswith("part_") for s in seen)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = tmp_path / "cut"
    assert not (cut / "scores.csv").exists() and 3 <= len(list((cut / "chunks").glob("*.parquet"))) < 12
    subprocess.run([sys.executable, str(script), str(cut), "1", "0"], check=True, env=env, capture_output=True)
    for name in ("scores.csv", "scores.parquet", "summary.json"):
        assert (tmp_path / "full" / name).read_bytes() == (cut / name).read_bytes(), name
    assert json.loads((cut / "manifest.json").read_text())["resumed"]
    assert not [p for p in cut.rglob(".*tmp*")]
