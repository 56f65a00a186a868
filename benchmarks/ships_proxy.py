"""Can a cheaper screen stand in for the Ships screen? The hidden-state change as a proxy for Ships.

The Ships screen needs one backward pass per Fisher probe (8 by default). The Generalized Ships screen
measures the first-order change of the last-token final hidden states (the subspace rotation), with
1 + `subspace_probes` backward passes. This benchmark ranks heads for *Ships* by each estimate and
compares with the exact Ships map (mean KL over prompts, from one exact sweep):

- `ships screen` (the Ships screen itself, `--probes` eigen-probes);
- `ships screen 1+2` (1 eigen-probe + 2 random probes);
- `gships screen` (the fixed Generalized Ships screen, `--subspace-probes`) used as a Ships proxy;
- `gships screen, first term only` (subspace_probes=0: one backward pass) as a proxy;
- `exact gships` as a proxy (what a perfect hidden-state screen could at best give).

Spearman over heads, how many of the exact Ships top 10 each proxy's top 10 / top 40 hold, screen time.

    OMP_NUM_THREADS=2 python benchmarks/ships_proxy.py --model smollm2-135m-instruct --limit 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from safetyheads import engine, scores
from safetyheads import screen as S
from safetyheads.ablation import num_layers_heads
from safetyheads.config import SCREEN_PROBES, SUBSPACE_PROBES
from safetyheads.data import load_prompts
from safetyheads.models import load_model
from safetyheads.prompts import encode, format_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--methods", default="undifferentiated,scaling")
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--probes", type=int, default=SCREEN_PROBES)
    ap.add_argument("--subspace-probes", type=int, default=SUBSPACE_PROBES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ps = load_prompts(args.dataset, limit=args.limit)
    enc = encode(tok, format_prompts(tok, list(ps.prompts), "chat"), device=model.device)
    n_layers, n_heads = num_layers_heads(model)
    heads = [(a, b) for a in range(n_layers) for b in range(n_heads)]
    print(f"{args.model}: {len(heads)} heads, {len(ps.prompts)} {args.dataset} prompts (chat), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        cache = engine.prepare(model, enc)
        res = engine.sweep(cache, [[h] for h in heads], method, args.epsilon, want=("kl", "hidden"), progress=False)
        t_exact = time.perf_counter() - t0
        ships = res.kl.mean(1).numpy().reshape(n_layers, n_heads)  # [L, H] exact Ships, mean over prompts
        exact_gships = scores.generalized_ships_batch(res.clean_hidden, res.hidden, 1).reshape(n_layers, n_heads)
        truth = set(S.top_heads(ships, 10))

        def row(name: str, est: np.ndarray, seconds: float | None, n_backward: int | None) -> dict:
            """One proxy's agreement with the exact Ships map; `est` is [L, H]."""
            r = {"model": args.model, "method": method, "proxy": name, "prompts": len(ps.prompts),
                 "spearman_vs_exact_ships": float(spearmanr(est.ravel(), ships.ravel())[0]),
                 "exact_top10_in_top10": len(truth & set(S.top_heads(est, 10))),
                 "exact_top10_in_top40": len(truth & set(S.top_heads(est, 40))),
                 "screen_s": seconds, "n_backward": n_backward, "exact_s": t_exact,
                 "speedup_vs_exact": None if seconds is None else t_exact / seconds}
            print(json.dumps(r), flush=True)
            return r

        variants = [("ships screen", dict(targets=("ships",), probes=args.probes), "ships"),
                    ("ships screen 1+2", dict(targets=("ships",), probes=1, random_probes=2), "ships"),
                    ("gships screen", dict(targets=("gships",), subspace_probes=args.subspace_probes), "gships"),
                    ("gships screen, first term only", dict(targets=("gships",), subspace_probes=0), "gships")]
        for name, options, target in variants:
            t0 = time.perf_counter()
            scr = S.screen(model, enc, method, args.epsilon, batch_size=args.batch_size, progress=False, **options)
            seconds = time.perf_counter() - t0
            est = scr.head_scores(target).numpy()  # [L, H]
            rows.append(row(name, est, seconds, scr.n_backward))
        rows.append(row("exact gships", exact_gships, None, None))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
