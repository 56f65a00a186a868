"""Sweep engine (and the whole `safetyheads ships` command) vs a plain Hugging Face loop.

Task: SmolLM2-135M-Instruct, the first 5 prompts of a dataset (default AdvBench) as raw text, every
head, `undifferentiated` (or `scaling`) with ε=1e-5: Ships = KL(p_clean || p_ablated) at the last
position for each (prompt, head).

- naive: the loop a user writes without this package, the way the reference implementation works:
  the stock model with its stock attention (sdpa), a forward hook that scales the head's slice of
  `q_proj`'s output by ε (undifferentiated; RoPE is linear, so this equals scaling the rotated
  query) or a forward pre-hook that scales the head's slice of `o_proj`'s input (scaling); per
  prompt, tokenized alone; per head, one full forward (logits at every position, as
  `model(**inputs)` gives them), softmax of the last logits, KL with the reference's +1e-12 smoothing.
  `naive_last_logit` is the same loop asking for the last position's logits only (`logits_to_keep=1`).
- engine: `prepare` once + ONE `sweep` over all single-head configurations.
- cli: `safetyheads ships` on the same prompts in a subprocess (run folder, chunks, files), its
  manifest's `compute_seconds` (model loading excluded) and its wall time.
- `--repeats N` times the engine and the CLI alternately N times and uses the medians (the naive
  loops run once: their minutes dwarf the drift).

Prints a table and writes JSON (`--json`). The floor is the FLOPs each approach has to do divided
by the FLOP rate of a large matmul measured on this machine, in this process.

    python benchmarks/engine_vs_naive.py --json bench.json [--naive-every 1] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from safetyheads.ablation import attention_module, decoder_layers, num_layers_heads, text_config
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


def _head_hook(model, head, method, epsilon):
    """A plain PyTorch hook on the stock model: the head's slice of q_proj's output (undifferentiated)
    or of o_proj's input (scaling) times epsilon. Returns the hook handle."""
    layer, h = head
    attn = attention_module(decoder_layers(model)[layer])
    hd = attn.head_dim
    cols = slice(h * hd, (h + 1) * hd)
    if method == "undifferentiated":
        def scale_query(module, args, out):
            out[..., cols] *= epsilon
            return out
        return attn.q_proj.register_forward_hook(scale_query)
    if method == "scaling":
        def scale_output(module, args):
            x = args[0].clone()
            x[..., cols] *= epsilon
            return (x,)
        return attn.o_proj.register_forward_pre_hook(scale_output)
    raise SystemExit(f"the plain baseline has no hook for {method!r}")


def naive_loop(model, tokenizer, texts, heads, method, epsilon, last_logit_only=False):
    """[P, len(heads)] KL, one prompt and one head per full forward pass of the stock model."""
    extra = {"logits_to_keep": 1} if last_logit_only else {}
    scores = torch.zeros(len(texts), len(heads), dtype=torch.float64)
    with torch.no_grad():
        for p, text in enumerate(texts):
            inputs = tokenizer(text, return_tensors="pt")
            base = torch.softmax(model(**inputs, **extra).logits[:, -1, :], dim=-1)
            for j, head in enumerate(heads):
                handle = _head_hook(model, head, method, epsilon)
                try:
                    logits = model(**inputs, **extra).logits  # [1, T, V] (or [1, 1, V])
                finally:
                    handle.remove()
                now = torch.softmax(logits[:, -1, :], dim=-1)
                base_s, now_s = base + 1e-12, now + 1e-12
                scores[p, j] = torch.sum(base_s * torch.log(base_s / now_s)).item()
    return scores


