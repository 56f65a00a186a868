"""The architecture harness (issue 15): which causal-LM types of the installed transformers the
head-ablation engine really supports, proven on a tiny random model of each, not kept by hand.

For every model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` it builds a tiny config from the
config class's own fields (few layers, 4 heads, GQA where the config has KV heads, a few small
experts, a small vocabulary, LM-head scalings and soft-caps set away from their defaults so that
missing one shows), draws random weights large enough for attention to be peaked, and checks the
engine against independent oracles:

- causal: changing the last token changes no earlier position (stock model);
- empty: an empty ablation is bit-identical to the stock model (sdpa and eager);
- uniform: `uniform` on a head changes the logits, and under eager attention the model's own
  attention weights of that head are exactly 1/visible keys, where the visible keys are those the
  stock model's weights give a nonzero weight (another head of the same layer stays peaked);
- scaling: `scaling` changes the logits;
- padding: the model's own forward on a left-padded batch gives each prompt what it gives alone;
  where it does not (positions counted from the first column, a recurrence or compressor that runs
  over the pads), batches of prompts of one length must, and the type is recorded with
  `left_padding: false`: the project then feeds it only such batches (`prompts.pads_safely`), and
  the sweep check's direct forward is one on those batches;
- sweep: `engine.prepare` (with its self-check) + `engine.sweep` give the log-probs and KLs of a
  direct forward of the stock model under `ablated()` (undifferentiated, scaling, mean; with and
  without shared-prefix replay);
- surgery: where `ablation.surgery` applies, the edited weights compute what the hook computes.

A type passes when every check passes for every variant (MHA, and GQA where the config has KV
heads). `python scripts/check_architectures.py` (`make test-archs`) runs every type in a worker
subprocess with a per-type timeout (a hang or a crash costs that type, not the run) and writes
`src/safetyheads/resources/architectures.json` (what `ablation.check_supported` reads) and
`docs/architectures.md`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
import sys
import time
import traceback
import zlib
from typing import Any

import torch

VOCAB = 128
SPECIAL = VOCAB - 8  # ids >= SPECIAL are kept for special tokens (image tokens, ...); prompts use 3..SPECIAL-1
HIDDEN = 64
HEADS = 4
KV_GQA = 2
HEAD_DIM = 16
LAYERS = 3
WINDOW = 6  # sliding windows shorter than the test prompts, so windowed layers really act
TOL = 1e-4

# exact field names -> value (a callable of gqa where it depends on it)
_SIZES: dict[str, Any] = {
    **dict.fromkeys(("vocab_size", "text_vocab_size", "vocab_size_per_layer_input"), VOCAB),
    "hidden_size_per_layer_input": 16,
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "model_dim", "dim", "hidden_dim",
                     "word_embed_proj_dim"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "inner_hidden_size",
                     "mlp_dim", "d_ff", "ffn_intermediate_size", "dense_intermediate_size", "mlp_hidden_size"),
                    2 * HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "num_q_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                     "n_head_kv", "num_kv_groups"), lambda gqa: KV_GQA if gqa else HEADS),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "head_size", "global_head_dim",
                     "v_head_dim", "local_head_dim"), HEAD_DIM),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts",
                     "num_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k", "num_experts_per_token",
                     "top_k_experts"), 2),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size", "expert_dim"), 32),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"), 256),
    **dict.fromkeys(("sliding_window", "attention_window_size", "sliding_window_size"), WINDOW),
    # LM-head and score post-processing away from their defaults (a missed one shows in the checks)
    "logit_scale": 0.3, "logits_scaling": 4.0, "lm_head_multiplier": 0.2, "output_multiplier": 0.5,
    "logits_soft_cap": 5.0,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
}
_SOFTCAPS = {"final_logit_softcapping": 5.0, "attn_logit_softcapping": 2.0}  # only where the default is set
# per-type fields the generic rules cannot guess (hybrid layer schedules and the like)
_OVERRIDES: dict[str, dict] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                      mamba_d_conv=4, mamba_chunk_size=16),
    "falcon_mamba": dict(state_size=8), "mamba": dict(state_size=8),
    "bamba": dict(attn_layer_indices=[1], mamba_d_state=8, mamba_n_heads=4, mamba_d_head=32, mamba_chunk_size=16),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_d_state=8,
                             mamba_n_heads=4, mamba_d_head=32, mamba_chunk_size=16),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    # Mamba-2: hidden_size * expand must equal num_heads * head_dim (64 * 2 = 8 * 16); groups divide heads
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=8, chunk_size=16),
    # the shared attention block is tied across the hybrid layers: two of them, or there is nothing to tie
    "zamba": dict(layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    # DBRX clamps q/k/v with clip_qkv unconditionally (None fails in torch.clamp); 8 is DBRX-instruct's
    "dbrx.attn_config": dict(clip_qkv=8.0),
    "gpt_neo": dict(window_size=WINDOW),  # local layers' window shorter than the prompts
    "reformer": dict(axial_pos_embds=False),  # axial position factors must sum to hidden_size
    # Qwen4-Exp's indexed (QSA) layers need their indexer sized; the default config leaves it unset
    "qwen4_exp_text": dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
    # KV sharing: the trailing shared layers reuse the last producer of their type, so every type
    # needs a producer before them (the default's 15 of 35 cut to 3 layers would leave none)
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         intermediate_size=[2 * HIDDEN] * 4, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    # Mamba-2 groups must divide the (shrunk) Mamba heads; the default 8 groups exceed 4 heads
    "nemotron_h": dict(n_groups=1),
    # sliding layers double the KV heads, so 4 KV heads (MHA) would give 8 > 4 query heads: 2 KV heads
    # make the full layers GQA and the sliding ones MHA, in both variants
    "mimo_v2_flash": dict(num_key_value_heads=2),
    # one input, one recurrent (looped) and one output layer: the default 8 + 8 input/output layers of
    # 3 make every layer run twice and the recurrent section empty
    "dory": dict(n_input_layers=1, n_recurrent_layers=1, n_output_layers=1),
}
_LAYER_PATTERN_FIELDS = ("layer_types", "layers_block_type", "block_types", "layer_block_types", "hybrid_layer_types",
                         "attention_layers")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _fields(cls) -> dict[str, Any]:
    """{field name: default} of a config class (dataclass fields, else __init__ parameters)."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                try:
                    out[f.name] = f.default_factory()  # type: ignore[misc]
                except Exception:
                    out[f.name] = None
            else:
                out[f.name] = None
    try:
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name not in ("self", "kwargs", "args") and name not in out:
                out[name] = None if p.default is inspect.Parameter.empty else p.default
    except (TypeError, ValueError):
        pass
    return out


