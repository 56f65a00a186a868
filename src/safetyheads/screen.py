"""Fast screening: estimate every head's Ships / Generalized Ships score from one clean forward pass
and a few backward passes, instead of one forward pass per head (attribution patching, adapted to
the paper's scores).

Two facts make it work:

1. The *local* change of a head's output under an ablation is known exactly from the clean pass.
   In the attention wrapper (`ablation.attached`) we call the model's own attention function a
   second time with the ablated query (ε·q, or 0·q for `uniform`), so
   Δo_h = attention(ε·q_h) − attention(q_h) holds for every architecture the wrapper supports
   (masks, sliding windows, soft-capping and GQA are the model's own); for `scaling`,
   Δo_h = (ε − 1)·o_h. A zero "tap" added to every head output lets one backward pass give
   ∂(anything)/∂o_h for ALL heads at once; the first-order change of a scalar is <∂/∂o_h, Δo_h>
   summed over positions.

2. The scored quantities are functions of the last-position final hidden state ĥ (after the
   final norm), one per prompt, and only need a few directions of its change Δĥ = J·Δo:
   * Ships is a KL whose gradient vanishes at the clean point, so to second order
     KL ≈ ½ Δzᵀ F Δz = ½ Δĥᵀ G Δĥ with F = diag(p) − ppᵀ the Fisher matrix of the next-token
     distribution and G = Wᵀ F W its pull-back through the LM head (W, soft-capping included).
     G = AᵀA with rows A_k = √p_k (W_k − Σ_j p_j W_j): its top eigenvectors come from a small
     SVD over the most probable tokens. Backpropagating the top `probes` eigen-directions
     (scaled by √λ) gives KL ≈ ½ Σ_j (√λ_j u_jᵀΔĥ)² for all heads and prompts at once. This is
     the best rank-`probes` approximation of G (no sampling noise); the fraction of tr(G) it
     keeps is reported per prompt (`fisher_captured`). Every prompt uses its own probes in the
     SAME backward pass (each prompt's hidden state depends on its own tokens only).
   * Generalized Ships (rank R): the stacked hidden states M = U S Vᵀ (P×D). To first order the
     top-R left singular subspace moves by T_ji = σ_i u_jᵀ ΔM v_i / (σ_i² − σ_j²) (j > R, i ≤ R),
     so the sum of principal angles ≈ the nuclear norm of T (sin θ ≈ θ). u_jᵀ ΔM v_i needs only
     v_iᵀΔĥ_p for every prompt p: R backward passes with probe v_i. The second term of T,
     σ_j u_iᵀ ΔM v_j, is NOT small in general (for a shift every prompt shares, ΔM = 1δᵀ, it is
     all of T): the largest σ_j get one backward pass each, the rest an unbiased random-sign
     sketch (`SubspaceProbes`), `subspace_probes` extra passes in all.

What it cannot see: anything beyond first order in Δo. Ablations are large perturbations, so the
scores are *estimates* for ranking; `auto` mode (`auto_scores`) recomputes the top K exactly.
benchmarks/screen_vs_exact.py measures how well the ranking agrees with the exact one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import ablation, files, layout, lm_head, methods, scores
from .config import SCREEN_PROBES as DEFAULT_PROBES
from .config import SCREEN_RANDOM_PROBES as DEFAULT_RANDOM_PROBES
from .config import SUBSPACE_PROBES as DEFAULT_SUBSPACE_PROBES
from .errors import UsageError

Head = tuple[int, int]
#: Scores the screen can estimate.
TARGETS = ("ships", "gships")
#: How many of the most probable tokens span the Fisher matrix per prompt (the rest of the
#: vocabulary is ignored; its share of tr(G) is in `fisher_captured`).
FISHER_TOKENS = 512


@dataclass
class ScreenResult:
    """Screen estimates for every head of the model.

    ships:   [P, L, H] float64, estimated KL(p_clean || p_ablated) per prompt and head (or None).
    gships:  [L, H] float64, estimated Generalized Ships (sum of principal angles, degrees) (or None).
    fisher_captured: [P] float64, share of tr(G) that the Ships eigen-probes keep exactly (1.0 = exact
                     quadratic form); the random probes, if any, estimate the rest without bias.
    """

    method: str
    epsilon: float
    n_layers: int
    n_heads: int
    ships: torch.Tensor | None = None
    gships: torch.Tensor | None = None
    fisher_captured: torch.Tensor | None = None
    rank: int = 1
    center: bool = False
    probes: int = 0
    random_probes: int = 0    # ships: Gaussian probes of the Fisher spectrum beyond the `probes` eigen-directions
    subspace_exact: int = 0   # gships: directions j ≥ R probed exactly (second term of the rotation)
    subspace_random: int = 0  # gships: random-sign probes of the remaining j (backward passes)
    n_forward: int = 0
    n_backward: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def head_scores(self, target: str) -> torch.Tensor:
        """[L, H] float64 per-head score: mean estimated KL over prompts for ships, the angle for gships."""
        if target == "ships":
            if self.ships is None:
                raise UsageError("this screen did not estimate ships")
            return self.ships.mean(0)
        if target == "gships":
            if self.gships is None:
                raise UsageError("this screen did not estimate gships")
            return self.gships
        raise UsageError(f"unknown screen target {target!r}; choose from {', '.join(TARGETS)}")

    def table(self, target: str) -> pd.DataFrame:
        """`layer, head, method, score, rank` (rank 1 = most important), sorted by rank."""
        return ranking_table(self.head_scores(target), self.method)


def ranking_table(values: torch.Tensor | np.ndarray, method: str) -> pd.DataFrame:
    """[L, H] scores -> DataFrame `layer, head, method, score, rank`, rank 1 = highest score."""
    s = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    n_layers, n_heads = s.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    df = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "method": method, "score": s.ravel()})
    df = scores.best_first(df).reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df


def top_heads(values: torch.Tensor | np.ndarray, k: int) -> list[Head]:
    """The k heads with the highest [L, H] scores, best first."""
    return scores.table_heads(ranking_table(values, "").head(k))


# ----------------------------------------------------------------------------------------------
# The tap: per-head output changes and gradient handles, through the ablation wrapper
# ----------------------------------------------------------------------------------------------

class _Tap:
    """`attend` hook for `ablation.attached`: runs the model's attention as usual, records each
    head's output change under the ablation (Δo, from a second call of the same attention
    function with the ablated query) and adds a zero tensor that requires grad to the output,
    so that autograd returns ∂/∂o for every head of every layer."""

    def __init__(self, method: str, epsilon: float, with_grad: bool):
        self.method = methods.get(method)
        self.epsilon = epsilon
        self.with_grad = with_grad
        self.delta: dict[int, torch.Tensor] = {}  # layer -> [B, T, H, hd], zero on padding rows
        self.taps: dict[int, torch.Tensor] = {}   # layer -> [B, T, H, hd] zeros, requires grad

    def attend(self, fn: Callable, layer: int, module: nn.Module, query, key, value, *args, **kwargs):
        out, weights = fn(module, query, key, value, *args, **kwargs)  # out: [B, T, H, hd]
        if not self.with_grad:
            return out, weights
        with torch.no_grad():
            change = self.method.screen_change(fn, module, query, key, value, out, args, kwargs, self.epsilon)
            mask = args[0] if args else kwargs.get("attention_mask")
            real = ablation._real_query_rows(mask, out.shape[0], out.shape[1], out.device)  # [B, T]
            # where(), not a product: a padding row may hold NaN from a fully masked softmax.
            change = torch.where(real[:, :, None, None], change, torch.zeros((), dtype=change.dtype))
        tap = torch.zeros_like(out, requires_grad=True)
        self.delta[layer] = change.detach()
        self.taps[layer] = tap
        return out + tap, weights


#: Probe directions backpropagated together in one vectorised backward pass (torch.vmap over the
#: vector-Jacobian product, `is_grads_batched`): the same numbers as one pass per probe, about 1.8x
#: faster on 2 CPU cores (SmolLM2, 8 prompts, 8 probes), at the price of PROBE_BATCH x the backward
#: activations. Models whose backward cannot be vmapped fall back to one pass per probe.
PROBE_BATCH = 8


def _probe_products(h: torch.Tensor, taps: Sequence[torch.Tensor], directions: Sequence[torch.Tensor], tap: _Tap,
                    n_layers: int, n_heads: int) -> list[torch.Tensor]:
    """For each direction d [b, D]: the first-order change of dᵀĥ per example and head, [b, L, H]."""
    out: list[torch.Tensor] = []
    batched = True
    i = 0
    while i < len(directions):
        group = directions[i:i + (PROBE_BATCH if batched else 1)]
        last = i + len(group) == len(directions)
        try:
            if batched and len(group) > 1:
                # the graph is kept: a failed vmapped pass must leave it for the fallback
                grads = torch.autograd.grad(h, taps, grad_outputs=torch.stack(group), retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)  # each [N, B, T, H, hd]
                out += [_head_products(tap, [None if g is None else g[n] for g in grads], n_layers, n_heads,
                                       h.shape[0]) for n in range(len(group))]
            else:
                grads = torch.autograd.grad((h * group[0]).sum(), taps, retain_graph=not last, allow_unused=True)
                out.append(_head_products(tap, grads, n_layers, n_heads, h.shape[0]))
        except RuntimeError:
            if not batched or len(group) == 1:
                raise
            batched = False  # an op without a batching rule: one pass per probe from here on
            continue
        i += len(group)
    return out


def _head_products(tap: _Tap, grads: Sequence[torch.Tensor | None], n_layers: int, n_heads: int,
                   batch: int) -> torch.Tensor:
    """First-order change of the probed scalar per example and head: [B, L, H] float64."""
    s = torch.zeros(batch, n_layers, n_heads, dtype=torch.float64)
    for layer, g in zip(sorted(tap.taps), grads):  # the softmax-attention layers (hybrids have others)
        if g is None:  # the probed scalar does not depend on this layer (cannot happen for decoders)
            continue
        prod = (g.float() * tap.delta[layer].float()).sum((1, 3)).double().cpu()  # [B, H_layer]
        s[:, layer, :prod.shape[1]] = prod
    return s


# ----------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------

def _last_hidden(model: nn.Module, enc) -> torch.Tensor:
    """Last-position final hidden state (after the final norm): [B, D]. Left padding puts every
    prompt's last token in the last column."""
    backbone = layout.decoder_backbone(model)
    out = backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   position_ids=enc.position_ids, use_cache=False)
    return out.last_hidden_state[:, -1, :]  # [B, D]


