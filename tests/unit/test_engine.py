"""The sweep engine on tiny random models of every supported architecture, MHA and GQA
(issue 3, acceptance 1 and 4): the clean pass equals the stock model, prefix reuse with batched
per-example ablations equals a full recompute with `ablated()`, chunking and OOM halving."""

from __future__ import annotations

import pytest
import torch

from safetyheads.ablation import ablated
from safetyheads.engine import prepare, single_head_configs, sweep
from safetyheads.errors import UsageError
from tiny_models import CASE_IDS, CASES, LAYERS, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

PROMPT_LENGTHS = (9, 5, 9, 7)  # two prompts share a length: groups of 1 and 2 prompts
CONFIGS = [[(2, 1)], [], [(0, 3)], [(LAYERS - 1, 2)], [(1, 0), (3, 3)], [(2, 1), (0, 0)]]


def _encoded(seed: int = 0):
    prompts = [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(PROMPT_LENGTHS)]
    ids, mask, pos = left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def model(request):
    arch, gqa = request.param
    return tiny_model(arch, gqa)


@pytest.fixture(scope="module")
def cache(model):
    return prepare(model, _encoded())


@torch.no_grad()
def _full_recompute(model, enc, heads, method, epsilon=1e-5):
    """Last-position log-probs and final-norm hidden states of a plain padded forward."""
    with ablated(model, heads, method, epsilon):
        out = model(**enc, output_hidden_states=True)
    logits = out.logits[:, -1].double()
    return torch.log_softmax(logits, -1), out.hidden_states[-1][:, -1]


@torch.no_grad()
def test_clean_pass_equals_stock_model(model, cache):
    stock_lp, stock_hidden = _full_recompute(model, _encoded(), [], "scaling")
    assert (cache.clean_logprobs - stock_lp.float()).abs().max() <= 1e-5
    assert (cache.clean_hidden - stock_hidden).abs().max() <= 1e-5
    result = sweep(cache, [[]], "undifferentiated", want=("kl", "hidden", "logprobs"), progress=False)
    assert torch.equal(result.kl, torch.zeros(1, len(PROMPT_LENGTHS), dtype=torch.float64))
    assert (result.logprobs[0] - stock_lp.float()).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["undifferentiated", "uniform", "scaling", "mean"])
def test_prefix_reuse_equals_full_recompute(model, cache, method):
    result = sweep(cache, CONFIGS, method, 1e-5, want=("kl", "hidden", "logprobs"), batch_size=5, progress=False)
    enc = _encoded()
    for c, heads in enumerate(CONFIGS):
        if method == "mean":  # full recompute with the same (clean, dataset-wide) head means
            from safetyheads.ablation import HeadAblator

            with torch.no_grad(), HeadAblator.from_configs(model, [heads], "mean", mean_values=cache.head_means):
                out = model(**enc, output_hidden_states=True)
            lp, hid = torch.log_softmax(out.logits[:, -1].double(), -1), out.hidden_states[-1][:, -1]
        else:
            lp, hid = _full_recompute(model, enc, heads, method)
        assert (result.logprobs[c] - lp.float()).abs().max() <= 1e-5, heads
        assert (result.hidden[c] - hid).abs().max() <= 1e-5, heads
        clean = cache.clean_logprobs.double()
        expected_kl = (clean.exp() * (clean - lp)).sum(-1)
        assert (result.kl[c] - expected_kl).abs().max() <= 1e-5
        if heads:
            assert result.kl[c].max() > 1e-6  # ablations do change the distribution


def test_chunking_and_batch_sizes_agree(model, cache):
    configs = single_head_configs(LAYERS, 4)
    a = sweep(cache, configs, "undifferentiated", want=("kl", "hidden"), batch_size=1, progress=False)
    b = sweep(cache, configs, "undifferentiated", want=("kl", "hidden"), batch_size=1000, progress=False)
    assert a.batch_size == 1 and b.batch_size == 1000
    assert (a.kl - b.kl).abs().max() <= 1e-6
    assert (a.hidden - b.hidden).abs().max() <= 1e-5


