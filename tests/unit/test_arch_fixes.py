"""Classes of architecture problems the engine and the wrapper now handle generically (issue 15),
each against an independent oracle: the stock model's own forward, a direct forward under
`ablated()`, the eager attention weights, or the plain average of the visible values.

- final norms named `layernorm` (CTRL) / `embedding_norm` (LFM2): engine clean log-probs = stock forward;
- a layer's extra output fed to the next layer (HY V4's sparse-attention top-k indices): sweep = direct forward;
- per-layer head counts above `num_attention_heads` (Laguna): the head grid and `uniform` weights;
- score terms besides query·key (sink kwargs, `position_bias`, a biased float mask: Inkling 2, Inkling,
  Doge): `uniform` output = mean of the visible values; eager weights = 1/visible keys;
- a final layer that mixes positions after its feed-forward block (Inkling's short convolution): the
  last-position shortcut is detected and turned off, sweep = direct forward;
- looped layers (Dory) and cross-layer residuals into the final norm (Inkling 2): refused with the class named.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safetyheads import ablation, archcheck, engine, layout
from safetyheads.ablation import HeadAblator, ablated
from safetyheads.errors import UnsupportedModelError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with ablation.unguarded():
        yield
    torch.set_num_threads(before)


def _tiny(model_type: str, attn: str = "eager") -> nn.Module:
    return archcheck.build(model_type, False, attn)


def _own_logprobs(model: nn.Module, enc: dict) -> torch.Tensor:
    """[P, V] float64: the stock model's forward on the left-padded batch (the oracle)."""
    with torch.no_grad():
        return torch.log_softmax(archcheck._forward(model, enc), -1)


def _sweep_matches_direct_forward(model: nn.Module, method: str = "undifferentiated") -> engine.CleanCache:
    """Engine sweep log-probs = a direct forward of the stock model under `ablated()`, for configs
    starting in the first and in the last attention layer."""
    enc = archcheck._encoded()
    heads = archcheck._test_heads(model)
    configs = [[h] for h in heads] + [heads]
    cache = engine.prepare(model, enc, share_prefix=False)
    result = engine.sweep(cache, configs, method, 1e-5, want=("logprobs",), batch_size=3, progress=False)
    for c, cfg in enumerate(configs):
        with ablated(model, cfg, method, 1e-5):
            direct = _own_logprobs(model, enc)
        assert (result.logprobs[c].double() - direct).abs().max() < 1e-4, cfg
        assert (direct - _own_logprobs(model, enc)).abs().max() > 1e-3, "the ablation must change something"
    return cache


@pytest.mark.parametrize("model_type,norm_name", [("ctrl", "layernorm"), ("lfm2", "embedding_norm")])
def test_final_norm_names(model_type, norm_name):
    model = _tiny(model_type)
    backbone = layout.decoder_backbone(model)
    assert layout.final_norm(model) is getattr(backbone, norm_name)
    enc = archcheck._encoded()
    cache = engine.prepare(model, enc, share_prefix=False, self_check=False)
    assert (cache.clean_logprobs.double() - _own_logprobs(model, enc)).abs().max() < 1e-4


def test_extra_layer_output_carried_to_the_next_layer():
    """HY V4 hands each layer's sparse-attention top-k to the next (`prev_topk_indices`); an
    ablation changes it, so the replay must take it from the replayed layer, not the clean record."""
    model = _tiny("hy_v4")
    cache = _sweep_matches_direct_forward(model)
    carried = [k for kw in cache.groups[0].kwargs for k, v in kw.items() if isinstance(v, engine._Carried)]
    assert carried and set(carried) == {"prev_topk_indices"}


def test_per_layer_head_counts():
    """Laguna's `num_attention_heads_per_layer` overrides `num_attention_heads`: the head grid is as
    wide as the widest layer and `uniform` on a head beyond `num_attention_heads` is exactly 1/visible
    keys in the eager weights (the harness's oracle)."""
    model = _tiny("laguna")
    config = model.config
    widest = max(config.num_attention_heads_per_layer)
    assert widest > config.num_attention_heads
    assert ablation.num_layers_heads(model)[1] == widest
    ids = archcheck._ids(10, 1)[None]
    with torch.no_grad():
        archcheck._check_uniform_weights(model, [(0, widest - 1), (0, 1)], ids)


class _Module(nn.Module):
    num_key_value_groups = 1
    training = False


def _reference_attention(module, query, key, value, attention_mask, position_bias=None, sinks=None, **kwargs):
    """Eager attention with every extra score term: [B, H, q, k] scores + bias + mask, a per-query
    sink logit [B, H, q, 1] absorbing weight. Returns ([B, q, H, hd], weights)."""
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if position_bias is not None:
        scores = scores + position_bias
    scores = scores + attention_mask
    if sinks is not None:
        weights = torch.softmax(torch.cat([scores, sinks], -1), -1)[..., :-1]
    else:
        weights = torch.softmax(scores, -1)
    return (weights @ value).transpose(1, 2), weights


