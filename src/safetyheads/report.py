"""One self-contained HTML report of a study: interactive heatmaps, rankings, Sahara steps, ASR
before/after, helpfulness, example generations and the manifests.

The page must open offline, so plotly.js is inlined once in the head and every chart is a plotly
figure serialised into the page. Sections whose run files are missing are replaced by a note, so a
report can be written from scores alone, from an evaluation alone, or from both.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import __version__
from .errors import UsageError
from .heads import head_labels
from .manifest import Manifest
from .results import (
    EvalRun, ScoresRun, Study, dataset_order, dataset_title, dose_response_table, format_duration, head_rankings,
    is_random_ranking, load_study, method_order, method_title, paper_order, ranking_agreement,
)

COLORSCALE = "RdBu_r"  # blue (low) to red (high), as in the paper figure
MARKER_COLORS = {"undifferentiated": "#7b1fa2", "scaling": "#4fc3f7"}
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_OVERALL = {"", "all", "overall", "*", "total", "nan", "none", "(all)"}


@dataclass
class ReportResult:
    path: Path
    notes: list[str] = field(default_factory=list)


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


class _Page:
    """Collects sections and notes, and gives each plotly figure a unique div id."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self._ids: set[str] = set()

    def plot(self, fig, div_id: str, *, css_class: str = "", height: int | None = None) -> str:
        div_id = _slug(div_id)
        while div_id in self._ids:
            div_id += "-b"
        self._ids.add(div_id)
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOTLY_CONFIG,
                           default_height=f"{height}px" if height else "100%", default_width="100%")
        return f'<div class="plot {css_class}">{body}</div>'


