"""GPU benchmark: a full head map of a Llama-2-7B-shaped model, both ablation methods.

Builds a model with Llama-2-7B's shape (32 layers x 32 heads, hidden 4096, MLP 11008, vocab 32000)
and random weights directly on the device (random weights of the same shape cost exactly the same
FLOPs, and the GPU machine cannot download weights), 100 prompts of ~60 random tokens (left padded
to a common length), and sweeps all 1,024 single-head ablations with the engine for
`undifferentiated` and `scaling`, scoring Ships (KL, from the engine) and Generalized Ships
(principal angles, from scores.py). Prints wall times, achieved TFLOP/s against the FLOP count
below, peak memory and the batch size the engine settled on.

    python benchmarks/gpu_full_map.py                 # the real thing: CUDA, bfloat16
    python benchmarks/gpu_full_map.py --tiny          # a tiny shape on CPU in seconds (CI runs this)

FLOP count (matmul FLOPs, 2 per multiply-add; the engine runs prompts unpadded, grouped by
length, so a prompt of T real tokens costs, per token and decoder layer
    attention projections  2*d*(n_q*hd) + 2*2*d*(n_kv*hd) + 2*(n_q*hd)*d
    attention scores/mix   2 * 2*n_q*hd * (T+1)/2           (QK^T and AV over the causal prefix, on average)
    MLP (gated)            3 * 2*d*ff
and per prompt the LM head at the last position only, 2*d*V. With prefix reuse an ablation of a
head in layer l replays only layers l..L-1, so it costs (L-l) layer passes over every prompt's
tokens plus P LM heads. The clean pass (all L layers once) is counted too. Target from issue 8: both methods on
one dataset in <= 3 minutes on one H200 in bf16 (~1 PFLOP/s dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass

import torch

SHAPES = {
    # name: (layers, heads, kv_heads, hidden, intermediate, vocab)
    "llama-2-7b": (32, 32, 32, 4096, 11008, 32000),
    "tiny": (4, 4, 2, 64, 160, 512),
}


@dataclass
class Shape:
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def layer_token_flops(s: Shape, seq_len: int) -> float:
    """FLOPs of one decoder layer for one token of a length-`seq_len` sequence (see module doc)."""
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    proj = 2 * s.hidden * q + 2 * 2 * s.hidden * kv + 2 * q * s.hidden
    attn = 2 * 2 * q * (seq_len + 1) / 2
    mlp = 3 * 2 * s.hidden * s.intermediate
    return proj + attn + mlp


def sweep_flops(s: Shape, heads_by_layer: list[int], lengths: list[int]) -> float:
    """FLOPs of a single-head sweep with prefix reuse plus its clean pass; `lengths` are the
    prompts' real token counts."""
    per_layer_pass = sum(layer_token_flops(s, t) * t for t in lengths)    # one layer over every prompt
    lm_head = 2 * s.hidden * s.vocab * len(lengths)                       # last position of every prompt
    clean = s.layers * per_layer_pass + lm_head
    ablations = sum(n * ((s.layers - layer) * per_layer_pass + lm_head) for layer, n in enumerate(heads_by_layer))
    return clean + ablations


