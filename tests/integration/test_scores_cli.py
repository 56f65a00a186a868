"""`safetyheads ships | gships | sahara` on the real SmolLM2: output files, a run killed with SIGKILL and
resumed gives byte-identical files, and every bad input gives a one-line error with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from safetyheads.cli.main import main

MODEL = "smollm2-135m-instruct"          # 30 layers x 9 heads
BASE = ["--model", MODEL, "--dataset", "maliciousinstruct", "--format", "raw"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "safetyheads", *args]


def _kill_after_first_chunk(args: list[str], out: Path, env: dict) -> Path:
    """Start the command into `out`, SIGKILL it as soon as its first chunk is on disk; -> chunks folder."""
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    chunks = out / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and any(p.suffix == ".parquet" for p in chunks.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a chunk was written: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return chunks


def test_kill9_then_resume_gives_identical_files(tmp_path):
    # the last 5 layers, one chunk each: cheap to replay, still long enough to kill the run in the middle
    args = ["ships", *BASE, "--limit", "3", "--layers", "25-29", "--chunk-rows", "1", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(_cli(*args, "--out", str(full)), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr

    chunks = _kill_after_first_chunk(args, part, env)
    n_chunks = len(list(chunks.glob("*.parquet")))
    assert 1 <= n_chunks < 5 and not (part / "ships.csv").exists()

    refused = subprocess.run(_cli(*args, "--out", str(part)), capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(_cli(*args, "--out", str(part), "--resume"), capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("ships.csv", "ships_summary.csv", "ships.parquet", "ships_summary.parquet"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest.get("resumed") and manifest.get("finished")


def test_gships_and_sahara_outputs(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["gships", *BASE, "--limit", "4", "--layers", "28-29", "--rank", "2", "--center",
                 "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "generalized_ships.csv")
    assert list(table.columns) == ["layer", "head", "method", "score", "rank"] and len(table) == 18
    assert set(table["layer"]) == {28, 29} and table["rank"].tolist() == list(range(1, 19))
    s = tmp_path / "s"
    assert main(["sahara", *BASE, "--limit", "4", "--layers", "29", "--group-size", "2", "--candidates", "top3",
                 "--gships-from", str(out), "--method", "scaling", "--out", str(s), "--quiet"]) != 0  # no scaling rows
    assert main(["sahara", *BASE, "--limit", "4", "--layers", "29", "--group-size", "2", "--out", str(s),
                 "--quiet"]) == 0
    steps = pd.read_csv(s / "sahara.csv")
    assert list(steps.columns) == ["step", "layer", "head", "score"] and len(steps) == 2
    assert "group: 29-" in capsys.readouterr().out
    # both runs are reproduced from their manifests alone, bit for bit on the same machine
    from safetyheads.reproduce import rerun
    for run in (out, s):
        again = rerun(run, tmp_path / f"{run.name}-again", quiet=True)
        assert again.ok and again.files["status"].eq("identical").all(), again.files


@pytest.mark.parametrize("argv, message", [
    (["ships", "--heads", "2-40"], "head"),
    (["ships", "--layers", "0-40"], "layer"),
    (["gships", "--epsilon", "1.5"], "epsilon"),
    (["gships", "--epsilon", "0"], "epsilon"),
    (["gships", "--rank", "0"], "rank"),
    (["gships", "--rank", "4"], "rank"),                     # 3 prompts
    (["sahara", "--group-size", "300"], "group-size"),
    (["sahara", "--layers", "29", "--group-size", "10"], "group-size"),
    (["ships", "--limit", "0"], "limit"),
])
def test_bad_input_one_line_error(argv, message, tmp_path, capsys):
    cmd, *rest = argv
    code = main([cmd, *BASE, "--limit", "3", *rest, "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # one error line, the last thing printed (model loading may print progress bars before it)
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and message in errors[0].lower(), err
    assert not (tmp_path / "x").exists()


def test_empty_dataset_and_different_run(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["ships", "--model", MODEL, "--dataset", str(empty), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    out = tmp_path / "run"
    assert main(["gships", *BASE, "--limit", "3", "--layers", "29", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["gships", *BASE, "--limit", "3", "--layers", "28", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "different run" in err[-1]
    assert main(["gships", *BASE, "--limit", "3", "--layers", "28", "--out", str(out), "--quiet", "--force"]) == 0
    assert set(pd.read_csv(out / "generalized_ships.csv")["layer"]) == {28}


@pytest.mark.parametrize("args,files", [
    # screen: one chunk per prompt slice (4 slices of 1 prompt)
    (["screen", "--target", "gships", "--batch-size", "1", "--layers", "26-29"], ["screen.csv", "screen.parquet"]),
    # auto: the screen's chunk, then the exact top 6 one layer chunk at a time
    (["gships", "--mode", "auto", "--top-k", "6", "--chunk-rows", "1", "--layers", "26-29"],
     ["screen.csv", "screen.parquet", "generalized_ships.csv", "generalized_ships.parquet"]),
])
def test_screen_and_auto_kill9_then_resume_give_identical_files(tmp_path, args, files):
    args = [args[0], *BASE, "--limit", "4", *args[1:], "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(_cli(*args, "--out", str(full)), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    n_total = len(list((full / "chunks").glob("*.parquet")))
    assert n_total >= 2

    chunks = _kill_after_first_chunk(args, part, env)
    # killed before the end: chunks missing, the run's last file not written (auto may already have
    # written screen.csv when the kill lands just after its screen chunk)
    assert 1 <= len(list(chunks.glob("*.parquet"))) < n_total and not (part / files[-1]).exists()

    resumed = subprocess.run(_cli(*args, "--out", str(part), "--resume"), capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in files:
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest.get("resumed") and manifest.get("finished")