def _logit_jacobian(model: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Next-token log-probs [B, V] float32, the LM-head weight W [V, D] and the per-token slope
    [B, V] (None when the model applies nothing after W) with dz/dĥ = diag(slope)·W: the model's own
    LM-head path (scalings, soft-capping) from `lm_head`, the one place that knows it."""
    with torch.no_grad():
        z, slope = lm_head.logits_and_slope(model, h)  # z [B, V]; slope may be an expanded view: read only
        weight = model.get_output_embeddings().weight[: z.shape[-1]]  # [V, D]
        return torch.log_softmax(z, -1), weight, slope


def fisher_probes(model: nn.Module, h: torch.Tensor, probes: int, tokens: int = FISHER_TOKENS,
                  random_probes: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigen-directions of the Fisher matrix pulled back to the final hidden state.

    Returns probe vectors [B, probes + random_probes, D] such that ½ Σ_j (q_jᵀΔĥ)² estimates the
    KL: the first `probes` are eigenvector · √eigenvalue (the exact rank-`probes` part), the
    `random_probes` others are Gaussian draws from the remaining spectrum, scaled by
    1/√random_probes, which make the estimate unbiased for the whole (top-token) Fisher matrix at
    the price of sampling noise. Row r draws from a generator seeded with `seed + r`. Also returns
    the share of tr(G) the eigen-probes keep [B] and the clean log-probs [B, V].
    """
    logp, weight, slope = _logit_jacobian(model, h)
    with torch.no_grad():
        p = logp.exp()  # [B, V] float32
        w = weight.float()  # [V, D]
        # Row k of J = dz/dĥ is slope_k · W_k. J̄ = Σ_k p_k J_k over the whole vocabulary.
        pw = p if slope is None else p * slope  # [B, V]
        jbar = pw @ w  # [B, D]
        norms2 = (w * w).sum(-1)  # [V]
        jn2 = norms2[None] if slope is None else slope * slope * norms2[None]  # [B, V]
        trace = ((p * jn2).sum(-1) - (jbar * jbar).sum(-1)).double()  # [B] tr(G)
        k = min(tokens, p.shape[1])
        top_p, top_i = p.topk(k, dim=-1)  # [B, K]
        rows = w[top_i]  # [B, K, D]
        if slope is not None:
            rows = rows * slope.gather(1, top_i)[..., None]
        a = top_p.sqrt()[..., None] * (rows - jbar[:, None, :])  # [B, K, D]: G ≈ aᵀa
        # Eigen-decomposition of the small Gram matrix a aᵀ [K, K] instead of an SVD of a: same
        # spectrum, several times cheaper. Right singular vectors: σ_j v_j = a_ᵀ u_j.
        a = a.double()
        evals, evecs = torch.linalg.eigh(a @ a.transpose(1, 2))  # ascending: [B, K], [B, K, K]
        evals, evecs = evals.flip(-1).clamp_min(0.0), evecs.flip(-1)  # descending
        m = min(probes, evals.shape[1])
        q = evecs[:, :, :m].transpose(1, 2) @ a  # [B, m, D]: rows σ_j v_j (norm √λ_j)
        captured = evals[:, :m].sum(-1) / trace.clamp_min(1e-300)
        if random_probes > 0 and evals.shape[1] > m:
            # (P_rest ξ)ᵀ a with ξ ~ N(0, I_K) and P_rest = I − U_m U_mᵀ: a Gaussian draw with covariance
            # Σ_{j>m} σ_j² v_j v_jᵀ (the rest of the spectrum). Projecting a token-space draw, instead of
            # drawing coefficients of the remaining eigenvectors, depends on the eigenvectors only
            # through their span, so signs and rotations inside degenerate eigenspaces cannot change it.
            # One generator per prompt (seed + row): a prompt gets the same draw whichever slice holds it.
            xi = torch.stack([torch.randn(random_probes, evals.shape[1], dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(seed + row))
                              for row in range(evals.shape[0])]).to(a.device)  # [B, n, K]
            top = evecs[:, :, :m]  # [B, K, m]
            xi = xi - (xi @ top) @ top.transpose(1, 2)  # [B, n, K]: P_rest ξ
            rest = xi @ a  # [B, n, D]
            q = torch.cat([q, rest / math.sqrt(random_probes)], 1)  # [B, m+n, D]
        q = q.to(h.dtype)
    return q, captured.clamp(max=1.0), logp


@dataclass
class SubspaceProbes:
    """Backward-pass directions that measure the first-order rotation of the clean top-R left
    singular subspace of M = U S Vᵀ ([P, D], prompts × hidden) for every head at once.

    The rotation of u_i (i < R) towards u_j (j ≥ R) is T_ji = (σ_i u_jᵀΔM v_i + σ_j u_iᵀΔM v_j) /
    (σ_i² − σ_j²). The first term needs v_iᵀΔĥ_p for every prompt: one backward pass per i. The
    second term is NOT negligible in general: for a shift shared by every prompt (ΔM = 1δᵀ) the
    first term vanishes (u_j ⊥ u_1 ≈ 1/√P) while the second is ≈ √P σ_j δᵀv_j. It needs u_iᵀΔM v_j
    for every j: the `exact` indices (largest σ_j, which weigh most) get a backward pass with
    probe v_j each; the remaining `tail` is sketched with K Rademacher probes per i,
    z_ik = Σ_{j∈tail} s_jk c_ji v_j (c_ji = σ_j / (σ_i² − σ_j²)), whose measurement
    y_ik = Σ_p u_i[p] z_ikᵀΔĥ_p = Σ_j s_jk B_ji has E[y_ik y_i'k] = Σ_j B_ji B_ji' and
    E[y_ik Σ_j s_jk A_ji'] = Σ_j B_ji A_ji': an unbiased estimate of TᵀT (and so of ‖T‖²_F).
    With rank 1 the angle is ‖T‖_F; with rank R it is the nuclear norm, Σ √eig(TᵀT).

    directions: [N, D] float64 in the order v_0..v_{R-1}, v_j (j in exact), z_ik (i-major).
    """

    rank: int
    u: torch.Tensor          # [P, P] left singular vectors of M
    sv: torch.Tensor         # [P] singular values, zero-padded
    exact: list[int]         # j ≥ R probed exactly
    tail: list[int]          # j ≥ R sketched by random signs
    signs: torch.Tensor      # [K, len(tail)] ±1 float64
    directions: torch.Tensor  # [N, D] float64

    @property
    def n_random(self) -> int:
        return int(self.signs.shape[0]) if self.tail else 0


def _gaps(sv: torch.Tensor, rank: int, js: Sequence[int]) -> torch.Tensor:
    """σ_i² − σ_j² for j in js (rows) and i < rank (columns): [len(js), R] float64, floored so that
    equal singular values (an ill-defined subspace) do not divide by zero."""
    s_i, s_j = sv[:rank], sv[list(js)]
    return (s_i[None, :] ** 2 - s_j[:, None] ** 2).clamp_min(float(sv[0]) ** 2 * 1e-12)


def subspace_probes_for(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor, rank: int, budget: int,
                    *, seed: int = 0, exact: bool = False) -> SubspaceProbes:
    """Choose the probe directions for the subspace rotation (see `SubspaceProbes`).

    u [P, P], sv [P] (zero-padded), vh [min(P, D) or more, D] from the SVD of M (float64). Indices
    j ≥ R with σ_j = 0 contribute nothing to the second term and are skipped. `budget` is the
    number of extra backward passes (rank 1): when the nonzero j ≥ R fit in it, or `exact`, all
    are probed exactly (the complete first-order formula); otherwise the budget//2 largest σ_j
    exactly and the rest by ceil(budget/2) random-sign probes per i (R·ceil(budget/2) passes)."""
    n_prompts = u.shape[0]
    floor = float(sv[0]) * 1e-12
    rest = [j for j in range(rank, min(n_prompts, vh.shape[0])) if float(sv[j]) > floor]
    if exact or len(rest) <= budget:
        chosen, tail = rest, []
    else:
        chosen, tail = rest[: budget // 2], rest[budget // 2:]
    n_random = -(-budget // 2) if tail else 0
    if not n_random:  # budget 0: the first term alone (biased; kept for comparisons)
        tail = []
    gen = torch.Generator().manual_seed(int(seed))
    signs = (torch.randint(0, 2, (n_random, len(tail)), generator=gen, dtype=torch.float64) * 2 - 1)  # [K, n_tail]
    dirs = [vh[:rank], vh[chosen]]
    if tail:
        c = sv[tail][:, None] / _gaps(sv, rank, tail)                      # [n_tail, R]: c_ji
        z = torch.einsum("kj,ji,jd->ikd", signs, c, vh[tail])              # [R, K, D]: z_ik
        dirs.append(z.reshape(-1, vh.shape[1]))
    return SubspaceProbes(rank, u, sv, chosen, tail, signs, torch.cat(dirs).double())


def subspace_rotation(probes: SubspaceProbes, proj: torch.Tensor) -> torch.Tensor:
    """First-order sum of principal angles (degrees) per head from the measurements
    proj [N, P, ...] = directionᵀ Δĥ_p (N = len(probes.directions)). Returns [...] float64."""
    R, u, sv = probes.rank, probes.u, probes.sv
    n_prompts = u.shape[0]
    rest = list(range(R, n_prompts))
    n_exact = len(probes.exact)
    lead = proj.shape[2:]
    if not rest:
        return torch.zeros(lead, dtype=torch.float64)
    gap = _gaps(sv, R, rest)                                                # [P-R, R]
    # first term: A_ji = σ_i u_jᵀΔM v_i / gap
    coef = torch.einsum("pj,ip...->ji...", u[:, rest], proj[:R])            # [P-R, R, ...]
    t = sv[:R].view(1, R, *[1] * len(lead)) * coef
    # second term, exact rows: B_ji = σ_j u_iᵀΔM v_j / gap
    if n_exact:
        b = torch.einsum("pi,jp...->ji...", u[:, :R], proj[R:R + n_exact])  # [n_exact, R, ...]
        rows = [j - R for j in probes.exact]
        t[rows] = t[rows] + sv[probes.exact].view(-1, 1, *[1] * len(lead)) * b
    t = t / gap.view(*gap.shape, *[1] * len(lead))                          # [P-R, R, ...]
    gram = torch.einsum("ji...,jk...->...ik", t, t)                         # [..., R, R]: T0ᵀT0
    if probes.tail:
        K = probes.n_random
        z = proj[R + n_exact:].reshape(R, K, *proj.shape[1:])               # [R, K, P, ...]
        y = torch.einsum("pi,ikp...->...ik", u[:, :R], z)                   # [..., R, K]: Σ_j s_jk B_ji
        tail_t = t[[j - R for j in probes.tail]]                            # [n_tail, R, ...]
        s_t = torch.einsum("kj,ji...->...ik", probes.signs, tail_t)         # [..., R, K]: Σ_j s_jk T0_ji
        cross = y @ s_t.transpose(-1, -2) / K                               # [..., R, R]
        gram = gram + cross + cross.transpose(-1, -2) + y @ y.transpose(-1, -2) / K
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)                        # [..., R]
    return torch.rad2deg(eig.sqrt().sum(-1))


# ----------------------------------------------------------------------------------------------
# The screen
# ----------------------------------------------------------------------------------------------

def check_screen_method(method: str) -> None:
    """UsageError unless the screen can linearise `method` (methods.Method.screen; `mean` needs
    dataset-wide means)."""
    if method not in methods.names(screen=True):
        raise UsageError(f"screen supports --method {', '.join(methods.names(screen=True))}, not {method!r}")


def check_screen_args(method: str, epsilon: float, targets: Sequence[str], probes: int, rank: int,
                      n_prompts: int, subspace_probes: int = 0, random_probes: int = 0) -> None:
    check_screen_method(method)
    methods.checked(method, epsilon)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise UsageError(f"screen targets must be among {', '.join(TARGETS)}, got {list(targets)}")
    if probes < 1:
        raise UsageError(f"--probes must be at least 1, got {probes}")
    if subspace_probes < 0:
        raise UsageError(f"--subspace-probes must be 0 or more, got {subspace_probes}")
    if random_probes < 0:
        raise UsageError(f"--random-probes must be 0 or more, got {random_probes}")
    if "gships" in targets and not 1 <= rank < n_prompts:
        raise UsageError(f"--rank must be between 1 and the number of prompts minus 1 ({n_prompts - 1}), got {rank}")


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters need no gradients (only the taps do); restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Screener:
    """One screen split into prompt slices, so that a run folder can compute, save and resume it
    slice by slice (`run_screen`) and `screen` can run it in one go. Every slice is computed the
    same way whichever process runs it and whenever; `combine` turns the slices' raw measurements
    (per-prompt KL estimates and subspace projections) into the scores.

    Cost: one forward pass with autograd plus `probes` backward passes for ships, plus one forward
    pass without autograd (none with `clean_hidden`) and `rank` + about `subspace_probes` backward
    passes for gships (which needs all prompts' clean hidden states before it can choose its probe
    directions; see `SubspaceProbes`). Parameters never get gradients. `full_subspace=True` probes
    every right singular direction exactly (up to P backward passes): the complete first-order
    angle with no sampling noise (it is also what few prompts get anyway). `seed` fixes the random
    signs. `random_probes` adds Gaussian probes of the rest of the Fisher spectrum (`fisher_probes`).
    """

    def __init__(self, model: nn.Module, encoded, method: str = "undifferentiated", epsilon: float = 1e-5, *,
                 targets: Sequence[str] = ("ships", "gships"), probes: int = DEFAULT_PROBES,
                 random_probes: int = DEFAULT_RANDOM_PROBES,
                 rank: int = 1, center: bool = False, full_subspace: bool = False,
                 subspace_probes: int = DEFAULT_SUBSPACE_PROBES, seed: int = 0,
                 clean_hidden: torch.Tensor | None = None, batch_size: int = 8):
        self.targets = tuple(targets)
        self.n_prompts = len(encoded)
        check_screen_args(method, epsilon, self.targets, probes, rank, self.n_prompts, subspace_probes, random_probes)
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        self.model, self.encoded, self.method, self.epsilon = model, encoded, method, float(epsilon)
        self.probes, self.random_probes, self.seed = probes, random_probes, int(seed)
        self.n_layers, self.n_heads = ablation.num_layers_heads(model)
        from .prompts import pads_safely

        # a slice is one left-padded batch; a model whose outputs change under padding gets one prompt a slice
        self.slices = _batches(self.n_prompts, batch_size if pads_safely(model) else 1)
        self.device = next(model.parameters()).device
        self.result = ScreenResult(method=method, epsilon=float(epsilon), n_layers=self.n_layers,
                                   n_heads=self.n_heads, rank=rank, center=center,
                                   probes=probes if "ships" in self.targets else 0,
                                   random_probes=random_probes if "ships" in self.targets else 0)
        self.basis: SubspaceProbes | None = None
        if "gships" in self.targets:
            # gships needs the clean subspace first: one plain forward pass over all prompts.
            t0 = time.perf_counter()
            if clean_hidden is not None:
                m = clean_hidden.detach().double().cpu()  # [P, D]
            else:
                with torch.no_grad():
                    m = torch.cat([_last_hidden(model, encoded[s].to(self.device)).double().cpu()
                                   for s in self.slices])  # [P, D]
                self.result.n_forward += 1
            if center:
                m = m - m.mean(0, keepdim=True)
            u_full, sv, vh = torch.linalg.svd(m, full_matrices=True)  # u [P, P], sv [min(P, D)], vh [D, D]
            sv_full = torch.zeros(self.n_prompts, dtype=torch.float64)
            sv_full[: sv.shape[0]] = sv
            if float(sv_full[rank - 1]) <= float(sv_full[0]) * 1e-12:
                raise UsageError(f"the clean hidden states have rank below {rank}: Generalized Ships is undefined")
            self.basis = subspace_probes_for(u_full, sv_full, vh, rank, subspace_probes, seed=seed,
                                             exact=full_subspace)
            self.result.subspace_exact, self.result.subspace_random = len(self.basis.exact), self.basis.n_random * rank
            self.result.timings["gships_clean_pass"] = time.perf_counter() - t0

    @property
    def n_directions(self) -> int:
        """Subspace probe directions (gships), each one backward pass per slice."""
        return 0 if self.basis is None else int(self.basis.directions.shape[0])

    def run_slice(self, s: slice) -> dict[str, torch.Tensor]:
        """Screen the prompts of one slice: {"ships": [b, L, H] estimated KL, "captured": [b] share
        of tr(G) kept} for ships, {"proj": [N, b, L, H] directionᵀΔĥ_p} for gships (float64)."""
        L, H = self.n_layers, self.n_heads
        enc = self.encoded[s].to(self.device)
        tap = _Tap(self.method, self.epsilon, with_grad=True)
        with _frozen(self.model), torch.enable_grad(), ablation.attached(self.model, tap):
            h = _last_hidden(self.model, enc)  # [b, D], in the graph of every tap
        taps = [tap.taps[layer] for layer in sorted(tap.taps)]  # the layers with softmax attention
        out: dict[str, torch.Tensor] = {}
        directions: list[torch.Tensor] = []  # each [b, D]
        if "ships" in self.targets:
            q, cap, _ = fisher_probes(self.model, h.detach(), self.probes, random_probes=self.random_probes,
                                      # row r is prompt s.start + r: one seed per (seed, prompt index)
                                      seed=self.seed * 1_000_003 + s.start)  # q [b, m, D]
            out["captured"] = cap.double().cpu()
            out["ships"] = torch.zeros(h.shape[0], L, H, dtype=torch.float64)
            directions += [q[:, j] for j in range(q.shape[1])]
        n_ships = len(directions)
        if self.basis is not None:
            out["proj"] = torch.zeros(self.n_directions, h.shape[0], L, H, dtype=torch.float64)
            directions += [v.to(self.device, h.dtype).expand_as(h) for v in self.basis.directions]
        with _frozen(self.model):
            for j, prod in enumerate(_probe_products(h, taps, directions, tap, L, H)):  # prod [b, L, H]
                if j < n_ships:
                    out["ships"] += 0.5 * prod.square()
                else:
                    out["proj"][j - n_ships] = prod
        self.result.n_backward += len(directions)
        return out

    def combine(self, parts: Sequence[dict[str, torch.Tensor]]) -> ScreenResult:
        """The slices' measurements (in slice order) -> the ScreenResult with every head's scores."""
        result = self.result
        result.n_forward += 1
        if "ships" in self.targets:
            result.ships = torch.cat([p["ships"] for p in parts])            # [P, L, H]
            result.fisher_captured = torch.cat([p["captured"] for p in parts])  # [P]
        if self.basis is not None:
            proj = torch.cat([p["proj"] for p in parts], dim=1)               # [N, P, L, H]
            if result.center:
                proj = proj - proj.mean(1, keepdim=True)  # ΔM is centred like M
            result.gships = subspace_rotation(self.basis, proj)
        return result

    # -- a slice as a run-folder chunk (float64 columns: a resumed run reads back the same bits) --
    def slice_frame(self, s: slice, part: dict[str, torch.Tensor]) -> pd.DataFrame:
        """One row per (prompt, layer, head) of the slice; columns ships, captured, proj_0.. as measured."""
        L, H = self.n_layers, self.n_heads
        prompt, layer, head = np.meshgrid(np.arange(s.start, s.stop), np.arange(L), np.arange(H), indexing="ij")
        cols: dict[str, np.ndarray] = {"prompt": prompt.ravel(), "layer": layer.ravel(), "head": head.ravel()}
        if "ships" in part:
            cols["ships"] = part["ships"].numpy().ravel()
            cols["captured"] = np.repeat(part["captured"].numpy(), L * H)
        for n in range(self.n_directions):
            cols[f"proj_{n}"] = part["proj"][n].numpy().ravel()
        return pd.DataFrame(cols)

    def frame_slice(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """`slice_frame`'s inverse."""
        L, H = self.n_layers, self.n_heads
        b = len(df) // (L * H)
        part: dict[str, torch.Tensor] = {}
        if "ships" in df:
            part["ships"] = torch.from_numpy(df["ships"].to_numpy(np.float64).reshape(b, L, H).copy())
            part["captured"] = torch.from_numpy(df["captured"].to_numpy(np.float64).reshape(b, L * H)[:, 0].copy())
        if self.n_directions:
            part["proj"] = torch.from_numpy(np.stack([df[f"proj_{n}"].to_numpy(np.float64).reshape(b, L, H)
                                                      for n in range(self.n_directions)]))
        return part


def screen(model: nn.Module, encoded, method: str = "undifferentiated", epsilon: float = 1e-5, *,
           progress: bool = True, **options: Any) -> ScreenResult:
    """Estimate every head's Ships (per prompt) and/or Generalized Ships from gradients, in one go
    (options: see `Screener`)."""
    start = time.perf_counter()
    screener = Screener(model, encoded, method, epsilon, **options)
    parts = []
    with tqdm(total=screener.n_prompts, desc=f"screen {method}", unit="prompt", disable=not progress) as bar:
        for s in screener.slices:
            parts.append(screener.run_slice(s))
            bar.update(s.stop - s.start)
    result = screener.combine(parts)
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# Auto mode and the run-folder API
# ----------------------------------------------------------------------------------------------

@dataclass
class AutoResult:
    """`auto` mode: the screen over all heads, then exact scores for its top K.

    exact_kl: [K, P] float64 (target ships) / exact_angle: [K] degrees (target gships), in the
    order of `heads` (the screen's top K, best first)."""

    screen: ScreenResult
    heads: list[Head]
    exact_kl: torch.Tensor | None = None
    exact_angle: np.ndarray | None = None
    seconds_screen: float = 0.0
    seconds_exact: float = 0.0


def auto_scores(model: nn.Module, encoded, method: str = "undifferentiated", epsilon: float = 1e-5, *,
                target: str = "gships", top_k: int = 40, probes: int = DEFAULT_PROBES,
                random_probes: int = DEFAULT_RANDOM_PROBES, subspace_probes: int = DEFAULT_SUBSPACE_PROBES,
                rank: int = 1, center: bool = False, allowed: Sequence[Head] | None = None, batch_size: int = 8,
                progress: bool = True) -> AutoResult:
    """Screen every head, then score the screen's `top_k` heads (among `allowed`) exactly with the
    sweep engine. The engine's clean pass also supplies the clean subspace for the screen."""
    from . import engine

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    t0 = time.perf_counter()
    cache = engine.prepare(model, encoded)  # the exact sweep needs it; the screen reuses its hidden states
    result = screen(model, encoded, method, epsilon, targets=(target,), probes=probes, random_probes=random_probes,
                    subspace_probes=subspace_probes, rank=rank, center=center, clean_hidden=cache.clean_hidden,
                    batch_size=batch_size, progress=progress)
    ranking = top_heads(result.head_scores(target), result.n_layers * result.n_heads)
    if allowed is not None:
        allowed_set = set(allowed)
        ranking = [h for h in ranking if h in allowed_set]
    chosen = ranking[:top_k]
    t1 = time.perf_counter()
    sweep = engine.sweep(cache, [[h] for h in chosen], method, epsilon,
                         want=("kl",) if target == "ships" else ("hidden",), progress=progress)
    out = AutoResult(result, chosen, seconds_screen=t1 - t0)
    if target == "ships":
        out.exact_kl = sweep.kl
    else:
        basis = scores.clean_subspace(sweep.clean_hidden, rank, center=center)
        out.exact_angle = scores.generalized_ships_batch(sweep.clean_hidden, sweep.hidden, rank, center=center,
                                                         clean_basis=basis)
    out.seconds_exact = time.perf_counter() - t1
    return out


@dataclass
class ScreenRun:
    out: Path
    table: pd.DataFrame                 # screen.csv: layer, head, method, score, rank (estimates)
    exact: pd.DataFrame | None = None   # auto mode: the top K with exact scores, ranked
    note: str = ""                      # what the estimates are worth (printed by the CLI)


#: Measured agreement of the screen with exact scores (benchmarks/screen_vs_exact.py), printed
#: with every screen so nobody mistakes the estimates for scores.
ACCURACY_NOTE = ("screen scores are gradient estimates, not exact scores. Measured (benchmarks/screen_vs_exact.md, "
                 "2026-12-02: all heads, JailbreakBench chat prompts, 8 Fisher probes, 4 subspace probes; "
                 "SmolLM2-135M-Instruct 20 prompts / Qwen2.5-Coder-0.5B-Instruct 8 prompts): Spearman with exact "
                 "0.96-0.99 (ships) and 0.96-0.98 (gships); the exact top 10 lies in the screen's top 40 for 9-10 "
                 "of 10 heads (gships undifferentiated on SmolLM2: 8) but in its top 10 for only 2-8. Use --mode "
                 "auto for exact scores of the top K, or --mode exact")


def run_screen(model: Any = None, data: Any = "maliciousinstruct", prompt: Any = "chat", *,
               out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
               target: str = "gships", mode: str = "screen", top_k: int = 40, probes: int = DEFAULT_PROBES,
               random_probes: int = DEFAULT_RANDOM_PROBES, subspace_probes: int = DEFAULT_SUBSPACE_PROBES,
               rank: int = 1, center: bool = False,
               layers: str | None = None, heads: str | None = None, batch_size: int = 8,
               chunk_rows: int | None = None, resume: bool = False, force: bool = False,
               quiet: bool = False) -> ScreenRun:
    """`safetyheads screen`: estimate every head's score from gradients and write screen.csv
    (layer, head, method, score, rank) into the run folder `out`. mode='auto' also scores the top
    `top_k` heads exactly and writes them as the exact analysis would (ships.csv +
    ships_summary.csv, or generalized_ships.csv) restricted to those heads.

    Both stages go through the pipeline like every analysis: the screen saves one chunk per slice
    of `batch_size` prompts (`screen_P00000`, ...), the exact stage the same layer chunks as
    `run_ships`/`run_gships`, so a killed run resumes to byte-identical files and torchrun ranks
    share the chunks."""
    from . import distributed, pipeline
    from .prompts import encode

    if mode not in ("screen", "auto"):
        raise UsageError(f"--mode must be screen or auto, got {mode!r}")
    if target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_screen_method(method)  # before loading the model
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    chunk_rows = pipeline.CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    inputs = pipeline.resolve("screen", model, data, prompt, method=method, epsilon=epsilon, layers=layers,
                              heads=heads, extra={"target": target, "mode": mode, "top_k": int(top_k),
                                                  "probes": int(probes), "random_probes": int(random_probes),
                                                  "subspace_probes": int(subspace_probes),
                                                  "rank": int(rank), "center": bool(center),
                                                  "batch_size": int(batch_size), "chunk_rows": chunk_rows})
    n_prompts = len(inputs.texts)
    check_screen_args(method, epsilon, (target,), probes, rank, n_prompts, subspace_probes, random_probes)
    if target == "gships":
        scores.check_rank(rank, n_prompts, center=center)
    run = pipeline.open_run(out, inputs, resume=resume, force=force)
    lm = inputs.loaded.model
    encoded = encode(inputs.loaded.tokenizer, inputs.texts, device=getattr(lm, "device", None))
    t0 = time.perf_counter()
    # auto: the engine's clean pass, which the exact stage needs, also supplies the screen's clean
    # subspace. A screen alone needs only the last hidden states: the Screener's own plain forward
    # (the engine's pass records every layer's inputs and checks itself against the model's forward:
    # 4.8 s against 1.2 s, a third of a Generalized Ships screen of Qwen2.5-0.5B on 8 prompts).
    cache = pipeline.clean_cache(inputs) if mode == "auto" else None
    screener = Screener(lm, encoded, method, epsilon, targets=(target,), probes=probes, random_probes=random_probes,
                        subspace_probes=subspace_probes, rank=rank, center=center, batch_size=batch_size,
                        clean_hidden=cache.clean_hidden if cache is not None else None)
    keys = {f"screen_P{s.start:05d}": s for s in screener.slices}
    run.plan({key: s.stop - s.start for key, s in keys.items()})                # [scale-out]
    todo = [key for key in keys if not run.chunk_done(key)]
    bar_off = quiet or not distributed.is_main()
    with tqdm(total=n_prompts, initial=n_prompts - sum(keys[k].stop - keys[k].start for k in todo),
              desc=f"screen {method}", unit="prompt", disable=bar_off) as bar:
        for key in todo:
            s = keys[key]
            run.write_chunk(key, screener.slice_frame(s, screener.run_slice(s)))
            bar.update(s.stop - s.start)
    run.sync(cache)                                                              # [scale-out]
    saved = run.read_chunks("screen_P")
    result = screener.combine([screener.frame_slice(saved[saved["prompt"].between(s.start, s.stop - 1)])
                               for s in screener.slices])
    table = result.table(target)
    allowed = set(inputs.heads)
    table = table[[(int(a), int(b)) in allowed for a, b in zip(table["layer"], table["head"])]]
    table = table.assign(rank=np.arange(1, len(table) + 1)).reset_index(drop=True)
    run.write_table(files.SCREEN, table)
    finish: dict[str, Any] = {"screen_top_heads": pipeline.head_list(table.head(10)),
                              "n_forward": result.n_forward, "n_backward_per_slice":
                              screener.n_directions + (probes + random_probes if target == "ships" else 0),
                              "subspace_exact": result.subspace_exact, "subspace_random": result.subspace_random}
    if result.fisher_captured is not None:
        finish["fisher_captured_mean"] = float(result.fisher_captured.mean())
    exact = None
    note = ACCURACY_NOTE
    if mode == "auto":
        chosen = scores.table_heads(table.head(top_k))
        # the exact stage: the same chunks, keys and files as `ships` / `gships` over these heads
        with pipeline.WorkBar(f"exact top {len(chosen)}", quiet, inputs.n_layers, n_prompts) as bar:
            if target == "ships":
                exact, estimate = _auto_exact_ships(run, inputs, cache, bar, chosen, method, epsilon, chunk_rows,
                                                    result)
            else:
                exact, estimate = _auto_exact_gships(run, inputs, cache, bar, chosen, method, epsilon, chunk_rows,
                                                     rank, center, result)
        truth = exact.set_index(["layer", "head"]).loc[list(estimate), "score"].to_numpy()
        rho = _spearman(np.array(list(estimate.values())), truth)
        finish.update(top_heads=pipeline.head_list(exact.head(10)), screen_vs_exact_spearman_top_k=rho)
        note = (f"exact scores for the screen's top {len(chosen)} heads; within them the screen's "
                f"estimates have Spearman {rho:.2f} with the exact scores. {ACCURACY_NOTE}")
    finish["seconds"] = time.perf_counter() - t0
    run.finish(finish)
    return ScreenRun(Path(out), table, exact, note)


def _auto_exact_ships(run, inputs, cache, bar, chosen: list[Head], method: str, epsilon: float, chunk_rows: int,
                      result: ScreenResult) -> tuple[pd.DataFrame, dict[Head, float]]:
    from . import analyses
    _, summary = analyses.ships_map(run, inputs, cache, bar, chosen, method, epsilon, False, chunk_rows)
    exact = scores.rank_by_score(summary.rename(columns={"mean": "score"})[["layer", "head", "method", "score"]])
    return exact, {h: float(result.ships[:, h[0], h[1]].mean()) for h in chosen}


def _auto_exact_gships(run, inputs, cache, bar, chosen: list[Head], method: str, epsilon: float, chunk_rows: int,
                       rank: int, center: bool, result: ScreenResult) -> tuple[pd.DataFrame, dict[Head, float]]:
    from . import analyses
    exact = analyses.gships_map(run, inputs, cache, bar, chosen, method, epsilon, rank, center, chunk_rows)
    return exact, {h: float(result.gships[h[0], h[1]]) for h in chosen}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b)[0])
