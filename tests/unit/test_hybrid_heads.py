"""Hybrid models (some layers without softmax attention): the heads that exist are those of the
attention layers, every analysis scores only those, and naming another is a one-line error.
Oracle: the model's own layer types (config.layer_types) and a direct forward under `ablated()`."""

from __future__ import annotations

import pytest
import torch

from safetyheads import ablation, archcheck
from safetyheads.engine import prepare, sweep
from safetyheads.errors import UsageError
from safetyheads.pipeline import select_heads
from safetyheads.prompts import Encoded
from tiny_models import left_pad, one_thread, random_ids  # noqa: F401


@pytest.fixture(scope="module")
def hybrid():
    return archcheck.build("qwen3_5_text", gqa=True, attn="sdpa").double()


def test_only_attention_layers_have_heads(hybrid):
    n_layers, n_heads = ablation.num_layers_heads(hybrid)
    kinds = list(hybrid.config.layer_types)
    attention = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    assert 0 < len(attention) < n_layers  # the tiny model is hybrid
    heads = ablation.model_heads(hybrid)
    assert sorted({layer for layer, _ in heads}) == attention
    chosen = select_heads(n_layers, n_heads, existing=heads)
    assert chosen == sorted(heads)
    linear = next(i for i in range(n_layers) if i not in attention)
    with pytest.raises(UsageError, match=f"head {linear}-0 does not exist"):
        select_heads(n_layers, n_heads, heads=f"{linear}-0", existing=heads)
    with pytest.raises(UsageError, match="softmax-attention"):
        select_heads(n_layers, n_heads, layers=str(linear), existing=heads)


def test_sweep_over_every_existing_head_equals_direct_forward(hybrid):
    ids, mask, pos = left_pad([random_ids(1, 7, seed=s)[0] for s in (1, 2)])
    heads = ablation.model_heads(hybrid)
    res = sweep(prepare(hybrid, Encoded(ids, mask, pos)), [[h] for h in heads], "scaling", want=("kl",),
                progress=False)
    for c in (0, len(heads) - 1):
        with torch.no_grad():
            clean = torch.log_softmax(hybrid(ids[:1, -7:]).logits[0, -1].double(), -1)
            with ablated_ctx(hybrid, heads[c]):
                abl = torch.log_softmax(hybrid(ids[:1, -7:]).logits[0, -1].double(), -1)
        assert float(res.kl[c, 0]) == pytest.approx(float((clean.exp() * (clean - abl)).sum()), rel=1e-6, abs=1e-12)


def ablated_ctx(model, head):
    return ablation.ablated(model, [head], "scaling")
