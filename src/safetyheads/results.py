"""Read finished run folders back for display (the figure and the HTML report).

The scores and evaluation commands write run folders (manifest.json plus CSV/JSONL files); this
module turns a list of such folders into a `Study`: scores runs grouped by dataset and method,
evaluation runs, and notes about anything that was missing. It is read-only and forgiving: optional
files may be absent. Manifests are read through `manifest.Manifest` (one schema, typed readers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from . import files, methods
from .errors import UsageError
from .heads import head_label
from . import manifest as manifests
from .manifest import Manifest
from .runs import RunDir

SCORES_FILES = tuple(files.csv(n) for n in (files.GSHIPS, files.SHIPS_SUMMARY, files.SAHARA, files.REFUSAL, files.SCREEN))
EVAL_FILES = (files.csv(files.ASR), files.csv(files.HELPFULNESS), files.GENERATIONS)

# Paper order first; other datasets follow alphabetically.
DATASET_TITLES = {
    "jailbreakbench": "JailbreakBench",
    "maliciousinstruct": "MaliciousInstruct",
    "advbench": "AdvBench",
    "harmless": "Harmless",
}
METHOD_TITLES = {m.name: m.title for m in methods.METHODS.values()}  # registry order: the paper's two first


def dataset_title(name: str) -> str:
    return DATASET_TITLES.get(name, name)


def method_title(name: str) -> str:
    return METHOD_TITLES.get(name, name)


def dataset_order(names: Iterable[str]) -> list[str]:
    """Paper datasets first (JailbreakBench, MaliciousInstruct), then the rest alphabetically."""
    known = list(DATASET_TITLES)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def method_order(names: Iterable[str]) -> list[str]:
    known = list(METHOD_TITLES)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def format_heads(heads: Any) -> str:
    """Heads in the CLI's `L-H,L-H` syntax, from whatever a manifest or JSONL line holds."""
    if heads is None:
        return ""
    if isinstance(heads, str):
        return heads
    parts = []
    for h in heads:
        if isinstance(h, str):
            parts.append(h)
        elif isinstance(h, dict):
            parts.append(head_label((h.get("layer"), h.get("head"))))
        else:
            parts.append(head_label(h))
    return ",".join(parts)


def paper_order(scores: Iterable[ScoresRun]) -> list[ScoresRun]:
    """Scores runs sorted by dataset, then method, in the paper's order (others alphabetically)."""
    scores = list(scores)
    datasets = dataset_order(r.dataset for r in scores)
    methods = method_order(r.method for r in scores)
    return sorted(scores, key=lambda r: (datasets.index(r.dataset), methods.index(r.method)))


def ships_order(summary: pd.DataFrame) -> pd.DataFrame:
    """A Ships summary best head first: most prompts with the head among their 10 highest, then the
    highest mean KL (the order of ships_summary.csv; `evaluate --from` and the report both use it)."""
    return summary.sort_values(["top10_count", "mean"], ascending=False, kind="stable")


# ---------------------------------------------------------------- manifests (schema: manifest.py)


def normalise_dataset(name: str | None) -> str:
    """Registry names as they are; a user file by its stem ("data/my_prompts.csv" -> "my_prompts")."""
    if not name:
        return "unknown"
    text = str(name).strip()
    if text.lower() in DATASET_TITLES:
        return text.lower()
    if "/" in text or "." in text:
        return Path(text).stem
    return text


# ---------------------------------------------------------------- runs


