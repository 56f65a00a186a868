"""The paper's figure (Generalized Ships heatmaps with the top safety heads marked) and the
dose-response figure of an evaluation (`dose_response`: ASR vs heads ablated, found vs random).

One panel per dataset, side by side: x = layer, y = head, colour = Generalized Ships of one method's
run (Undifferentiated Attention by default) on a blue-to-red map, the top-K heads of Undifferentiated
Attention as hollow purple circles and of Scaling Contribution as light-blue crosses.

Built on matplotlib's object API (`Figure`, no pyplot), so importing this module never changes the
caller's backend and the files are written by the Agg/SVG/PDF canvases directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import UsageError
from .results import (
    LAYER_MATCHED, RANDOM, Study, dataset_order, dataset_title, dose_response_table, load_study, method_order,
    method_title, normalise_dataset,
)

FORMATS = ("png", "svg", "pdf")
COLORMAP = "coolwarm"
# Marker style per method, as in the paper: purple circles and light-blue crosses.
MARKERS = {
    "undifferentiated": dict(marker="o", facecolors="none", edgecolors="#7b1fa2"),
    "scaling": dict(marker="x", color="#4fc3f7"),
}
_OTHER_MARKERS = [dict(marker="s", facecolors="none", edgecolors="#2e7d32"), dict(marker="+", color="#f9a825")]


@dataclass
class FigureResult:
    paths: list[Path]
    notes: list[str] = field(default_factory=list)


def _tick_locator(n: int):
    """Integer ticks: every index on small axes, ~8-10 round steps on large ones (24 to 80 layers)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=min(n, 10), integer=True, steps=[1, 2, 4, 5, 10], prune=None)


def _marker_size(ax, n_layers: int, n_heads: int) -> float:
    """Marker diameter (points) that fits one cell: the smaller cell side, in points, times ~0.8."""
    bbox = ax.get_position()
    fig_w, fig_h = ax.figure.get_size_inches()
    cell_pt = min(bbox.width * fig_w * 72 / n_layers, bbox.height * fig_h * 72 / n_heads)
    # On 80x64 grids a cell is ~3 pt: markers then overlap their neighbours rather than vanish.
    return float(np.clip(cell_pt * 0.78, 7.0, 16.0))


