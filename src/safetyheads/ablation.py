"""What a head ablation is (heads, method, ε) and how it is applied to a Hugging Face model.

While an ablation context is active, transformers' `AttentionInterface` lookups are intercepted
(`_install`): the attention function a module fetches (`sdpa`, `eager`, ... — the configured name is
untouched, so code that branches on it behaves as without us) is wrapped so that, for a module
attached to the context, the wrapper modifies the query heads (after q bias, q-norm and RoPE, i.e.
exactly what the scores see) or the per-head outputs (before `o_proj`) and calls the model's
ORIGINAL attention function; masking, sliding windows, soft-capping, sinks and GQA are whatever the
model itself does. No model class is forked. What each method does: `methods.py`; where the layers
and attention modules are: `layout.py`.

The factors live in a small object attached to the attention modules for the duration of a `with`
block (nothing global), one row per example, so one forward pass can hold many different
ablations (the sweep engine relies on this).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import methods
from .heads import Head, _range_hint, parse_heads, parse_layers  # noqa: F401  (the head syntax)
from .errors import UnsupportedModelError, UsageError
from .layout import (  # noqa: F401  (the layout resolver, re-exported for callers of this module)
    attention_layers, attention_module, decoder_backbone, decoder_layers, final_norm, layer_attention,
    routes_through_interface,
)

METHODS = methods.names()  # what each one means: methods.py

# What the architecture harness (archcheck.py, `make test-archs`) verified on the installed
# transformers: resources/architectures.json, {model_type: {"status", "reason", ...}}.
_ARCHITECTURES_FILE = Path(__file__).with_name("resources") / "architectures.json"


@lru_cache(maxsize=1)
def architecture_matrix() -> dict[str, dict]:
    """The harness's last results ({} when the file is missing); read once per process (the guard
    and every `prepare` consult it). Read-only: callers must not modify it."""
    import json

    try:
        data = json.loads(_ARCHITECTURES_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("types", {})


# model_type values the harness accepted (every semantic check passed on a tiny random model).
SUPPORTED_ARCHITECTURES = tuple(sorted(t for t, r in architecture_matrix().items() if r.get("status") == "accepted"))
_UNGUARDED = [0]  # > 0 while the harness verifies a type (`unguarded()`)


@contextmanager
def unguarded() -> Iterator[None]:
    """Lift `check_supported` for the duration of the block (the architecture harness only)."""
    _UNGUARDED[0] += 1
    try:
        yield
    finally:
        _UNGUARDED[0] -= 1


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
    """Raise UnsupportedModelError (one line) unless the architecture harness verified the model
    type; the reason names the class of problem it found (no softmax attention, attention not
    routed through the attention interface, a check that failed, ...)."""
    if _UNGUARDED[0]:
        return
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ARCHITECTURES:
        return
    entry = architecture_matrix().get(model_type)
    if entry is not None and entry.get("status") != "accepted":
        why = entry.get("reason") or entry.get("status")
    else:
        why = "not verified by the architecture harness on this transformers version (run `make test-archs`)"
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported by the head-ablation engine: {why} "
        f"({len(SUPPORTED_ARCHITECTURES)} model types are; see docs/architectures.md)"
    )


def num_layers_heads(model: Any) -> tuple[int, int]:
    """(number of decoder layers, number of query heads per layer). For a loaded model the layers
    are counted in the model (some configs' num_hidden_layers counts other blocks too); layers
    without softmax attention count as layers, their heads are absent (`attention_layers`)."""
    config = text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, (list, tuple)):
        heads = max(heads)
    per_layer = getattr(config, "num_attention_heads_per_layer", None)  # Laguna: a per-layer override
    if isinstance(per_layer, (list, tuple)) and per_layer:
        heads = max([int(h) for h in per_layer] + ([int(heads)] if heads is not None else []))
    if isinstance(model, nn.Module):
        return len(decoder_layers(model)), int(heads)
    return int(config.num_hidden_layers), int(heads)


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
# The attention wrapper: transformers' attention lookup, intercepted (the implementation keeps its name)
# ----------------------------------------------------------------------------------------------

_PATCH = {"depth": 0, "saved": None}


def _dispatch(fn: Callable) -> Callable:
    """The attention function `fn` a module looked up, routed through the hook of the active
    context when the calling module is attached to one."""
    if getattr(fn, "_safetyheads", False):
        return fn

    def attention(module, query, key, value, *args, **kwargs):
        state = getattr(module, _STATE_ATTR, None)
        if state is None:  # a module of another model, or outside any context
            return fn(module, query, key, value, *args, **kwargs)
        hook, layer = state
        return hook.attend(fn, layer, module, query, key, value, *args, **kwargs)

    attention._safetyheads = True
    attention.__name__ = f"{_PREFIX}{getattr(fn, '__name__', 'attention')}"
    return attention


def _install() -> None:
    """Wrap the lookups of transformers' AttentionInterface (`get_interface`, `[]`) so every
    attention function a module fetches is routed through `_dispatch`. The configured name
    (`sdpa`, `eager`, ...) is untouched: code that branches on it behaves as without us, and the
    `eager` default each modelling file passes (with its own sinks, soft-caps) is what is wrapped."""
    from transformers.modeling_utils import AttentionInterface

    if _PATCH["depth"] == 0:
        saved = (AttentionInterface.__dict__.get("get_interface"), AttentionInterface.__dict__.get("__getitem__"))
        base_get = AttentionInterface.get_interface
        base_item = AttentionInterface.__getitem__

        def get_interface(self, attn_implementation, default):
            return _dispatch(base_get(self, attn_implementation, default))

        def getitem(self, key):
            return _dispatch(base_item(self, key))

        AttentionInterface.get_interface = get_interface
        AttentionInterface.__getitem__ = getitem
        _PATCH["saved"] = saved
    _PATCH["depth"] += 1


def _uninstall() -> None:
    from transformers.modeling_utils import AttentionInterface

    _PATCH["depth"] -= 1
    if _PATCH["depth"] == 0:
        for name, value in zip(("get_interface", "__getitem__"), _PATCH["saved"]):
            if value is None:
                if name in AttentionInterface.__dict__:
                    delattr(AttentionInterface, name)
            else:
                setattr(AttentionInterface, name, value)
        _PATCH["saved"] = None


@contextmanager
def attached(model: nn.Module, hook: Any) -> Iterator[Any]:
    """Route every softmax-attention call of `model` through `hook.attend(fn, layer, module, q,
    k, v, ...)` for the duration of the block (layers without softmax attention run as they are);
    afterwards the model is exactly as before."""
    check_supported(model)
    modules = attention_layers(model)
    saved_state = {i: getattr(m, _STATE_ATTR, None) for i, m in modules.items()}
    _install()
    try:
        for i, module in modules.items():
            setattr(module, _STATE_ATTR, (hook, i))
        yield hook
    finally:
        for i, module in modules.items():
            state = saved_state[i]
            if state is None:
                if hasattr(module, _STATE_ATTR):
                    delattr(module, _STATE_ATTR)
            else:
                setattr(module, _STATE_ATTR, state)
        _uninstall()


def model_heads(model: nn.Module) -> list[Head]:
    """Every head that exists, (layer, head) in order: the query heads of each softmax-attention
    layer (hybrid models have none in their other layers; a layer with fewer heads than the
    largest, as in Gemma 4, has only its own)."""
    _, n_heads = num_layers_heads(model)
    out: list[Head] = []
    for layer, module in attention_layers(model).items():
        count = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        if count is None:
            q = getattr(module, "q_proj", None)
            hd = getattr(module, "head_dim", None)
            count = q.out_features // hd if isinstance(q, nn.Linear) and hd else n_heads
        out.extend((layer, h) for h in range(min(int(count), n_heads)))
    return out


def _spans(items: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, x in enumerate(items):
        if start is None:
            start = x
        if i + 1 == len(items) or items[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


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


_SINK_KWARGS = ("sinks", "s_aux")  # a per-head (or per-query, Inkling 2) sink logit given to the attention function
_BIAS_KWARGS = ("position_bias",)  # an additive score term [batch, heads, q, k] (Inkling's relative position bias)


def _without_score_terms(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The attention call's (args, kwargs) with every score term besides query·key removed, or
    None when it has none (the uniform recompute is then not needed): sink logits passed in
    (`sinks`, `s_aux`) at the dtype's minimum, a `position_bias` at 0, and a float attention
    mask that carries finite values besides 0 and "masked" (Doge's dynamic mask adds a learned
    per-key bias) reduced to 0 where it lets a key through (> min / 2, as the kernels read it),
    min elsewhere. `module.sinks` is handled by the caller (it is a parameter, not an argument)."""
    changed = isinstance(getattr(module, "sinks", None), torch.Tensor)
    kwargs = dict(kwargs)
    for name in _SINK_KWARGS:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t is not getattr(module, "sinks", None):
            kwargs[name] = torch.full_like(t, torch.finfo(t.dtype).min)
            changed = True
    for name in _BIAS_KWARGS:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool((t != 0).any()):
            kwargs[name] = torch.zeros_like(t)
            changed = True
    in_args = bool(args)
    mask = args[0] if in_args else kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        floor = torch.finfo(mask.dtype).min
        visible = mask > floor / 2
        if bool((visible & (mask != 0)).any()):
            plain = torch.where(visible, torch.zeros((), dtype=mask.dtype, device=mask.device),
                                torch.full((), floor, dtype=mask.dtype, device=mask.device))
            if in_args:
                args = (plain, *args[1:])
            else:
                kwargs["attention_mask"] = plain
            changed = True
    return (args, kwargs) if changed else None


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
        # Layers where some row's query factor is exactly 0 (uniform attention): only there can a score
        # term besides query·key (sinks, biases) need the recompute. Decided once here, on the CPU
        # tables, so the common path (ε > 0) never syncs with the device per layer and forward.
        self._q_zero = [parts is not None and parts[0] is not None and not parts[0].requires_grad
                        and bool((parts[0] == 0).any()) for parts in self._layers]
        live = set(attention_layers(model))
        absent = [i for i, parts in enumerate(self._layers)
                  if parts is not None and i not in live and not any(p is not None and p.requires_grad for p in parts)]
        if absent:
            raise UsageError(
                f"layer {absent[0]} has no softmax attention, so it has no heads to ablate "
                f"(layers with attention heads: {_spans(sorted(live))})")

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
        batch, heads = query.shape[0], query.shape[1]  # query: [batch, heads, q_len, head_dim]
        q = None
        if q_scale is not None:
            q = self._rows(q_scale, batch, query)[:, :heads]  # [batch, heads] (a layer may have fewer heads)
            query = query * q[:, :, None, None]
        out, weights = fn(module, query, key, value, *args, **kwargs)  # out: [batch, q_len, heads, head_dim]
        if q is not None and self._q_zero[layer] and bool((q == 0).any()):
            neutral = _without_score_terms(module, args, kwargs)
            if neutral is not None:
                out, weights = self._uniform_without_score_terms(fn, module, q == 0, out, weights, query, key, value,
                                                          *neutral)
        if mean_mask is not None:
            mean = self._head_means(layer, out, args[0] if args else kwargs.get("attention_mask"))  # [H, hd]
            mean = mean[:out.shape[2], :out.shape[3]]
            replace = self._rows(mean_mask, batch, out)[:, None, :out.shape[2], None] > 0  # [batch, 1, H, 1]
            out = torch.where(replace, mean[None, None].to(out), out)
        if o_scale is not None:
            out = out * self._rows(o_scale, batch, out)[:, None, :out.shape[2], None]  # o_scale: [batch, 1, H, 1]
        return out, weights

    @staticmethod
    def _uniform_without_score_terms(fn, module, zero, out, weights, query, key, value, args, kwargs):
        """Uniform attention in a module whose scores have terms besides query·key (`_without_score_terms`:
        attention sinks as in gpt-oss / DeepSeek V4 / Inkling 2, a hidden-state position bias as in
        Inkling, a learned dynamic mask as in Doge): a zero query still leaves those terms, so the
        keys would not get 1/visible each. `uniform` means exactly 1/visible keys, so the heads with a
        zero query are recomputed with the sink logit at the dtype's minimum (weight 0), the position
        bias at 0 and the mask reduced to visible / masked, and replace those rows' outputs
        (`args`, `kwargs`: the call's arguments with those terms removed; docs/design.md)."""
        sinks = getattr(module, "sinks", None)
        saved = sinks.data if isinstance(sinks, torch.Tensor) else None
        if saved is not None:
            drop = zero.any(0)  # [heads] that are uniform in some row
            sinks.data = saved.masked_fill(drop.to(saved.device)[:saved.shape[0]], torch.finfo(saved.dtype).min)
        try:
            out2, weights2 = fn(module, query, key, value, *args, **kwargs)
        finally:
            if saved is not None:
                sinks.data = saved
        out = torch.where(zero[:, None, :, None].to(out.device), out2, out)
        if isinstance(weights, torch.Tensor) and isinstance(weights2, torch.Tensor) and weights.ndim == 4:
            weights = torch.where(zero[:, :, None, None].to(weights.device), weights2, weights)
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
        """[layers, heads, head_dim] float32. Layers without softmax attention are NaN (their
        heads are absent); a layer with fewer heads or a smaller head_dim (Gemma 4's global
        layers) is zero-padded to the largest."""
        n_layers = len(decoder_layers(self.model))
        means = {i: self._sum[i] / max(self._count[i], 1.0) for i in self._sum}
        if not means:
            raise UnsupportedModelError("no attention call was recorded: the model's attention is not routed "
                                        "through the attention interface")
        H = max(m.shape[0] for m in means.values())
        hd = max(m.shape[1] for m in means.values())
        out = torch.full((n_layers, H, hd), float("nan"), dtype=torch.float32, device=next(iter(means.values())).device)
        for i, m in means.items():
            out[i] = 0.0
            out[i, :m.shape[0], :m.shape[1]] = m
        return out


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
