"""Does bfloat16 change which heads matter? Generalized Ships (and Ships) over all heads of a real
model, computed once with float32 weights/activations and once with bfloat16, compared by Spearman
rank correlation and top-10 overlap.

    python benchmarks/bf16_vs_fp32.py --model smollm2-135m-instruct --dataset maliciousinstruct --limit 20

The engine keeps log-softmax, KL and hidden states in float32 whatever the model dtype and scores.py
does the SVD in float64, so the only difference measured here is the bf16 forward pass itself.
Issue 8 expects Spearman >= 0.99 for Generalized Ships.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr


def run(spec: str, dtype: str, args) -> dict:
    from safetyheads import ablation, engine, scores
    from safetyheads.data import load_prompts
    from safetyheads.models import load_model
    from safetyheads.prompts import encode, format_prompts

    t0 = time.perf_counter()
    loaded = load_model(spec, device=args.device, dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    n_layers, n_heads = ablation.num_layers_heads(model)
    prompts = load_prompts(args.dataset, limit=args.limit)
    encoded = encode(tok, format_prompts(tok, prompts.prompts, args.format), device=model.device)
    configs = [[(layer, head)] for layer in range(n_layers) for head in range(n_heads)]
    cache = engine.prepare(model, encoded)
    result = engine.sweep(cache, configs, args.method, args.epsilon, want=("kl", "hidden"), progress=sys.stderr.isatty())
    # The engine promises float32 outputs whatever the model dtype: check rather than assume.
    dtypes = {"clean_logprobs": str(result.clean_logprobs.dtype), "clean_hidden": str(result.clean_hidden.dtype),
              "hidden": str(result.hidden.dtype), "kl": str(result.kl.dtype)}
    gships = scores.generalized_ships_batch(result.clean_hidden, result.hidden, args.rank)      # [C] degrees
    ships = result.kl.double().mean(dim=1).numpy()                                               # [C] mean KL
    return {"heads": [c[0] for c in configs], "gships": gships, "ships": ships, "dtypes": dtypes,
            "seconds": time.perf_counter() - t0, "model_dtype": str(next(model.parameters()).dtype)}


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> int:
    return len(set(np.argsort(-a)[:k].tolist()) & set(np.argsort(-b)[:k].tolist()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="maliciousinstruct")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--format", default="chat")
    ap.add_argument("--method", default="undifferentiated")
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    ref = run(args.model, "float32", args)
    low = run(args.model, "bfloat16", args)
    out = {"model": args.model, "dataset": args.dataset, "limit": args.limit, "format": args.format,
           "method": args.method, "rank": args.rank, "heads": [list(h) for h in ref["heads"]]}
    for key in ("gships", "ships"):
        rho = float(spearmanr(ref[key], low[key]).statistic)
        overlap = top_overlap(ref[key], low[key])
        # Most heads barely matter; their scores sit at bf16's noise floor and their order is
        # noise. The ranking that matters is that of the heads that do: Spearman over the top half
        # and top 50 (by float32 score) says whether bf16 keeps it.
        order = np.argsort(-ref[key])
        top_half, top50 = order[: len(order) // 2], order[:50]
        out[key] = {"spearman": rho, "top10_overlap": overlap,
                    "spearman_top_half": float(spearmanr(ref[key][top_half], low[key][top_half]).statistic),
                    "spearman_top50": float(spearmanr(ref[key][top50], low[key][top50]).statistic),
                    "median_float32": float(np.median(ref[key])),
                    "median_abs_diff": float(np.median(np.abs(ref[key] - low[key]))),
                    "max_abs_diff": float(np.max(np.abs(ref[key] - low[key]))),
                    "float32": ref[key].tolist(), "bfloat16": low[key].tolist()}
        top_ref = [f"{ref['heads'][i][0]}-{ref['heads'][i][1]}" for i in np.argsort(-ref[key])[:10]]
        top_low = [f"{low['heads'][i][0]}-{low['heads'][i][1]}" for i in np.argsort(-low[key])[:10]]
        o = out[key]
        print(f"{key}: Spearman {rho:.4f} (top half {o['spearman_top_half']:.4f}, top 50 {o['spearman_top50']:.4f}), "
              f"top-10 overlap {overlap}/10, median |diff| {o['median_abs_diff']:.3g} vs median score "
              f"{o['median_float32']:.3g}, max |diff| {o['max_abs_diff']:.3g}")
        print(f"  float32 top-10 {top_ref}\n  bfloat16 top-10 {top_low}")
    print(f"engine output dtypes with a {low['model_dtype']} model: {low['dtypes']}")
    print(f"time: float32 {ref['seconds']:.0f} s, bfloat16 {low['seconds']:.0f} s")
    out["output_dtypes_bf16"] = low["dtypes"]
    out["seconds"] = {"float32": ref["seconds"], "bfloat16": low["seconds"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
