"""Sharding, merging and the gloo process group of `safetyheads.distributed` (no model needed).

The 2-process tests start real processes with `torch.multiprocessing` and a real gloo group, the
same backend CI and CPU users get under torchrun."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from safetyheads import distributed as D

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which costs seconds per test when
    the CPU is shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    out = D.map_configs(head_map(3, 2), 3, lambda cs: torch.tensor([float(c[0][0] * 10 + c[0][1]) for c in cs]))
    assert out.tolist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]


def test_launcher_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = D.info()
    assert (d.rank, d.world_size, d.local_rank, d.enabled, d.is_main) == (5, 8, 1, True, False)
    assert D.local_device("cuda") == "cuda:1"
    assert D.local_device("cuda:3") == "cuda:3"  # an explicit index is the user's choice
    assert D.local_device("cpu") == "cpu"


def test_gather_single_process_reorders_and_checks():
    merged = D.gather([2, 0, 1], torch.tensor([[2.0], [0.0], [1.0]]), 3)
    assert merged.tolist() == [[0.0], [1.0], [2.0]]
    with pytest.raises(RuntimeError, match="computed by no rank"):
        D.gather([0, 1], torch.zeros(2), 3)
    with pytest.raises(ValueError):
        D.gather([0, 1], torch.zeros(3), 3)


# --- a real 2-process gloo group -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _score(configs) -> torch.Tensor:
    """A per-configuration 'score' with awkward float bits, independent of its neighbours."""
    # [len(configs), 3]
    return torch.stack([torch.tensor([l * 0.1 + h / 7.0, (l + 1) ** 0.5, torch.pi * h]) for (l, h), in configs])


class FolderRun:
    """The run-folder calls ShardedRun relies on, one pickle per chunk (stands in for runs.RunDir)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def chunk_done(self, key):
        return os.path.exists(os.path.join(self.path, key))

    def write_chunk(self, key, value):
        torch.save(value, os.path.join(self.path, key))

    def read_chunks(self, prefix):
        return {k: torch.load(os.path.join(self.path, k)) for k in sorted(os.listdir(self.path)) if k.startswith(prefix)}

    def update_manifest(self, **fields):
        torch.save(fields, os.path.join(self.path, "manifest"))

    def finish(self, extra):
        torch.save(extra, os.path.join(self.path, "finished"))


def chunk_loop(run, n_layers: int, computed: list) -> dict:
    """An analysis written for one process: one chunk per layer, with the three ShardedRun calls."""
    run.plan({f"L{layer}": 4 * (n_layers - layer) for layer in range(n_layers)})
    for layer in range(n_layers):
        if not run.chunk_done(f"L{layer}"):
            computed.append(layer)
            run.write_chunk(f"L{layer}", _score([[(layer, h)] for h in range(4)]))
    run.sync()
    chunks = run.read_chunks("L")
    run.finish({"chunks": len(chunks)})
    return chunks


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d = D.init("cpu", timeout_s=60)
    assert torch.distributed.get_backend() == "gloo"
    configs = head_map(6, 4)
    computed: list = []

    def compute(local):
        computed.extend(local)
        return _score(local)

    merged = D.map_configs(configs, 6, compute)
    chosen = D.broadcast(int(merged[:, 0].argmax()) if d.is_main else -1)
    # A resumed run: layer 1 is already on disk, so nobody recomputes it.
    folder = os.path.join(out_dir, "run")
    if d.is_main:
        FolderRun(folder).write_chunk("L1", _score([[(1, h)] for h in range(4)]))
    D.barrier()
    layers_computed: list = []
    run = D.ShardedRun.open(lambda: FolderRun(folder))
    chunks = chunk_loop(run, 6, layers_computed)
    torch.save({"rank": d.rank, "world": d.world_size, "computed": computed, "merged": merged, "chosen": chosen,
                "layers_computed": layers_computed, "chunks": chunks}, os.path.join(out_dir, f"rank{rank}.pt"))
    D.barrier()
    D.shutdown()


def test_two_gloo_processes_merge_to_the_single_process_result(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    configs = head_map(6, 4)
    expected = _score(configs)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    # Every configuration computed exactly once, by one rank, and both ranks did work.
    assert r0["computed"] and r1["computed"]
    assert sorted(map(tuple, r0["computed"] + r1["computed"])) == sorted(map(tuple, configs))
    # Both ranks hold the merged tensor, bit-identical to a single process computing everything.
    for r in (r0, r1):
        assert torch.equal(r["merged"], expected)
        assert r["chosen"] == int(expected[:, 0].argmax())

    # ShardedRun: the pending layers split between the ranks, the one on disk computed by nobody,
    # rank 0 wrote every chunk and both ranks read back the same chunks a single process writes.
    assert r0["layers_computed"] and r1["layers_computed"]
    assert sorted(r0["layers_computed"] + r1["layers_computed"]) == [0, 2, 3, 4, 5]
    single = FolderRun(str(tmp_path / "single"))
    single_chunks = chunk_loop(D.ShardedRun.open(lambda: single), 6, [])
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tmp_path / "single"))
    for r in (r0, r1):
        assert r["chunks"].keys() == single_chunks.keys()
        assert all(torch.equal(r["chunks"][k], single_chunks[k]) for k in single_chunks)
    assert torch.load(tmp_path / "run" / "finished") == {"chunks": 6}
    assert torch.load(tmp_path / "run" / "manifest") == {
        "world_size": 2, "chunks_per_rank": [len(r0["layers_computed"]), len(r1["layers_computed"])]}


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


def _result_files(run: "os.PathLike") -> dict[str, bytes]:
    """Every file of a run folder except the manifest (which records times, argv and world size)."""
    from pathlib import Path

    root = Path(run)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_torchrun_two_processes_write_byte_identical_files(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    from safetyheads.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = ["--model", str(tiny_model_dir), "--dataset", str(prompts), "--device", "cpu", "--quiet"]
    commands = {
        "ships": ["ships", *common, "--method", "scaling", "--with-gships"],
        "sahara": ["sahara", *common, "--group-size", "2"],
    }
    # The same commands, one process (here) and two processes (torchrun, gloo).
    for name, argv in commands.items():
        assert main([*argv, "--out", str(tmp_path / "one" / name)]) == 0
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom safetyheads.cli.main import main\n"
        f"for argv in {[[*argv, '--out', str(tmp_path / 'two' / name)] for name, argv in commands.items()]!r}:\n"
        "    assert main(argv) == 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(driver)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in commands:
        one, two = _result_files(tmp_path / "one" / name), _result_files(tmp_path / "two" / name)
        assert one.keys() == two.keys() and len(one) >= 3
        different = [f for f in one if one[f] != two[f]]
        assert not different, f"{name}: files differ between 1 and 2 processes: {different}"
        manifest = json.loads((tmp_path / "two" / name / "manifest.json").read_text())
        assert manifest["world_size"] == 2
        assert manifest["batch_size"] >= 1