@pytest.mark.parametrize("terms", ["position_bias", "sinks", "biased_mask", "all"])
def test_uniform_removes_score_terms(terms):
    """`uniform` = exactly 1/visible keys, so the head's output is the plain mean of the visible
    keys' values (the oracle, computed here from the values and the causal pattern alone), whatever
    extra score terms the model's attention function receives."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 3, 5, 4
    query, key, value = (torch.randn(B, H, T, hd, generator=gen) for _ in range(3))
    causal = torch.ones(T, T).tril().bool()  # [q, k]
    floor = torch.finfo(torch.float32).min
    mask = torch.zeros(B, 1, T, T).masked_fill(~causal, floor)
    kwargs: dict = {}
    if terms in ("position_bias", "all"):
        kwargs["position_bias"] = 3 * torch.randn(B, H, T, T, generator=gen)
    if terms in ("sinks", "all"):
        kwargs["sinks"] = 2 + torch.randn(B, H, T, 1, generator=gen)
    if terms in ("biased_mask", "all"):  # Doge: a learned per-key bias inside the float mask
        mask = (torch.rand(B, H, 1, T, generator=gen) * 4).expand(B, H, T, T).masked_fill(~causal, floor)

    class Table:  # the ablator's per-layer table: head 1 uniform in row 0 only
        pass

    ablator = HeadAblator.__new__(HeadAblator)
    q_scale = torch.ones(B, H)
    q_scale[0, 1] = 0.0
    ablator._layers = [(q_scale, None, None)]
    ablator._q_zero = [True]  # what __init__ finds in this table: a zero query factor in layer 0
    ablator._moved, ablator.batch_rows = {}, None
    out, _ = ablator.attend(_reference_attention, 0, _Module(), query, key, value, mask, **kwargs)
    expected = (causal.float() / causal.sum(-1, keepdim=True)) @ value[0, 1]  # [q, hd]
    assert torch.allclose(out[0, :, 1], expected, atol=1e-6)
    plain, _ = _reference_attention(_Module(), query, key, value, mask, **kwargs)
    assert torch.equal(out[1], plain[1]) and torch.equal(out[0, :, 0], plain[0, :, 0])  # others untouched
    assert not torch.allclose(plain[0, :, 1], expected, atol=1e-3)  # the terms did act on a zero query


@pytest.mark.parametrize("model_type", ["doge", "inkling_text"])
def test_uniform_weights_with_score_terms(model_type):
    """Doge (dynamic mask) and Inkling (hidden-state position bias): the eager weights of a uniform
    head are exactly 1/visible keys (the harness's oracle: visible = nonzero in the stock weights)."""
    model = _tiny(model_type)
    with torch.no_grad():
        archcheck._check_uniform_weights(model, archcheck._test_heads(model), archcheck._ids(10, 1)[None])


def test_final_layer_mixing_positions_after_the_feed_forward():
    """Inkling's final layer runs a short convolution over its feed-forward output, so computing
    that block on the last position alone would be wrong: prepare finds out and the sweep matches."""
    model = _tiny("inkling_text")
    cache = _sweep_matches_direct_forward(model, "scaling")
    assert cache.extra["tail_shortcut"] is False
    llama = _tiny("llama")
    assert engine.prepare(llama, archcheck._encoded(), share_prefix=False).extra["tail_shortcut"] is True


def test_looped_layers_refused():
    """Dory runs its recurrent layer twice per forward: refused, the class named."""
    config = archcheck.tiny_config("dory")
    assert (config.n_input_layers, config.n_recurrent_layers, config.n_output_layers) == (1, 1, 1)
    model = _tiny("dory")
    with pytest.raises(UnsupportedModelError, match="looped layers"):
        engine.prepare(model, archcheck._encoded(), share_prefix=False)


def test_cross_layer_residuals_refused():
    """Inkling 2 mixes earlier layers' outputs into the final norm's input (block attention
    residuals): a replay of the last layer alone cannot reproduce it, so it is refused."""
    model = _tiny("inkling2_text")
    with pytest.raises(UnsupportedModelError, match="before the final norm"):
        engine.prepare(model, archcheck._encoded(), share_prefix=False)


@pytest.mark.parametrize("model_type", ["nemotron_h", "mimo_v2_flash"])
def test_tiny_configs_run(model_type):
    """The harness's tiny configs of these types are valid models (Mamba-2 groups divide the heads;
    MiMo's doubled sliding-layer KV heads fit the query heads) in both variants."""
    for gqa in (False, True) if archcheck.has_gqa(model_type) else (False,):
        model = archcheck.build(model_type, gqa, "eager")
        with torch.no_grad():
            logits = model(input_ids=archcheck._ids(10, 1)[None], use_cache=False).logits
        assert logits.isfinite().all()


def test_an_output_skipping_a_layer_is_refused():
    """The replay carries a layer's extra outputs to the next layer only: an argument that is an
    extra output of an earlier layer, not passed on by the previous one, is refused; one handed along
    the chain (returned unchanged by each layer, as HY-V4's top-k indices) is fine."""
    from safetyheads.engine import _refuse_skipped_outputs

    topk, other, hidden = torch.arange(3), torch.zeros(2), torch.ones(2)
    earlier = {id(topk): (0, topk)}                       # layer 0 returned (hidden, topk)
    with pytest.raises(UnsupportedModelError, match="takes an output of layer 0"):
        _refuse_skipped_outputs(2, ((), {"prev_topk": topk}), earlier, (hidden, other))
    _refuse_skipped_outputs(2, ((), {"prev_topk": topk}), earlier, (hidden, topk))  # passed on by layer 1
    _refuse_skipped_outputs(2, ((other,), {}), earlier, (hidden,))                  # unrelated tensors
