"""The paper's scores as pure functions over engine outputs (no model, no I/O).

- Ships (Eq. 5-6): KL(p_clean || p_ablated) of the next-token distribution, per prompt and head.
- Generalized Ships (Eq. 9-11): principal angles between the top-R left singular subspaces of the
  stacked last-position hidden states, clean vs ablated, summed, in degrees.
- Tables: the per-(prompt, head) Ships table, its per-head summary, the Generalized Ships ranking.

Everything numerical runs in float64 whatever the model dtype: the KL of two nearly equal
distributions and the angle between two nearly equal subspaces are both small differences of
large quantities, which float32 resolves badly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .errors import UsageError
from .heads import heads_text, table_heads  # noqa: F401  (the head syntax lives in heads.py)

Head = tuple[int, int]

#: The reference implementation's smoothing constant (added to both probability vectors).
REFERENCE_SMOOTHING = 1e-12


# --------------------------------------------------------------------------------------------
# Ships
# --------------------------------------------------------------------------------------------
def kl_from_logprobs(clean_logprobs: torch.Tensor, ablated_logprobs: torch.Tensor, *,
                     smoothed: bool = False) -> torch.Tensor:
    """KL(p_clean || p_ablated) over the last (vocabulary) axis, from log-probabilities.

    clean_logprobs broadcasts against ablated_logprobs, e.g. [P, V] vs [C, P, V] -> [C, P].

    The default is the exact log-domain formula sum_v p_c (log p_c - log p_a) in float64: no
    smoothing is needed because log-probabilities never underflow to -inf for a softmax over
    finite logits. `smoothed=True` reproduces the reference implementation instead: float32
    probabilities with 1e-12 added to both before the log ratio, which caps the log ratio where
    the ablated probability underflows (so large KLs come out slightly smaller).
    """
    if smoothed:
        p = clean_logprobs.float().exp() + REFERENCE_SMOOTHING       # [..., V] float32, as the reference
        q = ablated_logprobs.float().exp() + REFERENCE_SMOOTHING
        return (p * torch.log(p / q)).sum(-1).double()
    lp_c = clean_logprobs.double()                                    # [..., V]
    lp_a = ablated_logprobs.double()
    p = lp_c.exp()
    # 0 * log(0 / q) = 0: a token the clean model gives probability 0 (a masked logit, -inf) adds nothing
    return torch.where(p > 0, p * (lp_c - lp_a), torch.zeros((), dtype=p.dtype)).sum(-1)


# --------------------------------------------------------------------------------------------
# Generalized Ships
# --------------------------------------------------------------------------------------------
def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _rank_tolerance(s: np.ndarray, shape: tuple[int, int]) -> float:
    """numpy.linalg.matrix_rank's default tolerance: singular values below it are noise."""
    return float(s[0]) * max(shape) * np.finfo(np.float64).eps if s.size else 0.0


def top_singular_vectors(matrix: torch.Tensor | np.ndarray, rank: int, *,
                         center: bool = False) -> np.ndarray:
    """Orthonormal basis of the top-`rank` left singular subspace of `matrix` [P, D] -> [P, r].

    r = min(rank, numerical rank of the matrix): directions with zero singular value are not
    part of the data's subspace (numpy would return an arbitrary completion for them), so they
    are dropped and the caller decides what a missing direction means.
    """
    m = _as_float64(matrix)                                           # [P, D]
    if center:
        m = m - m.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(m, full_matrices=False)                   # u [P, min(P, D)], s descending
    numerical_rank = int((s > _rank_tolerance(s, m.shape)).sum())
    return u[:, : min(rank, numerical_rank)]