def _table(df: pd.DataFrame, *, css_class: str = "", floatfmt: str = "{:.4g}") -> str:
    """A small HTML table with every cell escaped (pandas' to_html would do, but the format of
    floats and the escaping are easier to control by hand here)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for record in df.itertuples(index=False):
        cells = []
        for value in record:
            if isinstance(value, (float, np.floating)):
                text = "" if np.isnan(value) else floatfmt.format(value)
                cells.append(f'<td class="num">{_e(text)}</td>')
            elif isinstance(value, (int, np.integer)):
                cells.append(f'<td class="num">{value}</td>')
            else:
                cells.append(f"<td>{_e(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# ---------------------------------------------------------------- scores


def _hover_cells(runs: dict[str, ScoresRun], n_layers: int, n_heads: int) -> np.ndarray:
    """[heads, layers, methods] strings: "score (rank r)" under each method, for the hover label."""
    out = np.full((n_heads, n_layers, len(runs)), "not scored", dtype=object)
    for m, run in enumerate(runs.values()):
        df = run.gships
        for layer, head, score, rank in zip(df["layer"], df["head"], df["score"], df["rank"]):
            out[head, layer, m] = f"{score:.4g} (rank {rank})"
    return out


def _heatmap(page: _Page, dataset: str, method: str, runs: dict[str, ScoresRun], top: int) -> str:
    import plotly.graph_objects as go

    run = runs[method]
    n_layers = max(r.n_layers for r in runs.values())
    n_heads = max(r.n_heads for r in runs.values())
    z = np.full((n_heads, n_layers), np.nan)  # [heads, layers]
    g = run.grid()
    z[: g.shape[0], : g.shape[1]] = g
    custom = _hover_cells(runs, n_layers, n_heads)  # [heads, layers, methods]
    lines = [f"{_e(method_title(m))}: %{{customdata[{i}]}}" for i, m in enumerate(runs)]
    fig = go.Figure(
        go.Heatmap(
            z=np.where(np.isnan(z), None, z).tolist(), x=list(range(n_layers)), y=list(range(n_heads)),
            customdata=custom.tolist(), colorscale=COLORSCALE, colorbar=dict(title=dict(text="Generalized Ships")),
            hovertemplate="Layer %{x}, Head %{y}<br>" + "<br>".join(lines) + "<extra></extra>",
            xgap=0, ygap=0, name=method_title(method),
        )
    )
    for m, other in runs.items():
        best = other.top(top)
        symbol = "circle-open" if m == "undifferentiated" else "x-thin-open" if m == "scaling" else "square-open"
        fig.add_trace(
            go.Scatter(
                x=best["layer"].tolist(), y=best["head"].tolist(), mode="markers", name=f"top {top} {method_title(m)}",
                marker=dict(symbol=symbol, size=11, color=MARKER_COLORS.get(m, "#2e7d32"), line=dict(width=2.2)),
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=dict(text=f"colour: {_e(method_title(method))}", font=dict(size=13), x=0.02),
        xaxis=dict(title="Layer", dtick=max(1, round(n_layers / 12)), range=[-0.5, n_layers - 0.5], showgrid=False),
        yaxis=dict(title="Head", dtick=max(1, round(n_heads / 12)), range=[-0.5, n_heads - 0.5], showgrid=False),
        legend=dict(orientation="h", y=-0.18, x=0), template="plotly_white", width=560, height=470,
        margin=dict(l=55, r=20, t=45, b=40), hovermode="closest",
    )
    body = page.plot(fig, f"heatmap-{dataset}-{method}", css_class="sh-heatmap")
    attrs = f'data-dataset="{_e(dataset)}" data-method="{_e(method)}" data-layers="{n_layers}" data-heads="{n_heads}"'
    return f'<div class="heatmap-box" {attrs}>{body}</div>'


def _section_heatmaps(page: _Page, grouped: dict[str, dict[str, ScoresRun]], top: int) -> str:
    if not grouped:
        page.notes.append("no generalized_ships.csv in the runs: heatmaps skipped")
        return _note("No Generalized Ships results (generalized_ships.csv) in the given runs.")
    parts = ["<p>Hover a cell for its layer, head, and its score and rank under each method. "
             f"Markers: the top {top} heads of each method.</p>"]
    for dataset, runs in grouped.items():
        parts.append(f"<h3>{_e(dataset_title(dataset))}</h3><div class='row'>")
        parts.extend(_heatmap(page, dataset, method, runs, top) for method in runs)
        parts.append("</div>")
    return "".join(parts)


def _section_rankings(grouped: dict[str, dict[str, ScoresRun]], scores: list[ScoresRun], top: int) -> str:
    parts = []
    for dataset, runs in grouped.items():
        table = pd.DataFrame({"rank": range(1, top + 1)})
        for method, run in runs.items():
            best = run.top(top).reset_index(drop=True)
            heads = head_labels(best)
            table[f"{method_title(method)}: head"] = pd.Series(heads, dtype=object)
            table[f"{method_title(method)}: Generalized Ships"] = best["score"]
        parts.append(f"<h3>{_e(dataset_title(dataset))}: Generalized Ships, top {top}</h3>{_table(table)}")
    for run in paper_order(scores):
        if run.summary is None:
            continue
        summ = run.ships_ranking().head(top)
        shown = pd.DataFrame({"head": head_labels(summ)})
        for col in ("mean", "median", "top10_count"):
            if col in summ:
                shown[col] = summ[col].to_numpy()
        parts.append(
            f"<h3>{_e(dataset_title(run.dataset))}: Ships per prompt ({_e(method_title(run.method))}), top {top}</h3>"
            f"<p class='small'>mean/median KL over prompts; top10_count = prompts that have the head among their "
            f"10 highest.</p>{_table(shown)}"
        )
    return "".join(parts) or _note("No rankings: no generalized_ships.csv or ships_summary.csv in the runs.")


def _section_agreement(scores: list[ScoresRun], top: int) -> str:
    """How far the rankings agree: across datasets, across the two ablations, Ships vs Generalized Ships."""
    pairs = ranking_agreement(head_rankings(scores), top=top)
    if not len(pairs):
        return _note("Fewer than two rankings of one model in the runs: nothing to compare.")
    table = pd.DataFrame({
        "ranking A": pairs["a"], "ranking B": pairs["b"], "heads in both": pairs["heads"],
        "Spearman": pairs["spearman"],
        f"top-{top} overlap": [f"{n}/{k}" for n, k in zip(pairs["top_overlap"], pairs["top"])],
        f"heads in both top {top}": pairs["shared_top"],
    })
    return ("<p class='small'>Spearman: rank correlation of the two scores over the heads both rankings scored "
            "(Ships: mean KL). Overlap: heads in both top-K lists, in ranking A's order.</p>"
            f"<div class='wide'>{_table(table, floatfmt='{:.3f}')}</div>")


def _section_sahara(page: _Page, scores: list[ScoresRun]) -> str:
    import plotly.graph_objects as go

    runs = [r for r in paper_order(scores) if r.sahara is not None and len(r.sahara)]
    if not runs:
        page.notes.append("no sahara.csv in the runs: Sahara section skipped")
        return _note("No Sahara results (sahara.csv) in the given runs.")
    fig = go.Figure()
    parts = []
    for run in runs:
        df = run.sahara.sort_values("step")
        heads = head_labels(df)
        label = f"{dataset_title(run.dataset)}, {method_title(run.method)}"
        fig.add_trace(go.Scatter(x=df["step"].tolist(), y=df["score"].tolist(), mode="lines+markers+text",
                                 text=heads, textposition="top center", name=label,
                                 hovertemplate="step %{x}: add head %{text}<br>Generalized Ships %{y:.4g}<extra></extra>"))
        table = pd.DataFrame({"step": df["step"].astype(int), "head added": heads, "Generalized Ships of the group": df["score"]})
        parts.append(f"<h3>{_e(label)}</h3><p>Final group: <code>{_e(','.join(heads))}</code></p>{_table(table)}")
    fig.update_layout(template="plotly_white", height=360, xaxis=dict(title="step", dtick=1),
                      yaxis=dict(title="Generalized Ships of the group"), margin=dict(l=60, r=20, t=30, b=40))
    return page.plot(fig, "sahara-steps", height=360) + "".join(parts)


def _screened(scores: list[ScoresRun]) -> list[ScoresRun]:
    """The runs that hold screening estimates (screen.csv)."""
    return [r for r in scores if r.screen is not None and len(r.screen)]


def _section_screen(page: _Page, scores: list[ScoresRun], grouped: dict[str, dict[str, ScoresRun]], top: int) -> str:
    """Gradient screening estimates (screen.csv), with their agreement with exact Generalized Ships
    where the report also has an exact run for the same dataset and method."""
    from scipy.stats import spearmanr

    runs = paper_order(_screened(scores))
    parts = ["<p class='small'>First-order (Generalized Ships) or Fisher (Ships) estimates from a few backward "
             "passes; they rank heads for an exact check and are not scores themselves.</p>"]
    for run in runs:
        est = run.screen.sort_values("rank", kind="stable")
        best = est.head(top)
        table = pd.DataFrame({"rank": best["rank"].astype(int).to_numpy(),
                              "head": head_labels(best),
                              "estimate": best["score"].to_numpy()})
        agreement = ""
        exact = grouped.get(run.dataset, {}).get(run.method)
        if run.screen_target == "gships" and exact is not None and exact.gships is not None and exact.path != run.path:
            both = est.merge(exact.gships, on=["layer", "head"], suffixes=("_screen", "_exact"))
            if len(both) >= 3:
                rho = spearmanr(both["score_screen"], both["score_exact"]).statistic
                top_exact = {(a, b) for a, b in exact.top(top)[["layer", "head"]].itertuples(index=False)}
                top_screen = {(a, b) for a, b in best[["layer", "head"]].itertuples(index=False)}
                agreement = (f"<p>Against the exact run <code>{_e(exact.path.name)}</code> ({len(both)} heads in both): "
                             f"Spearman {rho:.3f}; {len(top_exact & top_screen)} of the exact top {top} are in the "
                             f"screen's top {top}.</p>")
        label = f"{dataset_title(run.dataset)}, {method_title(run.method)}: screen of {run.screen_target}"
        parts.append(f"<h3>{_e(label)}, top {top}</h3>{agreement}{_table(table)}")
    return "".join(parts)


# ---------------------------------------------------------------- evaluation
# One evaluation folder may hold the baseline and several ablations (rows told apart by their
# heads/method columns), and several folders may be given: every row gets an "ablation" label.


def _is_overall(category) -> bool:
    return category is None or (isinstance(category, float) and np.isnan(category)) or str(category).strip().lower() in _OVERALL


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _labelled(df: pd.DataFrame, run: EvalRun) -> pd.DataFrame:
    """Add `run` and `ablation` ("baseline" or "<method> <heads>") columns to a table of one run."""
    df = df.copy()
    methods = df["method"] if "method" in df else [None] * len(df)
    heads = df["heads"] if "heads" in df else [None] * len(df)
    labels = []
    for condition, m, h in zip(df["condition"], methods, heads):
        if str(condition) == "baseline":
            labels.append("baseline")
        else:
            label = " ".join(p for p in (_text(m) or run.method, _text(h) or run.heads) if p)
            labels.append(label or str(condition))
    if "ranking" in df:  # random draws, and one head list found by two rankings, stay apart
        rankings = [_text(r) for r in df["ranking"]]
        draws = df["draw"] if "draw" in df else [None] * len(df)
        shared = {lab for lab in labels if len({r for l, r in zip(labels, rankings) if l == lab}) > 1}
        for i, (ranking, draw) in enumerate(zip(rankings, draws)):
            if is_random_ranking(ranking):
                labels[i] += f" [{ranking} draw {int(draw)}]" if pd.notna(draw) else f" [{ranking}]"
            elif labels[i] in shared and ranking not in ("", "baseline"):
                labels[i] += f" [{ranking}]"
    df["ablation"] = labels
    df["run"] = run.path.name
    return df


def _disambiguate(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-run tables; an ablation label found in two runs gets its run's name appended."""
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    ablated = df[df["ablation"] != "baseline"]
    shared = ablated.groupby("ablation")["run"].nunique()
    clash = set(shared[shared > 1].index)
    if clash:
        mask = df["ablation"].isin(clash)
        df.loc[mask, "ablation"] = df.loc[mask, "ablation"] + " (" + df.loc[mask, "run"] + ")"
    return df


