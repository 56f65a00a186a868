"""The whole method end to end on one model: the README's main command (`safetyheads demo`).

1. Generalized Ships of every head, for both ablations (Undifferentiated Attention and Scaling
   Contribution), on JailbreakBench and MaliciousInstruct. Exact scores for all heads cost one
   forward pass per head (336 for this model); on 2 CPU cores that is far beyond 15 minutes, so the
   default demo screens all heads from gradients (`screen.py`) and scores the screen's top K
   exactly (`--mode auto`); the figure colours those K heads and greys the rest. `full=True`
   scores every head exactly.
2. The paper's figure from those four runs.
3. The proof: generate answers with the top-1 and top-3 heads (JailbreakBench ranking, each method)
   ablated, and with as many random heads (2 seeded draws per K, the control), judge them, and
   compare the attack success rate (95% Wilson intervals, paired McNemar test) and helpfulness with
   the clean model; `dose_response.png` draws ASR vs heads ablated, found heads vs the random band.
4. One self-contained HTML report, and a short summary table on the terminal.

The default sizes fit ~15 minutes on 2 CPU cores; `full=True` runs the paper-scale version
(all prompts, 128 new tokens) for machines with a GPU. Every step writes a resumable run folder,
so an interrupted demo continues where it stopped when run again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import files
from .heads import head_labels
from .errors import SafetyHeadsError

DEMO_DATASETS = ("jailbreakbench", "maliciousinstruct")
DEMO_METHODS = ("undifferentiated", "scaling")


@dataclass
class DemoSizes:
    """How much of the method the demo runs; printed before it starts and kept in each manifest."""

    gships_prompts: int | None = 8      # prompts per dataset for Generalized Ships (None = all)
    exact_top_k: int | None = 16        # heads scored exactly after screening (None = every head, exactly)
    eval_prompts: int | None = 16       # prompts per dataset for the ASR evaluation (None = all)
    harmless_prompts: int | None = 16   # built-in harmless prompts for the helpfulness checks
    max_new_tokens: int = 32
    top: tuple[int, ...] = (1, 3)       # ablate the top-1 and the top-3 heads
    random: tuple[int, ...] = (1, 3)    # random-head controls of these sizes (() = none)
    repeats: int = 2                    # random draws per size (seed 0)

    @classmethod
    def full(cls) -> "DemoSizes":
        return cls(gships_prompts=None, exact_top_k=None, eval_prompts=None, harmless_prompts=None,
                   max_new_tokens=128, top=(1, 3, 10), random=(1, 3, 10), repeats=3)


def _fmt(n: int | None) -> str:
    return "all" if n is None else str(n)


def run_demo(model: Any = "qwen2.5-coder-0.5b-instruct", *, out: str | Path = "runs/demo", full: bool = False,
             sizes: DemoSizes | None = None, device: str = "auto", dtype: str = "float32",
             data_dir: str | None = None, quiet: bool = False, log=print) -> dict:
    """Run the demo; returns a dict with the run folders, the top heads, the ASR table and timings.

    `model` is a model spec (see `models.load_model`) or an already loaded `LoadedModel`."""
    from .analyses import run_gships
    from .config import DataConfig
    from .data import load_prompts
    from .evaluate import evaluate
    from .models import load_model
    from .plots import paper_figure
    from .report import build_report
    from .screen import run_screen

    sizes = sizes or (DemoSizes.full() if full else DemoSizes())
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    scoring = ("every head exactly" if sizes.exact_top_k is None
               else f"all heads screened, the top {sizes.exact_top_k} exactly")
    log(f"safetyheads demo: model {getattr(model, 'spec', model)}; Generalized Ships ({scoring}) on {_fmt(sizes.gships_prompts)} "
        "prompts per dataset, "
        f"ASR on {_fmt(sizes.eval_prompts)} prompts per dataset with {sizes.max_new_tokens} new tokens "
        f"(top {', '.join(map(str, sizes.top))} heads"
        + (f" vs {sizes.repeats} random draws of {', '.join(map(str, sizes.random))}" if sizes.random else "")
        + "), "
        f"helpfulness on {_fmt(sizes.harmless_prompts)} harmless prompts"
        + ("" if full else "  (use --full for the paper-scale run)"))
    # Fail early (before loading the model) when the datasets cannot be found offline.
    for ds in DEMO_DATASETS:
        try:
            load_prompts(ds, limit=1, data_dir=data_dir)
        except SafetyHeadsError as exc:
            raise SafetyHeadsError(f"{exc} (the demo reads datasets from --data-dir / SAFETYHEADS_DATA_DIR "
                                   "first, then downloads them)") from exc

    t = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype) if isinstance(model, (str, Path)) else model
    timings["load model"] = time.perf_counter() - t

    score_runs: dict[tuple[str, str], Path] = {}
    for ds in DEMO_DATASETS:
        for method in DEMO_METHODS:
            run_dir = root / f"gships-{ds}-{method}"
            t = time.perf_counter()
            data = DataConfig(dataset=ds, limit=sizes.gships_prompts, data_dir=data_dir)
            if sizes.exact_top_k is None:
                run_gships(loaded, data, "chat", out=run_dir, method=method, resume=True, quiet=quiet)
            else:
                run_screen(loaded, data, "chat", out=run_dir, method=method, target="gships", mode="auto",
                           top_k=sizes.exact_top_k, resume=True, quiet=quiet)
            timings[f"gships {ds} {method}"] = time.perf_counter() - t
            score_runs[(ds, method)] = run_dir

    t = time.perf_counter()
    figure = paper_figure(list(score_runs.values()), root / "figure.png")
    timings["figure"] = time.perf_counter() - t

    t = time.perf_counter()
    # Heads come from the JailbreakBench ranking of each method; they are tested on both datasets.
    from_runs = [score_runs[("jailbreakbench", m)] for m in DEMO_METHODS]
    result = evaluate(loaded, list(DEMO_DATASETS), from_runs=from_runs, top=sizes.top, methods=DEMO_METHODS,
                      random=sizes.random, repeats=sizes.repeats if sizes.random else None, random_seed=0,
                      max_new_tokens=sizes.max_new_tokens, limit=sizes.eval_prompts,
                      harmless_limit=sizes.harmless_prompts, data_dir=data_dir, out=root / "evaluate",
                      resume=True, quiet=quiet)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    report = build_report([*score_runs.values(), root / "evaluate"], root / "report.html")
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    top_heads = {f"{ds}/{m}": head_labels(pd.read_csv(run / files.csv(files.GSHIPS)).sort_values("rank").head(5))
                 for (ds, m), run in score_runs.items()}
    summary = summary_table(result.asr)
    log("")
    log("Top-5 heads by Generalized Ships (layer-head):")
    for key, heads in top_heads.items():
        log(f"  {key:34s} {', '.join(heads)}")
    log("")
    log("Attack success rate (keyword judge), clean vs ablated:")
    log(summary.to_string(index=False))
    log("")
    log(f"figure: {figure.paths[0]}")
    dose = root / "evaluate" / "dose_response.png"
    if dose.is_file():
        log(f"dose-response (found vs random heads, 95% intervals): {dose}")
    log(f"report: {report.path}")
    log(f"wall time: {timings['total']:.0f} s")
    return {"sizes": asdict(sizes), "score_runs": {f"{k[0]}/{k[1]}": str(v) for k, v in score_runs.items()},
            "top_heads": top_heads, "asr": summary, "figure": [str(p) for p in figure.paths],
            "dose_response": str(dose) if dose.is_file() else None,
            "report": str(report.path), "timings": timings}


def summary_table(asr: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, condition) with the overall ASR: the table the demo prints."""
    df = asr[asr["category"] == "all"] if "category" in asr.columns else asr
    cols = [c for c in ("dataset", "condition", "ranking", "k", "draw", "heads", "method", "judge", "n", "asr",
                        "asr_low", "asr_high", "mcnemar_p") if c in df.columns]
    return df[cols].reset_index(drop=True)
