"""Surgery edits the weights of a session-scoped real model in place: this puts them back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from safetyheads.ablation import attention_module, decoder_layers


@contextmanager
def restored_attention(model, heads) -> Iterator[dict]:
    """Save the attention parameters of the heads' layers, yield the saved copies ({(layer, name):
    tensor}), and copy them back afterwards, whatever the block did."""
    layers = decoder_layers(model)
    saved = {(l, n): p.detach().clone() for l, _ in heads for n, p in attention_module(layers[l]).named_parameters()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for (l, n), value in saved.items():
                attention_module(layers[l]).get_parameter(n).copy_(value)
