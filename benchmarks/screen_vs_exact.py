"""Screen vs exact scores (issue 7): accuracy and time of gradient screening, `auto` mode and the
exact sweep, in one run, for every head of a model.

    python benchmarks/screen_vs_exact.py --model smollm2-135m-instruct --dataset jailbreakbench --limit 20

For each ablation method: the exact sweep (engine.prepare + engine.sweep over all single heads,
KL and hidden states from the same passes) gives the exact Ships (mean KL over prompts) and
Generalized Ships (rank 1) of every head; the screen estimates each target; auto mode screens and
then scores its top K exactly. Reported per (method, target): Spearman of screen vs exact over
heads, recall of the exact top 10 within the screen's top 10, 20 and 40, the overlap of auto's top
10 with the exact top 10, and the times with the speed-ups over exact. Writes a JSON next to the
printed markdown table when --json is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from safetyheads import engine, scores
from safetyheads.config import SCREEN_PROBES, SCREEN_RANDOM_PROBES, SUBSPACE_PROBES
from safetyheads import screen as S
from safetyheads.ablation import num_layers_heads
from safetyheads.data import load_prompts
from safetyheads.models import load_model
from safetyheads.prompts import encode, format_prompts


def _top(values: np.ndarray, heads: list, k: int) -> set:
    order = np.lexsort((np.arange(len(values)), -values))  # descending, ties by head order
    return {heads[i] for i in order[:k]}


def _variant_row(model, method, target, variant, result, heads, exact, truth10, t_var, t_exact, **extra) -> dict:
    """A screen variant's accuracy against the exact scores (screen time only)."""
    est = np.array([float(result.head_scores(target)[a, b]) for a, b in heads])
    return {"model": model, "method": method, "target": f"{target}[{variant}]",
            "spearman": float(spearmanr(est, exact[target])[0]),
            "recall10_in_top10": len(truth10 & _top(est, heads, 10)),
            "recall10_in_top20": len(truth10 & _top(est, heads, 20)),
            "recall10_in_top40": len(truth10 & _top(est, heads, 40)),
            "auto_top10_match": "-", "t_screen_s": t_var, "t_auto_s": float("nan"),
            "t_exact_s": t_exact, "speedup_screen": t_exact / t_var, "speedup_auto": float("nan"), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--format", default="chat")
    ap.add_argument("--methods", default="undifferentiated,scaling")
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--probes", type=int, default=SCREEN_PROBES)
    ap.add_argument("--random-probes", type=int, default=SCREEN_RANDOM_PROBES)
    ap.add_argument("--ships-variants", default="1+0,8+0",
                    help="extra ships screens to compare, EIGEN+RANDOM probes each (screen time only)")
    ap.add_argument("--subspace-probes", type=int, default=SUBSPACE_PROBES)
    ap.add_argument("--gships-variants", default="0,full",
                    help="extra gships screens to compare: subspace probe budgets, 0 = the old first-term-only "
                         "shortcut, full = every direction exact (screen time only)")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8, help="screen prompts per forward/backward")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ps = load_prompts(args.dataset, limit=args.limit)
    enc = encode(tok, format_prompts(tok, list(ps.prompts), args.format), device=model.device)
    n_layers, n_heads = num_layers_heads(model)
    heads = [(a, b) for a in range(n_layers) for b in range(n_heads)]
    print(f"{args.model}: {n_layers}x{n_heads} heads, {len(ps.prompts)} {args.dataset} prompts ({args.format}), "
          f"tokens {tuple(enc.input_ids.shape)}, torch threads {torch.get_num_threads()}, {platform.processor()}",
          flush=True)
    # warm-up, untimed: first-call allocations and thread pools would otherwise fall on whichever
    # approach runs first (the exact sweep, then the first screen with autograd)
    warm = enc[:2]
    engine.sweep(engine.prepare(model, warm), [[h] for h in heads[-n_heads:]], "scaling", 0.5, progress=False)
    S.screen(model, warm, "scaling", 0.5, probes=2, random_probes=1, progress=False)
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        cache = engine.prepare(model, enc)
        res = engine.sweep(cache, [[h] for h in heads], method, args.epsilon, want=("kl", "hidden"), progress=True)
        exact_angle = scores.generalized_ships_batch(res.clean_hidden, res.hidden, 1)  # [C] degrees
        t_exact = time.perf_counter() - t0
        exact = {"ships": res.kl.mean(1).numpy(), "gships": exact_angle}
        print(f"[{method}] exact sweep {t_exact:.1f}s", flush=True)
        for target in ("ships", "gships"):
            t0 = time.perf_counter()
            scr = S.screen(model, enc, method, args.epsilon, targets=(target,), probes=args.probes,
                           random_probes=args.random_probes, subspace_probes=args.subspace_probes,
                           batch_size=args.batch_size, progress=False)
            t_screen = time.perf_counter() - t0
            est = np.array([float(scr.head_scores(target)[a, b]) for a, b in heads])
            t0 = time.perf_counter()
            auto = S.auto_scores(model, enc, method, args.epsilon, target=target, top_k=args.top_k,
                                 probes=args.probes, random_probes=args.random_probes,
                                 subspace_probes=args.subspace_probes,
                                 batch_size=args.batch_size, progress=False)
            t_auto = time.perf_counter() - t0
            auto_vals = auto.exact_kl.mean(1).numpy() if target == "ships" else auto.exact_angle
            truth10 = _top(exact[target], heads, 10)
            row = {
                "model": args.model, "method": method, "target": target, "prompts": len(ps.prompts),
                "spearman": float(spearmanr(est, exact[target])[0]),
                "recall10_in_top10": len(truth10 & _top(est, heads, 10)),
                "recall10_in_top20": len(truth10 & _top(est, heads, 20)),
                "recall10_in_top40": len(truth10 & _top(est, heads, 40)),
                "auto_top10_match": len(truth10 & _top(auto_vals, auto.heads, 10)),
                "t_screen_s": t_screen, "t_auto_s": t_auto, "t_exact_s": t_exact,
                "speedup_screen": t_exact / t_screen, "speedup_auto": t_exact / t_auto,
                "n_backward": scr.n_backward, "n_forward": scr.n_forward,
            }
            if target == "ships":
                per = np.stack([scr.ships[:, a, b].numpy() for a, b in heads])  # [C, P]
                row["spearman_prompt_head"] = float(spearmanr(per.ravel(), res.kl.numpy().ravel())[0])
                row["fisher_captured_mean"] = float(scr.fisher_captured.mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
            if target == "gships":
                for variant in filter(None, args.gships_variants.split(",")):
                    kw = {"full_subspace": True} if variant == "full" else {"subspace_probes": int(variant)}
                    t0 = time.perf_counter()
                    var = S.screen(model, enc, method, args.epsilon, targets=("gships",),
                                   batch_size=args.batch_size, progress=False, **kw)
                    t_var = time.perf_counter() - t0
                    vrow = _variant_row(args.model, method, "gships", variant, var, heads, exact, truth10, t_var,
                                        t_exact, n_backward=var.n_backward)
                    rows.append(vrow)
                    print(json.dumps(vrow), flush=True)
            if target != "ships":
                continue
            for variant in filter(None, args.ships_variants.split(",")):
                eig, rnd = (int(x) for x in variant.split("+"))
                t0 = time.perf_counter()
                var = S.screen(model, enc, method, args.epsilon, targets=("ships",), probes=eig, random_probes=rnd,
                               batch_size=args.batch_size, progress=False)
                t_var = time.perf_counter() - t0
                vrow = _variant_row(args.model, method, "ships", variant, var, heads, exact, truth10, t_var, t_exact,
                                    fisher_captured_mean=float(var.fisher_captured.mean()))
                rows.append(vrow)
                print(json.dumps(vrow), flush=True)
    cols = ["method", "target", "spearman", "recall10_in_top10", "recall10_in_top20", "recall10_in_top40",
            "auto_top10_match", "t_screen_s", "t_auto_s", "t_exact_s", "speedup_screen", "speedup_auto"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
