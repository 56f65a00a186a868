"""The three analyses as API functions: `run_ships`, `run_gships`, `run_sahara`.

Each one resolves its inputs (model, prompts, heads), opens a run folder, runs the clean pass once,
then calls the sweep engine chunk by chunk (whole layers, about `pipeline.CHUNK_ROWS` rows per
chunk), writing each chunk atomically (the shared steps live in `pipeline.py`). An interrupted run resumed with `resume=True` skips the chunks already on disk,
and since every chunk is computed exactly as it would have been in one go and the final tables
are assembled from the chunks alone, the final files are identical to an uninterrupted run.

The math lives in `scores.py`; this module only orchestrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import files, scores
from .errors import UsageError
from .pipeline import (CHUNK_ROWS, Inputs, WorkBar, cache_shape, clean_cache, head_list, open_run, pending_chunks,
                       plan_chunks, resolve, select_heads)
from .scores import Head

__all__ = ["run_ships", "run_gships", "run_sahara", "select_heads", "parse_candidates"]

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
# Ships
# --------------------------------------------------------------------------------------------
def _ships_chunk(cache, inputs: Inputs, heads: list[Head], method: str, epsilon: float,
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
            values = scores.generalized_ships_batch(result.clean_hidden, result.hidden, rank, center=center,
                                                    clean_basis=basis)
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
                gparts += list(scores.generalized_ships_batch(res.clean_hidden, res.hidden, rank, center=center,
                                                              clean_basis=basis))
        kl = np.concatenate(parts)
        if gships is not None:
            gtable = scores.gships_table(heads, gparts, method)[["layer", "head", "method", "score"]]
    return scores.ships_table(kl, heads, inputs.prompt_set.ids, method), gtable


def ships_map(run, inputs: Inputs, cache, bar: WorkBar, heads: Sequence[Head], method: str, epsilon: float,
              smoothed: bool, chunk_rows: int, gships: tuple[np.ndarray, int, bool] | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ships of `heads`, layer chunk by layer chunk (resumable, sharded), written as ships.csv/.parquet
    (per prompt and head) and ships_summary.csv and returned (`run_ships` and the exact stage of
    `--mode auto`). With `gships` = (clean basis, rank, center) each chunk's Generalized Ships is
    saved beside it (chunks gships_L...), from the same sweep."""
    for chunk, key in pending_chunks(run, inputs, bar, "ships_L", plan_chunks(heads, len(inputs.texts), chunk_rows)):
        table, gtable = _ships_chunk(cache, inputs, chunk, method, epsilon, smoothed, gships, on_work=bar.advance)
        if gtable is not None:
            # the gships chunk first: a ships chunk on disk means both are there
            run.write_chunk("gships_" + key.removeprefix("ships_"), gtable)
        run.write_chunk(key, table)
        bar.heads(len(chunk))
    run.sync(cache)                                                      # [scale-out]
    table = run.read_chunks("ships_").sort_values(["prompt_id", "layer", "head"], kind="stable")
    table = table[scores.SHIPS_COLUMNS].reset_index(drop=True)
    summary = scores.ships_summary(table)
    run.write_table(files.SHIPS, table)
    run.write_table(files.SHIPS_SUMMARY, summary)
    return table, summary


def run_ships(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
              out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
              layers: str | None = None, heads: str | None = None, smoothed: bool = False,
              with_gships: bool = False, rank: int = 1, center: bool = False,
              chunk_rows: int = CHUNK_ROWS, resume: bool = False, force: bool = False, quiet: bool = False) -> ShipsResult:
    """Ships for every (prompt, head): KL(p_clean || p_ablated) of the next-token distribution.

    model: model spec, ModelConfig or LoadedModel; data: dataset name/path, DataConfig or
    PromptSet; prompt: format name or PromptConfig. Writes ships.parquet, ships.csv and
    ships_summary.csv into `out` and returns them. `with_gships` also writes
    generalized_ships.csv (with `rank`, `center`) from the same forward passes, which halves the
    cost of running both analyses.
    """
    if with_gships and rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    extra = {"smoothed": bool(smoothed), "chunking": "layers", "chunk_rows": int(chunk_rows)}
    if with_gships:
        extra.update(with_gships=True, rank=int(rank), center=bool(center))
    inputs = resolve("ships", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra=extra)
    if with_gships:
        scores.check_rank(rank, len(inputs.texts), center=center)
    run = open_run(out, inputs, resume=resume, force=force)
    cache = clean_cache(inputs)
    gships = (scores.clean_subspace(cache.clean_hidden, rank, center=center), rank, center) if with_gships else None
    with WorkBar(f"ships {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        table, summary = ships_map(run, inputs, cache, bar, inputs.heads, method, epsilon, smoothed, chunk_rows,
                                   gships)
    finish = {"top_heads": head_list(summary.head(10))}
    if with_gships:
        gtable = scores.rank_by_score(run.read_chunks("gships_"))
        run.write_table(files.GSHIPS, gtable)
        finish["gships_top_heads"] = head_list(gtable.head(10))
    run.finish(finish)
    return ShipsResult(Path(out), table, summary)


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
    return scores.generalized_ships_batch(clean, hidden, rank, center=center, clean_basis=clean_basis)


