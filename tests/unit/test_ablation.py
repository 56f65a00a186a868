"""The attention wrapper on tiny random models of every supported architecture, MHA and GQA
(issue 3, acceptance 1-4): nothing ablated is bit-identical, causality, exact uniform attention,
padding, per-example ablations in one batch, generation with a KV cache."""

from __future__ import annotations

import pytest
import torch

from safetyheads.ablation import (
    METHODS,
    HeadAblator,
    ablated,
    attention_module,
    decoder_layers,
    factor_tables,
    num_layers_heads,
)
from tiny_models import CASE_IDS, CASES, HEADS, LAYERS, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

# Heads in several layers, including the first and the last.
HEADS_SET = [(0, 1), (2, 3), (LAYERS - 1, 0)]
CAUSAL_METHODS = ("undifferentiated", "uniform", "scaling")  # `mean` averages over the batch's positions


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def model(request):
    arch, gqa = request.param
    return tiny_model(arch, gqa)


@torch.no_grad()
def test_nothing_ablated_is_bit_identical(model):
    ids = random_ids(2, 9)
    stock = model(ids).logits
    with ablated(model, [], "undifferentiated"):
        empty = model(ids).logits
    # A table full of neutral factors must skip every layer, too.
    tables = factor_tables([[], []], "scaling", 0.5, *num_layers_heads(model))
    with HeadAblator(model, tables):
        neutral = model(ids).logits
    assert torch.equal(stock, empty)
    assert torch.equal(stock, neutral)
    # and the model is back to its own attention afterwards
    assert not model.config._attn_implementation.startswith("safetyheads")
    assert torch.equal(model(ids).logits, stock)