def _generic_size(name: str, default: Any, gqa: bool) -> Any:
    """A small value for a size-like int field the exact table does not name (or None: keep)."""
    if not isinstance(default, int) or isinstance(default, bool):
        return None
    lowered = name.lower()
    if "rotary_dim" in lowered or lowered == "rope_dim":
        return 8
    if "heads" in lowered and default > HEADS and "per" not in lowered:
        return KV_GQA if any(w in lowered for w in ("key", "kv", "group")) and gqa else HEADS
    if lowered.endswith("layers") and default > LAYERS and "num" in lowered or lowered in ("encoder_layers", "decoder_layers"):
        return LAYERS if default > LAYERS else None
    if default <= 2 * HIDDEN:
        return None
    if any(w in lowered for w in ("vocab", "position", "window", "token", "chunk", "max_", "length", "seq",
                                  "base", "theta", "period", "offset", "factor", "image", "patch", "sample",
                                  "frames", "bucket", "stride", "step", "start", "interval")):
        return None
    if "heads" in lowered:
        return KV_GQA if any(w in lowered for w in ("key", "kv", "group")) and gqa else HEADS
    if any(w in lowered for w in ("size", "dim", "rank", "channels", "width", "inner", "hidden")):
        return 32 if "head" in lowered else 2 * HIDDEN
    return None


def _pick(default_types: list | str, n: int) -> list[int]:
    """Indices of n layers of a default layer pattern that include one layer of every kind."""
    kinds: dict[Any, int] = {}
    for i, kind in enumerate(default_types):
        kinds.setdefault(kind, i)
    chosen = sorted(kinds.values())[:max(n, 1)]
    i = 0
    while len(chosen) < n and i < len(default_types):
        if i not in chosen:
            chosen.append(i)
        i += 1
    return sorted(chosen)


def shrink_kwargs(cls, gqa: bool, model_type: str) -> dict[str, Any]:
    """Constructor keyword arguments that make `cls` (a config class) tiny."""
    fields = _fields(cls)
    attribute_map = getattr(cls, "attribute_map", {}) or {}
    kw: dict[str, Any] = {}
    for name, default in fields.items():
        standard = name
        for alias, target in attribute_map.items():
            if target == name:
                standard = alias if alias in _SIZES else name
        value = _SIZES.get(name, _SIZES.get(standard))
        if callable(value):
            value = value(gqa)
        if value is None and name in _SOFTCAPS and default is not None:
            value = _SOFTCAPS[name]
        if value is None:
            value = _generic_size(name, default, gqa)
        if value is None:
            if (name.endswith("_token_id") or name.endswith("_token_index") or name.endswith("_id")) \
                    and isinstance(default, int) and not isinstance(default, bool) and default >= SPECIAL:
                value = SPECIAL + zlib.crc32(name.encode()) % 8  # stable across processes (hash() is salted)
            elif name.endswith("_token_id") and isinstance(default, list):
                value = [SPECIAL + 1]
        if value is not None:
            if isinstance(default, list) and not isinstance(value, list) and name in ("intermediate_size",):
                value = [value] * LAYERS
            kw[name] = value
    # GQA-less configs: nothing to share
    for k in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
        if k in kw and k not in fields:
            kw.pop(k)
    kw.update(_OVERRIDES.get(model_type, {}))
    return kw


