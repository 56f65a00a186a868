"""Sweep engine vs a naive loop written the way the reference implementation works.

Task (issue 3, acceptance 6): SmolLM2-135M-Instruct, the first 5 MaliciousInstruct prompts as raw
text, every head, `undifferentiated` with ε=1e-5: Ships = KL(p_clean || p_ablated) at the last
position for each (prompt, head).

- naive: like the reference's `SHIPS.get_ships`: per prompt, tokenize alone; per head, one full
  forward (all layers, logits at every position) under `ablated()`, softmax of the last logits,
  KL with the reference's +1e-12 smoothing.
- engine: `prepare` once + `sweep` over all single-head configurations.

Prints a table and writes JSON (`--json`). The floor is the FLOPs each approach has to do divided
by the FLOP rate of a large matmul measured on this machine, in this process.

    python benchmarks/engine_vs_naive.py --json bench.json [--naive-every 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from safetyheads.ablation import ablated, decoder_layers, num_layers_heads, text_config
from safetyheads.data import load_prompts
from safetyheads.engine import prepare, single_head_configs, sweep
from safetyheads.models import load_model
from safetyheads.prompts import encode


def matmul_gflops(d: int, inter: int, rows: int = 2048, repeats: int = 10) -> float:
    """FLOP rate of a float32 [rows, d] x [d, inter] product, the shape of an MLP projection."""
    a, b = torch.randn(rows, d), torch.randn(d, inter)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * d * inter * repeats / (time.perf_counter() - t) / 1e9


def layer_macs_per_token(model) -> int:
    """Multiply-adds of one decoder layer's linear maps for one token."""
    layer = decoder_layers(model)[0]
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))


def flops(model, lengths: list[int]) -> dict:
    """FLOPs of the two approaches for every (prompt, head)."""
    config = text_config(model)
    L, H = num_layers_heads(model)
    D, V = int(config.hidden_size), int(config.vocab_size)
    hd = int(getattr(config, "head_dim", None) or D // H)
    per_layer = layer_macs_per_token(model)
    naive = engine = 0
    for T in lengths:
        attn = H * hd * T * (T + 1)  # QK^T and AV over the causal triangle (multiply-adds, whole sequence)
        layer = per_layer * T + attn
        naive += L * H * (L * layer + V * D * T)  # all layers, LM head at every position
        engine += H * sum((L - l) * layer for l in range(L)) + L * H * V * D  # layers >= l, LM head at the last
    return {"naive": 2.0 * naive, "engine": 2.0 * engine}


def naive_loop(model, tokenizer, texts, heads, method, epsilon):
    """[P, len(heads)] KL, one prompt and one head per full forward pass (the reference's way)."""
    scores = torch.zeros(len(texts), len(heads), dtype=torch.float64)
    with torch.no_grad():
        for p, text in enumerate(texts):
            inputs = tokenizer(text, return_tensors="pt")
            base = torch.softmax(model(**inputs).logits[:, -1, :], dim=-1)
            for j, head in enumerate(heads):
                with ablated(model, [head], method, epsilon):
                    logits = model(**inputs).logits  # [1, T, V]: every position, as the reference does
                now = torch.softmax(logits[:, -1, :], dim=-1)
                base_s, now_s = base + 1e-12, now + 1e-12
                scores[p, j] = torch.sum(base_s * torch.log(base_s / now_s)).item()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--method", default="undifferentiated")
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--naive-every", type=int, default=1,
                    help="time the naive loop on every k-th head only (its time per (prompt, head) is the same)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    texts = load_prompts("maliciousinstruct", limit=args.prompts).prompts  # raw: no template
    L, H = num_layers_heads(model)
    configs = single_head_configs(L, H)
    heads = [c[0] for c in configs]
    lengths = [len(tok(t).input_ids) for t in texts]

    t0 = time.perf_counter()
    cache = prepare(model, encode(tok, texts))
    result = sweep(cache, configs, args.method, args.epsilon, want=("kl",), progress=False)
    t_engine = time.perf_counter() - t0
    engine_kl = result.kl.T  # [P, L*H]

    sample = list(range(0, len(heads), args.naive_every))
    t0 = time.perf_counter()
    naive_kl = naive_loop(model, tok, texts, [heads[j] for j in sample], args.method, args.epsilon)
    t_naive = time.perf_counter() - t0

    ours = engine_kl[:, sample]
    diff = (ours - naive_kl).abs()
    rel = diff / naive_kl.abs().clamp_min(1e-12)
    units_engine, units_naive = len(texts) * len(heads), len(texts) * len(sample)
    per_engine, per_naive = t_engine / units_engine, t_naive / units_naive
    fl = flops(model, lengths)
    rate = matmul_gflops(int(text_config(model).hidden_size), int(text_config(model).intermediate_size))
    floor_engine = fl["engine"] / (rate * 1e9) / units_engine
    floor_naive = fl["naive"] / (rate * 1e9) / units_engine
    out = {
        "model": args.model, "prompts": len(texts), "prompt_tokens": lengths, "heads": len(heads),
        "method": args.method, "epsilon": args.epsilon, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "naive_heads_timed": len(sample),
        "engine_s": t_engine, "naive_s": t_naive,
        "engine_ms_per_prompt_head": 1e3 * per_engine, "naive_ms_per_prompt_head": 1e3 * per_naive,
        "speedup": per_naive / per_engine,
        "engine_batch_size": result.batch_size,
        "max_abs_diff": float(diff.max()), "max_rel_diff_where_kl_ge_1e-2": float(rel[naive_kl >= 1e-2].max())
        if (naive_kl >= 1e-2).any() else 0.0,
        "matmul_gflops": rate,
        "engine_gflop_per_prompt_head": fl["engine"] / units_engine / 1e9,
        "naive_gflop_per_prompt_head": fl["naive"] / units_engine / 1e9,
        "engine_floor_ms_per_prompt_head": 1e3 * floor_engine,
        "naive_floor_ms_per_prompt_head": 1e3 * floor_naive,
        "engine_fraction_of_floor": floor_engine / per_engine,
    }
    rows = [
        ("", "naive (reference way)", "sweep engine"),
        ("ms per (prompt, head)", f"{out['naive_ms_per_prompt_head']:.2f}", f"{out['engine_ms_per_prompt_head']:.2f}"),
        ("GFLOP per (prompt, head)", f"{out['naive_gflop_per_prompt_head']:.3f}", f"{out['engine_gflop_per_prompt_head']:.3f}"),
        ("floor ms (FLOPs / matmul rate)", f"{out['naive_floor_ms_per_prompt_head']:.2f}", f"{out['engine_floor_ms_per_prompt_head']:.2f}"),
    ]
    print(f"{args.model}, {len(texts)} prompts ({lengths} tokens), {len(heads)} heads, {args.method} eps={args.epsilon}, "
          f"{out['threads']} threads, matmul {rate:.1f} GFLOP/s")
    for r in rows:
        print(f"{r[0]:<32}{r[1]:>24}{r[2]:>16}")
    print(f"speedup {out['speedup']:.1f}x; engine at {100 * out['engine_fraction_of_floor']:.0f}% of its FLOP floor; "
          f"scores: max |diff| {out['max_abs_diff']:.2e}, max rel diff (KL >= 1e-2) {out['max_rel_diff_where_kl_ge_1e-2']:.2e}")
    assert out["max_abs_diff"] < 1e-4 or out["max_rel_diff_where_kl_ge_1e-2"] < 1e-2, "engine and naive scores disagree"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
