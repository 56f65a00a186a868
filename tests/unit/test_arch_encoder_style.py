"""BERT / RoBERTa-style `...ForCausalLM` decoders (issue 15): layers one level down in the
backbone's `encoder` (`bert.encoder.layer`), the attention proper in `layer.attention.self`, a
post-LN stack (or a closing norm in the encoder / backbone), and an LM head that is a transform
(dense + activation + LayerNorm) before the output embedding. Oracles: the harness's own checks,
the stock model's forward on a left-padded batch, the backbone's own last hidden state, and the
model's own bidirectional behaviour when it is not built as a decoder."""

from __future__ import annotations

import pytest
import torch

from safetyheads import ablation, archcheck, engine, layout, lm_head
from safetyheads.errors import UnsupportedModelError

from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)


def _tiny(model_type: str, *, is_decoder: bool = True, seed: int = 0) -> torch.nn.Module:
    """A tiny stock model of `model_type` built by transformers itself (not the harness), eager."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  is_decoder=is_decoder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # away from the 0.02 init, so heads and the head transform matter
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def _left_padded(pad: int) -> dict:
    """3 prompts of lengths 7, 4, 6 (ids 3..95), left padded with `pad` (as a tokenizer pads)."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (n,), generator=gen) for n in (7, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
def test_harness_accepts(model_type):
    result = archcheck.check_type(model_type)
    assert result["status"] == "accepted", result.get("reason")
    assert {"causal", "empty", "uniform-changes", "scaling", "uniform-weights", "sweep"} <= set(
        result["variants"]["mha"]["checks"])


@pytest.mark.parametrize("model_type,own_positions", [("bert", False), ("roberta", True)])
@torch.no_grad()
def test_engine_clean_logprobs_equal_the_stock_model_on_a_left_padded_batch(model_type, own_positions):
    """engine.prepare runs each prompt unpadded through the backbone, then the model's own head
    (transform + decoder); the oracle is the stock CausalLM forward on the left-padded batch, as a
    user calls it: BERT with 0-based position ids, RoBERTa without (it numbers positions itself
    from padding_idx + 1, skipping its pad tokens)."""
    model = _tiny(model_type)
    enc = _left_padded(int(model.config.pad_token_id))
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if not own_positions:
        kw["position_ids"] = enc["position_ids"]
    assert layout.numbers_own_positions(model) is own_positions  # so the self-check passes none to RoBERTa
    stock = torch.log_softmax(model(**kw).logits[:, -1].double(), -1)  # [P, V]
    with ablation.unguarded():
        cache = engine.prepare(model, enc, share_prefix=False, self_check=False)
    assert lm_head.logit_transform(model).head  # the model's own head module, not the bare decoder
    assert (cache.clean_logprobs.double() - stock).abs().max() < 1e-4
    # the bare output embedding (no transform) would score another distribution
    bare = torch.log_softmax(model.get_output_embeddings()(cache.clean_hidden).double(), -1)
    assert (bare - stock).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", ["xlm-roberta-xl", "roberta-prelayernorm", "megatron-bert"])
@torch.no_grad()
def test_final_norm_reproduces_the_backbone_output(model_type):
    """The closing LayerNorm of the encoder (XLM-R XL, MegatronBERT) or of the backbone
    (RoBERTa-PreLN) is found: final_norm(last layer's output) == the backbone's last hidden state."""
    model = _tiny(model_type)
    backbone, layers = layout.decoder_backbone(model), layout.decoder_layers(model)
    norm = layout.final_norm(model)
    assert not isinstance(norm, layout._NoNorm)
    seen = []
    hook = layers[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, (tuple, list)) else out))
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    try:
        reference = backbone(input_ids=ids).last_hidden_state  # [B, T, D]
    finally:
        hook.remove()
    assert torch.allclose(norm(seen[-1]), reference, atol=1e-5)


@torch.no_grad()
def test_an_encoder_checkpoint_loaded_as_a_causal_lm_is_refused():
    """Built with is_decoder=False (transformers only warns), a BERT attends bidirectionally: the
    last token changes the first position (the oracle), and layout refuses it in one line."""
    model = _tiny("bert", is_decoder=False)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = 3 + (int(ids[0, -1]) - 3 + 11) % 93
    assert (model(input_ids=ids).logits[0, 0] - model(input_ids=changed).logits[0, 0]).abs().max() > 1e-4
    with pytest.raises(UnsupportedModelError, match="not a causal decoder.*is_decoder=False"):
        layout.decoder_layers(model)


def test_the_screen_refuses_a_nonlinear_head():
    """The gradient screen's closed-form Jacobian (slope · W) ignores a head transform: refused in
    one line rather than screened wrongly; BertGeneration's head (the decoder alone) stays linear."""
    model = _tiny("roberta")
    with pytest.raises(UnsupportedModelError, match="LM head not linear"):
        lm_head.logits_and_slope(model, torch.zeros(1, 32))
    linear = _tiny("bert-generation")
    t = lm_head.logit_transform(linear)
    assert t.head and not t.nonlinear
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    z, slope = lm_head.logits_and_slope(linear, h)
    assert slope is None and torch.allclose(z, linear.get_output_embeddings()(h), atol=1e-6)


@torch.no_grad()
def test_helpfulness_logprobs_of_a_roberta_decoder_use_its_own_positions(monkeypatch):
    """evaluate's last-position log-probs (helpfulness KL / top-1) on a left-padded batch of a model that
    numbers its own positions: no 0-based position ids may be passed (they would shift every position
    by padding_idx + 1). Oracle: the stock model on each prompt alone, as a user runs it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from safetyheads import prompts as prompt_mod
    from safetyheads.evaluate import last_token_logprobs

    from tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()
    config = AutoConfig.for_model("roberta", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, is_decoder=True,
                                  pad_token_id=tok.pad_token_id,  # positions start after it: a table that reaches past
                                  max_position_embeddings=tok.pad_token_id + 64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    texts = ["Hi", "How do I pick a lock?", "Tell me a story"]
    monkeypatch.setattr(prompt_mod, "pads_safely", lambda m: True)  # padded batches (RoBERTa skips real pads)
    got = last_token_logprobs(model, tok, texts, fmt="raw", batch_size=3)  # [P, V]
    for p, text in enumerate(texts):
        ids = tok(text, return_tensors="pt").input_ids
        alone = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        assert (got[p].double() - alone).abs().max() < 1e-4, text