def _is_run_length(value: Any, n_layers: int) -> bool:
    """Whether a default is a run-length layer pattern [[kinds, repeats], ...] covering n_layers."""
    if not isinstance(value, list) or not value:
        return False
    if not all(isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple))
               and isinstance(v[1], int) for v in value):
        return False
    return sum(len(v[0]) * v[1] for v in value) == n_layers


def _layer_count_field(config) -> str | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(getattr(config, name, None), int):
            return name
    return None


def _adapt_layer_lists(cls, kw: dict, model_type: str) -> dict:
    """Per-layer lists of the default config (layer types, per-layer sizes) cut to the tiny
    model's layers, keeping one layer of every kind."""
    try:
        default = cls()
    except Exception:
        return kw
    count = _layer_count_field(default)
    if count is None:
        return kw
    L0 = getattr(default, count)
    pattern = None
    for name in _LAYER_PATTERN_FIELDS:
        try:
            value = getattr(default, name, None)
        except Exception:
            continue
        if isinstance(value, (list, str)) and len(value) == L0:
            pattern = value
            break
    if pattern is None:
        value = getattr(default, "hybrid_override_pattern", None)
        if isinstance(value, str) and len(value) == L0:
            pattern = value
    n = kw.get(count, LAYERS)
    pick = _pick(pattern, n) if pattern is not None else list(range(min(n, L0)))
    n = len(pick)
    declared = _fields(cls)
    overridden = _OVERRIDES.get(model_type, {})  # per-type schedules stand as given
    try:
        probe = copy.copy(default)
        setattr(probe, count, n)
        kw[count] = n
    except Exception:  # noqa: BLE001 - a derived count (ProphetNet's encoder + decoder layers) refuses a write
        pass
    for name in declared:
        try:
            value = getattr(default, name, None) if pattern is not None else None
        except Exception:  # noqa: BLE001 - per-layer attributes that refuse a global read
            continue
        if _is_run_length(value, L0):
            # [[kinds, repeats], ...] expanded to one kind per layer (GPT-Neo's attention_types): the
            # picked layers' kinds, once each
            kw[name] = [[[pattern[i] for i in pick], 1]]
    for name in list(_fields(cls)) + ["hybrid_override_pattern", "full_attention_interval"]:
        try:
            value = getattr(default, name, None)
        except Exception:  # per-layer attributes that refuse a global read (Gemma 4's head_dim)
            continue
        if name in kw and not (isinstance(value, list) and len(value) == L0) or name in overridden:
            continue
        if isinstance(value, list) and len(value) == L0 and L0 != n:
            old = kw.get(name)
            if isinstance(old, (int, float)) and not isinstance(old, bool) and name == "intermediate_size":
                kw[name] = [old] * n
            else:
                kw[name] = [value[i] for i in pick]
        elif (isinstance(value, str) and len(value) == L0 and L0 > 1
              and (name in _LAYER_PATTERN_FIELDS or name.endswith("pattern"))):
            # one character per layer (e.g. "M*M-"); other strings of that length (hidden_act "silu"
            # of a 4-layer default) are not per-layer and stay whole
            kw[name] = "".join(value[i] for i in pick)
    return kw


def _cause(exc: BaseException) -> str:
    """The message that says what is wrong: a strict-dataclass validation error's cause (its first
    line only names the validator), else the exception's own message."""
    cause = exc.__cause__ if exc.__cause__ is not None and "validation error" in str(exc).lower() else exc
    return f"{type(cause).__name__}: {str(cause).strip()}" if cause is not exc else str(exc)


# a value the message requires: "`name=1`" (ZAYA: "supports `num_experts_per_tok=1` only") or "name must be 0"
_REQUIRED = re.compile(r"`(\w+)=(-?\d+|True|False)`|\b(\w+) must be (-?\d+|True|False)\b")


