"""The LM head exactly as each model's own CausalLM forward applies it.

The engine runs the final norm and the LM head itself, at the last position only, instead of
calling the model's forward. Many families post-process the output embedding's result, and a
sweep that skipped it would score a different distribution than the model has (Cohere's
`logit_scale` of 0.0625 moves clean log-probs by ~5 nats). Everything those forwards apply, read
from the modelling files of the installed transformers (5.x), fits one form:

    z = softcap(scale · W(hidden_scale · h)[:vocab])      softcap(x) = cap · tanh(x / cap)

where W is the output embedding, or, for BERT / RoBERTa-style heads, the model's own LM-head
module around it: a transform (dense + activation + LayerNorm) and then the output embedding
(`cls.predictions`, `lm_head`, ELECTRA's `generator_predictions` + `generator_lm_head`). Such a
head is found generically: the output embedding nested inside a direct child of the CausalLM
(`LogitTransform.head`).

`logit_transform(model)` says which numbers a model uses (for the gradient screen's Jacobian as
well as for the engine); `logits(model, hidden)` applies them. Families not listed in `_RULES`
get the Gemma-style `final_logit_softcapping` of their own config when it has one (the
CausalLM forwards that declare it apply it) and nothing else; `engine.prepare`'s self-check
compares the result with the model's own forward, so a family with a post-processing this module
does not know is refused rather than scored wrongly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class LogitTransform:
    """What a CausalLM forward does around its output embedding W (see the module docstring)."""

    hidden_scale: float = 1.0  # h × this before W (MiniCPM3: 1 / logits_scaling = dim_model_base / hidden_size)
    scale: float = 1.0  # W(h) × this (Cohere logit_scale, Granite 1 / logits_scaling, Falcon-H1 lm_head_multiplier)
    softcap: float | None = None  # then cap · tanh(z / cap) (Gemma 2 / 3 text / 3n / 4, RecurrentGemma ...)
    vocab: int | None = None  # keep the first `vocab` logits only (Inkling's padded vocabulary)
    # the model's own LM-head modules (dotted paths, applied in order) in place of the output
    # embedding alone: BERT's ("cls",), RoBERTa's ("lm_head",), ELECTRA's two; () = the output embedding
    head: tuple[str, ...] = ()
    nonlinear: bool = False  # `head` holds a transform (dense + activation + LayerNorm) before W

    @property
    def identity(self) -> bool:
        """True when the logits are W(h) itself."""
        return (self.hidden_scale == 1.0 and self.scale == 1.0 and self.softcap is None and self.vocab is None
                and not self.head)

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """Post-process raw = W(hidden_scale · h) [..., V_W] into the model's logits, in float32
        (more precise than the model's own bf16 arithmetic; the self-check tolerance allows for it)."""
        z = raw.float()
        if self.vocab is not None and self.vocab < z.shape[-1]:
            z = z[..., :self.vocab]
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _number(value: Any, what: str) -> float:
    """A config scalar as a float; a missing or non-finite one is a broken config, said so."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"the model config's {what} is {value!r}, not a number") from None
    if not math.isfinite(x) or x == 0.0:
        raise UnsupportedModelError(f"the model config's {what} is {value!r}")
    return x


def _cap(value: Any) -> float | None:
    """A soft-capping value: None or 0 means no capping (as the forwards' `is not None` tests,
    plus 0, which would divide by zero)."""
    return None if value is None or float(value) == 0.0 else float(value)


def _text(model: nn.Module) -> Any:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _cohere(model: nn.Module) -> LogitTransform:
    # CohereForCausalLM & co: `self.logit_scale = config.logit_scale` in __init__, `logits * self.logit_scale`
    # in forward (CohereCompass: None means 1; its multimodal wrapper reads the text config's).
    value = getattr(model, "logit_scale", None)
    if value is None:
        value = getattr(_text(model), "logit_scale", None)
    return LogitTransform(scale=1.0 if value is None else _number(value, "logit_scale"))


def _divide_by_logits_scaling(model: nn.Module) -> LogitTransform:
    # Granite family: `logits / self.config.logits_scaling` (the vision wrappers: text_config's)
    return LogitTransform(scale=1.0 / _number(_text(model).logits_scaling, "logits_scaling"))


def _times_logits_scaling(model: nn.Module) -> LogitTransform:
    # HyperCLOVA X: `self.lm_head(h) * self.config.logits_scaling` (the vision wrapper: text_config's)
    return LogitTransform(scale=_number(_text(model).logits_scaling, "logits_scaling"))


def _falcon_h1(model: nn.Module) -> LogitTransform:
    # FalconH1ForCausalLM: `self.lm_head(h) * self.model.lm_head_multiplier` (= config.lm_head_multiplier)
    value = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if value is None:
        value = model.config.lm_head_multiplier
    return LogitTransform(scale=_number(value, "lm_head_multiplier"))


def _minicpm3(model: nn.Module) -> LogitTransform:
    # MiniCPM3ForCausalLM: `hidden_states / self.config.logits_scaling` BEFORE the LM head, where the
    # config property logits_scaling = hidden_size / dim_model_base
    return LogitTransform(hidden_scale=1.0 / _number(model.config.logits_scaling, "logits_scaling"))


def _text_softcap(model: nn.Module) -> LogitTransform:
    # multimodal wrappers (Gemma 3n / 4 / 4-unified, PaliGemma): the text config's final_logit_softcapping
    return LogitTransform(softcap=_cap(getattr(_text(model), "final_logit_softcapping", None)))


def _own_softcap(model: nn.Module) -> LogitTransform:
    # MistralLarge4 (always capped) and DiffusionGemma keep the cap on the instance
    value = getattr(model, "final_logit_softcapping", None)
    if value is None:
        value = getattr(_text(model), "final_logit_softcapping", None)
    return LogitTransform(softcap=_cap(value))


def _inkling2(model: nn.Module) -> LogitTransform:
    # Inkling2 (and its loop variant): `self.logit_softcap(logits)`, an Inkling2Softcap(cap) module
    module = getattr(model, "logit_softcap", None)
    value = getattr(module, "softcap", None)
    if value is None:
        value = getattr(_text(model), "final_logit_softcapping", None)
    return LogitTransform(softcap=_cap(value))


def _inkling(model: nn.Module) -> LogitTransform:
    # Inkling: `last_hidden_state / config.logits_mup_width_multiplier` before the LM head, then
    # logits[..., :unpadded_vocab_size] when that is smaller than the LM head
    text = _text(model)
    value = getattr(text, "unpadded_vocab_size", None)
    mup = getattr(text, "logits_mup_width_multiplier", None)
    return LogitTransform(hidden_scale=1.0 if mup is None else 1.0 / _number(mup, "logits_mup_width_multiplier"),
                          vocab=None if value is None else int(value))


def _recurrent_gemma(model: nn.Module) -> LogitTransform:
    # RecurrentGemmaForCausalLM: always `tanh(logits / cap) * cap` with cap = config.logits_soft_cap
    return LogitTransform(softcap=_cap(model.config.logits_soft_cap))


def _muse(model: nn.Module) -> LogitTransform:
    # MuseSpark / MuseGlimmer: `logits * text_config.output_multiplier`, then the Gemma-style cap
    text = _text(model)
    return LogitTransform(scale=_number(text.output_multiplier, "output_multiplier"),
                          softcap=_cap(text.final_logit_softcapping))


def _electra(model: nn.Module) -> LogitTransform:
    # ElectraForCausalLM: `self.generator_lm_head(self.generator_predictions(hidden_states))`, two
    # sibling modules (dense + activation + LayerNorm, then the output embedding)
    return LogitTransform(head=("generator_predictions", "generator_lm_head"), nonlinear=True)


def _none(model: nn.Module) -> LogitTransform:
    # e.g. Gemma3ForConditionalGeneration, whose forward does not cap (its text config may declare a cap)
    return LogitTransform()


# model_type of the loaded model's own config (the CausalLM or multimodal wrapper that was loaded)
_RULES: dict[str, Callable[[nn.Module], LogitTransform]] = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"), _cohere),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                     "granitemoeshared", "granite4_vision", "granite_docling"), _divide_by_logits_scaling),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), _times_logits_scaling),
    "falcon_h1": _falcon_h1,
    "minicpm3": _minicpm3,
    **dict.fromkeys(("gemma3n", "gemma4", "gemma4_unified", "paligemma"), _text_softcap),
    **dict.fromkeys(("mistral_large4", "diffusion_gemma"), _own_softcap),
    **dict.fromkeys(("inkling2", "inkling2_text", "inkling2_loop", "inkling2_loop_text"), _inkling2),
    **dict.fromkeys(("inkling_text", "inkling_mm_model"), _inkling),
    "recurrent_gemma": _recurrent_gemma,
    **dict.fromkeys(("muse_spark", "muse_glimmer"), _muse),
    "gemma3": _none,
    "electra": _electra,
}


def _own_head(model: nn.Module) -> LogitTransform:
    """The LM-head module a CausalLM applies where its output embedding is nested in a direct
    child of it (BERT's `cls.predictions.decoder`, RoBERTa's `lm_head.decoder`): that child's own
    forward, i.e. its transform (dense + activation + LayerNorm) and then the output embedding.
    A head whose other sub-modules hold no parameters (BertGeneration's) is still linear."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, nn.Module):
        return LogitTransform()
    if any(child is out for child in model.children()):
        return LogitTransform()  # the usual `lm_head` Linear: W itself (no walk through the backbone)
    for name, child in model.named_children():
        if any(m is out for m in child.modules()):
            if _holds_backbone(child, model):
                return LogitTransform()  # inside the backbone's own modules, not a head of its own
            nonlinear = any(p.numel() for sub in child.modules() if sub is not out and sub is not child
                            and not any(m is out for m in sub.modules()) for p in sub.parameters(recurse=False))
            return LogitTransform(head=(name,), nonlinear=nonlinear)
    return LogitTransform()


def _holds_backbone(module: nn.Module, model: nn.Module) -> bool:
    """Whether `module` holds the decoder layers (the output embedding found inside the backbone
    is no head of its own)."""
    from .layout import decoder_layers

    try:
        layers = decoder_layers(model)
    except UnsupportedModelError:
        return False
    return any(m is layers for m in module.modules())


def logit_transform(model: nn.Module) -> LogitTransform:
    """The post-processing `model`'s own forward applies around its output embedding.

    Listed families follow `_RULES`; any other applies its config's `final_logit_softcapping` if
    it declares one (Gemma 2, Gemma 3 text, Gemma 3n / 4 text, VaultGemma, NanoChat, ...). That
    reads the loaded model's own config, not the text config: a multimodal wrapper caps only if
    its forward says so (a rule above)."""
    rule = _RULES.get(getattr(model.config, "model_type", None))
    if rule is not None:
        t = rule(model)
    else:
        t = LogitTransform(softcap=_cap(getattr(model.config, "final_logit_softcapping", None)))
    if not t.head:
        own = _own_head(model)
        if own.head:
            t = dataclasses.replace(t, head=own.head, nonlinear=own.nonlinear)
    return t


def _raw(model: nn.Module, hidden: torch.Tensor, t: LogitTransform) -> torch.Tensor:
    """W(hidden) [..., V_W]: the output embedding, or the model's own head modules in order."""
    if not t.head:
        return model.get_output_embeddings()(hidden)
    x = hidden
    for path in t.head:
        x = model.get_submodule(path)(x)
        x = x[0] if isinstance(x, (tuple, list)) else x
    return x


def logits(model: nn.Module, hidden: torch.Tensor, transform: LogitTransform | None = None) -> torch.Tensor:
    """[..., D] final-norm hidden states -> [..., V] float32 next-token logits, as the model's own
    CausalLM forward computes them (`transform`: a precomputed `logit_transform(model)`)."""
    t = logit_transform(model) if transform is None else transform
    if t.hidden_scale != 1.0:
        hidden = hidden * t.hidden_scale
    return t.apply(_raw(model, hidden, t))


def logits_and_slope(model: nn.Module, hidden: torch.Tensor,
                     transform: LogitTransform | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, V] float32 and the per-token slope s [B, V] (None when the transform is the
    identity) such that dz_k/dh = s_k · W_k, W = the output embedding's weight [:V] (for a
    gradient-based screen that builds the Jacobian from W instead of autograd). The slope folds
    in the hidden and logit scales and soft-capping's 1 - tanh²."""
    t = logit_transform(model) if transform is None else transform
    if t.nonlinear:
        raise UnsupportedModelError(
            f"LM head not linear: {type(model).__name__} applies a dense + activation + LayerNorm transform "
            "before its output embedding, so the gradient screen's closed-form Jacobian (slope · W) does not hold")
    z = logits(model, hidden, t)
    if t.hidden_scale == 1.0 and t.scale == 1.0 and t.softcap is None:
        return z, None
    gain = t.hidden_scale * t.scale
    if t.softcap is None:
        return z, torch.full((), gain, dtype=z.dtype, device=z.device).expand_as(z)
    th = z / t.softcap  # tanh(x / cap)
    return z, gain * (1.0 - th * th)
