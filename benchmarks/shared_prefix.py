"""Shared-prefix replay on vs off: time of `engine.prepare` and `engine.sweep` and the largest
score difference, for every head of one layer (ablations starting there replay the layers above it).

    python benchmarks/shared_prefix.py --model qwen2.5-coder-0.5b-instruct --limit 20 --layer 12

Chat templates put the same system header in front of every prompt (Qwen2.5: 24 of ~44 tokens on
JailbreakBench); with sharing on, the sweep replays it once per head instead of once per (prompt, head).
"""

from __future__ import annotations

import argparse
import time

import torch

from safetyheads.data import load_prompts
from safetyheads.engine import prepare, sweep
from safetyheads.models import load_model
from safetyheads.prompts import encode, format_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--method", default="undifferentiated")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu")
    prompts = load_prompts(args.dataset, limit=args.limit)
    enc = encode(loaded.tokenizer, format_prompts(loaded.tokenizer, list(prompts.prompts), "chat"))
    results = {}
    print(f"{args.model}, {len(prompts.prompts)} {args.dataset} prompts (chat), layer {args.layer}, "
          f"{args.method}, torch threads {torch.get_num_threads()}")
    print("| sharing | shared tokens | prepare s | sweep s | ms per (prompt, head) |")
    print("| --- | --- | --- | --- | --- |")
    for share in (True, False):
        t = time.perf_counter()
        cache = prepare(loaded.model, enc, share_prefix=share)
        t_prepare = time.perf_counter() - t
        configs = [[(args.layer, h)] for h in range(cache.n_heads)]
        t = time.perf_counter()
        results[share] = sweep(cache, configs, args.method, want=("kl", "hidden"), progress=False)
        t_sweep = time.perf_counter() - t
        per = 1000 * t_sweep / (len(configs) * len(prompts.prompts))
        print(f"| {'on' if share else 'off'} | {cache.prefix_length} | {t_prepare:.1f} | {t_sweep:.1f} | {per:.1f} |",
              flush=True)
    a, b = results[True], results[False]
    print(f"max |ΔKL| {(a.kl - b.kl).abs().max().item():.2e}, max |Δhidden| {(a.hidden - b.hidden).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