@dataclass
class ScoresRun:
    """The scores of one method on one dataset (one run folder may hold several methods)."""

    path: Path
    manifest: Manifest  # the run folder's manifest, read once (manifest.read)
    model: str
    dataset: str
    method: str
    n_layers: int
    n_heads: int
    gships: pd.DataFrame | None  # layer, head, score, rank
    summary: pd.DataFrame | None  # layer, head, mean, median, top10_count (Ships)
    sahara: pd.DataFrame | None  # step, layer, head, score
    screen: pd.DataFrame | None = None  # layer, head, score, rank: gradient estimates (screen.csv)
    refusal: pd.DataFrame | None = None  # layer, head, score, rank: the refusal score (refusal.csv)

    @property
    def screen_target(self) -> str:
        """What the screen estimated: gships or ships (from the manifest)."""
        return self.manifest.target or "gships"

    def grid(self, column: str = "score") -> np.ndarray:
        """Generalized Ships as a [heads, layers] array (NaN where a head was not scored)."""
        out = np.full((self.n_heads, self.n_layers), np.nan)  # [heads, layers]
        if self.gships is not None:
            out[self.gships["head"].to_numpy(), self.gships["layer"].to_numpy()] = self.gships[column].to_numpy()
        return out

    def top(self, k: int) -> pd.DataFrame:
        """The k most important heads (rank 1 first)."""
        if self.gships is None:
            return pd.DataFrame(columns=["layer", "head", "score", "rank"])
        return self.gships.sort_values("rank", kind="stable").head(k)

    def ships_ranking(self) -> pd.DataFrame | None:
        """Ships per head, best first: most prompts with the head among their 10 highest, then the
        highest mean KL (the order of ships_summary.csv)."""
        if self.summary is None:
            return None
        if {"top10_count", "mean"} <= set(self.summary.columns):
            return ships_order(self.summary)
        return self.summary


@dataclass
class EvalRun:
    path: Path
    manifest: Manifest
    model: str
    method: str
    heads: str
    asr: pd.DataFrame | None
    helpfulness: pd.DataFrame | None
    generations: list[dict]
    judge_agreement: pd.DataFrame | None = None  # judge_agreement.csv: pairwise Cohen's kappa of the judges
    found_vs_random: pd.DataFrame | None = None  # found_vs_random.csv: found heads vs random draws of the same K

    @property
    def label(self) -> str:
        """How the ablation is named in charts: method and heads, else the folder name."""
        parts = [p for p in (self.method, self.heads) if p]
        return " ".join(parts) if parts else self.path.name


@dataclass
class Study:
    scores: list[ScoresRun] = field(default_factory=list)
    evals: list[EvalRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in [*self.scores, *self.evals] if r.model})

    @property
    def model(self) -> str:
        return ", ".join(self.models) or "unknown model"

    def by_dataset(self) -> dict[str, dict[str, ScoresRun]]:
        """{dataset: {method: run}} over runs with Generalized Ships, datasets in paper order.
        When two runs share a dataset and method, the later one given wins (with a note)."""
        grouped: dict[str, dict[str, ScoresRun]] = {}
        for run in self.scores:
            if run.gships is None:
                continue
            slot = grouped.setdefault(run.dataset, {})
            if run.method in slot:
                self.notes.append(
                    f"two runs for {run.dataset}/{run.method}: using {run.path}, ignoring {slot[run.method].path}"
                )
            slot[run.method] = run
        return {d: {m: grouped[d][m] for m in method_order(grouped[d])} for d in dataset_order(grouped)}


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    df = pd.read_csv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _split_by_method(df: pd.DataFrame | None, default: str) -> dict[str, pd.DataFrame]:
    if df is None:
        return {}
    if "method" not in df.columns:
        return {default: df}
    df = df.assign(method=df["method"].fillna(default).astype(str))
    return {str(m): g.drop(columns="method").reset_index(drop=True) for m, g in df.groupby("method", sort=False)}


