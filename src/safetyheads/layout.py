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
               "layer_norm", "final_ln", "output_norm",
               "layernorm", "embedding_norm")  # CTRL; LFM2 / LFM3 (NeoMME's start-of-stack embedding_norm: final_norm first)
_INTERFACE_MARKS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")
_routes_cache: dict[type, bool] = {}


# BERT-style backbones (BertModel, RobertaModel, ...) keep their layer stack one level down, in an
# `encoder` module (`bert.encoder.layer`) that may close it with a norm of its own (MegatronBERT's
# `encoder.ln`, XLM-RoBERTa-XL's `encoder.LayerNorm`); the backbone itself may norm the stack's
# output too (RoBERTa-PreLayerNorm's `roberta_prelayernorm.LayerNorm`). Looked for only where the
# module has no `decoder` of its own (an encoder-decoder model's layers are its decoder's).
_STACK_HOLDERS = ("encoder",)
_STACK_NORM_NAMES = ("LayerNorm", "ln")


def _own_layer_list(module: nn.Module) -> nn.ModuleList | None:
    for name in _LAYER_LIST_NAMES:
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    return None


def _stack_holder(module: nn.Module) -> nn.Module | None:
    """The module holding the layer list `module` owns: `module` itself, or its BERT-style
    `encoder` child (whose forward runs the layers for it)."""
    if _own_layer_list(module) is not None:
        return module
    if isinstance(getattr(module, "decoder", None), nn.Module):
        return None
    for name in _STACK_HOLDERS:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and _own_layer_list(child) is not None:
            return child
    return None


def _layer_list(module: nn.Module) -> nn.ModuleList | None:
    holder = _stack_holder(module)
    return None if holder is None else _own_layer_list(holder)


def _check_causal(backbone: nn.Module) -> None:
    """A BERT-style backbone is a causal decoder only when built with `is_decoder=True`; without
    it (an encoder checkpoint loaded as a CausalLM: transformers only warns) its layers attend
    bidirectionally, and the last position's scores would mean nothing."""
    config = getattr(backbone, "config", None)
    if _stack_holder(backbone) is not backbone and getattr(config, "is_decoder", None) is False:
        raise UnsupportedModelError(
            f"not a causal decoder: {type(backbone).__name__} is configured with is_decoder=False, so its "
            "layers attend bidirectionally (load it with is_decoder=True)")


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
                _check_causal(m)
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
_NORMING_HEADS = ("hyper_connection_mixer",)  # Qwen4-Exp: RMS-norms the hyper-connection streams, mixes them to [.., D]


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
    for name in _NORMING_HEADS:  # no norm: a head that norms and collapses the stack's output itself
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    holder = _stack_holder(backbone)
    if holder is not None and holder is not backbone:
        # BERT-style: the encoder's closing norm (MegatronBERT, XLM-RoBERTa-XL), then the
        # backbone's own after the encoder returns (RoBERTa-PreLayerNorm); both in turn if both
        found = [m for m in (_named_module(holder, _NORM_NAMES + _STACK_NORM_NAMES),
                             _named_module(backbone, _STACK_NORM_NAMES)) if m is not None]
        if len(found) == 2:
            return _HeadThenNorm(found[0], found[1])
        if found:
            return found[0]
    return _NoNorm()


def _named_module(owner: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first of `owner`'s attributes `names` that is a module."""
    for name in names:
        module = getattr(owner, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def numbers_own_positions(model: nn.Module) -> bool:
    """Whether the model numbers its positions from its input ids (RoBERTa-style learned positions:
    padding_idx + 1 at the first token, pad tokens skipped; the backbone's `embeddings` derive
    them with `create_position_ids_from_input_ids`). Position ids counted from 0 must then not be
    passed to its forward: they would shift every position by padding_idx + 1."""
    try:
        embeddings = getattr(decoder_backbone(model), "embeddings", None)
    except UnsupportedModelError:
        return False
    return callable(getattr(embeddings, "create_position_ids_from_input_ids", None))


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
    for name in ("attention", "self_attn", "attn"):
        # BERT-style: the layer's `attention` wraps the self-attention proper with its output
        # projection + residual LayerNorm (BertAttention: `.self` = BertSelfAttention, `.output`)
        wrapper = getattr(layer, name, None)
        inner = getattr(wrapper, "self", None) if isinstance(wrapper, nn.Module) else None
        if isinstance(inner, nn.Module) and routes_through_interface(inner):
            return inner
    for name, child in layer.named_children():
        # one level down: a norm-attention-norm wrapper around the attention (DBRX's `norm_attn_norm.attn`)
        if "cross" not in name and not isinstance(child, nn.ModuleList):
            for inner_name in ("self_attn", "attention", "attn"):
                inner = getattr(child, inner_name, None)
                if isinstance(inner, nn.Module) and routes_through_interface(inner):
                    return inner
    return None


def attention_module(layer: nn.Module) -> nn.Module:
    module = layer_attention(layer)
    if module is None:
        raise UnsupportedModelError(f"no softmax attention routed through the attention interface in {type(layer).__name__}")
    return module


def _own_attention_kind(model: nn.Module) -> str:
    """What a model's self-computed attention is, from its modelling source (one phrase)."""
    import inspect
    import sys

    try:
        source = inspect.getsource(sys.modules[type(model).__module__]).lower()
    except (OSError, TypeError, KeyError):
        return "computes it itself"
    if "softmax(" not in source:  # a call, not a docstring's mention
        return "computes it without a softmax (recurrent, linear or hashing attention)"
    if "alibi" in source:
        return "computes it itself with an ALiBi position bias"
    if "relative" in source or "rel_attn" in source or "position_bias" in source:
        return "computes it itself, with relative-position terms in its code"
    return "computes it itself (eager attention code of its own)"


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: its softmax attention module} for the decoder layers that have one; the
    heads of the other layers are absent (hybrid models: Mamba / linear-attention layers)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        module = layer_attention(layer)
        if module is not None:
            out[i] = module
    if not out:
        # (a BERT-style wrapper is named by its `.self`, the module that computes the attention)
        own = [type(getattr(m, "self", None) if isinstance(getattr(m, "self", None), nn.Module) else m).__name__
               for layer in decoder_layers(model) for m in layer.children()
               if "attention" in type(m).__name__.lower() and "linear" not in type(m).__name__.lower()]
        if own:
            raise UnsupportedModelError(f"attention not routed through the attention interface: {own[0]} "
                                        f"{_own_attention_kind(model)}, so the wrapper cannot reach its heads")
        raise UnsupportedModelError(
            f"no softmax attention routed through the attention interface in {type(model).__name__}'s decoder "
            "layers (state-space / recurrent / linear-attention layers only)")
    return out