def draw_figure(
    study: Study,
    *,
    top: int = 10,
    color_method: str = "undifferentiated",
    datasets: Sequence[str] | None = None,
    notes: list[str] | None = None,
):
    """Build the matplotlib Figure for a Study (one panel per dataset). Returns the Figure."""
    from matplotlib import colormaps, patheffects
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    notes = notes if notes is not None else []
    grouped = study.by_dataset()
    if not grouped:
        raise UsageError("no Generalized Ships results in the given run folders (generalized_ships.csv)")
    models = sorted({r.model for runs in grouped.values() for r in runs.values()})
    if len(models) > 1:
        raise UsageError(f"the runs come from different models ({', '.join(models)}); give one model's runs")
    methods = {m for runs in grouped.values() for m in runs}
    if color_method not in methods:
        raise UsageError(f"no {color_method} runs to colour by (have: {', '.join(sorted(methods))})")
    if datasets:
        datasets = [normalise_dataset(d) for d in datasets]
        unknown = [d for d in datasets if d not in grouped]
        if unknown:
            raise UsageError(f"no scores for dataset(s) {', '.join(unknown)} (have: {', '.join(grouped)})")
        grouped = {d: grouped[d] for d in datasets}

    n = len(grouped)
    fig = Figure(figsize=(5.6 * n + 0.4, 4.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    cmap = colormaps[COLORMAP].with_extremes(bad="#d9d9d9")  # grey: heads a limited run did not score

    for ax, (dataset, runs) in zip(axes, grouped.items()):
        shade = runs.get(color_method)
        if shade is None:
            shade = next(iter(runs.values()))
            notes.append(f"{dataset}: no {color_method} run; colouring by {shade.method}")
        n_layers = max(r.n_layers for r in runs.values())
        n_heads = max(r.n_heads for r in runs.values())
        grid = np.full((n_heads, n_layers), np.nan)  # [heads, layers]
        g = shade.grid()
        grid[: g.shape[0], : g.shape[1]] = g
        image = ax.imshow(
            np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap, interpolation="none",  # vector files embed the raw L x H grid
            extent=(-0.5, n_layers - 0.5, -0.5, n_heads - 0.5),
        )
        bar = fig.colorbar(image, ax=ax, pad=0.02, fraction=0.06)
        label = "Generalized Ships" if shade.method == "undifferentiated" else f"Generalized Ships ({method_title(shade.method)})"
        bar.set_label(label)

        diameter = _marker_size(ax, n_layers, n_heads)
        width = 1.6 if diameter >= 10 else 1.2
        handles = []
        extra = iter(_OTHER_MARKERS)
        for method, run in runs.items():
            style = MARKERS.get(method) or next(extra, _OTHER_MARKERS[-1])
            best = run.top(top)
            # A thin dark halo keeps light markers visible on the pale and blue cells alike.
            halo = [patheffects.withStroke(linewidth=2 * width, foreground="#1a1a1a", alpha=0.5)]
            ax.scatter(best["layer"], best["head"], s=diameter**2, linewidths=width, zorder=3, path_effects=halo, **style)
            handles.append(
                Line2D([], [], linestyle="none", markersize=7, markeredgewidth=1.6, label=method_title(method),
                       marker=style["marker"], markerfacecolor="none",
                       markeredgecolor=style.get("edgecolors", style.get("color")))
            )
        # below the axes: inside it, the legend hid marked heads in a corner
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncols=len(handles), fontsize=8,
                  frameon=False, borderpad=0.2, handletextpad=0.3, columnspacing=1.2)
        ax.set_title(f"Top {top} Safety Heads on {dataset_title(dataset)}")
        ax.set_xlabel("Layer")
        ax.set_ylabel("Head")
        ax.xaxis.set_major_locator(_tick_locator(n_layers))
        ax.yaxis.set_major_locator(_tick_locator(n_heads))
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_ylim(-0.5, n_heads - 0.5)
        ax.tick_params(labelsize=8)
    fig.suptitle(models[0], fontsize=9, color="#555555")
    return fig


def _outputs(out: Path, formats: Iterable[str]) -> list[Path]:
    fmts = [f.strip().lower().lstrip(".") for f in formats if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise UsageError(f"unknown figure format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    base = out.with_suffix("") if out.suffix.lower().lstrip(".") in FORMATS else out
    return [base.with_name(f"{base.name}.{f}") for f in dict.fromkeys(fmts)]


def paper_figure(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    top: int = 10,
    color_method: str = "undifferentiated",
    formats: Iterable[str] = FORMATS,
    datasets: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the paper's figure from scores run folders and save it as PNG (300 dpi), SVG and/or PDF.

    `out` names the files (its suffix is replaced per format); runs are grouped by the dataset and
    method recorded in their manifests. Returns the written paths and notes on anything skipped."""
    study = load_study(run_dirs)
    paths = _outputs(Path(out), formats)
    notes = list(study.notes)
    fig = draw_figure(study, top=top, color_method=color_method, datasets=datasets, notes=notes)
    _save(fig, paths)
    return FigureResult(paths=paths, notes=notes)


def _save(fig, paths: Sequence[Path]) -> None:
    import matplotlib

    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = path.suffix.lstrip(".")
        # No timestamps and a fixed SVG id salt, so regenerating an unchanged figure gives an
        # unchanged file (the README's figure is committed).
        metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
        with matplotlib.rc_context({"svg.hashsalt": "safetyheads"}):
            fig.savefig(path, dpi=300, format=fmt, metadata=metadata)


# ---------------------------------------------------------------- dose-response

RANDOM_COLOR = "#9e9e9e"


def draw_dose_response(table: pd.DataFrame, *, title: str | None = None):
    """ASR vs number of heads ablated (`results.dose_response_table` rows), one panel per
    (method, dataset): one line per ranking with its 95% Wilson band and error bars (rankings dodged
    a little sideways of their K so equal ASRs stay visible), each random control as a
    grey band from the lowest to the highest draw (dashed: their mean) behind them, and the
    baseline as a horizontal line. Returns the Figure."""
    from matplotlib.figure import Figure

    if table.empty or not (table["kind"] != "baseline").any():
        raise UsageError("no dose-response in the given runs (evaluate with --from/--top or --random)")
    datasets = dataset_order(table["dataset"])
    methods = method_order(table["method"].dropna())
    fig = Figure(figsize=(max(6.4, 4.2 * len(datasets) + 0.6), 3.2 * len(methods) + 1.2), layout="constrained")
    axes = fig.subplots(len(methods), len(datasets), squeeze=False, sharey=True)
    rankings = list(dict.fromkeys(table.loc[table["kind"] == "ranking", "ranking"]))
    colors = {r: f"C{i % 10}" for i, r in enumerate(rankings)}
    ks = sorted(set(table.loc[table["kind"] != "baseline", "k"].astype(int)))
    log_x = bool(ks) and ks[-1] >= 4 * ks[0]
    span = (ks[-1] - ks[0]) if len(ks) > 1 else 1.0
    handles: dict[str, object] = {}
    for row, method in enumerate(methods):
        for col, dataset in enumerate(datasets):
            ax = axes[row][col]
            here = table[(table["dataset"] == dataset) & (table["method"] == method)]
            base = table[(table["dataset"] == dataset) & (table["kind"] == "baseline")]
            if len(base):
                b = base.iloc[0]
                handles["baseline (no ablation)"] = ax.axhline(b["asr"], color="black", lw=1.2, ls=":", zorder=1)
                if pd.notna(b["low"]):
                    ax.axhspan(b["low"], b["high"], color="black", alpha=0.06, lw=0, zorder=0)
            for i, (ranking, g) in enumerate(here[here["kind"] == "random"].groupby("ranking", sort=False)):
                g = g.sort_values("k")
                shade = RANDOM_COLOR if ranking == RANDOM else f"C{(len(rankings) + i) % 10}"
                ax.fill_between(g["k"], g["low"], g["high"], color=shade, alpha=0.3, lw=0, zorder=2)
                line, = ax.plot(g["k"], g["asr"], color=shade, ls="--", lw=1.2, marker=".", zorder=2)
                name = ("random heads" if ranking == RANDOM
                        else ranking.replace(LAYER_MATCHED + " ", "layer-matched random: "))
                handles[f"{name} (min-max of {int(g['draws'].max())} draws; dashed: mean)"] = line
            found = list(here[here["kind"] == "ranking"].groupby("ranking", sort=False))
            for i, (ranking, g) in enumerate(found):
                g = g.sort_values("k")
                # several rankings often pick heads with the same ASR: each is drawn a little to the side
                # of its K (the tick), its Wilson interval as an error bar there, so none hides another
                shift = i - (len(found) - 1) / 2
                x = g["k"] * 2 ** (0.05 * shift) if log_x else g["k"] + 0.02 * span * shift
                low, high = g["low"].astype(float), g["high"].astype(float)
                ax.fill_between(x, low, high, color=colors[ranking], alpha=0.08, lw=0, zorder=3)
                yerr = [(g["asr"] - low).clip(lower=0), (high - g["asr"]).clip(lower=0)]  # nan-safe, never < 0
                ax.errorbar(x, g["asr"], yerr=yerr, color=colors[ranking], lw=0,
                            elinewidth=1.0, capsize=2, zorder=4)
                line, = ax.plot(x, g["asr"], color=colors[ranking], marker="o", ms=4, lw=1.6, zorder=4)
                handles[f"{ranking} (95% Wilson)"] = line
            if log_x:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_ylim(0, 1)
            ax.set_title(f"{dataset_title(dataset)}, {method_title(method)}", fontsize=9)
            ax.grid(alpha=0.3, lw=0.5)
            if row == len(methods) - 1:
                ax.set_xlabel("heads ablated (K)")
            if col == 0:
                ax.set_ylabel("attack success rate")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=1 if len(datasets) == 1 else 2,
               fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, color="#555555")
    return fig


def dose_response(run_dirs: Sequence[str | Path], out: str | Path, *, judge: str | None = None,
                  formats: Iterable[str] = ("png", "svg")) -> FigureResult:
    """Draw the dose-response figure of evaluate run folders (their asr.csv) to `out` (PNG 300 dpi
    and/or SVG, PDF). `judge`: which judge's ASR (default keywords, else the first)."""
    study = load_study(run_dirs)
    frames = [r.asr for r in study.evals if r.asr is not None]
    table = dose_response_table(pd.concat(frames, ignore_index=True) if frames else None, judge=judge)
    paths = _outputs(Path(out), formats)
    judged = table["judge"].iloc[0] if len(table) else None
    fig = draw_dose_response(table, title=study.model + (f", judge {judged}" if judged else ""))
    _save(fig, paths)
    return FigureResult(paths=paths, notes=list(study.notes))
