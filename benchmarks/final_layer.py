"""The final layer's feed-forward on the last position only (`engine._last_position_only`) vs on
every position: sweep time for the heads of one layer, and the largest score difference.

    python benchmarks/final_layer.py --model qwen2.5-coder-0.5b-instruct --limit 20 --layers 12,22

Only the last position of the final layer is read (KL and hidden state); a head in layer l replays
L - l layers, so the saving is about 0.9 / (L - l) of its time: small for early heads, large for late ones.

Measured (2026-11-29, 2-core CPU, Qwen2.5-0.5B, 20 JailbreakBench prompts, 14 heads per layer; a
background job was paused; runs of the same sweep varied by up to 15% between invocations):

| layer | last position only s | every position s | speed-up | max abs ΔKL |
| --- | --- | --- | --- | --- |
| 12 | 28.1 | 29.1 | 1.04x | 0 |
| 22 | 6.8 | 7.8 | 1.15x | 0 |
| 12 | 28.5 | 29.8 | 1.05x | 0 |
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from safetyheads import engine
from safetyheads.data import load_prompts
from safetyheads.engine import prepare, sweep
from safetyheads.models import load_model
from safetyheads.prompts import encode, format_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dataset", default="jailbreakbench")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--layers", default="12,22")
    ap.add_argument("--method", default="undifferentiated")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu")
    prompts = load_prompts(args.dataset, limit=args.limit)
    enc = encode(loaded.tokenizer, format_prompts(loaded.tokenizer, list(prompts.prompts), "chat"))
    cache = prepare(loaded.model, enc)
    print(f"{args.model}, {len(prompts.prompts)} {args.dataset} prompts (chat), {args.method}, "
          f"torch threads {torch.get_num_threads()}")
    print("| layer | last position only s | every position s | speed-up | max abs ΔKL |")
    print("| --- | --- | --- | --- | --- |")
    real = engine._last_position_only
    sweep(cache, [[(0, 0)]], args.method, want=("kl",), progress=False)  # warm-up (allocator, kernels)
    for layer in (int(x) for x in args.layers.split(",")):
        configs = [[(layer, h)] for h in range(cache.n_heads)]
        times, kls = {}, {}
        for on in (False, True):
            engine._last_position_only = real if on else (lambda layer: contextlib.nullcontext())
            t = time.perf_counter()
            kls[on] = sweep(cache, configs, args.method, want=("kl",), progress=False).kl
            times[on] = time.perf_counter() - t
        engine._last_position_only = real
        print(f"| {layer} | {times[True]:.1f} | {times[False]:.1f} | {times[False] / times[True]:.2f}x | "
              f"{(kls[True] - kls[False]).abs().max().item():.1e} |", flush=True)


if __name__ == "__main__":
    main()
