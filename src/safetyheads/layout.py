"""Where things are in a Hugging Face causal LM: its decoder layers, each layer's softmax attention
module, and the final norm — found generically (attribute names, breadth-first), never per model class.

The engine replays layers and reads the final hidden state through these; the ablation wrapper
attaches to the attention modules they return. A model whose layout is not found is refused with a
one-line reason (`UnsupportedModelError`). Per-architecture knowledge is only needed for surgery.
"""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedModelError


_LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks", "block", "decoder_layers")
_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "norm_f", "final_norm", "ln_out",
               "layer_norm", "final_ln", "output_norm")
_INTERFACE_MARKS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")
_routes_cache: dict[type, bool] = {}


def _layer_list(module: nn.Module) -> nn.ModuleList | None:
    for name in _LAYER_LIST_NAMES:
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    return None


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and the final norm (`LlamaModel`, GPT-2's
    `transformer`, OPT's `model.decoder`, a multimodal wrapper's language model, ...)."""
    seen: list[nn.Module] = []
    frontier = [model]
    for _ in range(4):  # breadth first, a few levels: the text decoder is never buried deeper
        nxt = []
        for m in frontier:
            if any(m is s for s in seen):
                continue
            seen.append(m)
            if _layer_list(m) is not None and m is not model:
                return m
            for name in ("language_model", "text_model", "model", "transformer", "decoder", "base_model",
                         "backbone", "gpt_neox", "text_decoder"):
                child = getattr(m, name, None)
                if isinstance(child, nn.Module):
                    nxt.append(child)
        frontier = nxt
    if _layer_list(model) is not None:
        return model
    raise UnsupportedModelError(f"layout not found: cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _layer_list(decoder_backbone(model))


class _NoNorm(nn.Identity):
    """Stands in for the final norm of a model that has none."""


class _HeadThenNorm(nn.Module):
    """A backbone that collapses its layers' output before the final norm (DeepSeek V4's
    hyper-connection head: [.., hc, D] -> [.., D]): `norm(head(h))`. `tap` is the module whose
    output is the final hidden state (the clean pass hooks it)."""

    def __init__(self, head: nn.Module, norm: nn.Module):
        super().__init__()
        object.__setattr__(self, "_parts", (head, norm))  # not registered: the model owns them
        self.tap = norm

    def forward(self, hidden):
        head, norm = self._parts
        return norm(head(hidden))


_PRE_NORM_HEADS = ("hc_head",)


def final_norm(model: nn.Module) -> nn.Module:
    """What the backbone applies to the last layer's output: its final norm (after a
    hyper-connection head where it has one), or an identity module for a model without one."""
    backbone = decoder_backbone(model)
    for name in _NORM_NAMES:
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            for head in _PRE_NORM_HEADS:
                if isinstance(getattr(backbone, head, None), nn.Module):
                    return _HeadThenNorm(getattr(backbone, head), module)
            return module
    return _NoNorm()


def routes_through_interface(module: nn.Module) -> bool:
    """Whether the module's class computes its attention through transformers' attention
    interface (its source, or a base class's, looks the function up there)."""
    cls = type(module)
    if cls not in _routes_cache:
        import inspect

        found = False
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch."):
                break
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            if any(mark in source for mark in _INTERFACE_MARKS):
                found = True
                break
        _routes_cache[cls] = found
    return _routes_cache[cls]


def layer_attention(layer: nn.Module) -> nn.Module | None:
    """The softmax self-attention module of a decoder layer (routed through the attention
    interface), or None for a layer without one (Mamba, linear attention, ...)."""
    for name in ("self_attn", "attention", "attn", "self_attention", "mixer", "attn_layer", "token_mixer"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module) and routes_through_interface(module):
            return module
    for name, module in layer.named_children():
        if "cross" not in name and routes_through_interface(module) and hasattr(module, "forward"):
            if any(isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in module.children()):
                return module
    return None


def attention_module(layer: nn.Module) -> nn.Module:
    module = layer_attention(layer)
    if module is None:
        raise UnsupportedModelError(f"no softmax attention routed through the attention interface in {type(layer).__name__}")
    return module


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: its softmax attention module} for the decoder layers that have one; the
    heads of the other layers are absent (hybrid models: Mamba / linear-attention layers)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        module = layer_attention(layer)
        if module is not None:
            out[i] = module
    if not out:
        own = [type(m).__name__ for layer in decoder_layers(model) for m in layer.children()
               if "attention" in type(m).__name__.lower() and "linear" not in type(m).__name__.lower()]
        if own:
            raise UnsupportedModelError(
                f"attention not routed through the attention interface: {own[0]} computes it itself "
                "(often with a position bias such as ALiBi), so the wrapper cannot reach its heads")
        raise UnsupportedModelError(
            f"no softmax attention routed through the attention interface in {type(model).__name__}'s decoder "
            "layers (state-space / recurrent / linear-attention layers only)")
    return out
