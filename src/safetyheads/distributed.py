"""Data parallelism over ablation configurations with `torch.distributed`.

A full head map is L×H independent ablations. Under `torchrun` or `accelerate launch` every
process (rank) runs the same command; this module lets each rank take a disjoint, cost-balanced
shard of the work (the analyses' chunks of ablation configurations), and sends every rank's
results to rank 0, which writes exactly the files a single process writes (`ShardedRun`).

Nothing here is home-made communication: it is `torch.distributed` (gloo on CPU, nccl on CUDA)
initialised from the environment variables the launchers set (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Without those variables everything degrades to a
single process: `shard` returns every index and `ShardedRun` is the plain run folder.

Cost model: the engine computes the clean residual stream once and replays only the decoder
layers from the first ablated layer on, so a configuration whose lowest ablated layer is l costs
L - l layer passes (a head in layer 0 costs the whole model, one in the last layer a single
layer). Shards are balanced on that cost, not on the number of configurations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

Head = tuple[int, int]
T = TypeVar("T")

__all__ = [
    "DistInfo",
    "info",
    "init",
    "is_main",
    "local_device",
    "config_cost",
    "shard",
    "shard_configs",
    "broadcast",
    "barrier",
    "shutdown",
    "setup",
    "chunk_cost",
    "ShardedRun",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `world_size == 1` means no data parallelism."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def info() -> DistInfo:
    """This process's rank and world size: from the live process group when there is one, else
    from the launcher's environment variables (torchrun and `accelerate launch` both set
    RANK / WORLD_SIZE / LOCAL_RANK), else a single process."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local_rank)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and shows progress."""
    return info().is_main


def _wants_cuda(device: str | torch.device | None) -> bool:
    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def local_device(device: str | torch.device | None = "auto") -> str:
    """The device this rank should use: `cuda` / `auto` become `cuda:LOCAL_RANK` in a multi-process
    job, so that the processes of one node each take their own GPU. Anything else is unchanged."""
    d = info()
    if d.enabled and _wants_cuda(device):
        dev = device if device is not None and str(device) != "auto" else "cuda"
        if torch.device(dev).index is None:
            return f"cuda:{d.local_rank}"
    return "auto" if device is None else str(device)


def init(device: str | torch.device | None = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group the launcher set up, if any; idempotent.

    Backend: nccl when this rank computes on CUDA, gloo otherwise (CPU, tests). Does nothing for
    a single process (no WORLD_SIZE > 1 in the environment), so callers can call it always."""
    d = info()
    if not d.enabled or not dist.is_available() or dist.is_initialized():
        return d
    cuda = _wants_cuda(device)
    if cuda:
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method="env://",
        timeout=timedelta(seconds=timeout_s),
    )
    return info()


def setup(device: str | torch.device | None = "auto") -> str:
    """What a command calls before loading its model: join the launcher's process group (if any)
    and return the device this rank should load on (`cuda:LOCAL_RANK` for `cuda`/`auto` in a
    multi-process job; `device` unchanged otherwise)."""
    init(device)
    return local_device(device)


def shutdown() -> None:
    """Leave the process group (end of a command); harmless when there is none."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s value of a picklable object, on every rank (a decision rank 0 made, e.g. the
    next Sahara head). Identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def config_cost(config: Sequence[Head], n_layers: int) -> int:
    """Layer passes an ablation costs under prefix reuse: L - (lowest ablated layer).
    The empty configuration (the clean model) is already computed by the clean pass: cost 0."""
    if len(config) == 0:
        return 0
    return n_layers - min(layer for layer, _ in config)


def chunk_cost(configs: Sequence[Sequence[Head]], n_layers: int) -> int:
    """Layer passes of a chunk of configurations swept together: the sum of their costs."""
    return sum(config_cost(c, n_layers) for c in configs)


def shard(costs: Sequence[float], world_size: int | None = None, rank: int | None = None) -> list[int]:
    """Indices of the items this rank computes, balanced on `costs`.

    Longest-processing-time-first greedy: items in decreasing cost go to the currently least
    loaded rank (ties: lower rank). Deterministic (ties between equal costs broken by index), so
    every rank computes the same assignment without talking to the others. The ranks' index sets
    are disjoint and cover every item; each returned list is sorted ascending, so a rank's
    configurations keep the single-process order (layer by layer for a head map)."""
    d = info()
    world_size = d.world_size if world_size is None else world_size
    rank = d.rank if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if world_size == 1:
        return list(range(len(costs)))
    load = [0.0] * world_size
    mine: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        load[target] += costs[i]
        if target == rank:
            mine.append(i)
    return sorted(mine)


def shard_configs(
    configs: Sequence[Sequence[Head]], n_layers: int, world_size: int | None = None, rank: int | None = None
) -> list[int]:
    """`shard` with each configuration costed by `config_cost`."""
    return shard([config_cost(c, n_layers) for c in configs], world_size, rank)