def test_out_of_memory_halves_batch(monkeypatch):
    model = tiny_model("llama", True)
    cache = prepare(model, _encoded())
    import safetyheads.engine as engine

    real = engine._replay

    def fake(cache_, group, configs, *args):
        if len(configs) * len(group.prompts) > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cache_, group, configs, *args)

    monkeypatch.setattr(engine, "_replay", fake)
    configs = single_head_configs(LAYERS, 4)
    result = sweep(cache, configs, "scaling", want=("kl",), batch_size=32, progress=False)
    monkeypatch.setattr(engine, "_replay", real)
    ref = sweep(cache, configs, "scaling", want=("kl",), batch_size=32, progress=False)
    assert result.batch_size <= 4
    assert (result.kl - ref.kl).abs().max() <= 1e-6


def test_sweep_rejects_bad_arguments():
    model = tiny_model("llama")
    cache = prepare(model, _encoded())
    with pytest.raises(UsageError, match="method"):
        sweep(cache, [[(0, 0)]], "zero", progress=False)
    with pytest.raises(UsageError, match="epsilon"):
        sweep(cache, [[(0, 0)]], "scaling", 1.5, progress=False)
    with pytest.raises(UsageError, match="outside"):
        sweep(cache, [[(LAYERS, 0)]], "scaling", progress=False)


def test_clean_pass_mini_batches_agree(monkeypatch):
    import safetyheads.engine as engine

    model = tiny_model("gemma2", True)  # eager: recorded masks carry a batch dimension
    whole = prepare(model, _encoded())
    monkeypatch.setattr(engine, "MAX_GROUP", 1)
    split = prepare(model, _encoded())
    assert len(split.groups) == len(PROMPT_LENGTHS) > len(whole.groups)
    a = sweep(whole, CONFIGS, "scaling", want=("kl", "hidden"), progress=False)
    b = sweep(split, CONFIGS, "scaling", want=("kl", "hidden"), progress=False)
    assert (a.kl - b.kl).abs().max() <= 1e-6
    assert (a.hidden - b.hidden).abs().max() <= 1e-5
    assert (whole.head_means - split.head_means).abs().max() <= 1e-5


@pytest.mark.parametrize("share", [True, False])
def test_work_is_reported_chunk_by_chunk(model, share):
    """`on_work` (progress bars) is told each chunk's layer passes x prompts as it finishes: the
    totals add up to the configurations' cost, and small batches report more than once."""
    cache = prepare(model, _encoded(), share_prefix=share)
    told: list[int] = []
    sweep(cache, CONFIGS, "scaling", want=("kl",), batch_size=2, progress=False, on_work=told.append)
    expected = sum(LAYERS - min(layer for layer, _ in c) for c in CONFIGS if c) * len(PROMPT_LENGTHS)
    assert sum(told) == expected
    assert len(told) > 1 and all(n > 0 for n in told)


def test_final_layer_feed_forward_runs_on_the_last_position_only(model, cache):
    """Only the last position of the final layer is read, so its feed-forward block computes that
    position alone (the results above still equal a full recompute); an instance-level forward
    (accelerate's device hooks put one there) is restored afterwards."""
    from safetyheads.ablation import decoder_layers

    mlp = decoder_layers(model)[-1].mlp
    linear = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    seen: list[int] = []
    handle = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    instance_forward = mlp.forward                                          # a bound method, stored on the instance
    mlp.forward = instance_forward
    try:
        sweep(cache, [[(LAYERS - 1, 0)], [(0, 1)]], "scaling", want=("kl",), progress=False)
    finally:
        handle.remove()
    assert seen and set(seen) == {1}
    assert mlp.__dict__["forward"] is instance_forward
    del mlp.forward