@torch.no_grad()
@pytest.mark.parametrize("method", CAUSAL_METHODS)
def test_ablation_changes_output_and_keeps_causality(model, method):
    ids = random_ids(1, 10, seed=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 7) % 90 + 3
    stock = model(ids).logits
    with ablated(model, HEADS_SET, method, 1e-5):
        a = model(ids).logits
        b = model(changed).logits
    assert (a - stock).abs().max() > 1e-3  # the ablation does something
    assert (a[:, :-1] - b[:, :-1]).abs().max() <= 1e-6
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def _window(model, layer: int) -> int | None:
    """The sliding window of `layer`, from the config (independent of the wrapper)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return None
    if types is None:
        return window if config.model_type == "mistral" else None
    return window if types[layer] == "sliding_attention" else None


@torch.no_grad()
def test_uniform_weights_are_exactly_one_over_visible_keys(model):
    arch = model.config.model_type
    gqa = getattr(model.config, "num_key_value_heads", HEADS) != HEADS
    eager = tiny_model(arch, gqa, attn="eager")
    ids, mask, pos = left_pad([random_ids(1, 10, seed=2)[0], random_ids(1, 6, seed=3)[0]])
    captured = {}
    hooks = [
        attention_module(layer).register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[1]))
        for i, layer in enumerate(decoder_layers(eager))
    ]
    try:
        with ablated(eager, HEADS_SET, "uniform"):
            eager(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in hooks:
            h.remove()
    T = ids.shape[1]
    for layer, head in HEADS_SET:
        weights = captured[layer][:, head]  # [B, T, T]
        window = _window(eager, layer)
        for b in range(ids.shape[0]):
            for i in range(T):
                if not mask[b, i]:
                    continue
                visible = torch.tensor([bool(mask[b, j]) and j <= i and (window is None or i - j < window) for j in range(T)])
                expected = torch.where(visible, 1.0 / visible.sum(), 0.0).float()
                assert torch.equal(weights[b, i], expected), (layer, head, b, i)
        # an unablated head of the same layer is not uniform
        other = captured[layer][:, (head + 1) % HEADS]
        assert other[0, -1].std() > 1e-3


@torch.no_grad()
def test_tiny_epsilon_matches_uniform(model):
    ids = random_ids(2, 10, seed=4)
    with ablated(model, HEADS_SET, "undifferentiated", 1e-10):
        tiny = model(ids).logits
    with ablated(model, HEADS_SET, "uniform"):
        uniform = model(ids).logits
    assert (tiny - uniform).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", CAUSAL_METHODS)
def test_left_padding_changes_nothing_for_real_tokens(model, method):
    prompts = [random_ids(1, 10, seed=5)[0], random_ids(1, 5, seed=6)[0], random_ids(1, 8, seed=7)[0]]
    ids, mask, pos = left_pad(prompts)
    with ablated(model, HEADS_SET, method, 1e-5):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for b, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            assert (batch[b, -len(p):] - alone).abs().max() <= 1e-5


@torch.no_grad()
def test_batch_of_different_ablations_equals_separate_runs(model):
    ids = random_ids(1, 9, seed=8)
    configs = [[(0, 0)], [(1, 2), (3, 1)], [], [(2, 3)]]
    for method in METHODS:
        ablator = HeadAblator.from_configs(model, configs, method, 1e-5)
        with ablator:
            together = model(ids.expand(len(configs), -1)).logits
        for c, heads in enumerate(configs):
            means = None
            if method == "mean":  # the batch-wide mean is what `together` used; reuse it
                means = torch.stack([ablator._means.get(i, torch.zeros(HEADS, 16)) for i in range(LAYERS)])
            with HeadAblator.from_configs(model, [heads], method, 1e-5, mean_values=means):
                alone = model(ids).logits
            assert (together[c] - alone[0]).abs().max() <= 1e-5, (method, heads)


@torch.no_grad()
def test_generate_with_cache_applies_ablation_to_every_token(model):
    prompt = random_ids(1, 6, seed=9)
    n_new = 4
    with ablated(model, HEADS_SET, "undifferentiated", 1e-5):
        generated = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True)
        # Greedy decoding without any cache, recomputing the full sequence each step.
        seq = prompt
        for _ in range(n_new):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)
    stock = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert stock.shape == generated.shape


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])  # bool sdpa mask, float eager mask, fused qkv
def test_mean_ablation_uses_mean_over_real_positions(arch):
    model = tiny_model(arch)
    ids, mask, pos = left_pad([random_ids(1, 9, seed=13)[0], random_ids(1, 4, seed=14)[0]])
    layer, head, hd = 1, 2, 16
    attn = attention_module(decoder_layers(model)[layer])
    o_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
    seen = []
    hook = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=pos)  # clean: head outputs
        with ablated(model, [(layer, head)], "mean"):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        hook.remove()
    clean, ablated_in = (x.view(*x.shape[:2], HEADS, hd) for x in seen)  # [B, T, H, hd]
    real = mask.bool()
    expected = clean[real][:, head].mean(0)  # over every real position of every prompt
    assert torch.allclose(ablated_in[:, :, head], expected.expand_as(ablated_in[:, :, head]), atol=1e-6)
    assert torch.equal(ablated_in[:, :, head - 1], clean[:, :, head - 1])  # other heads untouched


def test_context_restores_model_after_an_error_and_nests():
    model = tiny_model("qwen2", True)
    ids = random_ids(1, 7, seed=15)
    with torch.no_grad():
        stock = model(ids).logits
        with pytest.raises(KeyError):
            with ablated(model, [(1, 1)], "scaling", 1e-3):
                raise KeyError("boom")
        assert model.config._attn_implementation == "sdpa"
        assert not any(hasattr(attention_module(l), "_safetyheads_ablation") for l in decoder_layers(model))
        assert torch.equal(model(ids).logits, stock)
        with ablated(model, [(1, 1)], "scaling", 1e-3):
            outer = model(ids).logits
            with ablated(model, [(2, 0)], "uniform"):
                inner = model(ids).logits
            assert torch.equal(model(ids).logits, outer)  # the outer ablation is back
        with ablated(model, [(2, 0)], "uniform"):
            assert torch.equal(model(ids).logits, inner)  # inner replaces, does not stack
