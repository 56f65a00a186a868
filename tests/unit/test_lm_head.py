"""LM-head post-processing (lm_head.py) and the engine's runtime self-check (issue 15).

Oracle: the stock model's own CausalLM forward. Every tiny model below sets its family's scaling
or soft-cap to a non-default value, so skipping it would move the logits visibly (each test also
asserts that the bare output embedding differs from the model's logits, so it can fail)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from safetyheads import ablation, engine, lm_head
from safetyheads.ablation import ablated
from safetyheads.errors import UnsupportedModelError
from tiny_models import left_pad, one_thread, random_ids, tiny_model  # noqa: F401

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# model type -> the LM-head settings, all away from their defaults (Cohere's 0.0625, Granite's 1, ...)
FAMILIES = {
    "cohere": dict(logit_scale=0.3),
    "cohere2": dict(logit_scale=0.3, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "cohere2_moe": dict(logit_scale=0.3),
    "granite": dict(logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0),
    "hyperclovax": dict(logits_scaling=0.25),
    "falcon_h1": dict(lm_head_multiplier=0.2),
    "minicpm3": dict(dim_model_base=16, head_dim=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                     q_lora_rank=16, kv_lora_rank=16),
    "gemma2": dict(final_logit_softcapping=3.0, head_dim=16),
    "nanochat": dict(final_logit_softcapping=3.0),
}
# the families whose layers the engine replays as they are (attention in every layer, routed
# through the attention interface), with their heads shared (GQA) or not
ENGINE_CASES = [(t, gqa) for t in ("cohere", "cohere2", "granite") for gqa in (False, True)]


def tiny(model_type: str, gqa: bool = True, seed: int = 0) -> torch.nn.Module:
    """A float32 random model of `model_type` with FAMILIES' LM-head settings (weights drawn large
    enough that the logits are spread over several nats)."""
    kw = dict(COMMON, **FAMILIES[model_type])
    kw["num_key_value_heads"] = 2 if gqa else 4
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    attn = "eager" if model_type == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])))
    return model


def _batch():
    ids, mask, pos = left_pad([random_ids(1, n, seed=10 + i)[0] for i, n in enumerate((7, 4, 7, 6))])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@pytest.mark.parametrize("model_type", list(FAMILIES))
@torch.no_grad()
def test_logits_equal_the_models_own_forward(model_type):
    model = tiny(model_type)
    ids = random_ids(3, 8, seed=1)
    stock = model(input_ids=ids, use_cache=False).logits[:, -1]  # [3, V]
    h = ablation.decoder_backbone(model)(input_ids=ids, use_cache=False).last_hidden_state[:, -1]  # after the final norm
    ours = lm_head.logits(model, h)
    assert ours.dtype == torch.float32 and ours.shape == stock.shape
    assert (ours - stock).abs().max() <= 1e-5 * max(1.0, float(stock.abs().max()))
    assert (model.get_output_embeddings()(h) - stock).abs().max() > 0.5  # the post-processing matters here


@pytest.mark.parametrize("model_type", ["cohere", "granite", "minicpm3", "gemma2", "falcon_h1"])
def test_slope_is_the_jacobian(model_type):
    """logits_and_slope's s with dz_k/dh = s_k W_k equals autograd's Jacobian of the logits (whose
    values the test above ties to the model's forward)."""
    model = tiny(model_type)
    with torch.no_grad():
        h = ablation.decoder_backbone(model)(input_ids=random_ids(2, 6, seed=2), use_cache=False).last_hidden_state[:, -1]
    z, slope = lm_head.logits_and_slope(model, h)
    assert slope is not None and slope.shape == z.shape
    weight = model.get_output_embeddings().weight  # [V, D]
    for b in range(h.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda x: lm_head.logits(model, x[None])[0], h[b])  # [V, D]
        torch.testing.assert_close(slope[b, :, None] * weight, jac, rtol=1e-4, atol=1e-5)


def test_plain_lm_head_is_the_identity_transform():
    model = tiny_model("llama")
    assert lm_head.logit_transform(model).identity
    h = torch.randn(2, 64)
    z, slope = lm_head.logits_and_slope(model, h)
    assert slope is None
    torch.testing.assert_close(z, model.get_output_embeddings()(h))


# ------------------------------------------------------------------------------------ engine + self-check


@pytest.fixture
def accept(monkeypatch):
    """Let the engine run these families (the architecture guard is issue 15's harness's business)."""
    monkeypatch.setattr(ablation, "SUPPORTED_ARCHITECTURES",
                        ablation.SUPPORTED_ARCHITECTURES + tuple(t for t, _ in ENGINE_CASES))


@pytest.mark.parametrize("model_type,gqa", ENGINE_CASES, ids=[f"{t}-{'gqa' if g else 'mha'}" for t, g in ENGINE_CASES])
@torch.no_grad()
def test_engine_equals_the_models_forward_with_scaled_logits(accept, model_type, gqa):
    model = tiny(model_type, gqa)
    enc = _batch()
    cache = engine.prepare(model, enc)  # the self-check passes
    stock = torch.log_softmax(model(**enc).logits[:, -1].double(), -1)
    assert (cache.clean_logprobs - stock.float()).abs().max() <= 1e-5
    heads = [(1, 2), (2, 0)]
    result = engine.sweep(cache, [heads], "scaling", want=("kl", "logprobs"), progress=False)
    with ablated(model, heads, "scaling"):
        ablated_lp = torch.log_softmax(model(**enc).logits[:, -1].double(), -1)
    assert (result.logprobs[0] - ablated_lp.float()).abs().max() <= 1e-5
    kl = (stock.exp() * (stock - ablated_lp)).sum(-1)
    torch.testing.assert_close(result.kl[0], kl, rtol=1e-4, atol=1e-7)
    assert kl.min() > 1e-4  # the ablation did something


@torch.no_grad()
def test_a_missed_logit_scale_is_refused(accept, monkeypatch):
    """The engine as it was before lm_head.py (output embedding only) on a Cohere model: refused."""
    model = tiny("cohere")
    enc = _batch()
    monkeypatch.setattr(lm_head, "logit_transform", lambda m: lm_head.LogitTransform())
    with pytest.raises(UnsupportedModelError, match="self-check failed") as info:
        engine.prepare(model, enc)
    assert "\n" not in str(info.value) and "'cohere'" in str(info.value)
    engine.prepare(model, enc, self_check=False)  # without the check it would have been scored


class _DoubledLlama(LlamaForCausalLM):
    """A Llama whose forward doubles its logits: a post-processing no rule in lm_head.py knows."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


@torch.no_grad()
def test_an_unknown_lm_head_scaling_is_refused():
    stock = tiny_model("llama")
    model = _DoubledLlama(stock.config).eval()
    model.load_state_dict(stock.state_dict())
    assert model.config.model_type == "llama"  # passes the architecture guard
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        engine.prepare(model, _batch())


@torch.no_grad()
def test_self_check_costs_one_forward_per_mini_batch(monkeypatch):
    model = tiny_model("llama")
    enc = _batch()
    calls: list[dict] = []
    original = model.forward

    @functools.wraps(original)  # keeps the signature the check reads logits_to_keep from
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    engine.prepare(model, enc, self_check=False)
    assert calls == []  # the clean pass runs the backbone, not the model's forward
    engine.prepare(model, enc)
    assert len(calls) == 1 and calls[0]["logits_to_keep"] == 1  # all 4 prompts in one forward, last position only
    calls.clear()
    monkeypatch.setattr(engine, "MAX_GROUP", 3)
    engine.prepare(model, enc)
    assert len(calls) == 2


@torch.no_grad()
def test_check_against_forward_reports_the_gap():
    """The returned gap is the real one: an engine-side shift of one token's log-prob by 0.01
    is reported as 0.01 and refused under a tolerance of 1e-3."""
    model = tiny_model("llama")
    enc = _batch()
    cache = engine.prepare(model, enc)
    assert engine.check_against_forward(model, enc, cache.clean_logprobs) <= 1e-5
    shifted = cache.clean_logprobs.clone()
    top = shifted[0].argmax()
    shifted[0, top] -= 0.01
    assert engine.check_against_forward(model, enc, shifted, tolerance=1.0) == pytest.approx(0.01, abs=1e-4)
    with pytest.raises(UnsupportedModelError):
        engine.check_against_forward(model, enc, shifted)
