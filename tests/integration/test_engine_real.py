"""The ablation engine on the two real models (issue 3 acceptance, a few prompts only).

Tolerances: the unit tests hold every architecture to 1e-5. Here logits are ~20 in size, and
float32 matrix products of different shapes (one row vs many, padded vs not) round differently by
up to ~3e-5 even in the stock model; so the engine-vs-stock comparisons use 1e-4 (5e-6 relative)."""

from __future__ import annotations

import pytest
import torch

from safetyheads.ablation import ablated, attention_module, decoder_layers, num_layers_heads, surgery
from safetyheads.data import load_prompts
from safetyheads.engine import prepare, sweep
from safetyheads.prompts import encode
from attention_weights import restored_attention
from tiny_models import one_thread  # noqa: F401  (module-scoped: 1 thread, immune to a busy machine)

TOL = 1e-4


def _encoded(loaded, n):
    return encode(loaded.tokenizer, load_prompts("maliciousinstruct", limit=n).prompts)


def _forward(model, enc, **extra):
    return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids, **extra)


@torch.no_grad()
@pytest.mark.parametrize("name,n_prompts", [("smollm2", 3), ("qwen", 2)])
def test_engine_matches_stock_and_full_recompute(request, name, n_prompts):
    loaded = request.getfixturevalue(name)
    model = loaded.model
    n_layers, n_heads = num_layers_heads(model)
    enc = _encoded(loaded, n_prompts)
    cache = prepare(model, enc)
    stock = _forward(model, enc, output_hidden_states=True)
    stock_lp = torch.log_softmax(stock.logits[:, -1].double(), -1)
    assert (cache.clean_logprobs - stock_lp).abs().max() <= TOL
    assert (cache.clean_hidden - stock.hidden_states[-1][:, -1]).abs().max() <= TOL

    # a first-layer head, and a pair spanning the model (a replay from layer 3 with a second ablation at the end)
    configs = ([[(0, 1)], [(3, 2), (n_layers - 1, 0)], []] if name == "smollm2"
               else [[(n_layers // 2, n_heads - 1)], []])
    result = sweep(cache, configs, "undifferentiated", 1e-5, want=("kl", "hidden", "logprobs"), progress=False)
    assert torch.equal(result.kl[-1], torch.zeros(n_prompts, dtype=torch.float64))
    for c, heads in enumerate(configs[:-1]):
        with ablated(model, heads, "undifferentiated", 1e-5):
            full = _forward(model, enc, output_hidden_states=True)
        lp = torch.log_softmax(full.logits[:, -1].double(), -1)
        assert (result.logprobs[c] - lp).abs().max() <= TOL, heads
        assert (result.hidden[c] - full.hidden_states[-1][:, -1]).abs().max() <= TOL, heads
        assert result.kl[c].min() > 1e-6, heads


@torch.no_grad()
def test_uniform_limit_causality_and_padding_on_smollm2(smollm2):
    model = smollm2.model
    enc = _encoded(smollm2, 2)
    heads = [(0, 4), (7, 1), (20, 8)]
    with ablated(model, heads, "undifferentiated", 1e-10):
        tiny = _forward(model, enc).logits
    with ablated(model, heads, "uniform"):
        uniform = _forward(model, enc).logits
        real = enc.attention_mask.bool()
        assert (tiny - uniform)[real].abs().max() <= 1e-4
        # padding changes nothing for the real tokens
        for b in range(enc.input_ids.shape[0]):
            alone = model(enc.input_ids[b:b + 1, real[b]]).logits[0]
            assert (uniform[b, real[b]] - alone).abs().max() <= TOL
        # causality: a different last token leaves every earlier position alone
        ids = enc.input_ids[:1, real[0]]
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % model.config.vocab_size
        a, b2 = model(ids).logits, model(changed).logits
    assert (a[:, :-1] - b2[:, :-1]).abs().max() <= 1e-5
    assert (a[:, -1] - b2[:, -1]).abs().max() > 1e-2


@torch.no_grad()
def test_uniform_weights_exact_on_smollm2_eager(smollm2):
    model = smollm2.model
    enc = _encoded(smollm2, 2)
    layer, head = 5, 3
    before = model.config._attn_implementation
    captured = {}
    hook = attention_module(decoder_layers(model)[layer]).register_forward_hook(
        lambda m, a, out: captured.__setitem__("w", out[1]))
    try:
        model.config._attn_implementation = "eager"
        with ablated(model, [(layer, head)], "uniform"):
            _forward(model, enc)
    finally:
        hook.remove()
        model.config._attn_implementation = before
    weights = captured["w"][:, head]  # [B, T, T]
    mask = enc.attention_mask.bool()
    T = mask.shape[1]
    for b in range(mask.shape[0]):
        for i in torch.nonzero(mask[b]).flatten().tolist():
            visible = mask[b] & (torch.arange(T) <= i)
            expected = torch.where(visible, 1.0 / visible.sum(), 0.0).float()
            assert torch.equal(weights[b, i], expected)


@torch.no_grad()
@pytest.mark.parametrize("method", ["undifferentiated", "scaling"])
def test_surgery_equals_hook_on_smollm2(smollm2, method):
    model = smollm2.model
    enc = _encoded(smollm2, 2)
    heads = [(2, 6), (11, 0)]
    with ablated(model, heads, method, 1e-4):
        expected = _forward(model, enc).logits
    with restored_attention(model, heads):  # the fixture is shared
        surgery(model, heads, method, 1e-4)
        got = _forward(model, enc).logits
    real = enc.attention_mask.bool()
    assert (got - expected)[real].abs().max() <= TOL
