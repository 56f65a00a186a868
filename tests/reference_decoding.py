"""The reference decoder that cached generation is checked against (unit tests on tiny models,
integration tests on SmolLM2): one prompt at a time, no padding, the whole sequence recomputed at
every step without any cache, the ablation active throughout."""

from __future__ import annotations

import contextlib

import torch

from safetyheads.ablation import ablated
from safetyheads.generation import stop_token_ids
from safetyheads.prompts import encode, format_prompts


def greedy_without_cache(model, tok, prompts, *, n_new: int, heads, method: str, epsilon: float = 1e-5) -> list[list[int]]:
    """Greedy new token ids per prompt (stop tokens excluded), chat format."""
    ctx = ablated(model, heads, method, epsilon) if heads else contextlib.nullcontext()
    stops = set(stop_token_ids(model, tok))
    out = []
    with ctx, torch.no_grad():
        for text in format_prompts(tok, prompts, "chat"):
            ids = encode(tok, [text]).input_ids  # [1, T]
            new = []
            for _ in range(n_new):
                t = int(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
                if t in stops:
                    break
                new.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            out.append(new)
    return out
