"""The engine's out-of-memory path, forced on CPU by injecting the exception.

A GPU sweep that runs out of memory must halve its batch and retry, and the scores must not change.
CPU tests cannot run out of GPU memory, so the decoder layers are wrapped to raise
`torch.cuda.OutOfMemoryError` (what PyTorch raises on CUDA) whenever they see more rows than a
limit: exactly what a too-large batch does on a GPU. The clean pass (one row per prompt) stays
under the limit; the sweep's first batches do not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safetyheads import engine
from safetyheads.prompts import Encoded
from tiny_models import one_thread  # noqa: F401  (autouse: tiny matrices run on one thread)

N_LAYERS, N_HEADS, N_PROMPTS = 3, 4, 3


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: ablations then move the scores visibly
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.eval()


@pytest.fixture(scope="module")
def encoded():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (N_PROMPTS, 9), generator=g)                  # [P, T]
    lengths = torch.tensor([9, 9, 7])                                       # two length groups: 2 + 1 prompts
    start = (9 - lengths).unsqueeze(1)                                       # [P, 1] left padding
    positions = torch.arange(9).unsqueeze(0)                                 # [1, T]
    mask = (positions >= start).long()
    return Encoded(input_ids=ids * mask, attention_mask=mask, position_ids=(positions - start).clamp(min=0))


class OOMInjector:
    """Wraps every decoder layer's forward: more than `limit` rows -> CUDA out-of-memory error."""

    def __init__(self, model, limit: int, times: int | None = None):
        self.layers = model.model.layers
        self.limit, self.times = limit, times
        self.raised, self.largest_ok = 0, 0

    def __enter__(self):
        for layer in self.layers:
            original = layer.forward

            def forward(hidden_states, *args, _original=original, **kwargs):
                rows = hidden_states.shape[0]                                # hidden_states [rows, T, D]
                if rows > self.limit and (self.times is None or self.raised < self.times):
                    self.raised += 1
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                self.largest_ok = max(self.largest_ok, rows)
                return _original(hidden_states, *args, **kwargs)

            layer.forward = forward                                          # instance attribute, undone below
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


CONFIGS = [[(layer, head)] for layer in range(N_LAYERS) for head in range(N_HEADS)] + [[(0, 1), (2, 3)]]


@pytest.mark.parametrize("method", ["undifferentiated", "scaling"])
def test_oom_halves_the_batch_and_keeps_the_results(model, encoded, method):
    cache = engine.prepare(model, encoded)
    start = len(CONFIGS) * N_PROMPTS                                         # every row in one batch
    reference = engine.sweep(cache, CONFIGS, method, want=("kl", "hidden"), batch_size=start, progress=False)
    assert reference.batch_size == start

    # Any batch of more than one configuration's rows runs out of memory: the engine must halve
    # (repeatedly) and still produce every configuration's result.
    with OOMInjector(model, limit=N_PROMPTS) as oom:
        halved = engine.sweep(cache, CONFIGS, method, want=("kl", "hidden"), batch_size=start, progress=False)
    assert oom.raised >= 1, "the injected out-of-memory path was not exercised"
    assert oom.largest_ok <= N_PROMPTS
    assert halved.batch_size < start
    torch.testing.assert_close(halved.kl, reference.kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(halved.hidden, reference.hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(halved.clean_hidden, reference.clean_hidden)
    # The scores are not trivially zero: the comparison above compares something.
    assert float(reference.kl.max()) > 1e-6


def test_a_single_oom_halves_once(model, encoded):
    cache = engine.prepare(model, encoded)
    start = len(CONFIGS) * N_PROMPTS
    reference = engine.sweep(cache, CONFIGS, "scaling", want=("kl",), batch_size=start, progress=False)
    with OOMInjector(model, limit=N_PROMPTS, times=1) as oom:
        once = engine.sweep(cache, CONFIGS, "scaling", want=("kl",), batch_size=start, progress=False)
    assert oom.raised == 1
    assert start // 4 <= once.batch_size < start
    torch.testing.assert_close(once.kl, reference.kl, rtol=1e-4, atol=1e-7)


def test_other_errors_are_not_swallowed(model, encoded):
    """Only out-of-memory is retried: a genuine bug must surface, not loop forever halving."""
    cache = engine.prepare(model, encoded)
    layer = model.model.layers[1]

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch (a real bug)")

    layer.forward = broken
    try:
        with pytest.raises(RuntimeError, match="real bug"):
            engine.sweep(cache, CONFIGS, "scaling", want=("kl",), batch_size=8, progress=False)
    finally:
        del layer.forward


def test_work_reported_for_progress_is_taken_back_on_a_retry(model, encoded):
    """`on_work` feeds the progress bars: when a block is redone after an out-of-memory error in its
    third chunk, the two chunks already reported are taken back, so the net total is still each
    configuration's layer passes (L - first ablated layer) times the prompts."""
    cache = engine.prepare(model, encoded)
    last = model.model.layers[N_LAYERS - 1]                                  # every chunk's replay ends here
    original, calls = last.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(*args, **kwargs)

    told: list[int] = []
    last.forward = forward
    try:
        engine.sweep(cache, CONFIGS, "scaling", want=("kl",), batch_size=4, progress=False, on_work=told.append)
    finally:
        del last.forward
    assert told[2] == -(told[0] + told[1]), "the redone block's reported work was not taken back"
    expected = sum(N_LAYERS - min(layer for layer, _ in c) for c in CONFIGS) * N_PROMPTS
    assert sum(told) == expected