def _asr_rows(evals: list[EvalRun]) -> pd.DataFrame:
    """All asr.csv rows, labelled; `overall` marks dataset-level rows (computed from the category
    rows, weighted by n, where a file has categories only)."""
    frames = []
    for run in evals:
        if run.asr is None:
            continue
        df = _labelled(run.asr, run)
        df["category"] = df["category"] if "category" in df else ""
        df["judge"] = df["judge"].fillna("default") if "judge" in df else "default"
        df["n"] = df["n"] if "n" in df else np.nan
        df["overall"] = df["category"].map(_is_overall)
        df["category"] = df["category"].where(~df["overall"], "").fillna("").astype(str)
        missing = []
        for (dataset, ablation, judge), g in df.groupby(["dataset", "ablation", "judge"], sort=False):
            if not g["overall"].any():
                w = g["n"].fillna(1).astype(float)
                missing.append({**g.iloc[0].to_dict(), "category": "", "n": float(g["n"].sum()),
                                "asr": float(np.average(g["asr"], weights=w)), "overall": True})
        frames.append(pd.concat([df, pd.DataFrame(missing)], ignore_index=True) if missing else df)
    return _disambiguate(frames)


def _baseline_traces(base: pd.DataFrame, x_col: str) -> list[tuple[str, pd.DataFrame]]:
    """One baseline series when every run measured the same one (same prompts, greedy), else one per run."""
    spread = base.groupby(x_col)["asr"].agg(lambda s: s.max() - s.min())
    if spread.empty or bool((spread < 1e-9).all()):
        return [("baseline (no ablation)", base.drop_duplicates(subset=[x_col]))]
    return [(f"baseline (no ablation): {run}", g) for run, g in base.groupby("run", sort=False)]


