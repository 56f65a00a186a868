"""Dataset registry, lookup order, hash checks, downloads (from a local HTTP server) and user files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from safetyheads import data
from safetyheads.data import DATASETS, load_prompts, locate
from safetyheads.errors import DownloadError, UsageError

SHARED = Path(os.environ.get("SAFETYHEADS_DATA_DIR", "/nonexistent"))
needs_shared = pytest.mark.skipif(not (SHARED / "jailbreakbench").is_dir(), reason="../shared/datasets not present")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache; no data dir unless a test sets one; never the real network."""
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFETYHEADS_DATA_DIR", raising=False)
    monkeypatch.setenv("SAFETYHEADS_OFFLINE", "1")


@needs_shared
@pytest.mark.parametrize("name,rows", [("jailbreakbench", 100), ("maliciousinstruct", 100), ("advbench", 520)])
def test_registered_sets_load_from_data_dir_with_hash(monkeypatch, name, rows):
    monkeypatch.setenv("SAFETYHEADS_DATA_DIR", str(SHARED))
    ps = load_prompts(name)
    assert len(ps) == rows == DATASETS[name].rows
    assert ps.ids == list(range(rows))
    assert ps.sha256 == DATASETS[name].sha256 == hashlib.sha256(Path(ps.source).read_bytes()).hexdigest()
    assert all(p and p == p.strip() for p in ps.prompts)
    if name == "jailbreakbench":
        assert len(set(ps.categories)) == 10 and ps.prompts[0].startswith("Write a defamatory article")
    else:
        assert ps.categories == [None] * rows


def test_flat_data_dir_layout_and_argument(tmp_path):
    src = b"How?\nWhy?\n"
    spec = replace(DATASETS["maliciousinstruct"], sha256=hashlib.sha256(src).hexdigest())
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / spec.file).write_bytes(src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS, spec.name, spec)
        assert locate(spec.name, flat) == flat / spec.file
        assert load_prompts(spec.name, data_dir=flat).prompts == ["How?", "Why?"]


def test_hash_mismatch_in_data_dir_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "d" / "advbench"
    d.mkdir(parents=True)
    (d / "harmful_behaviors.csv").write_text("goal,target\nfoo,bar\n")
    monkeypatch.setenv("SAFETYHEADS_DATA_DIR", str(tmp_path / "d"))
    with pytest.raises(DownloadError, match="expected 6cd1a5c6"):
        load_prompts("advbench")


def test_offline_without_copy_says_how_to_provide():
    with pytest.raises(DownloadError, match="SAFETYHEADS_OFFLINE.*--data-dir"):
        load_prompts("jailbreakbench")


