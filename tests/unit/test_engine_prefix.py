"""Shared-prefix replay (engine.prepare/sweep): prompts that start with the same tokens (a chat
template's system header) replay that prefix once per configuration. Must equal the plain sweep
and a full padded recompute with `ablated()`, on every architecture, MHA and GQA, every method."""

from __future__ import annotations

import pytest
import torch

from safetyheads.ablation import HeadAblator, ablated
from safetyheads.engine import MIN_SHARED_PREFIX, prepare, shared_prefix_length, single_head_configs, sweep
from tiny_models import CASE_IDS, CASES, LAYERS, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

PREFIX = 6
OWN_LENGTHS = (5, 3, 5, 1, 4)  # groups of 1 and 2 prompts; one prompt has a single token of its own
CONFIGS = [[(2, 1)], [], [(0, 3)], [(LAYERS - 1, 2)], [(1, 0), (3, 3)], [(2, 1), (0, 0)], [(0, 1)]]


def _encoded(seed: int = 0):
    prefix = random_ids(1, PREFIX, seed=99)[0]
    prompts = [torch.cat([prefix, random_ids(1, n, seed=seed + i)[0]]) for i, n in enumerate(OWN_LENGTHS)]
    ids, mask, pos = left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def model(request):
    arch, gqa = request.param
    # a sliding window longer than the prompts: windowed layers (their masks and cache layers)
    # take part, but nothing is cut off (shorter windows switch sharing off, tested below)
    return tiny_model(arch, gqa, window=64)


@pytest.fixture(scope="module")
def caches(model):
    enc = _encoded()
    return prepare(model, enc), prepare(model, enc, share_prefix=False)


def test_prefix_is_found(model, caches):
    shared, plain = caches
    # random ids may happen to continue the prefix by a token or two
    assert shared.prefix_length >= PREFIX and plain.prefix_length == 0
    assert sum(g.length for g in shared.groups) < sum(g.length for g in plain.groups)
    assert (shared.clean_logprobs - plain.clean_logprobs).abs().max() <= 1e-5
    assert (shared.clean_hidden - plain.clean_hidden).abs().max() <= 1e-5
    assert (shared.head_means - plain.head_means).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["undifferentiated", "uniform", "scaling", "mean"])
def test_shared_prefix_equals_plain_sweep_and_full_recompute(model, caches, method):
    shared, plain = caches
    a = sweep(shared, CONFIGS, method, 1e-5, want=("kl", "hidden", "logprobs"), batch_size=3, progress=False)
    b = sweep(plain, CONFIGS, method, 1e-5, want=("kl", "hidden", "logprobs"), batch_size=3, progress=False)
    assert (a.kl - b.kl).abs().max() <= 1e-5
    assert (a.hidden - b.hidden).abs().max() <= 1e-5
    enc = _encoded()
    for c, heads in enumerate(CONFIGS):
        with torch.no_grad():
            if method == "mean":
                with HeadAblator.from_configs(model, [heads], "mean", mean_values=shared.head_means):
                    out = model(**enc, output_hidden_states=True)
            else:
                with ablated(model, heads, method, 1e-5):
                    out = model(**enc, output_hidden_states=True)
        lp = torch.log_softmax(out.logits[:, -1].double(), -1)
        assert (a.logprobs[c] - lp.float()).abs().max() <= 1e-5, heads
        assert (a.hidden[c] - out.hidden_states[-1][:, -1]).abs().max() <= 1e-5, heads
        if heads:
            assert a.kl[c].max() > 1e-6


def test_block_and_chunk_sizes_agree(model, caches):
    shared, _ = caches
    configs = single_head_configs(LAYERS, 4)
    a = sweep(shared, configs, "undifferentiated", want=("kl", "hidden"), batch_size=1, progress=False)
    b = sweep(shared, configs, "undifferentiated", want=("kl", "hidden"), batch_size=1000, progress=False)
    assert (a.kl - b.kl).abs().max() <= 1e-5  # float32 sums in different batch shapes
    assert (a.hidden - b.hidden).abs().max() <= 1e-5


def test_when_the_prefix_is_not_shared():
    model = tiny_model("llama", True)
    ids = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8]]
    assert shared_prefix_length(model, ids) == 6
    assert shared_prefix_length(model, [[1, 2, 3, 4, 5]] * 2) == 4  # each prompt keeps its last token
    assert shared_prefix_length(model, [ids[0]]) == 0  # one prompt: nothing to share
    assert shared_prefix_length(model, [[1, 2, 3, 9], [1, 2, 3, 8]]) == 0  # below MIN_SHARED_PREFIX
    assert MIN_SHARED_PREFIX == 4
    model.config.sliding_window = 4  # a window shorter than the prompts: the cache would drop keys
    try:
        assert shared_prefix_length(model, ids) == 0
    finally:
        model.config.sliding_window = None