def _construct(cls, kw: dict):
    """`cls(**kw)`; where the class's own validation rejects the tiny values and its message names
    the field, the field is repaired and the construction retried (a few times): set to the value
    the message requires ("`num_experts_per_tok=1` only", "hidden_size_per_layer_input must be 0"),
    else put back to its default. A field of a sub-config already in `kw` is repaired there."""
    kw = dict(kw)
    fields = _fields(cls)
    for _ in range(6):
        try:
            return cls(**kw)
        except Exception as exc:  # noqa: BLE001 - strict-dataclass validation errors are no ValueError
            text = _cause(exc)
            required = {a or c: b or d for a, b, c, d in _REQUIRED.findall(text)}
            repaired = False
            for name, value in required.items():
                literal = {"True": True, "False": False}.get(value, None)
                literal = int(value) if literal is None else literal
                subs = [v for v in kw.values() if hasattr(v, "to_dict") and name in _fields(type(v))]
                if name in fields and kw.get(name, fields[name]) != literal:
                    kw[name] = literal
                    repaired = True
                for sub in subs:
                    if getattr(sub, name, None) != literal:
                        setattr(sub, name, literal)
                        repaired = True
            if not repaired:
                named = [k for k in kw if not hasattr(kw[k], "to_dict") and re.search(rf"\b{re.escape(k)}\b", text)]
                if not named:
                    raise
                for k in named:
                    kw.pop(k)
    return cls(**kw)


