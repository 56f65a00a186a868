"""Batched multi-condition generation vs one `generate` call per condition: new tokens per second.

    .venv/bin/python benchmarks/batched_generation.py --threads 2 --conditions 8 --prompts 16 --max-new-tokens 64

C conditions (the unablated model and C - 1 random 3-head ablations, alternating undifferentiated
and scaling, seeded) x P chat-formatted prompts of a dataset, greedy. "per condition": one
`generate_responses` call per condition with all P prompts in one batch (what `evaluate` did before
issue 16). "batched": `generate_conditions`, rows = condition x prompt, at most --max-rows rows per
`generate` call (default C x P: one call). New tokens are the answer tokens kept (up to the first
stop token), the same in both since the outputs must be identical token for token: the script
exits 1 when any answer differs. Prints a Markdown row and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from safetyheads.data import load_prompts
from safetyheads.evaluate import random_heads
from safetyheads.generation import Condition, generate_conditions, generate_responses
from safetyheads.models import load_model
from safetyheads.ablation import num_layers_heads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--conditions", type=int, default=8, help="C, the baseline included (default 8)")
    ap.add_argument("--prompts", type=int, default=16, help="P prompts of the dataset (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-rows", type=int, default=None, help="rows per batched call (default C x P)")
    ap.add_argument("--heads", type=int, default=3, help="heads per ablated condition (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random head draws")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompts = list(load_prompts(args.dataset, limit=args.prompts).prompts)
    n_layers, n_heads = num_layers_heads(model)
    methods = ("undifferentiated", "scaling")
    conditions = [None] + [Condition(random_heads(n_layers, n_heads, args.heads, d, args.seed), methods[d % 2])
                           for d in range(1, args.conditions)]
    max_rows = args.max_rows or len(conditions) * len(prompts)
    print(f"{args.model}: {len(conditions)} conditions x {len(prompts)} {args.dataset} prompts (chat), greedy, "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, max rows {max_rows}", flush=True)

    generate_responses(model, tok, prompts[:1], max_new_tokens=2, progress=False)  # warm-up

    t = time.perf_counter()
    per = [generate_responses(model, tok, prompts, heads=c.heads if c else (), method=c.method if c else
                              "undifferentiated", max_new_tokens=args.max_new_tokens, batch_size=len(prompts),
                              progress=False).token_ids for c in conditions]
    t_per = time.perf_counter() - t
    t = time.perf_counter()
    batched = [g.token_ids for g in generate_conditions(model, tok, prompts, conditions, max_new_tokens=args.max_new_tokens,
                                                         max_rows=max_rows)]
    t_batched = time.perf_counter() - t

    tokens = sum(len(ids) for answers in per for ids in answers)
    differ = [(c, p) for c in range(len(conditions)) for p in range(len(prompts)) if per[c][p] != batched[c][p]]
    result = {"model": args.model, "conditions": len(conditions), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "max_rows": max_rows, "threads": torch.get_num_threads(),
              "new_tokens": tokens, "per_condition_s": t_per, "batched_s": t_batched,
              "per_condition_tok_s": tokens / t_per, "batched_tok_s": tokens / t_batched,
              "speedup": t_per / t_batched, "answers_differing": len(differ)}
    print("| C | P | new tokens | per condition s (tok/s) | batched s (tok/s) | speed-up | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(conditions)} | {len(prompts)} | {tokens} | {t_per:.1f} ({tokens / t_per:.1f}) | "
          f"{t_batched:.1f} ({tokens / t_batched:.1f}) | {t_per / t_batched:.2f}x | "
          f"{'yes' if not differ else f'NO: {len(differ)} answers differ'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if differ:
        c, p = differ[0]
        print(f"first difference: condition {c} ({conditions[c]}), prompt {p}: {per[c][p]} vs {batched[c][p]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
