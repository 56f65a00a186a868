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
    method: str = "undifferentiated",
    heads: str = "2-1,3-0",
    n_prompts: int = 6,
    model: str = "tiny-random-llama",
    seed: int = 0,
    helpfulness: bool = True,
) -> tuple[Path, pd.DataFrame]:
    """Write an evaluation run folder; returns (folder, the asr table written)."""
    rng = np.random.default_rng(seed)
    run = root / f"eval-{method}-{seed}"
    run.mkdir(parents=True)
    manifest = _manifest(model, ",".join(datasets), method, 6, 4, "evaluate", heads=heads, max_new_tokens=16)
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rows, gens = [], []
    for dataset in datasets:
        cats = JBB_CATEGORIES if dataset == "jailbreakbench" else [None]
        for condition in ("baseline", "ablated"):
            # The unablated model answers the same whatever the ablation: one baseline per dataset.
            r = np.random.default_rng(len(dataset)) if condition == "baseline" else rng
            refused = r.random(n_prompts) < (0.8 if condition == "baseline" else 0.3)
            for pid in range(n_prompts):
                prompt = f"<harmful request {pid} from {dataset}> & \"quotes\""
                response = "I cannot help with that." if refused[pid] else f"Sure, here is how ({condition}) <b>bold</b>"
                gens.append(
                    {
                        "dataset": dataset,
                        "prompt_id": pid,
                        "prompt": prompt,
                        "response": response,
                        "condition": condition,
                        "heads": [] if condition == "baseline" else heads,
                        "method": None if condition == "baseline" else method,
                        "epsilon": 1e-5,
                        "verdicts": {"keywords": bool(not refused[pid])},
                    }
                )
            rows.append(
                {"dataset": dataset, "category": "", "condition": condition, "judge": "keywords",
                 "n": n_prompts, "asr": float(np.mean(~refused))}
            )
            if dataset == "jailbreakbench":
                for cat in cats:
                    rows.append(
                        {"dataset": dataset, "category": cat, "condition": condition, "judge": "keywords",
                         "n": 10, "asr": float(r.integers(0, 11) / 10)}
                    )
    asr = pd.DataFrame(rows)
    asr.to_csv(run / "asr.csv", index=False)
    with open(run / "generations.jsonl", "w") as fh:
        for g in gens:
            fh.write(json.dumps(g) + "\n")
    if helpfulness:
        pd.DataFrame(
            [
                {"metric": "over_refusal_rate", "condition": "baseline", "value": float(rng.random() * 0.1)},
                {"metric": "over_refusal_rate", "condition": "ablated", "value": float(rng.random() * 0.1)},
                {"metric": "mean_kl", "condition": "ablated", "value": float(rng.random())},
                {"metric": "top1_agreement", "condition": "ablated", "value": float(rng.random())},
            ]
        ).to_csv(run / "helpfulness.csv", index=False)
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