def _shrink_entry(entry: dict, gqa: bool) -> dict:
    """One layer's overrides of a heterogeneous config shrunk by the same rules as the fields; an
    MLA head that is its no-RoPE and RoPE parts side by side (head_dim = nope + rope) stays so."""
    out = {}
    for name, value in entry.items():
        small = _SIZES.get(name)
        small = small(gqa) if callable(small) else small
        if small is None:
            small = _generic_size(name, value, gqa)
        out[name] = value if small is None or not isinstance(value, int) or isinstance(value, bool) else small
    parts = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")
    if all(isinstance(entry.get(k), int) for k in parts) \
            and entry["head_dim"] == entry["qk_nope_head_dim"] + entry["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    return out


def _build_config(cls, kw: dict, gqa: bool, shrink_layers: bool = False):
    """`_construct`; with `shrink_layers`, for a heterogeneous config whose per-layer overrides the
    class derives itself at full size (Dots 3 Note's sliding-window layers: 64 heads of 256), the
    same construction with those overrides shrunk (only where the model is otherwise not tiny:
    Gemma 4's wider full-attention heads are kept where they fit)."""
    config = _construct(cls, kw)
    if not shrink_layers or not getattr(config, "is_heterogeneous", False) or "per_layer_config" in kw:
        return config
    from transformers.integrations.heterogeneity.configuration_utils import _get_explicit_per_layer_overrides

    overrides = _get_explicit_per_layer_overrides(config)  # {tiny layer index: {field: value}}
    shrunk = {i: _shrink_entry(entry, gqa) for i, entry in overrides.items()}
    if shrunk == overrides:
        return config
    return _construct(cls, {**kw, "per_layer_config": shrunk})


def tiny_config(model_type: str, gqa: bool = False, cls: type | None = None, shrink_layers: bool = False):
    """A tiny config of `model_type` (sub-configs of multimodal wrappers shrunk the same way);
    `cls`: another config class to shrink under that type's name (its causal LM's own config);
    `shrink_layers`: shrink per-layer overrides too (`_build_config`)."""
    from transformers import CONFIG_MAPPING

    cls = cls or CONFIG_MAPPING[model_type]
    sub_configs = getattr(cls, "sub_configs", {}) or {}
    kw = _adapt_layer_lists(cls, shrink_kwargs(cls, gqa, model_type), model_type)
    try:
        default = cls()
    except Exception:
        default = None
    for key, sub_cls in sub_configs.items():
        current = getattr(default, key, None) if default is not None else None
        if current is not None and hasattr(current, "to_dict"):
            sub_cls = type(current)  # AutoConfig placeholders: the default's concrete class
        elif not isinstance(sub_cls, type) or sub_cls.__name__ == "AutoConfig":
            spec = (getattr(cls, "sub_configs_defaults", None) or {}).get(key)  # or the model type it names
            if getattr(spec, "model_type", None) in CONFIG_MAPPING:
                sub_cls = CONFIG_MAPPING[spec.model_type]
        if not isinstance(sub_cls, type) or sub_cls.__name__ == "AutoConfig":
            continue
        sub_type = getattr(sub_cls, "model_type", key)
        try:
            sub_kw = _adapt_layer_lists(sub_cls, shrink_kwargs(sub_cls, gqa, sub_type), sub_type)
            sub_kw.update(_OVERRIDES.get(f"{model_type}.{key}", {}))  # a sub-config without a model type of its own
            kw[key] = _build_config(sub_cls, sub_kw, gqa, shrink_layers)
        except Exception:
            pass
    for k in [k for k in kw if k in sub_configs and not hasattr(kw[k], "to_dict")]:
        kw.pop(k)
    return _build_config(cls, kw, gqa, shrink_layers)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that attention is peaked and ablations move the logits (std 0.02 gives
    near-uniform attention everywhere); 1-D parameters (norm gains, biases, sinks, SSM constants)
    are their initial values plus a small perturbation, so their meaning is kept."""
    gen = torch.Generator().manual_seed(seed)
    # an "embed"-named Linear (ELECTRA's embeddings_project) is a projection, fan-in scaled like the
    # others: std 1 there saturates every head's softmax to exact zeros (a tied LM head stays std 1)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    projections = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - tables
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.ndim >= 2:
            table = ("embed" in name or "wte" in name or "wpe" in name) and id(p) not in projections
            std = 1.0 if table else 1.5 / math.sqrt(max(p.shape[-1], 1))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _causal_lm_class(model_type: str) -> type | None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)


def _repair_for_model(config, exc: BaseException) -> bool:
    """Make `config` acceptable to a model constructor that rejected it; whether anything changed.

    - a sub-config attribute the modelling code reads but the sub-config class does not declare
      (DBRX's `attn_config.rope_theta`: real checkpoints carry it in their config.json): the parent's
      value of that name, or its `rope_parameters` entry;
    - a value the constructor's message requires ("make sure that `is_decoder=True`", Reformer)."""
    subs = [getattr(config, k, None) for k in (getattr(type(config), "sub_configs", {}) or {})]
    configs = [config] + [c for c in subs if hasattr(c, "to_dict")]
    text = str(exc)
    missing = re.search(r"'(\w+)' object has no attribute '(\w+)'", text)
    if isinstance(exc, AttributeError) and missing:
        owners = [c for c in configs[1:] if type(c).__name__ == missing.group(1)]
        name = missing.group(2)
        value = getattr(config, name, None) if hasattr(config, name) else None
        if value is None:
            value = (getattr(config, "rope_parameters", None) or {}).get(name)
        if owners and value is not None:
            setattr(owners[0], name, value)
            return True
        return False
    layer_types = getattr(config, "layer_types", None) or []
    rope = getattr(config, "rope_parameters", None)
    if isinstance(exc, KeyError) and exc.args and exc.args[0] in layer_types and isinstance(rope, dict) \
            and exc.args[0] not in rope:
        # per-layer-type RoPE that the default config leaves empty (Cohere Compass): standard RoPE
        rope[exc.args[0]] = {"rope_type": "default", "rope_theta": 10000.0}
        return True
    changed = False
    for a, b, c, d in _REQUIRED.findall(text):
        name, value = a or c, {"True": True, "False": False}.get(b or d, None)
        value = int(b or d) if value is None else value
        for cfg in configs:
            if hasattr(cfg, name) and getattr(cfg, name) != value:
                setattr(cfg, name, value)
                changed = True
    return changed


def _instantiate(model_cls: type | None, config, **kw):
    """The causal LM of `config` (the auto class, or `model_cls` directly), repairing the config
    where the constructor says what it lacks (`_repair_for_model`), a few times at most."""
    from transformers import AutoModelForCausalLM

    for attempt in range(4):
        try:
            if model_cls is None:
                return AutoModelForCausalLM.from_config(config, **kw)
            return model_cls._from_config(config, **kw)
        except Exception as exc:  # noqa: BLE001 - any constructor failure may be repairable
            if attempt == 3 or not _repair_for_model(config, exc):
                raise
    raise AssertionError("unreachable")


def _decoder_only_with_flag(model_cls: type | None) -> bool:
    """Whether a causal LM class is a causal decoder only with `config.is_decoder=True` (BERT /
    RoBERTa-style `...ForCausalLM`: its __init__ warns `if not config.is_decoder`, and its users
    set the flag; without it the layers attend bidirectionally). The harness builds it so."""
    try:
        return "if not config.is_decoder" in inspect.getsource(model_cls.__init__)
    except (TypeError, OSError, AttributeError):
        return False


def _tiny_causal_config(model_type: str, gqa: bool):
    """(tiny config, model class or None for the auto class), counted on the meta device so that a
    config the rules cannot shrink never takes the memory. Tried in turn: the type's config; the
    same with per-layer overrides shrunk (`_build_config`); and, for a type whose causal LM class
    takes a sub-config of the type's composite config (MusicGen's decoder, Dots 3 Note's text
    model), a tiny config of that sub-config class. The last failure is raised."""
    from transformers import CONFIG_MAPPING

    attempts: list[tuple[str, type | None, type | None]] = [(model_type, None, None)]
    model_cls = _causal_lm_class(model_type)
    own = getattr(model_cls, "config_class", None)
    if own is not None and own is not CONFIG_MAPPING[model_type]:
        attempts.append((getattr(own, "model_type", model_type), own, model_cls))
    error: Exception | None = None
    for name, cls, klass in attempts:
        for shrink_layers in (False, True):
            try:
                config = tiny_config(name, gqa, cls=cls, shrink_layers=shrink_layers)
                if _decoder_only_with_flag(klass or model_cls):
                    config.is_decoder = True
                with torch.device("meta"):
                    n = sum(p.numel() for p in _instantiate(klass, config, dtype=torch.float32).parameters())
            except Exception as exc:  # noqa: BLE001 - the next attempt may build
                error = exc
                break
            if n <= 20_000_000:
                return config, klass
            error = RuntimeError(f"the tiny config is not tiny ({n / 1e6:.0f}M parameters)")
    assert error is not None
    raise error


def build(model_type: str, gqa: bool, attn: str = "eager", seed: int = 0):
    config, model_cls = _tiny_causal_config(model_type, gqa)
    torch.manual_seed(seed)
    model = _instantiate(model_cls, config, attn_implementation=attn, dtype=torch.float32)
    randomize(model, seed)
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr():
            with torch.no_grad():  # tied: std-1 embeddings as the LM head would make every distribution one-hot
                in_emb.weight.mul_(0.25)
    except (AttributeError, NotImplementedError):
        pass
    return model.eval()


def has_gqa(model_type: str) -> bool:
    """Whether the type's config (or its text config) has a KV-head count to set."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    classes = [cls] + [c for c in (getattr(cls, "sub_configs", {}) or {}).values() if isinstance(c, type)]
    names = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")
    if any("kv_lora_rank" in _fields(c) for c in classes):
        return False  # multi-head latent attention: keys/values come from a shared latent, no KV-head groups
    return any(n in _fields(c) for c in classes for n in names)


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------

class CheckFailed(Exception):
    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check, self.detail = check, detail


def _ids(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, SPECIAL, (n,), generator=gen)


def _encoded():
    """4 prompts sharing a 6-token prefix, 2 of them of the same length (left padded)."""
    prefix = _ids(6, 99)
    prompts = [torch.cat([prefix, _ids(n, i)]) for i, n in enumerate((5, 3, 5, 2))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def _forward(model, enc, padded: bool = True) -> torch.Tensor:
    """Last-position logits [P, V] float64 of the model's own forward: on the left-padded batch, or
    (`padded=False`) on batches of prompts of one length, unpadded (`prompts.batch_rows`): what the
    engine's self-check feeds a model whose outputs change under left padding."""
    from .engine import own_last_logits

    n = enc["input_ids"].shape[0]
    out: torch.Tensor | None = None
    for rows, last in own_last_logits(model, enc, n, padded):
        logits = last.double()  # [n, V]
        if out is None:
            out = logits.new_empty(n, logits.shape[-1])
        out[rows] = logits
    return out


def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.double()


def _test_heads(model) -> list[tuple[int, int]]:
    from . import ablation, layout

    layers = sorted(layout.attention_layers(model))
    _, H = ablation.num_layers_heads(model)
    picks = [(layers[0], min(1, H - 1))]
    if len(layers) > 1:
        picks.append((layers[-1], 0))
    return picks


def _padding_check(model, enc) -> bool:
    """Whether the engine may feed `model` left-padded batches (its self-check's forward, generation):
    True when the model's own forward on the padded batch gives each prompt what it gives alone.
    When it does not (positions counted from the first column, a recurrence or a compressor that
    runs over the pads whatever the mask says), batches of prompts of one length must: they are
    all the engine then feeds it (`prompts.batch_rows`), so False; CheckFailed when even those
    differ from each prompt alone."""
    def matches(logits: torch.Tensor) -> bool:  # [P, V]
        lp = torch.log_softmax(logits, -1)
        for p in range(enc["input_ids"].shape[0]):
            n = int(enc["attention_mask"][p].sum())
            alone = torch.log_softmax(_logits(model, enc["input_ids"][p:p + 1, -n:])[:, -1], -1)
            if (alone[0] - lp[p]).abs().max() > TOL:
                return False
        return True

    if matches(_forward(model, enc, padded=True)):
        return True
    if matches(_forward(model, enc, padded=False)):
        return False
    raise CheckFailed("padding", "the model's own outputs depend on the batch even without padding, so its "
                                 "forward cannot serve as the engine's self-check")


@torch.no_grad()
def check_model(model, eager) -> dict:
    """Every check on one variant; `eager` is the same weights under eager attention (or None
    when sdpa is what was built and no eager copy exists). Raises CheckFailed."""
    from . import ablation, engine, layout
    from .ablation import HeadAblator, ablated

    done: list[str] = []
    ids = _ids(10, 1)[None]
    # causal (stock model)
    changed = ids.clone()
    changed[0, -1] = 3 + (int(ids[0, -1]) - 3 + 7) % (SPECIAL - 3)
    try:
        a = _logits(model, ids)
    except Exception as exc:  # a drafter fed the target model's states (Gemma 4 assistant), ...
        raise CheckFailed("forward", f"the stock forward fails on a [1, T] batch of token ids: {type(exc).__name__}: "
                                     f"{_cause(exc).splitlines()[0][:200]}") from exc
    b = _logits(model, changed)
    if (a[:, :-1] - b[:, :-1]).abs().max() > 1e-5 * max(1.0, float(a.abs().max())):  # rounding of batched experts
        raise CheckFailed("causal", "not a causal decoder: the last token changes earlier positions")
    done.append("causal")
    heads = _test_heads(model)
    for m in [model] + ([eager] if eager is not None else []):
        stock = _logits(m, ids)
        with ablated(m, [], "undifferentiated"):
            empty = _logits(m, ids)
        if not torch.equal(stock, empty):
            raise CheckFailed("empty", f"an empty ablation changes the output by {(stock - empty).abs().max():.2e} "
                                       f"({m.config._attn_implementation})")
        if not torch.equal(_logits(m, ids), stock):
            raise CheckFailed("empty", "the model is not restored after an ablation context")
    done.append("empty")
    stock = _logits(model, ids)
    for method in ("uniform", "scaling"):
        with ablated(model, heads, method, 1e-5):
            out = _logits(model, ids)
        if (out - stock).abs().max() <= 1e-4:
            raise CheckFailed(method, f"ablating {heads} does not change the logits (attention not routed "
                                      "through the attention interface?)")
    done += ["uniform-changes", "scaling"]
    if eager is not None:
        _check_uniform_weights(eager, heads, ids)
        done.append("uniform-weights")
    # engine = direct forward
    enc = _encoded()
    padded = _padding_check(model, enc)
    clean = torch.log_softmax(_forward(model, enc, padded), -1)
    configs = [[h] for h in heads] + [heads, []]
    share_ok = None
    for share in (True, False):
        try:
            cache = engine.prepare(model, enc, share_prefix=share, left_padding=padded)
        except Exception as exc:
            raise CheckFailed("sweep", f"prepare: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        for method in ("undifferentiated", "scaling", "mean"):
            try:
                result = engine.sweep(cache, configs, method, 1e-5, want=("kl", "logprobs"), batch_size=3,
                                      progress=False)
            except Exception as exc:
                if share and cache.prefix is not None:
                    share_ok = False
                    break
                raise CheckFailed("sweep", f"{method}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            worst = 0.0
            for c, cfg in enumerate(configs):
                if method == "mean":
                    with HeadAblator.from_configs(model, [cfg], "mean", mean_values=cache.head_means):
                        lp = torch.log_softmax(_forward(model, enc, padded), -1)
                else:
                    with ablated(model, cfg, method, 1e-5):
                        lp = torch.log_softmax(_forward(model, enc, padded), -1)
                kl = (clean.exp() * (clean - lp)).sum(-1)
                worst = max(worst, float((result.logprobs[c].double() - lp).abs().max()),
                            float((result.kl[c] - kl).abs().max()))
                if cfg and method != "mean" and float(kl.max()) <= 1e-12:
                    raise CheckFailed("sweep", f"{method} on {cfg} gives KL 0 in a direct forward")
            if worst > TOL:
                if share and cache.prefix is not None:
                    share_ok = False
                    break
                raise CheckFailed("sweep", f"{method}: engine differs from a direct forward under ablated() "
                                           f"by {worst:.2e} (share_prefix={share})")
        else:
            if share:
                share_ok = cache.prefix is not None or None
    done.append("sweep")
    mt = ablation.text_config(model).model_type
    if mt in ablation._SURGERY and model.config.model_type == mt:
        for method, eps in (("scaling", 0.5), ("undifferentiated", 0.5)):
            if method == "undifferentiated" and mt in ablation._Q_NORM:
                continue
            edited = ablation.surgery(copy.deepcopy(model), heads, method, eps)
            with ablated(model, heads, method, eps):
                hooked = _logits(model, ids)
            if (_logits(edited, ids) - hooked).abs().max() > TOL:
                raise CheckFailed("surgery", f"{method}: the edited weights differ from the hook ablation")
        done.append("surgery")
    return {"checks": done, "share_prefix": share_ok, "left_padding": padded, "heads": [list(h) for h in heads],
            "attention_layers": sorted(layout.attention_layers(model)),
            "n_layers": ablation.num_layers_heads(model)[0]}


@torch.no_grad()
def _check_uniform_weights(eager, heads, ids) -> None:
    """Oracle: the eager model's own attention weights. Visible keys = where the stock model's
    weights (any head of the layer) are nonzero; the ablated head must put exactly 1/|visible|
    on each, and another head of the layer must not be uniform."""
    from . import layout
    from .ablation import ablated

    modules = layout.attention_layers(eager)
    captured: dict[int, Any] = {}

    def run(ablate):
        captured.clear()
        hooks = [m.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(
            i, out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None)) for i, m in modules.items()]
        try:
            if ablate:
                with ablated(eager, heads, "uniform"):
                    _logits(eager, ids)
            else:
                _logits(eager, ids)
        finally:
            for h in hooks:
                h.remove()
        return dict(captured)

    clean, uni = run(False), run(True)
    for layer, head in heads:
        w0, w = clean.get(layer), uni.get(layer)
        if not isinstance(w, torch.Tensor) or w.ndim != 4:
            raise CheckFailed("uniform-weights", "eager attention returns no attention weights to check")
        visible = (w0[0] > 0).any(0)  # [T, K]
        row = w[0, head]  # [T, K]
        n = visible.sum(-1, keepdim=True).clamp_min(1)
        expected = torch.where(visible, 1.0 / n, torch.zeros((), dtype=row.dtype))
        gap = float((row - expected).abs().max())
        if gap > 1e-6:
            raise CheckFailed("uniform-weights", f"uniform attention weights of head {layer}-{head} are not "
                                                 f"1/visible keys (off by {gap:.2e}: a position bias or "
                                                 "attention sink acts on a zero query?)")
        other = w[0, (head + 1) % w.shape[1]]
        if other.shape == row.shape and float((other - expected).abs().max()) < 1e-4:
            raise CheckFailed("uniform-weights", "an unablated head is uniform too (attention not routed per head?)")


def _classify(exc: BaseException) -> str:
    """The class of problem, one line."""
    from .errors import UnsupportedModelError

    lines = [line.strip() for line in _cause(exc).splitlines() if line.strip()]  # a validator's cause, not its name
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, CheckFailed):
        return f"check '{exc.check}' failed: {exc.detail}"
    if isinstance(exc, UnsupportedModelError):
        return text
    return f"{type(exc).__name__}: {text[:240]}"


def check_type(model_type: str) -> dict:
    """All variants of one model type -> {"status", "reason", "variants", ...}."""
    from . import ablation, layout

    t0 = time.time()
    entry: dict[str, Any] = {"status": "accepted", "reason": "", "variants": {}}
    variants = [False, True] if has_gqa(model_type) else [False]
    with ablation.unguarded():
        for gqa in variants:
            name = "gqa" if gqa else "mha"
            try:
                model = build(model_type, gqa, "eager")
            except Exception as exc:
                entry.update(status="unverified", reason=f"the harness cannot build a tiny model: {_classify(exc)}")
                break
            try:
                layout.attention_layers(model)
            except Exception as exc:
                entry.update(status="refused", reason=_classify(exc))
                break
            sdpa = None
            try:
                sdpa = copy.deepcopy(model)
                sdpa.set_attn_implementation("sdpa")
            except Exception:
                sdpa = None
            try:
                info = check_model(sdpa if sdpa is not None else model, model)
                entry["variants"][name] = info
            except Exception as exc:
                entry.update(status="refused", reason=_classify(exc))
                entry["trace"] = traceback.format_exc(limit=3)[-1500:]
                break
    if entry["status"] == "accepted":
        shares = [v.get("share_prefix") for v in entry["variants"].values()]
        if any(s is False for s in shares):
            entry["share_prefix"] = False
            entry["reason"] = "shared-prefix replay off (its cache replay did not match a direct forward)"
        if any(v.get("left_padding") is False for v in entry["variants"].values()):
            entry["left_padding"] = False  # what prompts.pads_safely reads
            note = "left padding changes its outputs: batches hold prompts of one length, unpadded"
            entry["reason"] = f"{entry['reason']}; {note}" if entry["reason"] else note
        first = next(iter(entry["variants"].values()))
        if len(first["attention_layers"]) < first["n_layers"]:
            entry["hybrid"] = True
    entry["seconds"] = round(time.time() - t0, 2)
    return entry


def worker() -> None:
    """Read model types from stdin, one a line; answer each with a line `RESULT <json>`."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    for line in sys.stdin:
        model_type = line.strip()
        if not model_type:
            continue
        try:
            result = check_type(model_type)
        except BaseException as exc:  # noqa: BLE001 - the worker must answer
            result = {"status": "unverified", "reason": f"harness error: {_classify(exc)}"}
        sys.stdout.write("RESULT " + json.dumps({"type": model_type, **result}) + "\n")
        sys.stdout.flush()


class Runner:
    """Runs types in a worker subprocess, one at a time, restarting it after a timeout or crash."""

    def __init__(self, timeout: float = 240.0, python: str | None = None):
        self.timeout, self.python, self.proc = timeout, python or sys.executable, None

    def _start(self):
        import subprocess

        self.proc = subprocess.Popen([self.python, "-m", "safetyheads.archcheck", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def check(self, model_type: str) -> dict:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(model_type + "\n")
        self.proc.stdin.flush()
        deadline = time.time() + self.timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                self.close()
                return {"type": model_type, "status": "unverified", "reason": f"timed out after {self.timeout:.0f} s"}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                self.proc = None
                return {"type": model_type, "status": "unverified", "reason": f"the worker crashed (exit {code})"}
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        for t in sys.argv[1:]:
            print(json.dumps({"type": t, **check_type(t)}, indent=1))