class ShardedRun:
    """A run folder shared by every rank, so that an analysis written for one process runs data
    parallel with three small additions: `open`, `plan` before its chunk loop, `sync` after it.

    The chunk loop stays the single-process loop::

        run = ShardedRun.open(lambda: RunDir.open(...))
        run.plan({key: cost for each chunk})        # collective: who computes which pending chunk
        for each chunk:
            if not run.chunk_done(key):             # True for chunks on disk AND chunks of other ranks
                run.write_chunk(key, compute(...))
        run.sync()                                  # collective: rank 0 writes every rank's chunks
        table = run.read_chunks(prefix)             # collective: rank 0 reads, every rank gets it

    Whole chunks are the unit of work: each is computed by one rank exactly as a single process
    computes it (same configurations, same sweep call), so the merged files are byte-identical to
    a 1-process run, and resume works chunk by chunk as before. Chunks are assigned by cost
    (`shard`, longest first), a chunk's cost being the layer passes of its configurations.
    Only rank 0 touches the folder; `write_table`, `write_json` and `finish` are no-ops elsewhere.
    In a single process every call goes straight to the wrapped run folder.
    """

    def __init__(self, run, dist_info: DistInfo):
        self._run = run                      # the real RunDir on rank 0, None elsewhere
        self._info = dist_info
        self._skip: set[str] = set()         # chunks this rank must not compute (done, or another rank's)
        self._pending: dict[str, object] = {}
        self._chunks_per_rank = [0] * dist_info.world_size   # provenance for the manifest
        self._batch_sizes: set[int] = set()  # every batch size this rank's sweeps finally used
        self._prefix_tokens: int | None = None  # leading tokens the sweeps replayed once per config

    @classmethod
    def open(cls, open_run: Callable[[], object]) -> "ShardedRun":
        """Call `open_run()` on rank 0 only (it creates/validates the folder). Collective: if it
        raises a user error on rank 0, every rank raises the same message instead of hanging."""
        from .errors import UsageError

        d = info()
        if not (dist.is_available() and dist.is_initialized()) or d.world_size == 1:
            return cls(open_run(), d)
        run, error = None, None
        if d.is_main:
            try:
                run = open_run()
            except Exception as exc:  # re-raised below, after the other ranks have heard of it
                error = exc
        message = broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise UsageError(message)
        return cls(run, d)

    @property
    def distributed(self) -> bool:
        return self._info.world_size > 1

    @property
    def path(self):
        return getattr(self._run, "path", None)

    def plan(self, costs: dict[str, float]) -> list[str]:
        """Assign the pending chunks among `costs` (key -> cost) to ranks; return this rank's keys.
        Collective. Chunks already on disk (resume) are assigned to nobody."""
        if not self.distributed:
            return [k for k in costs if not self._run.chunk_done(k)]
        done = broadcast([k for k in costs if self._run.chunk_done(k)] if self._info.is_main else None)
        pending = [k for k in costs if k not in set(done)]
        pending_costs = [float(costs[k]) for k in pending]
        for r in range(self._info.world_size):
            self._chunks_per_rank[r] += len(shard(pending_costs, self._info.world_size, r))
        mine = {pending[i] for i in shard(pending_costs)}
        self._skip = set(costs) - mine
        return [k for k in pending if k in mine]

    def chunk_done(self, key: str) -> bool:
        if not self.distributed:
            return self._run.chunk_done(key)
        return key in self._skip

    def write_chunk(self, key: str, frame) -> None:
        if not self.distributed:
            self._run.write_chunk(key, frame)
        elif self._info.is_main:
            self._run.write_chunk(key, frame)  # persisted at once: survives a kill of the job
        else:
            self._pending[key] = frame

    def sync(self, cache=None) -> None:
        """Collective: rank 0 writes the chunks the other ranks computed (in key order).
        `cache` (the engine's CleanCache) passes on the batch sizes its sweeps used."""
        for size in (getattr(cache, "extra", None) or {}).get("batch_sizes", ()):
            self.record_batch_size(size)
        if cache is not None and hasattr(cache, "prefix_length"):
            self._prefix_tokens = int(cache.prefix_length)
        if not self.distributed:
            return
        parts: list = [None] * self._info.world_size
        dist.all_gather_object(parts, (self._pending, sorted(self._batch_sizes)))
        self._pending = {}
        if self._info.is_main:
            for _, sizes in parts:
                self._batch_sizes.update(sizes)
            received = {k: v for part, _ in parts[1:] for k, v in part.items()}
            for key in sorted(received):
                self._run.write_chunk(key, received[key])
        barrier()

    def record_batch_size(self, batch_size: int) -> None:
        """Note the batch size a sweep finally used (after any out-of-memory halving)."""
        self._batch_sizes.add(int(batch_size))

    def finish(self, extra: dict | None = None, **more) -> None:
        """The run folder's `finish`, on rank 0, after recording in the manifest how the work was
        spread (`world_size`, `chunks_per_rank`) and the batch size the sweeps used (`batch_size`:
        the smallest any sweep on any rank ended with; `batch_sizes`: all of them)."""
        if self._run is None:
            return
        fields: dict = {"world_size": self._info.world_size}
        if self.distributed:
            fields["chunks_per_rank"] = list(self._chunks_per_rank)
        if self._batch_sizes:
            fields["batch_size"] = min(self._batch_sizes)
            fields["batch_sizes"] = sorted(self._batch_sizes)
        if self._prefix_tokens is not None:
            fields["shared_prefix_tokens"] = self._prefix_tokens
        self._run.update_manifest(**fields)
        self._run.finish(extra, **more)

    def read_chunks(self, prefix: str):
        """Collective: rank 0's `read_chunks(prefix)`, on every rank (a decision made from it, such
        as Sahara's next head, is then the same everywhere)."""
        if not self.distributed:
            return self._run.read_chunks(prefix)
        return broadcast(self._run.read_chunks(prefix) if self._info.is_main else None)

    def __getattr__(self, name: str):
        """Everything else (write_table, write_json, finish, ...) runs on rank 0 only."""
        if self._run is not None:
            return getattr(self._run, name)
        return lambda *args, **kwargs: None
