"""The three analyses as API functions: `run_ships`, `run_gships`, `run_sahara`.

Each one resolves its inputs (model, prompts, heads), opens a run folder, runs the clean pass once,
then calls the sweep engine chunk by chunk (one decoder layer's heads per chunk), writing each
chunk atomically. An interrupted run resumed with `resume=True` skips the chunks already on disk,
and since every chunk is computed exactly as it would have been in one go and the final tables
are assembled from the chunks alone, the final files are identical to an uninterrupted run.

The math lives in `scores.py`; this module only orchestrates.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import distributed, scores
from .errors import UsageError
from .scores import Head

# Bound on the [configs, prompts, vocab] float32 log-prob block requested for the smoothed KL.
_LOGPROB_BUDGET_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class ShipsResult:
    out: Path
    table: pd.DataFrame        # prompt_id, layer, head, method, score
    summary: pd.DataFrame      # layer, head, method, mean, median, top10_count


@dataclass
class GShipsResult:
    out: Path
    table: pd.DataFrame        # layer, head, method, score, rank


@dataclass
class SaharaResult:
    out: Path
    steps: pd.DataFrame        # step, layer, head, score
    candidates: pd.DataFrame   # step, layer, head, score for every head tried at every step
    group: list[Head] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Input resolution
# --------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Everything an analysis needs, resolved once."""
    command: str               # ships | gships | sahara
    loaded: Any                # models.LoadedModel
    prompt_set: Any            # data.PromptSet
    texts: list[str]           # the exact model inputs (after formatting)
    n_layers: int
    n_heads: int
    heads: list[Head]          # the heads to score, sorted by (layer, head)
    config: dict               # what goes into manifest.json