def _error_bars(g: pd.DataFrame) -> dict | None:
    """plotly error bars from the 95% Wilson interval columns, where the file has them."""
    if not {"asr_low", "asr_high"} <= set(g.columns) or g["asr_low"].isna().all():
        return None
    asr = g["asr"].astype(float)
    return dict(type="data", symmetric=False, array=(g["asr_high"].astype(float) - asr).tolist(),
                arrayminus=(asr - g["asr_low"].astype(float)).tolist(), thickness=1, width=3)


def _asr_chart(page: _Page, df: pd.DataFrame, x_col: str, title: str, div_id: str) -> str:
    """Grouped bars over `x_col` values: the baseline, then each ablation's ASR (95% Wilson error bars)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    traces = _baseline_traces(df[df["ablation"] == "baseline"], x_col)
    for name, g in traces:
        fig.add_trace(go.Bar(x=g[x_col].tolist(), y=g["asr"].tolist(), name=name, error_y=_error_bars(g),
                             marker_color="#9e9e9e" if len(traces) == 1 else None,
                             hovertemplate="%{x}<br>baseline ASR %{y:.1%}<extra></extra>"))
    for label, g in df[df["ablation"] != "baseline"].groupby("ablation", sort=False):
        fig.add_trace(go.Bar(x=g[x_col].tolist(), y=g["asr"].tolist(), name=f"ablated: {label}", error_y=_error_bars(g),
                             hovertemplate="%{x}<br>ablated ASR %{y:.1%}<extra>" + _e(label) + "</extra>"))
    fig.update_layout(barmode="group", template="plotly_white", height=380, title=dict(text=_e(title), font=dict(size=14)),
                      yaxis=dict(title="attack success rate", tickformat=".0%", range=[0, 1.05]),
                      margin=dict(l=60, r=20, t=45, b=80), legend=dict(orientation="h", y=-0.25))
    return page.plot(fig, div_id, height=380)


def _section_asr(page: _Page, evals: list[EvalRun]) -> str:
    rows = _asr_rows(evals)
    if rows.empty:
        page.notes.append("no asr.csv in the runs: ASR section skipped")
        return _note("No evaluation results (asr.csv) in the given runs.")
    judges = list(dict.fromkeys(rows["judge"]))
    judge = "keywords" if "keywords" in judges else judges[0]
    chosen = rows[rows["judge"] == judge]
    overall = chosen[chosen["overall"]].copy()
    datasets = dataset_order(overall["dataset"])
    overall = overall.sort_values("dataset", key=lambda s: s.map(datasets.index), kind="stable")
    overall["dataset title"] = overall["dataset"].map(dataset_title)
    others = f" (also in the table: {', '.join(j for j in judges if j != judge)})" if len(judges) > 1 else ""
    parts = [f"<p>Judge shown: <code>{_e(judge)}</code>{_e(others)}. ASR = share of prompts the judge counts as "
             "jailbroken (answered); intervals: 95% Wilson; McNemar p: paired exact test of the ablated condition "
             "against the baseline on the same prompts (newly jailbroken vs newly refused).</p>"]
    parts += _dose_response_charts(page, evals, judge)
    # random draws are in the dose-response charts and the table; as bars they would bury the rest
    drawn = chosen["ranking"].map(is_random_ranking) if "ranking" in chosen else pd.Series(False, index=chosen.index)
    bars = overall[~drawn.reindex(overall.index, fill_value=False)]
    parts.append(_asr_chart(page, bars, "dataset title", "ASR per dataset, before and after ablation", "asr-datasets"))
    for dataset in dataset_order(chosen["dataset"]):
        cats = chosen[(chosen["dataset"] == dataset) & ~chosen["overall"] & ~drawn]
        if len(cats):
            parts.append(_asr_chart(page, cats, "category", f"ASR per category: {dataset_title(dataset)}",
                                    f"asr-{dataset}-categories"))
    # The table: one row per (ablation, dataset, category, judge) with before, after and the change.
    keys = ["run", "dataset", "category", "judge"]
    base = rows[rows["ablation"] == "baseline"][keys + ["asr"]].drop_duplicates(subset=keys)
    table = rows[rows["ablation"] != "baseline"].merge(base, on=keys, how="left", suffixes=("", "_baseline"))
    stats = {"asr_low", "asr_high", "newly_jailbroken", "newly_refused", "mcnemar_p"} <= set(table.columns)
    table = pd.DataFrame({
        "ablation": table["ablation"], "dataset": table["dataset"], "category": table["category"].replace("", "(all)"),
        "judge": table["judge"], "n": table["n"], "baseline ASR": table["asr_baseline"], "ablated ASR": table["asr"],
        **({"ablated 95% CI": _intervals(table)} if stats else {}),
        "change": table["asr"] - table["asr_baseline"],
        **({"newly jailbroken": _counts(table["newly_jailbroken"]), "newly refused": _counts(table["newly_refused"]),
            "McNemar p": table["mcnemar_p"]} if stats else {}),
    })
    if table.empty:  # a baseline-only evaluation
        table = rows[keys + ["n", "asr"]].rename(columns={"asr": "baseline ASR"})
        if {"asr_low", "asr_high"} <= set(rows.columns):
            table["95% CI"] = _intervals(rows)
    parts.append(_table(table, floatfmt="{:.3f}"))
    parts += _found_vs_random(evals)
    parts += _judge_agreement(evals)
    return "".join(parts)


def _runs_table(evals: list[EvalRun], attr: str, cols: list[str]) -> pd.DataFrame | None:
    """One evaluation table (`attr` of each EvalRun) over all runs, a `run` column only when several."""
    frames = [getattr(run, attr).assign(run=run.path.name) for run in evals if getattr(run, attr) is not None]
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    table = table[[c for c in ["run", *cols] if c in table.columns]]
    return table.drop(columns="run") if table["run"].nunique() == 1 else table


def _found_vs_random(evals: list[EvalRun]) -> list[str]:
    """Found heads against the random draws of the same K (found_vs_random.csv of each run)."""
    table = _runs_table(evals, "found_vs_random", ["dataset", "judge", "method", "ranking", "k", "n", "asr_found",
                                                   "asr_random", "asr_random_min", "asr_random_max", "n_draws",
                                                   "difference", "p_value"])
    if table is None:
        return []
    return ["<h3>Found heads vs random heads</h3><p>Each ranking's top K against the random draws of the same "
            "method and K, on the same prompts: asr_random is the draws' mean (min–max over the draws), "
            "difference the mean over prompts of (found verdict − mean random verdict), p_value its paired "
            "sign-flip permutation test. With few draws this compares with those draws, not with every "
            "possible random head set.</p>", _table(table, floatfmt="{:.3f}")]


def _judge_agreement(evals: list[EvalRun]) -> list[str]:
    """Pairwise agreement of the judges (judge_agreement.csv of each run that ran several)."""
    table = _runs_table(evals, "judge_agreement", ["dataset", "judge_a", "judge_b", "n", "both_jailbroken", "only_a",
                                                   "only_b", "neither", "agreement", "kappa", "n_unparsed"])
    if table is None:
        return []
    return ["<h3>Agreement between judges</h3><p>Jailbroken verdicts of each pair of judges on the same generations "
            "(every prompt under every condition; rows either judge could not parse are left out and counted in "
            "n_unparsed). kappa: Cohen's κ from the 2×2 table (1 = full agreement, 0 = what the two judges' own "
            "rates give by chance).</p>", _table(table, floatfmt="{:.3f}")]


def _intervals(df: pd.DataFrame) -> list[str]:
    return [f"{lo:.3f}–{hi:.3f}" if pd.notna(lo) else "" for lo, hi in zip(df["asr_low"], df["asr_high"])]


def _counts(values: pd.Series) -> list[str]:
    return [str(int(v)) if pd.notna(v) else "" for v in values]


def _dose_response_charts(page: _Page, evals: list[EvalRun], judge: str) -> list[str]:
    """Per evaluation run with rankings or random draws, one interactive dose-response chart per
    (dataset, method): the same picture as `plots.draw_dose_response` (lines with Wilson bands, the
    random band behind them, the baseline as a line)."""
    import plotly.graph_objects as go

    parts = []
    for run in evals:
        if run.asr is None or judge not in set(run.asr.get("judge", [])):
            continue
        table = dose_response_table(run.asr, judge=judge)
        if not (table["kind"] != "baseline").any():
            continue
        for dataset in dataset_order(table["dataset"]):
            for method in method_order(table.loc[table["dataset"] == dataset, "method"].dropna()):
                here = table[(table["dataset"] == dataset) & (table["method"] == method)]
                fig = go.Figure()
                base = table[(table["dataset"] == dataset) & (table["kind"] == "baseline")]
                ks = sorted(here["k"].astype(int).unique())
                if len(base) and ks:
                    b = base.iloc[0]
                    fig.add_trace(go.Scatter(x=[ks[0], ks[-1]], y=[b["asr"]] * 2, mode="lines", name="baseline",
                                             line=dict(color="black", dash="dot"),
                                             hovertemplate=f"baseline ASR {b['asr']:.1%} "
                                                           f"[{b['low']:.1%}, {b['high']:.1%}]<extra></extra>"))
                for kind in ("random", "ranking"):
                    for ranking, g in here[here["kind"] == kind].groupby("ranking", sort=False):
                        g = g.sort_values("k")
                        color = "#9e9e9e" if kind == "random" else None
                        band = "min–max over draws" if kind == "random" else "95% Wilson"
                        fig.add_trace(go.Scatter(x=g["k"].tolist(), y=g["high"].tolist(), mode="lines",
                                                 line=dict(width=0), showlegend=False, hoverinfo="skip",
                                                 legendgroup=ranking))
                        fig.add_trace(go.Scatter(x=g["k"].tolist(), y=g["low"].tolist(), mode="lines",
                                                 line=dict(width=0), fill="tonexty", showlegend=False,
                                                 hoverinfo="skip", legendgroup=ranking,
                                                 fillcolor="rgba(158,158,158,0.3)" if kind == "random" else None))
                        fig.add_trace(go.Scatter(
                            x=g["k"].tolist(), y=g["asr"].tolist(), mode="lines+markers", name=_e(ranking),
                            legendgroup=ranking, line=dict(color=color, dash="dash" if kind == "random" else None),
                            customdata=np.stack([g["low"], g["high"], g["draws"]], axis=1).tolist(),
                            hovertemplate="K=%{x}: ASR %{y:.1%} [%{customdata[0]:.1%}, %{customdata[1]:.1%}] "
                                          + band + "<extra>" + _e(ranking) + "</extra>"))
                logx = ks[-1] >= 4 * ks[0]
                fig.update_layout(
                    template="plotly_white", height=380,
                    title=dict(text=_e(f"Dose-response: {dataset_title(dataset)}, {method_title(method)}"),
                               font=dict(size=14)),
                    xaxis=dict(title="heads ablated (K)", type="log" if logx else "linear", tickvals=ks),
                    yaxis=dict(title="attack success rate", tickformat=".0%", range=[0, 1.02]),
                    margin=dict(l=60, r=20, t=45, b=60), legend=dict(orientation="h", y=-0.25))
                parts.append(page.plot(fig, f"dose-{run.path.name}-{dataset}-{method}", height=380))
    return parts


def _section_helpfulness(page: _Page, evals: list[EvalRun]) -> str:
    import plotly.graph_objects as go

    df = _disambiguate([_labelled(r.helpfulness, r) for r in evals if r.helpfulness is not None])
    if df.empty:
        page.notes.append("no helpfulness.csv in the runs: helpfulness section skipped")
        return _note("No helpfulness results (helpfulness.csv) in the given runs.")
    df["judge"] = df["judge"].fillna("").astype(str) if "judge" in df else ""
    df["measure"] = [f"{m} ({j})" if j else str(m) for m, j in zip(df["metric"], df["judge"])]
    labels = list(dict.fromkeys(["baseline", *df["ablation"]]))
    labels = [l for l in labels if l in set(df["ablation"])]
    wide = df.pivot_table(index="measure", columns="ablation", values="value", aggfunc="first", sort=False)
    wide = wide[labels].reset_index()
    wide.columns.name = None
    fig = go.Figure()
    for label in labels:
        g = df[df["ablation"] == label]
        fig.add_trace(go.Bar(x=g["measure"].tolist(), y=g["value"].tolist(), name=label,
                             marker_color="#9e9e9e" if label == "baseline" else None,
                             hovertemplate="%{x}<br>%{y:.4g}<extra>" + _e(label) + "</extra>"))
    fig.update_layout(barmode="group", template="plotly_white", height=360, margin=dict(l=60, r=20, t=30, b=90),
                      legend=dict(orientation="h", y=-0.3))
    explain = ("<p class='small'>over_refusal_rate: share of harmless requests refused; mean_kl: mean "
               "KL(clean ‖ ablated) of the next-token distribution on harmless prompts; top1_agreement: share "
               "of harmless prompts whose most likely next token is unchanged.</p>")
    return explain + page.plot(fig, "helpfulness", height=360) + _table(wide)


def _verdict_text(verdicts) -> str:
    """{"keywords": {"jailbroken": true, "refused": false}} -> "keywords: jailbroken"."""
    if not isinstance(verdicts, dict):
        return "" if verdicts is None else str(verdicts)
    parts = []
    for judge, v in verdicts.items():
        if isinstance(v, dict):
            true = [k for k, val in v.items() if val is True]
            parts.append(f"{judge}: {', '.join(true) or 'none'}")
        else:
            parts.append(f"{judge}: {v}")
    return "; ".join(parts)


def _section_examples(evals: list[EvalRun], per_dataset: int) -> str:
    """A few prompts answered before and after: those whose verdict changed first, then those whose
    response changed, so the handful shown is the informative part."""
    parts = []
    for run in evals:
        if not run.generations:
            continue
        gens = pd.DataFrame(run.generations)
        if not {"condition", "prompt", "response"} <= set(gens.columns):
            continue
        for col in ("dataset", "prompt_id", "verdicts"):
            if col not in gens:
                gens[col] = None
        gens = _labelled(gens, run)
        groups = []
        for (dataset, pid, prompt), g in gens.groupby(["dataset", "prompt_id", "prompt"], sort=False, dropna=False):
            base = g[g["ablation"] == "baseline"]
            abl = g[g["ablation"] != "baseline"]
            if base.empty or abl.empty:
                continue
            b = base.iloc[0]
            verdict_changed = any(_verdict_text(v) != _verdict_text(b["verdicts"]) for v in abl["verdicts"])
            text_changed = any(r != b["response"] for r in abl["response"])
            groups.append((str(dataset), (not verdict_changed, not text_changed), pid, prompt, b, abl))
        if not groups:
            continue
        parts.append(f"<h3>{_e(run.path.name)}</h3>" if len(evals) > 1 else "")
        for dataset in dataset_order(g[0] for g in groups):
            chosen = sorted((g for g in groups if g[0] == dataset), key=lambda g: g[1])[:per_dataset]
            parts.append(f"<h4>{_e(dataset_title(dataset))}</h4>")
            for _, _, pid, prompt, b, abl in chosen:
                cells = [f"<div><div class='tag'>before (no ablation) · {_e(_verdict_text(b['verdicts']))}</div>"
                         f"<pre>{_e(b['response'])}</pre></div>"]
                cells += [f"<div><div class='tag'>after: {_e(a['ablation'])} · {_e(_verdict_text(a['verdicts']))}</div>"
                          f"<pre>{_e(a['response'])}</pre></div>" for _, a in abl.iterrows()]
                parts.append(f"<div class='example'><div class='prompt'><b>Prompt {_e(pid)}:</b> {_e(prompt)}</div>"
                             f"<div class='pair'>{''.join(cells)}</div></div>")
    return "".join(parts) or _note("No example generations (generations.jsonl with baseline and ablated answers).")


# ---------------------------------------------------------------- manifests


_KEY_PACKAGES = ("safetyheads", "torch", "transformers", "python")


def _prompt_counts(record: Manifest) -> str:
    return ", ".join("?" if n is None else str(n) for n in record.prompt_counts)


def _when(record: Manifest) -> str:
    """"2026-11-29 15:47 (3 min 12 s)": the manifest's start time and the run's compute time (summed
    over resumed sessions, see `Manifest.seconds`)."""
    started = record.started
    if not isinstance(started, str):
        return ""
    text = started[:16].replace("T", " ")
    if not isinstance(record.finished, str):
        return f"{text} (unfinished)"
    seconds = record.seconds
    return text if seconds is None else f"{text} ({format_duration(seconds)})"


def _section_manifests(paths: Sequence[tuple[Path, Manifest, str]]) -> str:
    """The provenance of every number on the page: one row per run folder, the full manifests below."""
    rows, details = [], []
    for path, record, kind in paths:
        versions = record.versions
        if isinstance(versions, dict):
            shown = {k: v for k, v in versions.items() if k in _KEY_PACKAGES} or versions
            version_text = ", ".join(f"{k} {v}" for k, v in shown.items())
        else:
            version_text = _text(versions)
        git = record.git if isinstance(record.git, dict) else {}
        sha = record.weights_sha256
        rows.append({
            "run folder": path.name, "command": str(record.command or kind),
            "model": record.model_name or "",
            "weights sha256": f"{sha[:12]}…" if isinstance(sha, str) and sha else "",
            "dataset": ", ".join(record.dataset_names),
            "prompts": _prompt_counts(record),
            "method / ablations": record.method
            or "; ".join(f"{a.get('method')} {a.get('heads')}" for a in record.ablations),
            "epsilon": str(record.epsilon or ""),
            "format": record.format or "",
            "started (compute time)": _when(record),
            "git": (str(git.get("commit", ""))[:10] + (" (dirty)" if git.get("dirty") else "")) if git else "",
            "versions": version_text,
        })
        details.append(f"<details><summary>{_e(path)}/manifest.json</summary>"
                       f"<pre>{_e(json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str))}</pre></details>")
    table = pd.DataFrame(rows)
    parents = sorted({str(p.parent) for p, _, _ in paths})
    intro = (f"<p class='small'>Run folders in: {_e(', '.join(parents))}. A run started from the command line "
             "records it (<code>argv</code> below); <code>safetyheads rerun RUN_DIR --out NEW_DIR</code> replays it "
             "and compares every result file.</p>")
    if table["versions"].nunique() == 1:  # the usual case: say it once
        intro += f"<p class='small'>Package versions: {_e(table['versions'].iloc[0])}</p>"
        table = table.drop(columns="versions")
    return intro + f"<div class='wide'>{_table(table, css_class='small')}</div>" + "".join(details)


# ---------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 24px 60px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin:.8em 0 .2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{margin:1.4em 0 .4em}
nav a{margin-right:1em} .note{color:#8a6d3b;background:#fcf8e3;padding:.4em .7em;border-radius:4px}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:12px} .heatmap-box{flex:0 0 auto;width:560px}
.example{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:10px;margin-top:6px} .tag{font-size:.8em;color:#666}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:6px 8px;margin:2px 0;font-size:.85em;max-height:22em;overflow:auto}
.small{font-size:.85em;color:#555} .wide{overflow-x:auto} code{background:#f3f3f3;padding:0 3px}
"""


