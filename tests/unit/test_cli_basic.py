"""`safetyheads models | datasets | fetch` through the real CLI entry point."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from safetyheads.cli.main import build_parser, main

SHARED = Path(os.environ.get("SAFETYHEADS_DATA_DIR", "/nonexistent"))
needs_shared = pytest.mark.skipif(not (SHARED / "advbench").is_dir(), reason="../shared/datasets not present")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFETYHEADS_OFFLINE", "1")
    monkeypatch.delenv("SAFETYHEADS_DATA_DIR", raising=False)


def test_help_lists_basic_commands(capsys):
    text = build_parser().format_help()
    for cmd in ("models", "datasets", "fetch"):
        assert cmd in text


def test_models_lists_builtins_and_cache_state(capsys, tmp_path):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct (default)" in out and "smollm2-135m-instruct" in out
    assert str(tmp_path / "cache") in out
    assert out.count(" no ") >= 4  # nothing cached in a fresh cache


@needs_shared
def test_datasets_lists_all_with_local_copies(capsys, tmp_path):
    assert main(["datasets", "--data-dir", str(SHARED)]) == 0
    out = capsys.readouterr().out
    for name, rows in (("jailbreakbench", 100), ("maliciousinstruct", 100), ("advbench", 520), ("harmless", 100)):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert str(rows) in line
    assert out.count("sha256 ok") == 3
    # a tampered copy is reported
    bad = tmp_path / "data"
    shutil.copytree(SHARED, bad)
    (bad / "advbench" / "harmful_behaviors.csv").write_text("goal\nx\n")
    assert main(["datasets", "--data-dir", str(bad)]) == 0
    assert "HASH MISMATCH" in capsys.readouterr().out


def test_datasets_without_copies(capsys):
    assert main(["datasets"]) == 0
    assert capsys.readouterr().out.count("not found locally") == 3


@needs_shared
def test_fetch_dataset(capsys):
    assert main(["fetch", "advbench", "--data-dir", str(SHARED)]) == 0
    assert "advbench: ready" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["fetch", "no-such-model"], "cannot fetch 'no-such-model'; built-in models:"),
        (["fetch", "jailbreakbench"], "SAFETYHEADS_OFFLINE"),
        (["fetch", "smollm2-135m-instruct"], "place the GGUF"),
    ],
)
def test_bad_input_is_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