def si(x: float, unit: str) -> str:
    """1.23e15 -> '1.23 P<unit>'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def build_model(s: Shape, device: str, dtype: torch.dtype, seed: int):
    """A LlamaForCausalLM of shape `s` with random weights, created directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        hidden_size=s.hidden, intermediate_size=s.intermediate, vocab_size=s.vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def random_prompts(n: int, mean_len: int, vocab: int, device: str, seed: int):
    """`n` prompts of mean_len ± 10% random tokens, left padded, as prompts.Encoded."""
    from safetyheads.prompts import Encoded

    g = torch.Generator().manual_seed(seed)
    spread = max(1, mean_len // 10)
    lengths = torch.randint(mean_len - spread, mean_len + spread + 1, (n,), generator=g)   # [P]
    seq = int(lengths.max())
    ids = torch.randint(3, vocab, (n, seq), generator=g)                                   # [P, T]
    positions = torch.arange(seq).unsqueeze(0)                                             # [1, T]
    start = (seq - lengths).unsqueeze(1)                                                   # [P, 1] first real token
    mask = (positions >= start).long()                                                     # [P, T] left padding
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    position_ids = (positions - start).clamp(min=0)                                        # [P, T] 0 at first real token
    return Encoded(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device))


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux: the whole process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (CI smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompts", type=int, default=None, help="default 100 (8 with --tiny)")
    ap.add_argument("--tokens", type=int, default=None, help="mean prompt length, default 60 (12 with --tiny)")
    ap.add_argument("--methods", default="undifferentiated,scaling")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's memory-based choice")
    ap.add_argument("--rank", type=int, default=1, help="Generalized Ships subspace rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    # Imported before the clock starts: the build time is the model's, not the libraries'.
    from transformers import LlamaForCausalLM  # noqa: F401

    from safetyheads import engine, prompts, scores  # noqa: F401

    shape = Shape(*SHAPES["tiny" if args.tiny else "llama-2-7b"])
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    n_prompts = args.prompts or (8 if args.tiny else 100)
    mean_len = args.tokens or (12 if args.tiny else 60)
    methods = [m for m in args.methods.split(",") if m]

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    encoded = random_prompts(n_prompts, mean_len, shape.vocab, device, args.seed)
    sync(device)
    build_s = time.perf_counter() - t0
    seq_len = int(encoded.input_ids.shape[1])
    lengths = [int(n) for n in encoded.attention_mask.sum(-1).tolist()]
    heads = [(layer, head) for layer in range(shape.layers) for head in range(shape.heads)]
    configs = [[h] for h in heads]
    flops = sweep_flops(shape, [shape.heads] * shape.layers, lengths)
    name = "tiny" if args.tiny else "llama-2-7b-shaped (random weights)"
    print(f"model {name}: {shape.layers} layers x {shape.heads} heads ({shape.kv_heads} kv), hidden {shape.hidden}, "
          f"ff {shape.intermediate}, vocab {shape.vocab}; {dtype_name} on {device}; built in {build_s:.1f} s")
    print(f"{n_prompts} prompts of {min(lengths)}-{max(lengths)} tokens; {len(configs)} single-head ablations per "
          f"method; {si(flops, 'FLOP')} per method (prefix reuse, clean pass included)")

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    figures: dict = {"shape": shape.__dict__, "device": device, "dtype": dtype_name, "prompts": n_prompts,
                     "seq_len": seq_len, "lengths": lengths, "configs": len(configs), "flops_per_method": flops, "methods": {}}
    total_s = 0.0
    for method in methods:
        t0 = time.perf_counter()
        cache = engine.prepare(model, encoded)
        result = engine.sweep(cache, configs, method, want=("kl", "hidden"), batch_size=args.batch_size,
                              progress=sys.stderr.isatty())
        sync(device)
        sweep_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        ships = result.kl.mean(dim=1)                                                   # [C] mean KL over prompts
        gships = scores.generalized_ships_batch(result.clean_hidden, result.hidden, args.rank)  # [C] degrees
        score_s = time.perf_counter() - t1
        rate = flops / sweep_s                                                          # FLOP/s
        top = sorted(range(len(heads)), key=lambda i: -gships[i])[:5]
        finite = bool(torch.isfinite(result.kl).all()) and bool(torch.isfinite(torch.as_tensor(gships)).all())
        print(f"[{method}] sweep {sweep_s:.1f} s ({si(rate, 'FLOP/s')} achieved), scoring {score_s:.1f} s, "
              f"batch size {result.batch_size}, peak memory {peak_memory_gib(device):.1f} GiB; "
              f"top Generalized Ships heads {[f'{heads[i][0]}-{heads[i][1]}' for i in top]}")
        figures["methods"][method] = {
            "sweep_s": sweep_s, "score_s": score_s, "tflops": rate / 1e12, "batch_size": result.batch_size,
            "peak_gib": peak_memory_gib(device), "finite": finite,
            "ships_mean": [float(x) for x in ships], "gships": [float(x) for x in gships],
        }
        total_s += sweep_s + score_s
        del cache, result
    verdict = "meets" if total_s <= 180 else "misses"
    print(f"total for {len(methods)} method(s) on one dataset: {total_s:.1f} s "
          f"({verdict} the 3-minute target{'' if not args.tiny else '; target applies to the H200 run'})")
    figures["total_s"] = total_s
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