def principal_angles(basis_a: np.ndarray, basis_b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between span(basis_a) and span(basis_b).

    Both bases must have orthonormal columns ([n, ka], [n, kb]); min(ka, kb) angles come back.
    Cosines come from the singular values of A^T B, but arccos is ill-conditioned near 0: a
    float64 cosine of 1 - 1e-17 already reads as angle 0. So small angles (cos^2 >= 1/2) are
    taken from the sines instead, the singular values of the part of the smaller basis that lies
    outside the larger one (Björck & Golub; the same split as scipy.linalg.subspace_angles).
    """
    a, b = np.asarray(basis_a, np.float64), np.asarray(basis_b, np.float64)
    if a.shape[1] < b.shape[1]:
        a, b = b, a                                                   # project the smaller basis onto the larger
    k = b.shape[1]
    if k == 0:
        return np.zeros(0)
    cross = a.T @ b                                                   # [ka, kb]
    cos = np.clip(np.linalg.svd(cross, compute_uv=False), 0.0, 1.0)   # [kb] descending = angles ascending
    residual = b - a @ cross                                          # [n, kb]: b's component outside span(a)
    sin = np.clip(np.linalg.svd(residual, compute_uv=False), 0.0, 1.0)[::-1]  # ascending = angles ascending
    return np.where(cos**2 >= 0.5, np.arcsin(sin[:k]), np.arccos(cos))


def generalized_ships(clean_hidden: torch.Tensor | np.ndarray, ablated_hidden: torch.Tensor | np.ndarray,
                      rank: int = 1, *, center: bool = False, clean_basis: np.ndarray | None = None) -> float:
    """Generalized Ships of one ablation: the sum of the `rank` principal angles, in degrees,
    between the top-`rank` left singular subspaces of M_clean and M_ablated ([P, D] each).

    rank=1 is the reference implementation's arccos(|u1_clean . u1_ablated|). A direction the
    ablated matrix no longer has (its numerical rank fell below `rank`, e.g. all hidden states
    collapsed) counts as 90 degrees, the largest possible angle. `clean_basis` lets a caller that
    scores many ablations against the same clean matrix compute its SVD once.
    """
    check_rank(rank, _as_float64(clean_hidden).shape[0] if clean_basis is None else clean_basis.shape[0],
               center=center)
    if clean_basis is None:
        clean_basis = top_singular_vectors(clean_hidden, rank, center=center)
    ablated_basis = top_singular_vectors(ablated_hidden, rank, center=center)
    angles = np.degrees(principal_angles(clean_basis, ablated_basis))
    missing = rank - angles.size
    return float(angles.sum() + 90.0 * missing)


def generalized_ships_batch(clean_hidden: torch.Tensor, hidden: torch.Tensor, rank: int = 1, *,
                            center: bool = False, clean_basis: np.ndarray | None = None) -> np.ndarray:
    """Generalized Ships for C ablations at once: clean [P, D], hidden [C, P, D] -> [C] degrees
    (the clean SVD once; `clean_basis` = `clean_subspace(...)` to share it across calls)."""
    if clean_basis is None:
        clean_basis = clean_subspace(clean_hidden, rank, center=center)
    return np.array([generalized_ships(clean_hidden, hidden[c], rank, center=center, clean_basis=clean_basis)
                     for c in range(hidden.shape[0])], dtype=np.float64)


def check_rank(rank: int, n_prompts: int, *, center: bool = False) -> None:
    """UsageError unless 1 <= rank <= number of prompts (minus one when centring, which removes a
    dimension: P centred rows span at most P-1 directions)."""
    limit = n_prompts - 1 if center else n_prompts
    if rank < 1:
        raise UsageError(f"--rank must be at least 1 (got {rank})")
    if rank > limit:
        what = f"the number of prompts minus one ({limit}) when --center is used" if center \
            else f"the number of prompts ({limit})"
        raise UsageError(f"--rank {rank} is larger than {what}")


def clean_subspace(clean_hidden: torch.Tensor | np.ndarray, rank: int, *, center: bool = False) -> np.ndarray:
    """Top-`rank` basis of the clean matrix, refusing a clean matrix with fewer than `rank`
    independent directions (then the clean subspace itself is not defined)."""
    check_rank(rank, _as_float64(clean_hidden).shape[0], center=center)
    basis = top_singular_vectors(clean_hidden, rank, center=center)
    if basis.shape[1] < rank:
        raise UsageError(f"--rank {rank} exceeds the rank of the clean hidden-state matrix "
                         f"({basis.shape[1]}: some prompts give identical or zero states); use a smaller --rank")
    return basis


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
SHIPS_COLUMNS = ["prompt_id", "layer", "head", "method", "score"]
SUMMARY_COLUMNS = ["layer", "head", "method", "mean", "median", "top10_count"]
GSHIPS_COLUMNS = ["layer", "head", "method", "score", "rank"]


def ships_table(kl: torch.Tensor | np.ndarray, heads: Sequence[Head], prompt_ids: Sequence[int],
                method: str) -> pd.DataFrame:
    """Long table of Ships scores: kl [C, P] for C single heads -> rows ordered prompt, layer, head."""
    scores = _as_float64(kl)                                          # [C, P]
    if scores.shape != (len(heads), len(prompt_ids)):
        raise ValueError(f"kl has shape {scores.shape}, expected ({len(heads)}, {len(prompt_ids)})")
    layers = np.array([h[0] for h in heads], dtype=np.int64)
    head_idx = np.array([h[1] for h in heads], dtype=np.int64)
    df = pd.DataFrame({
        "prompt_id": np.repeat(np.asarray(prompt_ids, dtype=np.int64), len(heads)),
        "layer": np.tile(layers, len(prompt_ids)),
        "head": np.tile(head_idx, len(prompt_ids)),
        "method": method,
        "score": scores.T.reshape(-1),                                # prompt-major
    })
    return df.sort_values(["prompt_id", "layer", "head"], kind="stable").reset_index(drop=True)


def ships_summary(table: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """Per head and method: mean and median Ships over prompts, and `top10_count`, the number of
    prompts that have the head among their `top` highest-scoring heads (ties broken by layer, head
    so the result is deterministic). Sorted by top10_count, then mean, both descending."""
    ordered = table.sort_values(["method", "prompt_id", "score", "layer", "head"],
                                ascending=[True, True, False, True, True], kind="stable")
    position = ordered.groupby(["method", "prompt_id"], sort=False).cumcount()
    in_top = ordered.assign(in_top=(position < top).astype(np.int64))
    summary = (in_top.groupby(["layer", "head", "method"], sort=True)
               .agg(mean=("score", "mean"), median=("score", "median"), top10_count=("in_top", "sum"))
               .reset_index())
    summary = summary.sort_values(["top10_count", "mean", "method", "layer", "head"],
                                  ascending=[False, False, True, True, True], kind="stable")
    return summary[SUMMARY_COLUMNS].reset_index(drop=True)


def gships_table(heads: Sequence[Head], scores: Sequence[float] | np.ndarray, method: str) -> pd.DataFrame:
    """Generalized Ships ranking: rank 1 = largest angle (most important head). Ties keep layer,
    head order. Rows sorted by rank."""
    df = pd.DataFrame({
        "layer": np.array([h[0] for h in heads], dtype=np.int64),
        "head": np.array([h[1] for h in heads], dtype=np.int64),
        "method": method,
        "score": np.asarray(scores, dtype=np.float64),
    })
    return rank_by_score(df)


def best_first(df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """THE ranking order of every score table: highest `score` first, ties in (layer, head)
    order; optionally grouped by the columns `by` first (e.g. method). Stable."""
    keys = [*by, "score", "layer", "head"]
    return df.sort_values(keys, ascending=[True] * len(by) + [False, True, True], kind="stable")


def rank_by_score(df: pd.DataFrame) -> pd.DataFrame:
    """Add `rank` (1 = highest score) within each method and sort by method, rank."""
    df = best_first(df, by=["method"])
    df = df.assign(rank=df.groupby("method", sort=False).cumcount().astype(np.int64) + 1)
    return df[GSHIPS_COLUMNS].reset_index(drop=True)


def top_heads(table: pd.DataFrame, k: int, *, method: str | None = None) -> list[Head]:
    """The k highest-ranked heads of a Generalized Ships table (optionally of one method)."""
    if method is not None:
        table = table[table["method"] == method]
    ranked = rank_by_score(table)
    return [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]