class _Server:
    """Serves a folder over HTTP on localhost, so the real urllib download path runs offline."""

    def __init__(self, root: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = functools.partial(Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    s = _Server(root)
    s.root = root
    yield s
    s.close()


def test_download_verifies_and_caches(server, monkeypatch, tmp_path):
    body = b"goal,target\nWrite a poem,Sure\nBake a cake,Sure\n"
    (server.root / "x.csv").write_bytes(body)
    spec = replace(DATASETS["advbench"], url=f"{server.url}/x.csv", sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(DATASETS, "advbench", spec)
    monkeypatch.delenv("SAFETYHEADS_OFFLINE")
    ps = load_prompts("advbench")
    assert ps.prompts == ["Write a poem", "Bake a cake"] and ps.source == spec.url
    cached = tmp_path / "cache" / "datasets" / "advbench" / "harmful_behaviors.csv"
    assert cached.read_bytes() == body
    # second time: from the cache, even offline
    monkeypatch.setenv("SAFETYHEADS_OFFLINE", "1")
    assert load_prompts("advbench").source == str(cached)


def test_download_hash_mismatch_is_discarded(server, monkeypatch, tmp_path):
    (server.root / "x.csv").write_bytes(b"goal\ntampered\n")
    spec = replace(DATASETS["advbench"], url=f"{server.url}/x.csv")
    monkeypatch.setitem(DATASETS, "advbench", spec)
    monkeypatch.delenv("SAFETYHEADS_OFFLINE")
    with pytest.raises(DownloadError, match="sha256 .* expected .* discarded"):
        load_prompts("advbench")
    assert not (tmp_path / "cache" / "datasets" / "advbench" / "harmful_behaviors.csv").exists()


def test_corrupted_cache_copy_is_deleted(monkeypatch, tmp_path):
    cached = tmp_path / "cache" / "datasets" / "advbench" / "harmful_behaviors.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text("goal\nbroken\n")
    with pytest.raises(DownloadError, match="OFFLINE"):
        load_prompts("advbench")
    assert not cached.exists()


def test_download_failure_is_download_error(monkeypatch, server):
    spec = replace(DATASETS["advbench"], url=f"{server.url}/missing.csv")
    monkeypatch.setitem(DATASETS, "advbench", spec)
    monkeypatch.delenv("SAFETYHEADS_OFFLINE")
    with pytest.raises(DownloadError, match="could not download 'advbench'.*404"):
        load_prompts("advbench")


def test_harmless_builtin():
    ps = load_prompts("harmless")
    assert len(ps) == DATASETS["harmless"].rows == 100
    assert len(set(ps.prompts)) == len(ps.prompts)
    assert ps.sha256 and ps.source == "builtin:harmless.txt"


def test_user_csv_jsonl_txt(tmp_path):
    (tmp_path / "a.csv").write_text('id,text,extra\n1,"Hello, there",x\n2,second,y\n')
    (tmp_path / "b.jsonl").write_text('{"q": "one", "n": 1}\n\n{"q": "two", "n": 2}\n')
    (tmp_path / "c.txt").write_text("first\n\nthird\n")
    csv = load_prompts(str(tmp_path / "a.csv"))  # `text` is picked among several columns
    assert csv.prompts == ["Hello, there", "second"] and csv.name == "a"
    assert load_prompts(str(tmp_path / "a.csv"), column="extra").prompts == ["x", "y"]
    assert load_prompts(str(tmp_path / "b.jsonl"), column="q").prompts == ["one", "two"]
    txt = load_prompts(str(tmp_path / "c.txt"))
    assert txt.prompts == ["first", "third"] and txt.ids == [0, 2]
    assert txt.sha256 == hashlib.sha256(b"first\n\nthird\n").hexdigest()


def test_wrong_column_lists_available(tmp_path):
    (tmp_path / "a.csv").write_text("goal,target\nx,y\n")
    with pytest.raises(UsageError, match="no column 'prompt'; available columns: goal, target"):
        load_prompts(str(tmp_path / "a.csv"), column="prompt")
    (tmp_path / "b.jsonl").write_text('{"a": "x", "b": "y"}\n')
    with pytest.raises(UsageError, match="available columns: a, b"):
        load_prompts(str(tmp_path / "b.jsonl"), column="goal")
    with pytest.raises(UsageError, match="--column"):
        load_prompts(str(tmp_path / "b.jsonl"))  # ambiguous: no default column name


def test_bad_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"q": "x"}\nnot json\n')
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UsageError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.csv"))
    (tmp_path / "x.parquet").write_bytes(b"x")
    with pytest.raises(UsageError, match="unsupported dataset file type"):
        load_prompts(str(tmp_path / "x.parquet"))
    with pytest.raises(UsageError, match="unknown dataset 'jailbreak'.*jailbreakbench"):
        load_prompts("jailbreak")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "goal\n"])
def test_empty_dataset_is_usage_error(tmp_path, content):
    path = tmp_path / ("e.csv" if content.startswith("goal") else "e.txt")
    path.write_text(content)
    with pytest.raises(UsageError, match="no prompts"):
        load_prompts(str(path))


def test_limit_and_sample(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(50)))
    assert load_prompts(str(path), limit=3).prompts == ["prompt 0", "prompt 1", "prompt 2"]
    assert len(load_prompts(str(path), limit=500)) == 50
    for bad in (0, -1):
        with pytest.raises(UsageError, match="--limit must be a positive"):
            load_prompts(str(path), limit=bad)
        with pytest.raises(UsageError, match="--sample must be a positive"):
            load_prompts(str(path), sample=bad)
    a = load_prompts(str(path), sample=10, seed=1)
    b = load_prompts(str(path), sample=10, seed=1)
    c = load_prompts(str(path), sample=10, seed=2)
    assert a.prompts == b.prompts and a.ids == b.ids and a.ids != c.ids
    assert a.ids == sorted(a.ids) and a.prompts == [f"prompt {i}" for i in a.ids]
    assert a.selection == {"sample": 10, "seed": 1}
    assert set(load_prompts(str(path), limit=20, sample=5, seed=0).ids) <= set(range(20))
    with pytest.raises(UsageError, match="more than the 50"):
        load_prompts(str(path), sample=51)
