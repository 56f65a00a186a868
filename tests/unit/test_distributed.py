"""Sharding, merging and the gloo process group of `safetyheads.distributed` (no model needed).

The 2-process tests start real processes with `torch.multiprocessing` and a real gloo group, the
same backend CI and CPU users get under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetyheads import distributed as D
from tiny_models import one_thread  # noqa: F401  (autouse: tiny matrices run on one thread)

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """Tests run as one process unless they say otherwise, whatever launched pytest."""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


def head_map(n_layers: int, n_heads: int) -> list[list[tuple[int, int]]]:
    return [[(layer, head)] for layer in range(n_layers) for head in range(n_heads)]


# --- cost model and sharding -------------------------------------------------------------------


def test_config_cost_is_layers_replayed():
    assert D.config_cost([(0, 3)], 30) == 30
    assert D.config_cost([(29, 0)], 30) == 1
    # A group replays from its lowest layer.
    assert D.config_cost([(12, 1), (5, 0), (20, 2)], 30) == 25
    assert D.config_cost([], 30) == 0


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_cover_everything_and_keep_order(world):
    configs = head_map(30, 9)
    shards = [D.shard_configs(configs, 30, world, r) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(len(configs)))
    for s in shards:
        assert s == sorted(s)


@pytest.mark.parametrize("n_layers,n_heads,world", [(30, 9, 2), (32, 32, 8), (24, 14, 3), (5, 2, 4)])
def test_shards_are_balanced_by_cost_not_by_count(n_layers, n_heads, world):
    configs = head_map(n_layers, n_heads)
    costs = [D.config_cost(c, n_layers) for c in configs]
    loads = [sum(costs[i] for i in D.shard_configs(configs, n_layers, world, r)) for r in range(world)]
    # Greedy LPT: no rank is more than one item's cost above another.
    assert max(loads) - min(loads) <= max(costs)
    # And far better than that on a real head map: within 2% of the ideal share.
    if len(configs) >= 50 * world:
        assert max(loads) <= 1.02 * sum(costs) / world


def test_naive_contiguous_split_would_be_unbalanced():
    """Why cost matters: halving a head map by count gives the first rank ~3x the work."""
    configs = head_map(32, 32)
    costs = [D.config_cost(c, 32) for c in configs]
    first_half = sum(costs[: len(costs) // 2])
    second_half = sum(costs[len(costs) // 2:])
    assert first_half > 2.5 * second_half
    balanced = [sum(costs[i] for i in D.shard_configs(configs, 32, 2, r)) for r in range(2)]
    assert max(balanced) < 0.51 * sum(costs)


def test_shard_is_deterministic_and_checks_rank():
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    assert D.shard(costs, 3, 1) == D.shard(list(costs), 3, 1)
    with pytest.raises(ValueError):
        D.shard(costs, 2, 2)


def test_single_process_defaults(monkeypatch):
    assert D.info() == D.DistInfo(0, 1, 0)
    assert D.is_main()
    assert D.init("cpu") == D.DistInfo(0, 1, 0)  # no launcher: no process group
    assert D.shard([1, 2, 3]) == [0, 1, 2]
    assert D.broadcast({"a": 1}) == {"a": 1}
    assert D.setup("cpu") == "cpu" and D.setup("auto") == "auto"


def test_launcher_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = D.info()
    assert (d.rank, d.world_size, d.local_rank, d.enabled, d.is_main) == (5, 8, 1, True, False)
    assert D.local_device("cuda") == "cuda:1"
    assert D.local_device("cuda:3") == "cuda:3"  # an explicit index is the user's choice
    assert D.local_device("cpu") == "cpu"


# --- the real thing: `torchrun --nproc-per-node 2 safetyheads ...` vs one process -----------------

PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?", "hi there",
           "explain photosynthesis"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random chat model saved as an ordinary model folder (what --model DIR loads)."""
    from tiny_chat import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=4, heads=4, kv_heads=2, seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _result_files(run: "os.PathLike") -> dict[str, bytes]:
    """Every file of a run folder except the manifest (which records times, argv and world size)."""
    root = Path(run)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_torchrun_two_processes_write_byte_identical_files(tiny_model_dir, tmp_path):
    """ships (+ gships), sahara, gships --mode auto and a resumed gships, each run by one process and by two
    (torchrun, gloo): the result files, chunks included, must be byte-identical, and both ranks
    must have done work. One torchrun launch runs all three commands (process start-up dominates)."""
    from safetyheads.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--model", str(tiny_model_dir), "--dataset", str(prompts), "--device", "cpu", "--quiet",
              "--chunk-rows", "1"]  # one chunk per layer
    commands = {
        "ships": ["ships", *common, "--method", "scaling", "--with-gships"],
        "sahara": ["sahara", *common, "--group-size", "2"],
        "gships": ["gships", *common],
        # the screen (one chunk) and the exact top 5 (one chunk per layer), through the same pipeline
        "auto": ["gships", *common, "--mode", "auto", "--top-k", "5"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", str(tmp_path / "one" / name)]) == 0
    # The resumed run: the 1-process gships folder with two layers' chunks and the final files
    # deleted, as if it had been killed.
    shutil.copytree(tmp_path / "one" / "gships", tmp_path / "two" / "gships")
    for lost in ("chunks/gships_L000.parquet", "chunks/gships_L002.parquet", "generalized_ships.csv",
                 "generalized_ships.parquet"):
        (tmp_path / "two" / "gships" / lost).unlink()
    runs = [[*argv, "--out", str(tmp_path / "two" / name)] + (["--resume"] if name == "gships" else [])
            for name, argv in commands.items()]
    driver = tmp_path / "driver.py"
    # Last, a user error that only rank 0 can see (--out holds another run): every rank must
    # exit with the one-line error (status 2) instead of waiting for rank 0 forever.
    refused = ["gships", *common, "--out", str(tmp_path / "two" / "ships")]
    driver.write_text("from safetyheads.cli.main import main\n"
                      f"for argv in {runs!r}:\n"
                      "    assert main(argv) == 0, argv\n"
                      f"assert main({refused!r}) == 2\n")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(driver)],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("already holds a different run") == 2  # both ranks report it

    for name in commands:
        one, two = _result_files(tmp_path / "one" / name), _result_files(tmp_path / "two" / name)
        assert one.keys() == two.keys() and len(one) >= 3
        different = [f for f in one if one[f] != two[f]]
        assert not different, f"{name}: files differ between 1 and 2 processes: {different}"
        manifest = json.loads((tmp_path / "two" / name / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and manifest["batch_size"] >= 1
        assert min(manifest["chunks_per_rank"]) >= 1, f"{name}: a rank did nothing: {manifest['chunks_per_rank']}"
    # Resume: only the two missing layers were computed, one per rank (they cost 4x4 and 4x2 layer passes).
    assert json.loads((tmp_path / "two" / "gships" / "manifest.json").read_text())["chunks_per_rank"] == [1, 1]
    assert json.loads((tmp_path / "one" / "gships" / "manifest.json").read_text())["world_size"] == 1
