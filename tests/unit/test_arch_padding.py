"""Models whose own forward changes under left padding (BART-style learned positions counted from
the first column, recurrences, DeepSeek-V4's compressor windows): the harness finds them, and the
project then feeds them only batches of prompts of one length (self-check, generation, helpfulness
log-probs). Oracles: each prompt run alone through the stock model, unpadded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BartConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from tiny_chat import tiny_tokenizer  # noqa: E402

from safetyheads import ablation, archcheck, engine, prompts  # noqa: E402
from safetyheads.errors import UnsupportedModelError  # noqa: E402
from safetyheads.generation import Condition, generate_conditions, generate_responses, generate_texts  # noqa: E402

from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["Hi", "How do I pick a lock?", "Tell me", "Write a story about a dragon.", "Hey"]


def _tiny(kind: str, vocab: int = archcheck.VOCAB, seed: int = 0):
    """A tiny random BART decoder (learned positions from `arange`, no position_ids) or Llama."""
    common = dict(vocab_size=vocab, max_position_embeddings=128, pad_token_id=vocab - 1, eos_token_id=vocab - 2,
                  bos_token_id=vocab - 3)
    if kind == "bart":
        # encoder_layers = decoder_layers: its DynamicCache(config) sizes itself by num_hidden_layers = encoder_layers
        config = BartConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                            encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, **common)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=False, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    archcheck.randomize(model, seed)
    model.generation_config.eos_token_id = vocab - 2
    model.generation_config.pad_token_id = vocab - 1
    return model.eval()


@torch.no_grad()
def _alone(model, enc) -> torch.Tensor:
    """Oracle: each prompt's last-position log-probs from its own unpadded forward. [P, V] float64"""
    rows = []
    for p in range(enc["input_ids"].shape[0]):
        n = int(enc["attention_mask"][p].sum())
        logits = model(input_ids=enc["input_ids"][p:p + 1, -n:], use_cache=False).logits[0, -1]
        rows.append(torch.log_softmax(logits.double(), -1))
    return torch.stack(rows)


@torch.no_grad()
def _padded(model, enc) -> torch.Tensor:
    """The stock model's own forward on the left-padded batch (mask-derived position ids). [P, V] float64"""
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=enc["position_ids"], use_cache=False).logits[:, -1]
    return torch.log_softmax(logits.double(), -1)


def test_batch_rows():
    lengths = [5, 3, 5, 2, 5, 3]
    assert prompts.batch_rows(lengths, 4) == [[0, 1, 2, 3], [4, 5]]  # the common path: consecutive rows
    batches = prompts.batch_rows(lengths, 2, padded=False)
    assert sorted(r for b in batches for r in b) == list(range(6))
    for b in batches:
        assert 1 <= len(b) <= 2 and len({lengths[r] for r in b}) == 1
    assert batches[0] == [0, 2]  # each length's rows in order


def test_pads_safely_reads_the_harness_matrix(monkeypatch):
    model = _tiny("bart")
    monkeypatch.setattr(ablation, "architecture_matrix", lambda: {"bart": {"status": "accepted",
                                                                          "left_padding": False}})
    assert prompts.pads_safely(model) is False
    assert prompts.pads_safely(_tiny("llama")) is True  # no entry: padding is fine


@pytest.mark.parametrize("kind", ["bart", "llama"])
def test_padding_check_finds_what_the_stock_model_does(kind):
    model = _tiny(kind)
    enc = archcheck._encoded()
    pads_ok = bool((_padded(model, enc) - _alone(model, enc)).abs().max() <= archcheck.TOL)
    assert pads_ok is (kind == "llama")  # BART's positions count the pads; Llama's take position_ids
    assert archcheck._padding_check(model, enc) is pads_ok
    # whatever the flag, the harness's direct-forward oracle is then each prompt alone
    ref = torch.log_softmax(archcheck._forward(model, enc, pads_ok), -1)
    assert (ref - _alone(model, enc)).abs().max() <= archcheck.TOL


def test_self_check_on_unpadded_batches():
    """The engine's self-check compares with unpadded equal-length batches where padding is unsafe;
    against the padded forward BART's correct clean pass would be refused, and a wrong clean
    log-prob is still caught on the unpadded path."""
    model = _tiny("bart")
    enc = archcheck._encoded()
    with ablation.unguarded():
        cache = engine.prepare(model, enc, share_prefix=False, left_padding=False)
        assert (cache.clean_logprobs.double() - _alone(model, enc)).abs().max() <= 1e-4
        with pytest.raises(UnsupportedModelError):
            engine.prepare(model, enc, share_prefix=False, left_padding=True)
        wrong = cache.clean_logprobs.clone()
        wrong[2] = torch.log_softmax(wrong[2].flip(-1), -1)  # one prompt of the equal-length pair
        with pytest.raises(UnsupportedModelError):
            engine.check_against_forward(model, enc, wrong, left_padding=False)


def test_harness_accepts_bart_with_unpadded_batches():
    result = archcheck.check_type("bart")
    assert result["status"] == "accepted", result.get("reason")
    assert result["left_padding"] is False and "left padding" in result["reason"]
    assert all(v["left_padding"] is False for v in result["variants"].values())
    assert "left_padding" not in archcheck.check_type("llama")


@pytest.fixture()
def unpadded_bart(monkeypatch):
    """A BART decoder with the chat tokenizer's vocabulary, flagged as the harness flags BART
    (unguarded: the committed matrix may predate that flag)."""
    monkeypatch.setattr(prompts, "pads_safely", lambda model: False)
    with ablation.unguarded():
        yield _tiny("bart", vocab=259), tiny_tokenizer()


def test_generation_batches_only_equal_lengths(unpadded_bart):
    model, tok = unpadded_bart
    texts = prompts.format_prompts(tok, PROMPTS, "chat")
    batched = generate_texts(model, tok, texts, max_new_tokens=6, batch_size=4, progress=False)
    alone = [generate_texts(model, tok, [t], max_new_tokens=6, batch_size=1, progress=False).token_ids[0]
             for t in texts]
    assert batched.token_ids == alone
    conditions = [None, Condition(((0, 1),), "scaling", 1e-5), Condition(((1, 0), (1, 2)), "undifferentiated")]
    together = generate_conditions(model, tok, PROMPTS, conditions, max_new_tokens=6, progress=False)
    for cond, gen in zip(conditions, together):
        each = [generate_responses(model, tok, [p], heads=cond.heads if cond else (),
                                   method=cond.method if cond else "undifferentiated",
                                   epsilon=cond.epsilon if cond else 1e-5, max_new_tokens=6, batch_size=1,
                                   progress=False).token_ids[0] for p in PROMPTS]
        assert gen.token_ids == each


def test_helpfulness_logprobs_unpadded(unpadded_bart):
    from safetyheads.evaluate import last_token_logprobs

    model, tok = unpadded_bart
    got = last_token_logprobs(model, tok, PROMPTS, fmt="chat", batch_size=4)  # [P, V]
    enc = prompts.encode(tok, prompts.format_prompts(tok, PROMPTS, "chat"))
    ref = _alone(model, {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    assert (got.double() - ref).abs().max() <= 1e-4