def cli_run(args) -> dict:
    """`safetyheads ships` on the same prompts, in a subprocess: compute_seconds and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.txt"
        data.write_text("\n".join(load_prompts(args.dataset, limit=args.prompts).prompts) + "\n")
        out = Path(tmp) / "run"
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "safetyheads", "ships", "--model", args.model, "--dataset", str(data),
               "--format", "raw", "--method", args.method, "--epsilon", str(args.epsilon), "--device", "cpu",
               "--out", str(out), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
        import pandas as pd
        table = pd.read_parquet(out / "ships.parquet")
    return {"compute_s": float(manifest["compute_seconds"]), "wall_s": wall, "table": table,
            "chunks": len(manifest.get("chunks_per_rank") or []) or None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dataset", default="advbench")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--method", default="undifferentiated", help="undifferentiated or scaling")
    ap.add_argument("--epsilon", type=float, default=1e-5)
    ap.add_argument("--naive-every", type=int, default=1,
                    help="time the naive loops on every k-th head only (their time per (prompt, head) is the same)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-cli", action="store_true", help="skip the `safetyheads ships` subprocess")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time the engine and the CLI alternately this many times; ratios use the medians")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    texts = load_prompts(args.dataset, limit=args.prompts).prompts  # raw: no template
    L, H = num_layers_heads(model)
    configs = single_head_configs(L, H)
    heads = [c[0] for c in configs]
    lengths = [len(tok(t).input_ids) for t in texts]
    units = len(texts) * len(heads)

    # warm-up (first-call allocations, thread pools), untimed, so the first timed approach is not penalised
    sweep(prepare(model, encode(tok, texts[:1])), configs[-H:], args.method, args.epsilon, want=("kl",), progress=False)
    naive_loop(model, tok, texts[:1], heads[-1:], args.method, args.epsilon)

    def time_engine():
        t0 = time.perf_counter()
        cache = prepare(model, encode(tok, texts))
        result = sweep(cache, configs, args.method, args.epsilon, want=("kl",), progress=False)
        return time.perf_counter() - t0, result

    engine_times = []
    t, result = time_engine()
    engine_times.append(t)
    engine_kl = result.kl.T  # [P, L*H]

    sample = list(range(0, len(heads), args.naive_every))
    units_naive = len(texts) * len(sample)
    t0 = time.perf_counter()
    naive_kl = naive_loop(model, tok, texts, [heads[j] for j in sample], args.method, args.epsilon)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive_last = naive_loop(model, tok, texts, [heads[j] for j in sample], args.method, args.epsilon,
                            last_logit_only=True)
    t_naive_last = time.perf_counter() - t0

    # The engine and the CLI alternately, `--repeats` times: this machine's speed drifts by more than the
    # CLI's overhead, so the ratio is taken between medians of interleaved samples.
    cli, cli_times, cli_walls = None, [], []
    for r in range(args.repeats):
        if r:
            engine_times.append(time_engine()[0])
        if not args.no_cli:
            cli = cli_run(args)  # the last run's table is compared with the engine's scores below
            cli_times.append(cli["compute_s"])
            cli_walls.append(cli["wall_s"])
    t_engine = statistics.median(engine_times)
    if cli is not None:
        cli.update(compute_s=statistics.median(cli_times), wall_s=statistics.median(cli_walls))

    ours = engine_kl[:, sample]
    diff = (ours - naive_kl).abs()
    rel = diff / naive_kl.abs().clamp_min(1e-12)
    per_engine, per_naive, per_last = t_engine / units, t_naive / units_naive, t_naive_last / units_naive
    fl = flops(model, lengths)
    rate = matmul_gflops(int(text_config(model).hidden_size), int(text_config(model).intermediate_size))
    floor_engine = fl["engine"] / (rate * 1e9) / units
    floor_naive = fl["naive"] / (rate * 1e9) / units
    out = {
        "model": args.model, "dataset": args.dataset, "prompts": len(texts), "prompt_tokens": lengths,
        "heads": len(heads), "method": args.method, "epsilon": args.epsilon, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "naive_heads_timed": len(sample),
        "repeats": args.repeats, "engine_s_samples": engine_times, "cli_compute_s_samples": cli_times,
        "engine_s": t_engine, "naive_s": t_naive, "naive_last_logit_s": t_naive_last,
        "engine_ms_per_prompt_head": 1e3 * per_engine, "naive_ms_per_prompt_head": 1e3 * per_naive,
        "naive_last_logit_ms_per_prompt_head": 1e3 * per_last,
        "speedup": per_naive / per_engine, "speedup_vs_last_logit_naive": per_last / per_engine,
        "engine_batch_size": result.batch_size,
        "max_abs_diff": float(diff.max()), "max_rel_diff_where_kl_ge_1e-2": float(rel[naive_kl >= 1e-2].max())
        if (naive_kl >= 1e-2).any() else 0.0,
        "max_abs_diff_last_logit_naive": float((naive_last - naive_kl).abs().max()),
        "matmul_gflops": rate,
        "engine_gflop_per_prompt_head": fl["engine"] / units / 1e9,
        "naive_gflop_per_prompt_head": fl["naive"] / units / 1e9,
        "engine_floor_ms_per_prompt_head": 1e3 * floor_engine,
        "naive_floor_ms_per_prompt_head": 1e3 * floor_naive,
        "engine_fraction_of_floor": floor_engine / per_engine,
    }
    if cli is not None:
        table = cli.pop("table")
        cli_kl = torch.tensor(table.sort_values(["prompt_id", "layer", "head"])["score"].to_numpy()).view(len(texts), -1)
        out.update({"cli_compute_s": cli["compute_s"], "cli_wall_s": cli["wall_s"],
                    "cli_ms_per_prompt_head": 1e3 * cli["compute_s"] / units,
                    "cli_speedup": per_naive / (cli["compute_s"] / units),
                    "cli_compute_over_engine": cli["compute_s"] / t_engine,
                    "cli_max_abs_diff_vs_engine": float((cli_kl - engine_kl).abs().max())})
    rows = [
        ("", "naive (plain HF)", "naive, last logit", "sweep engine") + (("ships CLI",) if cli else ()),
        ("ms per (prompt, head)", f"{out['naive_ms_per_prompt_head']:.2f}", f"{out['naive_last_logit_ms_per_prompt_head']:.2f}",
         f"{out['engine_ms_per_prompt_head']:.2f}") + ((f"{out['cli_ms_per_prompt_head']:.2f}",) if cli else ()),
        ("speed-up vs naive", "1.0", f"{per_naive / per_last:.1f}", f"{out['speedup']:.1f}")
        + ((f"{out['cli_speedup']:.1f}",) if cli else ()),
        ("GFLOP per (prompt, head)", f"{out['naive_gflop_per_prompt_head']:.3f}", "", f"{out['engine_gflop_per_prompt_head']:.3f}"),
        ("floor ms (FLOPs / matmul rate)", f"{out['naive_floor_ms_per_prompt_head']:.2f}", "", f"{out['engine_floor_ms_per_prompt_head']:.2f}"),
    ]
    print(f"{args.model}, {len(texts)} {args.dataset} prompts ({lengths} tokens), {len(heads)} heads, {args.method} "
          f"eps={args.epsilon}, {out['threads']} threads, matmul {rate:.1f} GFLOP/s")
    for r in rows:
        print(f"{r[0]:<32}" + "".join(f"{c:>20}" for c in r[1:]))
    print(f"engine at {100 * out['engine_fraction_of_floor']:.0f}% of its FLOP floor; scores: max |diff| "
          f"{out['max_abs_diff']:.2e}, max rel diff (KL >= 1e-2) {out['max_rel_diff_where_kl_ge_1e-2']:.2e}")
    if cli:
        print(f"CLI compute {out['cli_compute_s']:.1f} s = {out['cli_compute_over_engine']:.2f} x the single-call sweep "
              f"({t_engine:.1f} s); wall {out['cli_wall_s']:.1f} s with model loading; max |diff| vs engine "
              f"{out['cli_max_abs_diff_vs_engine']:.1e}")
    assert out["max_abs_diff"] < 1e-4 or out["max_rel_diff_where_kl_ge_1e-2"] < 1e-2, "engine and naive scores disagree"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