def render_report(study: Study, *, top: int = 10, examples: int = 5, title: str | None = None) -> tuple[str, list[str]]:
    """The report's HTML text and notes about skipped sections."""
    import plotly.offline

    if top < 1 or examples < 0:
        raise UsageError("--top must be at least 1 and --examples at least 0")
    page = _Page()
    page.notes.extend(study.notes)
    grouped = study.by_dataset()
    title = title or f"safetyheads report: {study.model}"
    sections = [
        ("heatmaps", "Generalized Ships heatmaps", _section_heatmaps(page, grouped, top)),
        ("rankings", "Rankings", _section_rankings(grouped, study.scores, top)),
        ("agreement", "Agreement between rankings", _section_agreement(study.scores, top)),
        ("sahara", "Sahara: greedy head-group search", _section_sahara(page, study.scores)),
        ("asr", "Attack success rate, before and after", _section_asr(page, study.evals)),
        ("helpfulness", "Helpfulness", _section_helpfulness(page, study.evals)),
        ("examples", "Example generations", _section_examples(study.evals, examples)),
        # screening is optional and rare: its section appears only when a run has screen.csv
        *([("screen", "Screening estimates", _section_screen(page, study.scores, grouped, top))]
          if _screened(study.scores) else []),
    ]
    seen, runs = set(), []
    for run in [*study.scores, *study.evals]:
        if run.path not in seen:
            seen.add(run.path)
            runs.append((run.path, run.manifest, "scores" if isinstance(run, ScoresRun) else "evaluation"))
    sections.append(("manifest", "Runs and manifests", _section_manifests(runs)))
    # "sec-" keeps section ids apart from plot div ids (a clash makes plotly draw into the section).
    nav = " ".join(f'<a href="#sec-{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="sec-{sid}"><h2>{_e(name)}</h2>{content}</section>' for sid, name, content in sections)
    notes = "".join(f"<li>{_e(n)}</li>" for n in page.notes)
    notes_html = f"<details><summary>{len(page.notes)} note(s)</summary><ul>{notes}</ul></details>" if notes else ""
    text = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='data:,'>"  # no favicon request (a 404 in the console offline)
        f"<title>{_e(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{_e(title)}</h1><p class='small'>Model: <b>{_e(study.model)}</b> · "
        f"{len(runs)} run folder(s) · written by safetyheads {_e(__version__)}</p>{notes_html}"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
    return text, page.notes


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, top: int = 10, examples: int = 5,
                 title: str | None = None) -> ReportResult:
    """Write the self-contained HTML report of the given run folders to `out`."""
    study = load_study(run_dirs)
    text, notes = render_report(study, top=top, examples=examples, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return ReportResult(path=out, notes=notes)