def _with_rank(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["layer"] = df["layer"].astype(int)
    df["head"] = df["head"].astype(int)
    df["score"] = df["score"].astype(float)
    if "rank" not in df.columns or df["rank"].isna().any():
        from .scores import best_first  # torch-free callers (summary) only pay for it here
        order = best_first(df).index
        df.loc[order, "rank"] = np.arange(1, len(df) + 1)
    df["rank"] = df["rank"].astype(int)
    return df


def load_scores_runs(run: Path, record: Manifest) -> list[ScoresRun]:
    """Every (method) scores run a folder holds; empty when it holds no scores file."""
    gships = _read_csv(run / files.csv(files.GSHIPS), ("layer", "head", "score"))
    summary = _read_csv(run / files.csv(files.SHIPS_SUMMARY), ("layer", "head"))
    sahara = _read_csv(run / files.csv(files.SAHARA), ("step", "layer", "head", "score"))
    screen = _read_csv(run / files.csv(files.SCREEN), ("layer", "head", "score"))
    refusal = _read_csv(run / files.csv(files.REFUSAL), ("layer", "head", "score"))
    if gships is None and summary is None and sahara is None and screen is None and refusal is None:
        return []
    model = record.model_name or "unknown model"
    dataset = normalise_dataset(record.dataset)
    method = record.method or "unknown"
    by_gships = _split_by_method(gships, method)
    by_summary = _split_by_method(summary, method)
    by_screen = _split_by_method(screen, method)
    by_refusal = _split_by_method(refusal, method)
    methods = list(dict.fromkeys([*by_gships, *by_summary, *by_screen, *by_refusal])) or [method]
    out = []
    for m in methods:
        g = _with_rank(by_gships[m]) if m in by_gships else None
        s = by_summary.get(m)
        sc = _with_rank(by_screen[m]) if m in by_screen else None
        rf = _with_rank(by_refusal[m]) if m in by_refusal else None
        # The size the manifest declares, grown to cover every head in the files (a run limited
        # with --layers still shows the whole model; a manifest without sizes is still drawable).
        n_layers = record.n_layers or 0
        n_heads = record.n_heads or 0
        for df in (g, s, sahara, sc, rf):
            if df is not None and len(df):
                n_layers = max(n_layers, int(df["layer"].max()) + 1)
                n_heads = max(n_heads, int(df["head"].max()) + 1)
        out.append(
            ScoresRun(
                path=run, manifest=record, model=str(model), dataset=dataset, method=m,
                n_layers=n_layers, n_heads=n_heads, gships=g, summary=s,
                sahara=sahara if m == method or len(methods) == 1 else None, screen=sc, refusal=rf,
            )
        )
    return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return rows


def load_eval_run(run: Path, record: Manifest) -> EvalRun | None:
    asr = _read_csv(run / files.csv(files.ASR), ("dataset", "condition", "asr"))
    helpfulness = _read_csv(run / files.csv(files.HELPFULNESS), ("metric", "condition", "value"))
    generations = _read_jsonl(run / files.GENERATIONS)
    if asr is None and helpfulness is None and not generations:
        return None
    ablated = next((g for g in generations if g.get("condition") == "ablated"), {})
    method = record.method or ablated.get("method") or ""
    heads = record.heads or ablated.get("heads")
    model = record.model_name or ""
    agreement = _read_csv(run / files.csv(files.JUDGE_AGREEMENT), ("judge_a", "judge_b", "kappa"))
    versus = _read_csv(run / files.csv(files.FOUND_VS_RANDOM), ("ranking", "k", "asr_found", "asr_random", "p_value"))
    return EvalRun(
        path=run, manifest=record, model=str(model), method=str(method), heads=format_heads(heads),
        asr=asr, helpfulness=helpfulness, generations=generations, judge_agreement=agreement,
        found_vs_random=versus,
    )


def _is_run(path: Path) -> bool:
    return (path / files.MANIFEST).exists() or any((path / f).exists() for f in SCORES_FILES + EVAL_FILES)


def _runs_under(folder: Path, depth: int = 3) -> list[Path]:
    """Run folders inside `folder`, a few levels down (a run's own subfolders are not searched)."""
    out: list[Path] = []
    for child in sorted(c for c in folder.iterdir() if c.is_dir()):
        if _is_run(child):
            out.append(child)
        elif depth > 1:
            out.extend(_runs_under(child, depth - 1))
    return out


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """The run folders given, or, for a folder that is not a run itself, the runs inside it, up to
    three levels down (so `report runs/demo` works on a folder of runs, and of folders of runs)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UsageError(f"no such run folder: {p}")
        if _is_run(p):
            out.append(p)
            continue
        inner = _runs_under(p)
        if not inner:
            raise UsageError(f"{p} is not a run folder (no manifest.json, generalized_ships.csv or asr.csv)")
        out.extend(inner)
    return list(dict.fromkeys(out))


def load_study(paths: Iterable[str | Path]) -> Study:
    """Read run folders (scores and/or evaluation) into a Study."""
    study = Study()
    for run in find_run_dirs(paths):
        manifest = manifests.read(run)
        if not (run / files.MANIFEST).is_file():
            study.notes.append(f"{run}: no manifest.json; model and dataset unknown")
        scores = load_scores_runs(run, manifest)
        evaluation = load_eval_run(run, manifest)
        study.scores.extend(scores)
        if evaluation is not None:
            study.evals.append(evaluation)
        if not scores and evaluation is None:
            study.notes.append(f"{run}: holds no scores or evaluation results yet")
    return study


# ---------------------------------------------------------------- the `summary` table


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _run_status(run: Path, manifest: Manifest) -> str:
    if manifest.finished:
        return "finished"
    return f"unfinished: {len(RunDir(run, manifest).chunk_keys())} chunks saved"


@dataclass
class RunsSummary:
    rankings: pd.DataFrame  # run, command, model, dataset, prompts, method, status, time, ranking, top_heads
    asr: pd.DataFrame  # run, dataset, condition, method, heads, judge, n, asr (all categories together)
    agreement: pd.DataFrame  # ranking_agreement's pairs when asked for, else empty


def summarize_runs(paths: Iterable[str | Path], top: int = 5, agreement: bool = False) -> RunsSummary:
    """What each run folder holds, in one table: its top `top` heads per ranking (Generalized Ships,
    Ships by top-10 count, the Sahara group, a screen's estimate), whether it finished, and its compute
    time; plus the ASR rows of evaluation runs. Unfinished runs are listed too, with what is on disk.
    `agreement` adds `ranking_agreement` over every exact ranking found (top `top` overlap)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    rows, asr_rows, all_scores = [], [], []
    for run in find_run_dirs(paths):
        manifest = manifests.read(run)
        datasets = manifest.datasets or []
        prompts = datasets[0].get("n") if len(datasets) == 1 and isinstance(datasets[0], dict) else None
        time_text = format_duration(manifest.seconds)
        if time_text and manifest.resumed and manifest.compute_seconds is None:
            time_text += " (calendar span: resumed, no compute_seconds)"     # manifests from before compute_seconds
        base = {"run": str(run), "command": manifest.command or "", "status": _run_status(run, manifest),
                "time": time_text}
        found = False
        for sr in load_scores_runs(run, manifest):
            all_scores.append(sr)
            info = {**base, "model": sr.model, "dataset": sr.dataset, "prompts": prompts, "method": sr.method}
            rankings = []
            if sr.gships is not None:
                rankings.append(("Generalized Ships", format_heads(sr.top(top)[["layer", "head"]].to_numpy())))
            if sr.summary is not None:
                ordered = sr.ships_ranking()
                rankings.append(("Ships (top-10 count)", format_heads(ordered.head(top)[["layer", "head"]].to_numpy())))
            if sr.sahara is not None:
                rankings.append(("Sahara group", format_heads(sr.sahara.sort_values("step")[["layer", "head"]].to_numpy())))
            if sr.screen is not None:
                screen = sr.screen.sort_values("rank", kind="stable").head(top)
                rankings.append((f"screen estimate ({sr.screen_target})", format_heads(screen[["layer", "head"]].to_numpy())))
            for ranking, heads in rankings:
                rows.append({**info, "ranking": ranking, "top_heads": heads})
                found = True
        evaluation = load_eval_run(run, manifest)
        if evaluation is not None and evaluation.asr is not None:
            found = True
            overall = evaluation.asr
            if "category" in overall.columns:
                overall = overall[overall["category"].astype(str) == "all"]
            for r in overall.to_dict("records"):
                asr_rows.append({"run": str(run), "dataset": r.get("dataset"), "condition": r.get("condition"),
                                 "method": r.get("method"), "heads": r.get("heads"), "judge": r.get("judge"),
                                 "n": r.get("n"), "asr": r.get("asr")})
        if not found:
            rows.append({**base, "model": manifest.model_name or "",
                         "dataset": normalise_dataset(manifest.dataset),
                         "prompts": prompts, "method": manifest.method or "", "ranking": "",
                         "top_heads": ""})
    columns = ["run", "command", "model", "dataset", "prompts", "method", "status", "time", "ranking", "top_heads"]
    asr_columns = ["run", "dataset", "condition", "method", "heads", "judge", "n", "asr"]
    pairs = ranking_agreement(head_rankings(all_scores), top=top) if agreement else ranking_agreement([], top=top)
    return RunsSummary(pd.DataFrame(rows, columns=columns), pd.DataFrame(asr_rows, columns=asr_columns), pairs)


# ---------------------------------------------------------------- agreement between rankings
# Are the safety heads the same across datasets, across the two ablations, and between Ships and
# Generalized Ships? The paper argues they are shared; these numbers let a reader check it.


@dataclass
class Ranking:
    """One head ranking from a run folder, best head first."""

    label: str  # e.g. "JailbreakBench, Scaling Contribution: Generalized Ships"
    model: str
    heads: pd.DataFrame  # layer, head, score: the score Spearman compares (best first)


def head_rankings(scores: Sequence[ScoresRun]) -> list[Ranking]:
    """The exact rankings in the runs, in paper order (dataset, then method): Generalized Ships
    (by score), Ships (by top-10 count, then mean KL; its Spearman uses the mean KL, since counts
    tie) and the refusal score (by score). Screen estimates and Sahara groups are not rankings of every head and are left out. Two
    runs with the same dataset and method are told apart by their folder names."""
    out: list[Ranking] = []
    seen: set[str] = set()
    for run in paper_order(scores):
        candidates = []
        if run.gships is not None:
            candidates.append(("Generalized Ships", run.top(len(run.gships))[["layer", "head", "score"]]))
        ships = run.ships_ranking()
        if ships is not None and "mean" in ships.columns:
            candidates.append(("Ships", ships[["layer", "head", "mean"]].rename(columns={"mean": "score"})))
        if run.refusal is not None:
            candidates.append(("refusal score", run.refusal.sort_values("rank", kind="stable")[["layer", "head", "score"]]))
        for kind, table in candidates:
            label = f"{dataset_title(run.dataset)}, {method_title(run.method)}: {kind}"
            if label in seen:
                label += f" ({run.path.name})"
            seen.add(label)
            out.append(Ranking(label, run.model, table.reset_index(drop=True)))
    return out


def ranking_agreement(rankings: Sequence[Ranking], top: int = 10) -> pd.DataFrame:
    """For every pair of rankings of the same model: how many heads both scored, the Spearman
    correlation of their scores over those heads (NaN under 3 heads), and the heads in both top
    `top` lists (listed in the first ranking's order)."""
    from scipy.stats import spearmanr

    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    rows = []
    for i, a in enumerate(rankings):
        for b in rankings[i + 1:]:
            if a.model != b.model:
                continue
            both = a.heads.merge(b.heads, on=["layer", "head"], suffixes=("_a", "_b"))
            rho = float("nan")
            if len(both) >= 3 and both["score_a"].nunique() > 1 and both["score_b"].nunique() > 1:
                rho = float(spearmanr(both["score_a"], both["score_b"]).statistic)
            top_a = [tuple(h) for h in a.heads[["layer", "head"]].head(top).to_numpy().tolist()]
            top_b = {tuple(h) for h in b.heads[["layer", "head"]].head(top).to_numpy().tolist()}
            shared = [h for h in top_a if h in top_b]
            rows.append({"a": a.label, "b": b.label, "model": a.model, "heads": len(both), "spearman": rho,
                         "top_overlap": len(shared), "top": min(top, len(a.heads), len(b.heads)),
                         "shared_top": format_heads(shared)})
    return pd.DataFrame(rows, columns=["a", "b", "model", "heads", "spearman", "top_overlap", "top", "shared_top"])


# ---------------------------------------------------------------- dose-response
# ASR against the number of heads ablated: one line per ranking, random draws pooled per K into a
# band, the baseline as the level everything is compared with. Shared by plots.py and report.py.

RANDOM = "random"  # the `ranking` of uniform random-head draws (evaluate --random)
LAYER_MATCHED = "random-layer-matched"  # + " " + the matched ranking's label (--random-layer-matched)
DOSE_COLUMNS = ["dataset", "method", "ranking", "kind", "k", "asr", "low", "high", "draws", "judge"]


def is_random_ranking(ranking: str) -> bool:
    """Random-head controls (`random`, `random-layer-matched ...`), as `evaluate` names them."""
    return str(ranking) == RANDOM or str(ranking).startswith(LAYER_MATCHED + " ")


def dose_response_table(asr: pd.DataFrame, judge: str | None = None) -> pd.DataFrame:
    """Dataset-level rows of an evaluate `asr.csv` (one judge: `judge`, else keywords, else the
    first) as dose-response points: `kind` baseline (k = 0, its Wilson interval, no method),
    ranking (each K's ASR and Wilson interval) or random (per K over the draws: mean ASR, low/high
    = the lowest and highest draw). `--ablate` head lists have no K axis and are left out. Empty
    when the file has no `ranking`/`k` columns (written before they existed)."""
    if asr is None or not {"ranking", "k", "asr"} <= set(asr.columns):
        return pd.DataFrame(columns=DOSE_COLUMNS)
    rows = asr
    if "category" in rows.columns:
        rows = rows[rows["category"].astype(str) == "all"]
    if "judge" in rows.columns and len(rows):
        judges = list(dict.fromkeys(rows["judge"]))
        judge = judge or ("keywords" if "keywords" in judges else judges[0])
        if judge not in judges:
            raise UsageError(f"no ASR by judge {judge!r} (have: {', '.join(map(str, judges))})")
        rows = rows[rows["judge"] == judge]
    out = []
    for r in rows[rows["condition"] == "baseline"].to_dict("records"):
        out.append({"dataset": r["dataset"], "method": None, "ranking": "baseline", "kind": "baseline", "k": 0,
                    "asr": r["asr"], "low": r.get("asr_low"), "high": r.get("asr_high"), "draws": 1})
    ablated = rows[(rows["condition"] != "baseline") & (rows["ranking"].astype(str) != "ablate")]
    for (dataset, method, ranking, k), g in ablated.groupby(["dataset", "method", "ranking", "k"], sort=False):
        if is_random_ranking(ranking):
            out.append({"dataset": dataset, "method": method, "ranking": ranking, "kind": "random", "k": int(k),
                        "asr": g["asr"].mean(), "low": g["asr"].min(), "high": g["asr"].max(), "draws": len(g)})
        else:
            r = g.iloc[0]
            out.append({"dataset": dataset, "method": method, "ranking": ranking, "kind": "ranking", "k": int(k),
                        "asr": r["asr"], "low": r.get("asr_low"), "high": r.get("asr_high"), "draws": 1})
    table = pd.DataFrame(out, columns=DOSE_COLUMNS).assign(judge=judge)
    return table.sort_values(["kind", "ranking", "k"], kind="stable").reset_index(drop=True)