def _plain(obj: Any) -> Any:
    """A config object as a JSON-able dict (dataclass, object with to_dict, dict, or a string)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, dict):
        return obj
    return str(obj)


def _check_ablation(method: str, epsilon: float) -> None:
    from .ablation import check_epsilon, check_method
    check_method(method)
    check_epsilon(epsilon)


def _load_model(model: Any):
    """A `LoadedModel` from a LoadedModel, a ModelConfig or a model spec string."""
    from .models import DEFAULT_MODEL, LoadedModel, load_model
    if isinstance(model, LoadedModel):
        distributed.setup(str(model.model.device))                       # [scale-out] join torchrun's group
        return model
    if model is None or isinstance(model, (str, Path)):
        return load_model(str(model or DEFAULT_MODEL), device=distributed.setup("auto"))  # [scale-out]
    model = replace(model, device=distributed.setup(model.device))      # [scale-out] cuda:LOCAL_RANK per rank
    return model.load()                                                  # config.ModelConfig


def _load_prompt_set(data: Any):
    """A `PromptSet` from a PromptSet, a DataConfig or a dataset name/path."""
    from .data import PromptSet, load_prompts
    if isinstance(data, PromptSet):
        prompt_set = data
    elif isinstance(data, (str, Path)):
        prompt_set = load_prompts(str(data))
    else:
        prompt_set = data.load()                                         # config.DataConfig
    if not prompt_set.prompts:
        raise UsageError(f"dataset {prompt_set.name!r} has no prompts left (check --limit/--sample)")
    return prompt_set


def _prompt_options(prompt: Any) -> tuple[str, str | None]:
    if prompt is None:
        return "chat", None
    if isinstance(prompt, str):
        return prompt, None
    options = _plain(prompt)
    return options.get("format") or options.get("fmt") or "chat", options.get("system_prompt")


def select_heads(n_layers: int, n_heads: int, *, layers: str | None = None, heads: str | None = None) -> list[Head]:
    """Heads to score: `heads` ("2-26,3-8") if given, else every head; restricted to `layers`
    ("0-5,7") if given. Out-of-range values raise UsageError (in the ablation module's parser)."""
    from .ablation import parse_heads, parse_layers
    chosen = parse_heads(heads, n_layers, n_heads) if heads else \
        [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    if layers:
        allowed = set(parse_layers(layers, n_layers))
        chosen = [hd for hd in chosen if hd[0] in allowed]
    chosen = sorted(set((int(a), int(b)) for a, b in chosen))
    if not chosen:
        raise UsageError("no heads selected: --heads and --layers have nothing in common")
    return chosen


def _resolve(command: str, model: Any, data: Any, prompt: Any, *, method: str, epsilon: float,
             layers: str | None, heads: str | None, extra: dict) -> _Inputs:
    """Validate the cheap options, load model and prompts, and build the manifest config."""
    from .ablation import num_layers_heads
    from .prompts import format_prompts
    _check_ablation(method, epsilon)
    prompt_set = _load_prompt_set(data)
    loaded = _load_model(model)
    n_layers, n_heads = num_layers_heads(loaded.model)
    selected = select_heads(n_layers, n_heads, layers=layers, heads=heads)
    fmt, system_prompt = _prompt_options(prompt)
    texts = format_prompts(loaded.tokenizer, list(prompt_set.prompts), fmt, system_prompt)
    config = {
        "model": getattr(loaded, "spec", None),
        "weights_sha256": getattr(loaded, "weights_sha256", None),
        # bf16 and float32 scores differ beyond float noise: a resume must not mix their chunks
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "dataset": prompt_set.name,
        "data": {"source": str(prompt_set.source), "sha256": prompt_set.sha256,
                 "n_prompts": len(prompt_set.prompts), "ids": [int(i) for i in prompt_set.ids],
                 "options": _plain(data) if not isinstance(data, type(prompt_set)) else None},
        "format": fmt,
        "system_prompt": system_prompt,
        # The exact model inputs decide the scores; their hash makes a resume with other prompts fail.
        "inputs_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "method": method,
        "epsilon": float(epsilon),
        "layers": layers,
        "heads": heads,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_scored_heads": len(selected),
        **extra,
    }
    return _Inputs(command, loaded, prompt_set, texts, n_layers, n_heads, selected, config)


def _open_run(out: str | Path, inputs: _Inputs, *, resume: bool, force: bool):
    from .runs import RunDir
    if out is None:
        raise UsageError("--out RUN_DIR is required")
    # [scale-out] only rank 0 touches the folder; see distributed.ShardedRun
    return distributed.ShardedRun.open(lambda: RunDir.open(
        Path(out), inputs.config, resume=resume, force=force, command=inputs.command,
        model=inputs.loaded, datasets=inputs.prompt_set))


def _clean_cache(inputs: _Inputs):
    """One clean forward over all prompts (needed on resume too: it is cheap next to a sweep)."""
    from .engine import prepare
    from .prompts import encode
    model = inputs.loaded.model
    encoded = encode(inputs.loaded.tokenizer, inputs.texts, device=getattr(model, "device", None))
    return prepare(model, encoded)


def _by_layer(heads: Sequence[Head]) -> dict[int, list[Head]]:
    groups: dict[int, list[Head]] = {}
    for h in heads:
        groups.setdefault(h[0], []).append(h)
    return groups


class _WorkBar:
    """The progress bar of an analysis, counted in compute rather than in heads.

    An ablation that starts in layer l replays L - l layers, so an early-layer head costs up to L
    times more than a late one: a bar counting heads would give an ETA off by about 2x and sit
    still through a slow layer. This bar counts layer passes x prompts, moves after every sweep
    chunk (the engine reports its work), and shows the heads done in its description. Work found on disk
    when resuming (or given to other ranks) counts as done before the clock starts, so it does not
    inflate the rate."""

    def __init__(self, desc: str, quiet: bool, n_layers: int, n_prompts: int) -> None:
        self.desc, self.n_layers, self.n_prompts = desc, n_layers, n_prompts
        self.disable = quiet or not distributed.is_main()                  # [scale-out]
        self.bar: tqdm | None = None
        self.heads_done = self.heads_total = 0
        self.planned = 0  # work of the chunks added so far
        self.label = "heads"

    def work(self, configs: Sequence[Sequence[Head]]) -> int:
        return distributed.chunk_cost(configs, self.n_layers) * self.n_prompts

    def add(self, chunks: Sequence[tuple[Sequence[Sequence[Head]], bool]], *, later: int = 0,
            label: str = "heads") -> None:
        """Add planned chunks (configs, already done?) to the total; `later` is an estimate of the
        work still to be planned (Sahara's next steps), replaced by their real work when added."""
        done = sum(self.work(c) for c, is_done in chunks if is_done)
        planned = sum(self.work(c) for c, _ in chunks)
        self.heads_total += sum(len(c) for c, _ in chunks)
        self.heads_done += sum(len(c) for c, is_done in chunks if is_done)
        self.label = label
        self.planned += planned
        if self.bar is None:
            self.bar = tqdm(total=self.planned + later, initial=done, desc=self._text(), disable=self.disable,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]")
        else:
            self.bar.total = self.planned + later
            if done:
                self.bar.update(done)
        self._describe()

    def advance(self, work: float) -> None:
        """Sweep work finished (negative after an out-of-memory retry)."""
        if self.bar is not None:
            self.bar.update(work)

    def heads(self, n: int) -> None:
        self.heads_done += n
        self._describe()

    def _text(self) -> str:
        return f"{self.desc} ({self.heads_done}/{self.heads_total} {self.label})"

    def _describe(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(self._text(), refresh=True)

    def __enter__(self) -> "_WorkBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _chunk_key(prefix: str, layer: int) -> str:
    """The run-folder key of one layer's chunk, e.g. ships_L007 (sorted keys = layer order)."""
    return f"{prefix}{layer:03d}"


def _pending_chunks(run, inputs: _Inputs, bar: _WorkBar, prefix: str, by_layer: dict[int, list[Head]],
                    group: Sequence[Head] = (), *, later: int = 0, label: str = "heads"
                    ) -> Iterator[tuple[int, list[Head], str]]:
    """The layer chunks of one sweep still to compute: each chunk ablates `group` + one head of
    `by_layer[layer]`. Shares the chunks out among the ranks by cost ([scale-out]; a no-op in one
    process), counts them all on the progress bar (saved ones as done), then yields
    (layer, heads, chunk key) for each chunk not saved yet, in layer order."""
    keys = {layer: _chunk_key(prefix, layer) for layer in by_layer}
    run.plan({keys[layer]: distributed.chunk_cost([list(group) + [h] for h in heads], inputs.n_layers)
              for layer, heads in by_layer.items()})
    bar.add([([list(group) + [h] for h in heads], run.chunk_done(keys[layer])) for layer, heads in by_layer.items()],
            later=later, label=label)
    for layer, heads in by_layer.items():
        if not run.chunk_done(keys[layer]):
            yield layer, heads, keys[layer]


# --------------------------------------------------------------------------------------------
# Ships
# --------------------------------------------------------------------------------------------
def _ships_chunk(cache, inputs: _Inputs, heads: list[Head], method: str, epsilon: float,
                 smoothed: bool, gships: tuple[np.ndarray, int, bool] | None = None, on_work=None
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Ships table of one chunk of single heads and, when `gships` = (clean basis, rank, center) is
    given, their Generalized Ships from the same sweep (the hidden states come for free)."""
    from .engine import sweep
    configs = [[h] for h in heads]
    want = ("kl", "hidden") if gships is not None else ("kl",)
    gtable = None
    if not smoothed:
        result = sweep(cache, configs, method, epsilon, want=want, progress=False, on_work=on_work)
        kl = result.kl                                                   # [C, P] float64
        if gships is not None:
            basis, rank, center = gships
            values = [scores.generalized_ships(result.clean_hidden, result.hidden[c], rank, center=center,
                                               clean_basis=basis) for c in range(len(configs))]
            gtable = scores.gships_table(heads, values, method)[["layer", "head", "method", "score"]]
    else:
        # The reference's smoothed KL needs whole distributions: ask for log-probs in slices small
        # enough that [slice, P, V] float32 fits the budget.
        n_prompts, vocab = cache_shape(cache)
        step = max(1, _LOGPROB_BUDGET_BYTES // max(1, n_prompts * vocab * 4))
        parts, gparts = [], []
        for i in range(0, len(configs), step):
            res = sweep(cache, configs[i:i + step], method, epsilon,
                        want=("logprobs", "hidden") if gships is not None else ("logprobs",), progress=False,
                        on_work=on_work)
            parts.append(scores.kl_from_logprobs(res.clean_logprobs, res.logprobs, smoothed=True).numpy())
            if gships is not None:
                basis, rank, center = gships
                gparts += [scores.generalized_ships(res.clean_hidden, res.hidden[c], rank, center=center,
                                                    clean_basis=basis) for c in range(res.hidden.shape[0])]
        kl = np.concatenate(parts)
        if gships is not None:
            gtable = scores.gships_table(heads, gparts, method)[["layer", "head", "method", "score"]]
    return scores.ships_table(kl, heads, inputs.prompt_set.ids, method), gtable


def cache_shape(cache) -> tuple[int, int]:
    """(prompts, vocabulary) of a clean cache, from its clean log-probs."""
    lp = getattr(cache, "clean_logprobs")
    return int(lp.shape[0]), int(lp.shape[-1])


def run_ships(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
              out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
              layers: str | None = None, heads: str | None = None, smoothed: bool = False,
              with_gships: bool = False, rank: int = 1, center: bool = False,
              resume: bool = False, force: bool = False, quiet: bool = False) -> ShipsResult:
    """Ships for every (prompt, head): KL(p_clean || p_ablated) of the next-token distribution.

    model: model spec, ModelConfig or LoadedModel; data: dataset name/path, DataConfig or
    PromptSet; prompt: format name or PromptConfig. Writes ships.parquet, ships.csv and
    ships_summary.csv into `out` and returns them. `with_gships` also writes
    generalized_ships.csv (with `rank`, `center`) from the same forward passes, which halves the
    cost of running both analyses.
    """
    if with_gships and rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    extra = {"smoothed": bool(smoothed), "chunking": "layer"}
    if with_gships:
        extra.update(with_gships=True, rank=int(rank), center=bool(center))
    inputs = _resolve("ships", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra=extra)
    if with_gships:
        scores.check_rank(rank, len(inputs.texts), center=center)
    run = _open_run(out, inputs, resume=resume, force=force)
    cache = _clean_cache(inputs)
    gships = (scores.clean_subspace(cache.clean_hidden, rank, center=center), rank, center) if with_gships else None
    by_layer = _by_layer(inputs.heads)
    with _WorkBar(f"ships {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        for layer, layer_heads, key in _pending_chunks(run, inputs, bar, "ships_L", by_layer):
            table, gtable = _ships_chunk(cache, inputs, layer_heads, method, epsilon, smoothed, gships,
                                         on_work=bar.advance)
            if gtable is not None:
                # the gships chunk first: a ships chunk on disk means both are there
                run.write_chunk(_chunk_key("gships_L", layer), gtable)
            run.write_chunk(key, table)
            bar.heads(len(layer_heads))
    run.sync(cache)                                                      # [scale-out]
    table = run.read_chunks("ships_").sort_values(["prompt_id", "layer", "head"], kind="stable")
    table = table[scores.SHIPS_COLUMNS].reset_index(drop=True)
    summary = scores.ships_summary(table)
    run.write_table("ships", table)
    run.write_table("ships_summary", summary)
    finish = {"top_heads": _head_list(summary.head(10))}
    if with_gships:
        gtable = scores.rank_by_score(run.read_chunks("gships_"))
        run.write_table("generalized_ships", gtable)
        finish["gships_top_heads"] = _head_list(gtable.head(10))
    run.finish(finish)
    return ShipsResult(Path(out), table, summary)


def _head_list(df: pd.DataFrame) -> list[str]:
    return [f"{int(r['layer'])}-{int(r['head'])}" for _, r in df.iterrows()]


# --------------------------------------------------------------------------------------------
# Generalized Ships
# --------------------------------------------------------------------------------------------
def _gships_scores(cache, configs: list[list[Head]], method: str, epsilon: float, clean_basis: np.ndarray,
                   rank: int, center: bool, on_work=None) -> np.ndarray:
    """Generalized Ships of each config against the clean model -> [C] degrees."""
    from .engine import sweep
    result = sweep(cache, configs, method, epsilon, want=("hidden",), progress=False, on_work=on_work)
    hidden = result.hidden                                               # [C, P, D] float32
    clean = result.clean_hidden                                          # [P, D]
    return np.array([scores.generalized_ships(clean, hidden[c], rank, center=center, clean_basis=clean_basis)
                     for c in range(len(configs))], dtype=np.float64)


def run_gships(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
               out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
               layers: str | None = None, heads: str | None = None, rank: int = 1, center: bool = False,
               resume: bool = False, force: bool = False, quiet: bool = False) -> GShipsResult:
    """Generalized Ships of every selected head: the sum of the `rank` principal angles (degrees)
    between the top-`rank` left singular subspaces of the last-position final-norm hidden states,
    clean vs ablated. rank=1, center=False reproduces the reference implementation (the paper does
    not state R). Writes generalized_ships.csv (+ .parquet), rank 1 = most important."""
    if rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    inputs = _resolve("gships", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra={"rank": int(rank), "center": bool(center), "chunking": "layer"})
    scores.check_rank(rank, len(inputs.texts), center=center)
    run = _open_run(out, inputs, resume=resume, force=force)
    cache = _clean_cache(inputs)
    clean_basis = scores.clean_subspace(cache.clean_hidden, rank, center=center)
    by_layer = _by_layer(inputs.heads)
    with _WorkBar(f"gships {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        for layer, layer_heads, key in _pending_chunks(run, inputs, bar, "gships_L", by_layer):
            values = _gships_scores(cache, [[h] for h in layer_heads], method, epsilon, clean_basis, rank, center,
                                    on_work=bar.advance)
            run.write_chunk(key, scores.gships_table(layer_heads, values, method)[["layer", "head", "method", "score"]])
            bar.heads(len(layer_heads))
    run.sync(cache)                                                      # [scale-out]
    table = scores.rank_by_score(run.read_chunks("gships_"))
    run.write_table("generalized_ships", table)
    run.finish({"top_heads": _head_list(table.head(10))})
    return GShipsResult(Path(out), table)


# --------------------------------------------------------------------------------------------
# Sahara
# --------------------------------------------------------------------------------------------
def parse_candidates(spec: str | int | None) -> int | None:
    """`all` -> None; `topK` / `K` -> K."""
    if spec is None or str(spec).lower() == "all":
        return None
    text = str(spec).lower()
    digits = text[3:] if text.startswith("top") else text
    if not digits.isdigit() or int(digits) < 1:
        raise UsageError(f"--candidates must be 'all' or 'topK' (e.g. top20), got {spec!r}")
    return int(digits)


def _candidates_from_gships(path: str | Path, method: str, k: int, allowed: Sequence[Head]) -> list[Head]:
    folder = Path(path)
    csv = folder / "generalized_ships.csv" if folder.is_dir() else folder
    if not csv.exists():
        raise UsageError(f"no generalized_ships.csv in {path}: run `safetyheads gships` there first")
    table = pd.read_csv(csv)
    if method not in set(table["method"]):
        raise UsageError(f"{csv} has no scores for method {method!r}")
    allowed_set = set(allowed)
    table = table[[(int(a), int(b)) in allowed_set for a, b in zip(table["layer"], table["head"])]]
    return scores.top_heads(table, k, method=method)


def run_sahara(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
               out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
               layers: str | None = None, heads: str | None = None, group_size: int = 3,
               candidates: str | int | None = "all", gships_from: str | Path | None = None,
               rank: int = 1, center: bool = False,
               resume: bool = False, force: bool = False, quiet: bool = False) -> SaharaResult:
    """Sahara: greedy search for the head group whose joint ablation moves the hidden-state
    subspace most. Step s scores every remaining candidate h by Generalized Ships of
    group ∪ {h} (one sweep, per-example head masks) and adds the best.

    candidates='all' tries every selected head at every step; 'topK' keeps the K best heads by
    single-head Generalized Ships, read from `gships_from` (a gships run folder or CSV) when given,
    else taken from step 1 (which scores every single head, i.e. is exactly Generalized Ships).
    Writes sahara.csv (step, layer, head, score), sahara_candidates.csv and sahara.json (the group).
    """
    top_k = parse_candidates(candidates)
    if group_size < 1:
        raise UsageError(f"--group-size must be at least 1 (got {group_size})")
    if rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    inputs = _resolve("sahara", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra={"rank": int(rank), "center": bool(center), "group_size": int(group_size),
                             "candidates": str(candidates), "gships_from": str(gships_from) if gships_from else None,
                             "chunking": "step, layer"})
    scores.check_rank(rank, len(inputs.texts), center=center)
    pool = list(inputs.heads)
    if gships_from is not None:
        if top_k is None:
            raise UsageError("--gships-from needs --candidates topK")
        pool = _candidates_from_gships(gships_from, method, top_k, pool)
        top_k = None                                                     # already applied
    if group_size > len(pool) or (top_k is not None and group_size > min(top_k, len(pool))):
        n = len(pool) if top_k is None else min(top_k, len(pool))
        raise UsageError(f"--group-size {group_size} is larger than the number of candidate heads ({n})")
    run = _open_run(out, inputs, resume=resume, force=force)
    cache = _clean_cache(inputs)
    clean_basis = scores.clean_subspace(cache.clean_hidden, rank, center=center)

    group: list[Head] = []
    tried: list[pd.DataFrame] = []
    remaining = list(pool)
    def tried_at(step: int) -> int:  # heads tried at a step: the pool at step 1, then the K candidates
        n = len(pool) if top_k is None or step == 1 else min(top_k, len(pool))
        return n - (step - 1)

    with _WorkBar(f"sahara {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        for step in range(1, group_size + 1):
            by_layer = _by_layer(remaining)
            # the later steps' work is not known yet (it depends on this step's winner): estimate it
            # at this step's work per head
            per_head = sum(bar.work([group + [h] for h in hs]) for hs in by_layer.values()) / max(1, len(remaining))
            later = int(per_head * sum(tried_at(s) for s in range(step + 1, group_size + 1)))
            for layer, layer_heads, key in _pending_chunks(run, inputs, bar, f"sahara_S{step:03d}_L", by_layer, group,
                                                           later=later, label=f"heads tried (step {step}/{group_size})"):
                values = _gships_scores(cache, [group + [h] for h in layer_heads], method, epsilon, clean_basis,
                                        rank, center, on_work=bar.advance)
                run.write_chunk(key, pd.DataFrame({
                    "step": np.int64(step),
                    "layer": np.array([h[0] for h in layer_heads], dtype=np.int64),
                    "head": np.array([h[1] for h in layer_heads], dtype=np.int64),
                    "score": values}))
                bar.heads(len(layer_heads))
            run.sync(cache)                                              # [scale-out]
            step_scores = run.read_chunks(f"sahara_S{step:03d}_")
            ordered = step_scores.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable")
            best = (int(ordered.iloc[0]["layer"]), int(ordered.iloc[0]["head"]))
            tried.append(step_scores)
            group.append(best)
            remaining = [h for h in remaining if h != best]
            if step == 1 and top_k is not None:
                # Step 1 scored every single head: that is Generalized Ships, so its top K are the candidates.
                keep = set((int(r.layer), int(r.head)) for r in ordered.head(top_k).itertuples())
                remaining = [h for h in remaining if h in keep]
    steps = pd.DataFrame({
        "step": np.arange(1, len(group) + 1, dtype=np.int64),
        "layer": np.array([h[0] for h in group], dtype=np.int64),
        "head": np.array([h[1] for h in group], dtype=np.int64),
        "score": [float(t.loc[(t["layer"] == h[0]) & (t["head"] == h[1]), "score"].iloc[0])
                  for t, h in zip(tried, group)],
    })
    candidates_table = pd.concat(tried, ignore_index=True)[["step", "layer", "head", "score"]]
    candidates_table = candidates_table.sort_values(["step", "layer", "head"], kind="stable").reset_index(drop=True)
    group_text = ",".join(f"{a}-{b}" for a, b in group)
    run.write_table("sahara", steps)
    run.write_table("sahara_candidates", candidates_table)
    run.write_json("sahara", {"group": [list(h) for h in group], "heads": group_text, "method": method,
                              "epsilon": float(epsilon), "rank": int(rank), "center": bool(center),
                              "scores": steps["score"].tolist()})
    run.finish({"group": group_text})
    return SaharaResult(Path(out), steps, candidates_table, group)