def gships_map(run, inputs: Inputs, cache, bar: WorkBar, heads: Sequence[Head], method: str, epsilon: float,
               rank: int, center: bool, chunk_rows: int) -> pd.DataFrame:
    """Generalized Ships of `heads`, layer chunk by layer chunk (resumable, sharded), written as
    generalized_ships.csv and returned ranked (`run_gships` and the exact stage of `--mode auto`)."""
    clean_basis = scores.clean_subspace(cache.clean_hidden, rank, center=center)
    for chunk, key in pending_chunks(run, inputs, bar, "gships_L", plan_chunks(heads, len(inputs.texts), chunk_rows)):
        values = _gships_scores(cache, [[h] for h in chunk], method, epsilon, clean_basis, rank, center,
                                on_work=bar.advance)
        run.write_chunk(key, scores.gships_table(chunk, values, method)[["layer", "head", "method", "score"]])
        bar.heads(len(chunk))
    run.sync(cache)                                                      # [scale-out]
    table = scores.rank_by_score(run.read_chunks("gships_"))
    run.write_table(files.GSHIPS, table)
    return table


def run_gships(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
               out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
               layers: str | None = None, heads: str | None = None, rank: int = 1, center: bool = False,
               chunk_rows: int = CHUNK_ROWS, resume: bool = False, force: bool = False, quiet: bool = False) -> GShipsResult:
    """Generalized Ships of every selected head: the sum of the `rank` principal angles (degrees)
    between the top-`rank` left singular subspaces of the last-position final-norm hidden states,
    clean vs ablated. rank=1, center=False reproduces the reference implementation (the paper does
    not state R). Writes generalized_ships.csv (+ .parquet), rank 1 = most important."""
    if rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    inputs = resolve("gships", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra={"rank": int(rank), "center": bool(center), "chunking": "layers",
                             "chunk_rows": int(chunk_rows)})
    scores.check_rank(rank, len(inputs.texts), center=center)
    run = open_run(out, inputs, resume=resume, force=force)
    cache = clean_cache(inputs)
    with WorkBar(f"gships {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        table = gships_map(run, inputs, cache, bar, inputs.heads, method, epsilon, rank, center, chunk_rows)
    run.finish({"top_heads": head_list(table.head(10))})
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
    csv = folder / files.csv(files.GSHIPS) if folder.is_dir() else folder
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
               chunk_rows: int = CHUNK_ROWS, resume: bool = False, force: bool = False, quiet: bool = False) -> SaharaResult:
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
    inputs = resolve("sahara", model, data, prompt, method=method, epsilon=epsilon, layers=layers, heads=heads,
                      extra={"rank": int(rank), "center": bool(center), "group_size": int(group_size),
                             "candidates": str(candidates), "gships_from": str(gships_from) if gships_from else None,
                             "chunking": "step, layers", "chunk_rows": int(chunk_rows)})
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
    run = open_run(out, inputs, resume=resume, force=force)
    cache = clean_cache(inputs)
    clean_basis = scores.clean_subspace(cache.clean_hidden, rank, center=center)

    group: list[Head] = []
    tried: list[pd.DataFrame] = []
    remaining = list(pool)
    def tried_at(step: int) -> int:  # heads tried at a step: the pool at step 1, then the K candidates
        n = len(pool) if top_k is None or step == 1 else min(top_k, len(pool))
        return n - (step - 1)

    with WorkBar(f"sahara {method}", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        for step in range(1, group_size + 1):
            chunks = plan_chunks(remaining, len(inputs.texts), chunk_rows)
            # the later steps' work is not known yet (it depends on this step's winner): estimate it
            # at this step's work per head
            per_head = bar.work([group + [h] for h in remaining]) / max(1, len(remaining))
            later = int(per_head * sum(tried_at(s) for s in range(step + 1, group_size + 1)))
            for chunk, key in pending_chunks(run, inputs, bar, f"sahara_S{step:03d}_L", chunks, group,
                                             later=later, label=f"heads tried (step {step}/{group_size})"):
                values = _gships_scores(cache, [group + [h] for h in chunk], method, epsilon, clean_basis,
                                        rank, center, on_work=bar.advance)
                run.write_chunk(key, pd.DataFrame({
                    "step": np.int64(step),
                    "layer": np.array([h[0] for h in chunk], dtype=np.int64),
                    "head": np.array([h[1] for h in chunk], dtype=np.int64),
                    "score": values}))
                bar.heads(len(chunk))
            run.sync(cache)                                              # [scale-out]
            step_scores = run.read_chunks(f"sahara_S{step:03d}_")
            ordered = scores.best_first(step_scores)
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
    group_text = scores.heads_text(group)
    run.write_table(files.SAHARA, steps)
    run.write_table(files.SAHARA_CANDIDATES, candidates_table)
    run.write_json(files.SAHARA, {"group": [list(h) for h in group], "heads": group_text, "method": method,
                              "epsilon": float(epsilon), "rank": int(rank), "center": bool(center),
                              "scores": steps["score"].tolist()})
    run.finish({"group": group_text})
    return SaharaResult(Path(out), steps, candidates_table, group)
