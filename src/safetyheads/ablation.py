"""What a head ablation is (heads, method, ε) and how it is applied to a Hugging Face model.

One attention function is registered in transformers' `AttentionInterface` for each original
implementation (`safetyheads_sdpa`, `safetyheads_eager`, ...). While an ablation context is active,
the model's config points at that name; the wrapper looks up the module's layer, modifies the
query heads (after q bias, q-norm and RoPE, i.e. exactly what the scores see) or the per-head
outputs (before `o_proj`), and calls the model's ORIGINAL attention function, so masking, sliding
windows, soft-capping and GQA are whatever the model itself does. No model class is forked.

The factors live in a small object attached to the attention modules for the duration of a `with`
block (nothing global), one row per example, so one forward pass can hold many different
ablations (the sweep engine relies on this).
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import methods
from .errors import UnsupportedModelError, UsageError

METHODS = methods.names()  # what each one means: methods.py
Head = tuple[int, int]

# model_type values whose tiny random models pass tests/unit/test_ablation*.py and test_engine*.py.
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "gpt_neox",
)

_PREFIX = "safetyheads_"
_STATE_ATTR = "_safetyheads_ablation"  # set on attention modules while a context is active


# ----------------------------------------------------------------------------------------------
# Heads syntax and validation
# ----------------------------------------------------------------------------------------------

def text_config(model_or_config: Any):
    """The config that describes the decoder (the text config of multimodal wrappers)."""
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def check_supported(model_or_config: Any) -> None:
    """Raise UnsupportedModelError unless the architecture is one the engine is tested on."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)  # a multimodal wrapper (e.g. "gemma3") is not tested
    if model_type not in SUPPORTED_ARCHITECTURES or getattr(text_config(config), "model_type", None) != model_type:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by the head-ablation engine; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def num_layers_heads(model: Any) -> tuple[int, int]:
    """(number of decoder layers, number of query heads per layer)."""
    config = text_config(model)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def _range_hint(n_layers: int, n_heads: int) -> str:
    return f"this model has layers 0-{n_layers - 1} and heads 0-{n_heads - 1}"


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[Head]:
    """Parse `"2-26,3-8"` into `[(2, 26), (3, 8)]` (zero-based LAYER-HEAD), duplicates dropped."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise UsageError(f"no heads given: write heads as LAYER-HEAD, e.g. 2-26,3-8 ({_range_hint(n_layers, n_heads)})")
    heads: list[Head] = []
    for item in items:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if not m:
            raise UsageError(
                f"bad head {item!r}: write heads as LAYER-HEAD, e.g. 2-26,3-8 ({_range_hint(n_layers, n_heads)})"
            )
        head = (int(m.group(1)), int(m.group(2)))
        if not (0 <= head[0] < n_layers and 0 <= head[1] < n_heads):
            raise UsageError(f"head {item} is outside the model: {_range_hint(n_layers, n_heads)}")
        if head not in heads:
            heads.append(head)
    return heads


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse `"0-5,7"` into `[0, 1, 2, 3, 4, 5, 7]`; `"all"` means every layer."""
    text = str(spec).strip()
    if text.lower() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not m:
            raise UsageError(f"bad layer {item!r}: write layers like 0-5,7 (this model has layers 0-{n_layers - 1})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi or hi >= n_layers:
            raise UsageError(f"layers {item} are outside the model: it has layers 0-{n_layers - 1}")
        layers.extend(i for i in range(lo, hi + 1) if i not in layers)
    return layers


def check_method(method: str) -> None:
    methods.get(method)


check_epsilon = methods.check_epsilon


def _check_heads(heads: Sequence[Head], n_layers: int, n_heads: int) -> list[Head]:
    out = []
    for head in heads:
        layer, h = int(head[0]), int(head[1])
        if not (0 <= layer < n_layers and 0 <= h < n_heads):
            raise UsageError(f"head {layer}-{h} is outside the model: {_range_hint(n_layers, n_heads)}")
        out.append((layer, h))
    return out


# ----------------------------------------------------------------------------------------------
# Model structure (generic lookups; the per-architecture knowledge is only needed for surgery)
# ----------------------------------------------------------------------------------------------

def decoder_backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and the final norm (e.g. `LlamaModel`)."""
    base = getattr(model, "base_model", model)
    for candidate in (base, getattr(base, "language_model", None), getattr(base, "model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_backbone(model).layers


def final_norm(model: nn.Module) -> nn.Module:
    backbone = decoder_backbone(model)
    for name in ("norm", "final_layer_norm", "final_layernorm", "ln_f"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(f"cannot find the final norm of {type(model).__name__}")


def attention_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(f"cannot find the attention module of {type(layer).__name__}")


# ----------------------------------------------------------------------------------------------
# The attention wrapper
# ----------------------------------------------------------------------------------------------

def _original_function(original: str, module: nn.Module) -> Callable:
    """The attention function the model would have used: eager is model-specific (soft-capping,
    sinks...), the others come from transformers' registry."""
    if original == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


def _make_wrapper(original: str) -> Callable:
    def attention(module, query, key, value, *args, **kwargs):
        fn = _original_function(original, module)
        state = getattr(module, _STATE_ATTR, None)
        if state is None:  # e.g. a second model sharing the config name outside any context
            return fn(module, query, key, value, *args, **kwargs)
        hook, layer = state
        return hook.attend(fn, layer, module, query, key, value, *args, **kwargs)

    attention.__name__ = f"{_PREFIX}{original}"
    return attention


def _register(original: str) -> str:
    """Register the wrapper (and the original's mask builder) under `safetyheads_<original>`."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{_PREFIX}{original}"
    if name not in AttentionInterface._global_mapping:
        if original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise UnsupportedModelError(f"attention implementation {original!r} cannot be wrapped for ablation")
        AttentionInterface.register(name, _make_wrapper(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _configs_of(model: nn.Module, modules: Sequence[nn.Module]) -> list:
    seen: dict[int, Any] = {}
    for config in [model.config, *(getattr(m, "config", None) for m in modules)]:
        if config is not None:
            seen[id(config)] = config
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None:
                    seen[id(sub)] = sub
    return list(seen.values())


@contextmanager
def attached(model: nn.Module, hook: Any) -> Iterator[Any]:
    """Route every attention call of `model` through `hook.attend(fn, layer, module, q, k, v, ...)`
    for the duration of the block; restore the previous attention implementation afterwards."""
    check_supported(model)
    modules = [attention_module(layer) for layer in decoder_layers(model)]
    configs = _configs_of(model, modules)
    saved_impl = [(c, getattr(c, "_attn_implementation_internal", None)) for c in configs]
    saved_state = [getattr(m, _STATE_ATTR, None) for m in modules]
    current = text_config(model)._attn_implementation or "eager"
    original = current[len(_PREFIX):] if current.startswith(_PREFIX) else current
    name = _register(original)
    try:
        for config in configs:
            if getattr(config, "_attn_implementation_internal", None) is not None or config is model.config:
                config._attn_implementation_internal = name
        for i, module in enumerate(modules):
            setattr(module, _STATE_ATTR, (hook, i))
        yield hook
    finally:
        for config, impl in saved_impl:
            config._attn_implementation_internal = impl
        for module, state in zip(modules, saved_state):
            if state is None:
                if hasattr(module, _STATE_ATTR):
                    delattr(module, _STATE_ATTR)
            else:
                setattr(module, _STATE_ATTR, state)


def _real_query_rows(attention_mask: Any, batch: int, q_len: int, device) -> torch.Tensor:
    """[batch, q_len] bool: which query positions are real tokens (a real token sees its own key,
    which is always the last q_len keys; a padding row sees no real key of its own)."""
    if not isinstance(attention_mask, torch.Tensor):
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    mask = attention_mask
    if mask.ndim == 2:  # [batch, kv] padding mask (flash)
        return mask[:, -q_len:].bool().expand(batch, q_len)
    k_len = mask.shape[-1]
    idx = torch.arange(q_len, device=mask.device)
    diag = mask[:, 0, idx, k_len - q_len + idx]  # [b, q_len]
    real = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return real.expand(batch, q_len)


# ----------------------------------------------------------------------------------------------
# Factor tables
# ----------------------------------------------------------------------------------------------

@dataclass
class FactorTables:
    """Per-example, per-head factors, each [rows, layers, heads] float32 (None = not used).
    q_scale multiplies the query, o_scale the head output; where mean_mask is set, the head
    output is replaced by the head's mean output."""

    q_scale: torch.Tensor | None = None
    o_scale: torch.Tensor | None = None
    mean_mask: torch.Tensor | None = None


def factor_tables(
    configs: Sequence[Sequence[Head]],
    method: str,
    epsilon: float,
    n_layers: int,
    n_heads: int,
    repeat: int = 1,
) -> FactorTables:
    """One row per (config, repeat) — config-major: row c*repeat + r — ablating config c's heads;
    the method's `acts_on` decides which table holds its factor."""
    spec = methods.checked(method, epsilon)
    rows = len(configs)
    table = torch.ones(rows, n_layers, n_heads, dtype=torch.float32)  # [C, L, H]
    flag = torch.zeros(rows, n_layers, n_heads, dtype=torch.bool)
    for c, heads in enumerate(configs):
        for layer, h in _check_heads(heads, n_layers, n_heads):
            flag[c, layer, h] = True
    table[flag] = spec.factor(epsilon)
    if repeat != 1:
        table = table.repeat_interleave(repeat, dim=0)  # [C*repeat, L, H]
        flag = flag.repeat_interleave(repeat, dim=0)
    if spec.acts_on == "query":
        return FactorTables(q_scale=table)
    if spec.acts_on == "output":
        return FactorTables(o_scale=table)
    return FactorTables(mean_mask=flag)


class HeadAblator:
    """Applies per-example head factors ([rows, layers, heads]) to a model's attention while used
    as a context manager. rows == 1 broadcasts over any batch (generation); otherwise the batch
    must have `rows` examples, or exactly `batch_rows` when the engine sets it (it replays a batch
    that grows layer by layer and uses the first `batch_rows` rows).

    `mean` ablation needs each head's mean output: pass `mean_values` [layers, heads, head_dim],
    or it is taken from the first forward pass in the context (the prompt pass of `generate`),
    over the batch's prompts and real (non-padding) positions, and reused afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        tables: FactorTables,
        mean_values: torch.Tensor | None = None,
    ):
        self.model = model
        self.tables = tables
        self.mean_values = mean_values  # [L, H, head_dim] or None
        self.batch_rows: int | None = None
        n_layers, n_heads = num_layers_heads(model)
        self._layers: list[tuple | None] = []
        self._means: dict[int, torch.Tensor] = {}
        self._moved: dict[tuple, torch.Tensor] = {}
        for layer in range(n_layers):
            parts = []
            active = False
            for name, neutral in (("q_scale", 1.0), ("o_scale", 1.0), ("mean_mask", False)):
                t = getattr(tables, name)
                if t is None:
                    parts.append(None)
                    continue
                if t.shape[1:] != (n_layers, n_heads):
                    raise UsageError(f"factor table {name} has shape {tuple(t.shape)}, expected [rows, {n_layers}, {n_heads}]")
                col = t[:, layer, :]  # [rows, H]
                # Layers where nothing changes are skipped entirely (bit-identical outputs); a
                # table that requires grad (gradient screening) keeps every layer live.
                if t.requires_grad or bool((col != neutral).any()):
                    active = True
                    parts.append(col)
                else:
                    parts.append(None)
            self._layers.append(tuple(parts) if active else None)

    @classmethod
    def from_configs(
        cls,
        model: nn.Module,
        configs: Sequence[Sequence[Head]],
        method: str,
        epsilon: float = 1e-5,
        repeat: int = 1,
        mean_values: torch.Tensor | None = None,
    ) -> "HeadAblator":
        n_layers, n_heads = num_layers_heads(model)
        return cls(model, factor_tables(configs, method, epsilon, n_layers, n_heads, repeat), mean_values)

    @property
    def active_layers(self) -> list[int]:
        return [i for i, parts in enumerate(self._layers) if parts is not None]

    def __enter__(self) -> "HeadAblator":
        self._ctx = attached(self.model, self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def _rows(self, col: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        rows = col.shape[0]
        n = 1 if rows == 1 else (self.batch_rows if self.batch_rows is not None else rows)
        if rows != 1 and (n != batch or n > rows):
            raise UsageError(f"ablation table has {rows} rows (using {n}) but the batch has {batch} examples")
        if col.requires_grad:  # keep the graph (gradient screening)
            return col[:n].to(device=like.device, dtype=like.dtype)
        # one host-to-device copy per table column, not one per forward pass (generation steps)
        key = (id(col), n, like.device, like.dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = col[:n].to(device=like.device, dtype=like.dtype)
        return moved

    def attend(self, fn: Callable, layer: int, module: nn.Module, query, key, value, *args, **kwargs):
        parts = self._layers[layer]
        if parts is None:
            return fn(module, query, key, value, *args, **kwargs)
        q_scale, o_scale, mean_mask = parts
        batch = query.shape[0]  # query: [batch, heads, q_len, head_dim]
        if q_scale is not None:
            query = query * self._rows(q_scale, batch, query)[:, :, None, None]
        out, weights = fn(module, query, key, value, *args, **kwargs)  # out: [batch, q_len, heads, head_dim]
        if mean_mask is not None:
            mean = self._head_means(layer, out, args[0] if args else kwargs.get("attention_mask"))  # [H, hd]
            replace = self._rows(mean_mask, batch, out)[:, None, :, None] > 0  # [batch, 1, H, 1]
            out = torch.where(replace, mean[None, None].to(out), out)
        if o_scale is not None:
            out = out * self._rows(o_scale, batch, out)[:, None, :, None]  # o_scale: [batch, 1, H, 1]
        return out, weights

    def _head_means(self, layer: int, out: torch.Tensor, attention_mask: Any) -> torch.Tensor:
        if self.mean_values is not None:
            return self.mean_values[layer]
        if layer not in self._means:
            real = _real_query_rows(attention_mask, out.shape[0], out.shape[1], out.device)  # [B, q]
            # masked_fill, not a product: a fully masked padding row may hold NaN
            total = out.masked_fill(~real[:, :, None, None], 0).sum((0, 1))  # [H, hd]
            self._means[layer] = (total / real.sum().clamp_min(1)).detach()
        return self._means[layer]


class MeanRecorder:
    """Records each head's mean output over real (non-padding) positions of every forward pass
    run inside the context (used by the engine's clean pass for `mean` ablation)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.weight = 1.0  # how many prompts each recorded row stands for (a shared prefix: all of them)
        self._sum: dict[int, torch.Tensor] = {}
        self._count: dict[int, float] = {}

    def __enter__(self) -> "MeanRecorder":
        self._ctx = attached(self.model, self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def attend(self, fn, layer, module, query, key, value, *args, **kwargs):
        out, weights = fn(module, query, key, value, *args, **kwargs)  # [B, q, H, hd]
        real = _real_query_rows(args[0] if args else kwargs.get("attention_mask"), out.shape[0], out.shape[1], out.device)
        total = out.float().masked_fill(~real[:, :, None, None], 0).sum((0, 1)).detach()  # [H, hd]
        self._sum[layer] = self._sum.get(layer, 0) + self.weight * total
        self._count[layer] = self._count.get(layer, 0.0) + self.weight * float(real.sum())
        return out, weights

    def means(self) -> torch.Tensor:
        """[layers, heads, head_dim] float32."""
        n_layers = len(decoder_layers(self.model))
        return torch.stack([self._sum[i] / max(self._count[i], 1.0) for i in range(n_layers)])


@contextmanager
def ablated(model: nn.Module, heads: Sequence[Head], method: str, epsilon: float = 1e-5) -> Iterator[HeadAblator]:
    """Run `model` with `heads` ablated by `method` for every example of every forward pass in the
    block, including `model.generate()` with a KV cache (prompt and generated tokens alike).
    `mean` takes each head's mean output from the first forward pass in the block (the prompt pass
    of `generate`: the batch's prompts, real positions) and keeps it for the following steps."""
    methods.checked(method, epsilon)
    with HeadAblator.from_configs(model, [list(heads)], method, epsilon) as ablator:
        yield ablator


# ----------------------------------------------------------------------------------------------
# Surgery: the same ablation as a weight edit
# ----------------------------------------------------------------------------------------------

# How to find a head's query rows and output columns: (q linear, q rows layout, o linear).
# layout "plain": q rows h*hd:(h+1)*hd; "fused_qkv": q rows first in a fused q|k|v projection;
# "neox": rows interleaved per head as [q_h | k_h | v_h].
_SURGERY = {
    "llama": ("q_proj", "plain", "o_proj"),
    "mistral": ("q_proj", "plain", "o_proj"),
    "qwen2": ("q_proj", "plain", "o_proj"),
    "gemma2": ("q_proj", "plain", "o_proj"),
    "phi3": ("qkv_proj", "fused_qkv", "o_proj"),
    "gpt_neox": ("query_key_value", "neox", "dense"),
    "qwen3": ("q_proj", "plain", "o_proj"),
    "gemma3_text": ("q_proj", "plain", "o_proj"),
    "olmo2": ("q_proj", "plain", "o_proj"),
}
# Architectures that normalise q after the projection: scaling q_proj rows is undone by the norm.
_Q_NORM = {"qwen3": "Qwen3", "gemma3_text": "Gemma 3", "olmo2": "OLMo 2"}


def _head_dim(model: nn.Module) -> int:
    config = text_config(model)
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _surgery_method(method: str, epsilon: float) -> methods.Method:
    """The method, if a weight edit realises it (UnsupportedModelError with the reason otherwise)."""
    spec = methods.get(method)
    if spec.surgery is None:
        usable = ", ".join(m for m in methods.names() if methods.get(m).surgery)
        raise UnsupportedModelError(f"{spec.no_surgery}; use {usable}")
    spec.check_epsilon(epsilon)
    return spec


@torch.no_grad()
def surgery(model: nn.Module, heads: Sequence[Head], method: str, epsilon: float = 1e-5) -> nn.Module:
    """Edit weights in place so that the plain model computes the ablation:
    undifferentiated/uniform scale the head's rows of the query projection (weight and bias) by
    ε/0; scaling scales the head's input columns of the output projection by ε (the method's
    `surgery` edit in methods.py)."""
    check_supported(model)
    spec = _surgery_method(method, epsilon)
    model_type = text_config(model).model_type
    n_layers, n_heads = num_layers_heads(model)
    heads = _check_heads(heads, n_layers, n_heads)
    if spec.surgery == "q_rows" and model_type in _Q_NORM:
        raise UnsupportedModelError(
            f"surgery cannot realise {method} attention on {_Q_NORM[model_type]} ({model_type}): "
            "it normalises the query after q_proj, which undoes any scaling of the weights; use the hook ablation"
        )
    q_name, layout, o_name = _SURGERY[model_type]
    hd = _head_dim(model)
    factor = spec.factor(epsilon)
    layers = decoder_layers(model)
    for layer, h in heads:
        attn = attention_module(layers[layer])
        if spec.surgery == "o_cols":
            o = getattr(attn, o_name)
            o.weight[:, h * hd:(h + 1) * hd] *= factor  # columns read head h's output
            continue
        q = getattr(attn, q_name)
        rows = slice(3 * h * hd, 3 * h * hd + hd) if layout == "neox" else slice(h * hd, (h + 1) * hd)
        q.weight[rows, :] *= factor
        if q.bias is not None:
            q.bias[rows] *= factor
    return model


def surgery_checkpoint(model_config: Any, heads: str | Sequence[Head], method: str, epsilon: float, out: str,
                       force: bool = False) -> Path:
    """Load the model `model_config` (a config.ModelConfig) describes, realise the ablation in its
    weights and write an ordinary Hugging Face checkpoint (safetensors, config, tokenizer) to `out`,
    with `safetyheads_surgery.json` saying what was done to which model."""
    import json

    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"output folder {out} is not empty; choose another --out or pass --force")
    spec = _surgery_method(method, epsilon)
    loaded = model_config.load()
    model = loaded.model
    n_layers, n_heads = num_layers_heads(model)
    head_list = parse_heads(heads, n_layers, n_heads) if isinstance(heads, str) else _check_heads(heads, n_layers, n_heads)
    surgery(model, head_list, method, epsilon)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)
    note = {
        "heads": [list(h) for h in head_list],
        "method": method,
        "epsilon": spec.recorded_epsilon(epsilon),
        "model": getattr(loaded, "spec", None),
        "source": getattr(loaded, "source", None),
        "weights_sha256": getattr(loaded, "weights_sha256", None),
    }
    (out_dir / "safetyheads_surgery.json").write_text(json.dumps(note, indent=2) + "\n")
    return out_dir
