"""Gradient screening (issue 7) on tiny random models, in float64 so that exact KLs and angles of
small perturbations are resolved: the estimators agree with the exact scores where their
approximations hold (small perturbations), and rank heads sensibly for real ablations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from safetyheads import screen as S
from safetyheads.ablation import ablated
from safetyheads.errors import UsageError
from safetyheads.prompts import Encoded
from safetyheads.scores import generalized_ships
from tiny_models import HEADS, LAYERS, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

PROMPT_LENGTHS = (9, 6, 9, 7, 8, 5)


def _encoded(seed: int = 0) -> Encoded:
    ids, mask, pos = left_pad([random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(PROMPT_LENGTHS)])
    return Encoded(ids, mask, pos)


def _model(arch: str = "llama", gqa: bool = True, weak_attention: bool = False):
    model = tiny_model(arch, gqa).double()
    if weak_attention:  # small queries: attention is already near uniform, so `uniform` is a small change
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(0.05)
    return model


@torch.no_grad()
def _exact(model, enc: Encoded, method: str, epsilon: float):
    """Per head: KL [P] (float64) and the rank-1 Generalized Ships angle, by plain ablated forwards."""
    def run():
        h = S._last_hidden(model, enc)
        return torch.log_softmax(model.get_output_embeddings()(h).double(), -1), h

    lp0, h0 = run()
    kl = torch.zeros(len(enc), LAYERS, HEADS, dtype=torch.float64)
    angle = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for layer in range(LAYERS):
        for head in range(HEADS):
            with ablated(model, [(layer, head)], method, epsilon):
                lp, h = run()
            kl[:, layer, head] = (lp0.exp() * (lp0 - lp)).sum(-1)
            angle[layer, head] = float(generalized_ships(h0, h, 1))
    return kl, angle


def _all_probes(model) -> int:
    return model.config.hidden_size  # every eigen-direction of the pulled-back Fisher matrix


@pytest.mark.parametrize("arch,gqa", [("llama", True), ("qwen2", False)])
def test_small_scaling_matches_exact(arch, gqa):
    """ε = 0.98 scales every head output by 0.98: second-order KL and first-order angles hold."""
    model, enc = _model(arch, gqa), _encoded()
    res = S.screen(model, enc, "scaling", 0.98, probes=_all_probes(model),
                   random_probes=0, full_subspace=True, progress=False)
    kl, angle = _exact(model, enc, "scaling", 0.98)
    assert torch.allclose(res.fisher_captured, torch.ones_like(res.fisher_captured), atol=1e-9)
    assert float(kl.min()) > 0
    rel = (res.ships - kl).abs() / kl
    assert float(rel.median()) < 0.03 and float(rel.max()) < 0.15, rel
    rel_angle = (res.gships - angle).abs() / angle
    assert float(rel_angle.median()) < 0.03 and float(rel_angle.max()) < 0.15, rel_angle


def test_uniform_output_change_is_the_ablations():
    """`uniform` (attention over the visible prefix, padding excluded, sliding windows kept):
    with near-uniform attention already, the change is small and the estimate matches."""
    model, enc = _model("mistral", True, weak_attention=True), _encoded(1)
    res = S.screen(model, enc, "uniform", probes=_all_probes(model),
                   random_probes=0, targets=("ships",), progress=False)
    kl, _ = _exact(model, enc, "uniform", 1e-5)
    rel = (res.ships - kl).abs() / kl
    assert float(rel.median()) < 0.05, rel


def test_fewer_probes_underestimate_by_the_captured_share():
    """Truncating the Fisher matrix can only lose mass: each estimate shrinks monotonically."""
    model, enc = _model(), _encoded()
    few = S.screen(model, enc, "scaling", 0.98, probes=2, random_probes=0, targets=("ships",), progress=False)
    full = S.screen(model, enc, "scaling", 0.98, probes=_all_probes(model),
                   random_probes=0, targets=("ships",), progress=False)
    assert bool((few.ships <= full.ships * (1 + 1e-9)).all())
    assert bool((few.fisher_captured < 1).all()) and bool((few.fisher_captured > 0).all())
    assert few.n_backward == 2 and full.n_backward == _all_probes(model)


def test_random_fisher_probes_are_unbiased_for_the_quadratic_form():
    """½ Σ_j (q_jᵀ d)² with 1 eigen-probe + 2 Gaussian probes of the rest averages to the
    Fisher quadratic form ½ dᵀ Jᵀ(diag p − ppᵀ)J d, J taken by autograd through the LM head (the
    oracle; the tiny vocabulary is smaller than FISHER_TOKENS, so the top-token Fisher is all of it)."""
    model, enc = _model(), _encoded()
    with torch.no_grad():
        h = S._last_hidden(model, enc)[:2]  # [2, D]
    head = model.get_output_embeddings()
    assert head.weight.shape[0] <= S.FISHER_TOKENS
    d = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)  # [2, D]
    truth = []
    for r in range(2):
        jac = torch.autograd.functional.jacobian(lambda x: head(x), h[r])  # [V, D]
        p = torch.softmax(head(h[r]), -1).detach()
        fisher = torch.diag(p) - torch.outer(p, p)
        jd = jac @ d[r]
        truth.append(float(0.5 * jd @ fisher @ jd))
    draws = []
    for seed in range(400):
        q, _, _ = S.fisher_probes(model, h, 1, random_probes=2, seed=1000 * seed)  # [2, 3, D]
        draws.append(0.5 * ((q @ d[:, :, None])[..., 0] ** 2).sum(-1))  # [2]
    draws = torch.stack(draws)  # [400, 2]
    mean, sem = draws.mean(0), draws.std(0) / 400 ** 0.5
    for r in range(2):
        assert abs(float(mean[r]) - truth[r]) < 4 * float(sem[r]), (float(mean[r]), truth[r], float(sem[r]))
        assert float(draws[:, r].std()) > 0  # the random part does vary
    # the same seed gives the same probes; a prompt's draw does not depend on its batch
    a, _, _ = S.fisher_probes(model, h, 1, random_probes=2, seed=5)
    b, _, _ = S.fisher_probes(model, h[1:], 1, random_probes=2, seed=6)
    assert torch.allclose(a[1:], b, rtol=1e-5, atol=1e-6)  # eigh's rounding differs with the batch


def test_real_ablation_ranking_agrees():
    """ε = 1e-5 (the paper's setting) is far from linear; the ranking must still correlate."""
    model, enc = _model("llama", True), _encoded(2)
    res = S.screen(model, enc, "undifferentiated", 1e-5, probes=4, progress=False)
    kl, angle = _exact(model, enc, "undifferentiated", 1e-5)
    rho_ships = spearmanr(kl.mean(0).flatten(), res.head_scores("ships").flatten())[0]
    rho_gships = spearmanr(angle.flatten(), res.head_scores("gships").flatten())[0]
    assert rho_ships > 0.6, rho_ships
    assert rho_gships > 0.6, rho_gships


def test_batches_and_padding_do_not_change_estimates():
    model, enc = _model(), _encoded()
    # random Fisher probes too: each prompt draws its own, whichever slice holds it
    one = S.screen(model, enc, "undifferentiated", probes=3, random_probes=2, batch_size=len(enc), progress=False)
    split = S.screen(model, enc, "undifferentiated", probes=3, random_probes=2, batch_size=2, progress=False)
    assert torch.allclose(one.ships, split.ships, rtol=1e-6, atol=1e-12)
    assert torch.allclose(one.gships, split.gships, rtol=1e-6, atol=1e-12)
    # a prompt screened alone: the same estimate (the random Fisher probes are drawn per prompt index,
    # so this comparison uses eigen-probes only)
    one = S.screen(model, enc, "undifferentiated", probes=3, random_probes=0, targets=("ships",), progress=False)
    alone = S.screen(model, enc[1:2], "undifferentiated", probes=3, random_probes=0, targets=("ships",),
                     progress=False)
    assert torch.allclose(alone.ships[0], one.ships[1], rtol=1e-6, atol=1e-12)


def test_table_and_parameters_untouched():
    model, enc = _model(), _encoded()
    before = [p.requires_grad for p in model.parameters()]
    res = S.screen(model, enc, "scaling", probes=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    df = res.table("gships")
    assert list(df.columns) == ["layer", "head", "method", "score", "rank"]
    assert len(df) == LAYERS * HEADS and list(df["rank"]) == list(range(1, LAYERS * HEADS + 1))
    assert np.all(np.diff(df["score"].to_numpy()) <= 0)
    best = S.top_heads(res.head_scores("ships"), 3)
    assert best == [(int(r.layer), int(r.head)) for r in res.table("ships").head(3).itertuples()]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="mean"), "screen supports"),
    (dict(method="scaling", epsilon=1.5), "psilon|ε"),
    (dict(targets=("kl",)), "targets"),
    (dict(probes=0), "probes"),
    (dict(rank=6), "rank"),
    (dict(subspace_probes=-1), "subspace-probes"),
    (dict(random_probes=-1), "random-probes"),
])
def test_bad_arguments(kwargs, match):
    model, enc = _model(), _encoded()
    with pytest.raises(UsageError, match=match):
        S.screen(model, enc, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# run_screen and the CLI, on a tiny chat model
# ----------------------------------------------------------------------------------------------

CHAT_PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?"]


@pytest.fixture(scope="module")
def chat_loaded():
    from safetyheads.models import LoadedModel
    from tiny_chat import tiny_model as chat_model, tiny_tokenizer
    return LoadedModel(model=chat_model("qwen2", layers=3, heads=4, kv_heads=2, seed=1), tokenizer=tiny_tokenizer(),
                       spec="tiny-qwen2", revision=None, weights_sha256=None, source="memory")


def _prompt_set():
    from safetyheads.data import PromptSet
    return PromptSet(name="tiny", prompts=list(CHAT_PROMPTS), ids=[5, 6, 7, 8], categories=[None] * 4,
                     source="memory", sha256=None)


@pytest.mark.parametrize("target", ["ships", "gships"])
def test_run_screen_auto_writes_exact_top_k(chat_loaded, tmp_path, target):
    import pandas as pd
    from safetyheads import analyses

    out = tmp_path / "run"
    res = S.run_screen(chat_loaded, _prompt_set(), "chat", out=out, method="scaling", target=target, mode="auto",
                       top_k=3, quiet=True)
    screen_csv = pd.read_csv(out / "screen.csv")
    assert list(screen_csv.columns) == ["layer", "head", "method", "score", "rank"] and len(screen_csv) == 12
    top3 = list(zip(screen_csv["layer"][:3], screen_csv["head"][:3]))
    # the exact scores of those 3 heads equal what the exact analysis computes for them
    heads = ",".join(f"{a}-{b}" for a, b in top3)
    if target == "ships":
        ref = analyses.run_ships(chat_loaded, _prompt_set(), "chat", out=tmp_path / "ref", method="scaling",
                                 heads=heads, quiet=True).table
        got = pd.read_csv(out / "ships.csv")
        assert set(got["prompt_id"]) == {5, 6, 7, 8}
    else:
        ref = analyses.run_gships(chat_loaded, _prompt_set(), "chat", out=tmp_path / "ref", method="scaling",
                                  heads=heads, quiet=True).table
        got = pd.read_csv(out / "generalized_ships.csv")
    key = [c for c in ("prompt_id", "layer", "head") if c in ref.columns]
    merged = got.merge(ref, on=key, suffixes=("", "_ref"))
    # the two runs batch different configs together, so float32 matrix products may round differently
    # (e.g. 0.180384 vs 0.180382 degrees): equal to float32 precision, not bit for bit
    assert len(merged) == len(ref) and np.allclose(merged["score"], merged["score_ref"], rtol=1e-4, atol=1e-9)
    assert "Spearman" in res.note


def test_screen_cli(chat_loaded, tmp_path, capsys):
    import pandas as pd
    from safetyheads.cli.main import main

    model_dir = tmp_path / "model"
    chat_loaded.model.save_pretrained(model_dir)
    chat_loaded.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(CHAT_PROMPTS))
    out = tmp_path / "run"
    argv = ["screen", "--model", str(model_dir), "--dataset", str(data), "--out", str(out), "--method", "uniform",
            "--target", "ships", "--probes", "2", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "screen.csv" in text and "note:" in text
    assert (out / "screen.csv").is_file() and not (out / "ships.csv").exists()
    from safetyheads import manifest
    assert manifest.read(out).config["random_probes"] == 0  # the default: eigen-probes only
    sampled = tmp_path / "run_random"
    assert main([str(sampled) if a == str(out) else a for a in argv] + ["--random-probes", "2"]) == 0
    assert manifest.read(sampled).config["random_probes"] == 2
    with_random, without = pd.read_csv(sampled / "screen.csv"), pd.read_csv(out / "screen.csv")
    key = ["layer", "head"]
    both = with_random.merge(without, on=key)
    # eigen-probes alone keep a share of tr(G): a lower bound of the unbiased estimate on average
    assert not np.allclose(both["score_x"], both["score_y"]) and both["score_y"].mean() < both["score_x"].mean()
    capsys.readouterr()
    assert main(argv) == 2  # the folder holds this run now: refuse without --resume/--force
    assert main(argv[:-1] + ["--method", "mean", "--force", "--quiet"]) == 2
    assert "screen supports" in capsys.readouterr().err
    # the same screen from `gships --mode auto` (exact scores for the top 2) and a bad --mode
    out2 = tmp_path / "run2"
    base = ["gships", "--model", str(model_dir), "--dataset", str(data), "--out", str(out2), "--method", "scaling",
            "--quiet"]
    assert main(base + ["--mode", "auto", "--top-k", "2"]) == 0
    assert (out2 / "screen.csv").is_file() and len(pd.read_csv(out2 / "generalized_ships.csv")) == 2
    assert main(base + ["--mode", "fast", "--force"]) == 2
    assert "--mode" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The subspace rotation estimator on synthetic matrices (oracle: scipy's principal angles)
# ------------------------------------------------------------------------------------------------

def _first_order_angle(m: np.ndarray, dm: np.ndarray, rank: int, t: float = 1e-6) -> float:
    """d/dt of the summed principal angles (degrees) between the top-`rank` left singular
    subspaces of m and m + t·dm, by a finite difference of scipy's subspace_angles."""
    import scipy.linalg

    def top(x):
        return np.linalg.svd(x, full_matrices=False)[0][:, :rank]

    return float(np.degrees(scipy.linalg.subspace_angles(top(m), top(m + t * dm)).sum()) / t)


def _uncentred(n_prompts=10, dim=32, ratio=0.18, seed=0) -> np.ndarray:
    """Hidden states like a real model's: one large shared mean direction, σ₂/σ₁ ≈ ratio."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    mean /= np.linalg.norm(mean)
    noise = rng.normal(size=(n_prompts, dim))
    m = np.outer(np.ones(n_prompts), mean)  # σ₁ ≈ √P
    s = np.linalg.svd(noise, compute_uv=False)
    return m + noise * (ratio * np.sqrt(n_prompts) / s[0])


def _estimate(m: np.ndarray, dm: np.ndarray, rank: int, budget: int, seed: int = 0, exact: bool = False) -> float:
    """The screen's estimate when every backward pass measures directionᵀ Δĥ_p exactly."""
    u, sv, vh = torch.linalg.svd(torch.tensor(m), full_matrices=True)
    sv_full = torch.zeros(m.shape[0], dtype=torch.float64)
    sv_full[: sv.shape[0]] = sv
    probes = S.subspace_probes_for(u, sv_full, vh, rank, budget, seed=seed, exact=exact)
    proj = probes.directions @ torch.tensor(dm).T  # [N, P]
    return float(S.subspace_rotation(probes, proj[:, :, None])[0])


def test_common_mode_shift_is_not_dropped():
    """ΔM = 1δᵀ (every prompt moves the same way): the first term σ_i u_jᵀΔM v_i vanishes, the
    rotation is all in σ_j u_iᵀΔM v_j. The σ_j ≪ σ_i shortcut (budget 0) misses most of it."""
    m = _uncentred()
    s = np.linalg.svd(m, compute_uv=False)
    assert 0.1 < s[1] / s[0] < 0.3
    dm = np.outer(np.ones(m.shape[0]), np.random.default_rng(1).normal(size=m.shape[1]))
    truth = _first_order_angle(m, dm, 1)
    assert abs(_estimate(m, dm, 1, 0, exact=True) - truth) < 1e-3 * truth
    shortcut = _estimate(m, dm, 1, 0)
    assert shortcut < 0.5 * truth, (shortcut, truth)  # what the screen used to report
    # the default budget samples part of the second term: noisy per draw, centred on the truth
    default = np.median([_estimate(m, dm, 1, S.DEFAULT_SUBSPACE_PROBES, seed=s) for s in range(100)])
    assert abs(default - truth) < 0.25 * truth, (default, truth)


def test_random_sign_probes_are_unbiased_for_the_squared_angle():
    m = _uncentred(seed=2)
    dm = np.outer(np.ones(m.shape[0]), np.random.default_rng(3).normal(size=m.shape[1]))
    dm += 0.3 * np.random.default_rng(4).normal(size=dm.shape)
    truth2 = _first_order_angle(m, dm, 1) ** 2
    draws = np.array([_estimate(m, dm, 1, 2, seed=s) ** 2 for s in range(2000)])
    se = draws.std() / np.sqrt(len(draws))
    assert abs(draws.mean() - truth2) < 4 * se + 1e-9 * truth2, (draws.mean(), truth2, se)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_exact_subspace_rotation_matches_scipy(rank):
    m = _uncentred(n_prompts=8, dim=16, seed=5)
    dm = np.random.default_rng(6).normal(size=m.shape)
    truth = _first_order_angle(m, dm, rank)
    assert abs(_estimate(m, dm, rank, 0, exact=True) - truth) < 2e-3 * truth
    # few prompts: the default budget already covers every direction, no sampling
    assert _estimate(m, dm, rank, 8 - rank) == pytest.approx(_estimate(m, dm, rank, 0, exact=True), rel=1e-12)


def test_vectorised_backward_equals_one_pass_per_probe(monkeypatch):
    model, enc = _model(), _encoded()
    together = S.screen(model, enc, "undifferentiated", probes=3, progress=False)
    monkeypatch.setattr(S, "PROBE_BATCH", 1)
    apart = S.screen(model, enc, "undifferentiated", probes=3, progress=False)
    assert torch.allclose(together.ships, apart.ships, rtol=1e-10, atol=1e-14)
    assert torch.allclose(together.gships, apart.gships, rtol=1e-10, atol=1e-14)
