"""Synthetic run folders for the figure and report tests.

They follow the file formats the scores and evaluation commands write (see issues 4 and 5), filled
with random numbers, so the display code can be tested without running a model. Scores are drawn
from a seeded generator: tests compare what is drawn with what is in the files, never with constants.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

JBB_CATEGORIES = ["Harassment/Discrimination", "Malware/Hacking", "Physical harm", "Economic harm", "Fraud/Deception"]


def _manifest(model: str, dataset: str, method: str, n_layers: int, n_heads: int, command: str, **extra) -> dict:
    return {
        "command": command,
        "config": {
            "model": model,
            "dataset": dataset,
            "method": method,
            "epsilon": 1e-5,
            "format": "chat",
            "n_layers": n_layers,
            "n_heads": n_heads,
            **extra,
        },
        "model": {"spec": model, "revision": None, "weights_sha256": "0" * 64},
        "versions": {"safetyheads": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
        "started": "2026-11-29T12:00:00Z",
        "finished": "2026-11-29T12:05:00Z",
    }


def ranked(scores: np.ndarray) -> pd.DataFrame:
    """[layers, heads] scores -> the `layer, head, score, rank` table (rank 1 = highest score)."""
    n_layers, n_heads = scores.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    df = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "score": scores.ravel()})
    df = df.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df


def make_scores_run(
    root: Path,
    *,
    dataset: str,
    method: str,
    n_layers: int = 6,
    n_heads: int = 4,
    model: str = "tiny-random-llama",
    seed: int = 0,
    summary: bool = True,
    sahara: bool = True,
    manifest_sizes: bool = True,
) -> tuple[Path, np.ndarray]:
    """Write a Generalized Ships run folder; returns (folder, scores [layers, heads])."""
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 2.0, size=(n_layers, n_heads))  # [layers, heads], degrees-like
    run = root / f"gships-{dataset}-{method}-{seed}"
    run.mkdir(parents=True)
    manifest = _manifest(model, dataset, method, n_layers, n_heads, "gships")
    if not manifest_sizes:
        for key in ("n_layers", "n_heads"):
            manifest["config"].pop(key)
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    table = ranked(scores)
    table.insert(2, "method", method)
    table[["layer", "head", "method", "score", "rank"]].to_csv(run / "generalized_ships.csv", index=False)
    if summary:
        summ = pd.DataFrame(
            {
                "layer": table["layer"],
                "head": table["head"],
                "method": method,
                "mean": table["score"] / 10,
                "median": table["score"] / 12,
                "top10_count": rng.integers(0, 5, size=len(table)),
            }
        )
        summ.to_csv(run / "ships_summary.csv", index=False)
    if sahara:
        top = table.head(3)
        pd.DataFrame(
            {"step": [1, 2, 3], "layer": top["layer"], "head": top["head"], "score": np.cumsum(top["score"].to_numpy())}
        ).to_csv(run / "sahara.csv", index=False)
    return run, scores


def make_eval_run(
    root: Path,
    *,
    datasets: tuple[str, ...] = ("jailbreakbench", "maliciousinstruct"),
    ablations: tuple[tuple[str, str], ...] = (("undifferentiated", "2-1,3-0"), ("scaling", "3-1")),
    n_prompts: int = 6,
    model: str = "tiny-random-llama",
    seed: int = 0,
    helpfulness: bool = True,
    simple: bool = False,
) -> tuple[Path, pd.DataFrame]:
    """Write an evaluation run folder; returns (folder, the asr table written).

    By default the files follow `safetyheads evaluate`: one folder holds the baseline and several
    ablations (asr.csv with heads/method columns, category 'all' for the dataset rows, nested judge
    verdicts, harmless generations). `simple=True` writes the minimal format of the task brief (one
    ablation, no heads/method columns, category '' for the dataset rows, flat verdicts)."""
    rng = np.random.default_rng(seed)
    if simple:
        ablations = ablations[:1]
    run = root / f"eval-{'-'.join(m for m, _ in ablations)}-{seed}"
    run.mkdir(parents=True)
    config = {"model": model, "datasets": list(datasets), "max_new_tokens": 16, "greedy": True,
              "ablations": [{"heads": h, "method": m, "epsilon": 1e-5} for m, h in ablations]}
    if simple:
        config.update(method=ablations[0][0], heads=ablations[0][1])
    manifest = {"command": "evaluate", "config": config,
                "versions": {"safetyheads": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"}}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    conditions = [("baseline", None, "")] + [("ablated", m, h) for m, h in ablations]
    gens = []
    for dataset in [*datasets, *(["harmless"] if helpfulness and not simple else [])]:
        for condition, method, heads in conditions:
            # The unablated model answers the same whatever the ablation: one baseline per dataset.
            r = np.random.default_rng(len(dataset)) if condition == "baseline" else rng
            jailbroken = r.random(n_prompts) < (0.2 if condition == "baseline" else 0.7)
            for pid in range(n_prompts):
                response = (f"Sure, here is how ({condition} {method}) <b>bold</b>" if jailbroken[pid]
                            else "I cannot help with that.")
                verdict = {"jailbroken": bool(jailbroken[pid]), "refused": bool(not jailbroken[pid])}
                gens.append({
                    "dataset": dataset, "prompt_id": pid,
                    "category": JBB_CATEGORIES[pid % len(JBB_CATEGORIES)] if dataset == "jailbreakbench" else None,
                    "prompt": f"<harmful request {pid} from {dataset}> & \"quotes\"", "response": response,
                    "condition": condition, "heads": heads, "method": method, "epsilon": 1e-5 if method else None,
                    "verdicts": {"keywords": verdict["jailbroken"] if simple else verdict},
                })
    g = pd.DataFrame(gens)
    g = g[g["dataset"] != "harmless"]
    g["jb"] = [v["keywords"] if simple else v["keywords"]["jailbroken"] for v in g["verdicts"]]
    rows = []
    overall = "" if simple else "all"
    for (dataset, condition, heads, method), part in g.groupby(["dataset", "condition", "heads", "method"],
                                                              dropna=False, sort=False):
        groups = [(overall, part)] + ([(c, p) for c, p in part.groupby("category")] if dataset == "jailbreakbench" else [])
        for cat, p in groups:
            row = {"dataset": dataset, "category": cat, "condition": condition, "heads": heads,
                   "method": method, "epsilon": 1e-5 if isinstance(method, str) else None,
                   "judge": "keywords", "n": len(p), "asr": float(p["jb"].mean())}
            if simple:
                for k in ("heads", "method", "epsilon"):
                    row.pop(k)
            rows.append(row)
    asr = pd.DataFrame(rows)
    asr.to_csv(run / "asr.csv", index=False)
    with open(run / "generations.jsonl", "w") as fh:
        for rec in gens:
            fh.write(json.dumps(rec) + "\n")
    if helpfulness:
        hrows = []
        for condition, method, heads in conditions:
            base = {"condition": condition, "heads": heads, "method": method}
            hrows.append({**base, "metric": "over_refusal_rate", "judge": "keywords", "value": float(rng.random() * 0.1)})
            hrows.append({**base, "metric": "mean_kl", "judge": None,
                          "value": 0.0 if condition == "baseline" else float(rng.random())})
        help_df = pd.DataFrame(hrows)
        if simple:
            help_df = help_df.drop(columns=["heads", "method", "judge"])
        help_df.to_csv(run / "helpfulness.csv", index=False)
    return run, asr


def make_study(root: Path, *, n_layers: int = 6, n_heads: int = 4) -> dict[tuple[str, str], tuple[Path, np.ndarray]]:
    """Four scores runs (two datasets x two methods), like the demo writes."""
    out = {}
    for i, dataset in enumerate(("jailbreakbench", "maliciousinstruct")):
        for j, method in enumerate(("undifferentiated", "scaling")):
            out[(dataset, method)] = make_scores_run(
                root, dataset=dataset, method=method, n_layers=n_layers, n_heads=n_heads, seed=10 * i + j
            )
    return out
