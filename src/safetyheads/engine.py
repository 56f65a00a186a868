"""Batched sweeps over many head-ablation configurations, with prefix reuse.

`prepare` runs the clean model once. Forward pre-hooks on the decoder layers record each layer's
input hidden states and the exact keyword arguments the model passed it (masks for that layer's
type, position embeddings, position ids...), so a replay needs no model-specific code.
Prompts are regrouped by length and run without padding: no compute is spent on pad tokens.

`sweep` evaluates configurations (each a list of heads). An ablation whose earliest head is in
layer l cannot change layers < l, so its replay starts from the recorded input of layer l. A
chunk of configurations is replayed in ONE pass over the layers whose batch grows: at layer l the
rows of the configurations that start there join the batch (each config × each prompt of the
length group is one row, with its own factors in the `HeadAblator` table). After the last layer
only the last position goes through the final norm and the LM head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ablation
from .ablation import Head, HeadAblator, MeanRecorder
from .errors import UsageError

WANTS = ("kl", "hidden", "logprobs")
MAX_GROUP = 64  # prompts per clean-pass mini-batch


@dataclass
class SweepResult:
    clean_logprobs: torch.Tensor  # [P, V] float32, next-token log-probs at the last position
    clean_hidden: torch.Tensor  # [P, D] float32, last position, after the final norm
    kl: torch.Tensor | None  # [C, P] float64, KL(p_clean || p_ablated)
    hidden: torch.Tensor | None  # [C, P, D] float32
    logprobs: torch.Tensor | None  # [C, P, V] float32, only when asked (tests)
    batch_size: int  # rows (config x prompt) per replay chunk finally used


@dataclass
class _Group:
    """Prompts of one length, run unpadded together."""

    prompts: list[int]  # indices into the prompt list
    inputs: list[torch.Tensor]  # per layer: [n, T, D] the layer's clean input hidden states
    args: list[tuple]  # per layer: positional args after hidden_states
    kwargs: list[dict]  # per layer: keyword args exactly as the model passed them
    clean_logits: torch.Tensor  # [n, V] float32, last position

    @property
    def length(self) -> int:
        return self.inputs[0].shape[1]


@dataclass
class CleanCache:
    """Everything a sweep needs from the clean pass of one model over one prompt set."""

    model: nn.Module
    groups: list[_Group]
    clean_logprobs: torch.Tensor  # [P, V] float32
    clean_hidden: torch.Tensor  # [P, D] float32
    head_means: torch.Tensor  # [L, H, head_dim] float32, mean head outputs over prompts and positions
    n_layers: int
    n_heads: int
    extra: dict = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return self.clean_logprobs.shape[0]


def _field(encoded: Any, name: str):
    return encoded[name] if isinstance(encoded, dict) or hasattr(encoded, "keys") else getattr(encoded, name)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, last_hidden: torch.Tensor) -> torch.Tensor:
    """[N, D] final-norm hidden states -> [N, V] float32 logits, as the CausalLM head computes them
    (including Gemma 2's final soft-capping)."""
    logits = model.get_output_embeddings()(last_hidden)
    cap = getattr(ablation.text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@torch.no_grad()
def prepare(model: nn.Module, encoded: Any) -> CleanCache:
    """One clean forward over the prompts (grouped by length, unpadded), recording every decoder
    layer's inputs, the clean last-position log-probs and final-norm hidden states."""
    ablation.check_supported(model)
    input_ids = _field(encoded, "input_ids")  # [P, T] left padded
    mask = _field(encoded, "attention_mask")  # [P, T]
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise UsageError("no prompts to run")
    device = _model_device(model)
    lengths = mask.sum(-1).tolist()
    if min(lengths) == 0:
        raise UsageError("a prompt is empty after tokenisation")
    by_length: dict[int, list[int]] = {}
    for p, n in enumerate(lengths):
        by_length.setdefault(int(n), []).append(p)
    # mini-batches of at most MAX_GROUP prompts bound the clean pass's memory
    batches = [(n, ps[i:i + MAX_GROUP]) for n, ps in sorted(by_length.items()) for i in range(0, len(ps), MAX_GROUP)]

    layers = ablation.decoder_layers(model)
    norm = ablation.final_norm(model)
    backbone = ablation.decoder_backbone(model)
    n_layers, n_heads = ablation.num_layers_heads(model)
    record: dict[int, tuple] = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            record[i] = (hidden.detach(), _detach(tuple(args[1:])), _detach(kw))

        return hook

    last_normed: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(norm.register_forward_hook(lambda m, a, out: last_normed.append(out[:, -1].detach())))
    groups: list[_Group] = []
    P = input_ids.shape[0]
    clean_logprobs: torch.Tensor | None = None
    clean_hidden: torch.Tensor | None = None
    try:
        with MeanRecorder(model) as recorder:
            for n, prompts in batches:
                ids = input_ids[prompts][:, -n:].to(device)  # left padding: the real tokens are the last n
                record.clear()
                last_normed.clear()
                backbone(input_ids=ids, use_cache=False)  # the LM head runs below, at the last position only
                hidden = last_normed[-1]  # [n, D]
                logits = _logits(model, hidden)
                groups.append(
                    _Group(
                        prompts=prompts,
                        inputs=[record[i][0] for i in range(n_layers)],
                        args=[record[i][1] for i in range(n_layers)],
                        kwargs=[record[i][2] for i in range(n_layers)],
                        clean_logits=logits,
                    )
                )
                if clean_logprobs is None:
                    clean_logprobs = torch.empty(P, logits.shape[-1], dtype=torch.float32)
                    clean_hidden = torch.empty(P, hidden.shape[-1], dtype=torch.float32)
                clean_logprobs[prompts] = torch.log_softmax(logits.double(), -1).float().cpu()
                clean_hidden[prompts] = hidden.float().cpu()
        means = recorder.means()
    finally:
        for h in handles:
            h.remove()
    return CleanCache(model, groups, clean_logprobs, clean_hidden, means, n_layers, n_heads)


# ----------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------

def _expand(obj: Any, n: int, rows: int) -> Any:
    """Repeat the batch dimension of recorded tensors from the group's n prompts to `rows`
    (config-major: row c*n + p is prompt p). Batch-1 tensors broadcast and stay as they are;
    1-D tensors (cache positions) have no batch dimension."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 2 and obj.shape[0] == n and n > 1:
            return obj.repeat(rows // n, *([1] * (obj.ndim - 1)))
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_expand(x, n, rows) for x in obj)
    if isinstance(obj, dict):
        return {k: _expand(v, n, rows) for k, v in obj.items()}
    return obj


def _start_layer(heads: Sequence[Head], n_layers: int) -> int:
    return min((int(layer) for layer, _ in heads), default=n_layers)


def _replay(cache: CleanCache, group: _Group, configs: list[Sequence[Head]], starts: list[int],
            method: str, epsilon: float) -> torch.Tensor:
    """Run `configs` (sorted by start layer) over the group's prompts; -> [C*n, D] final-norm
    hidden states at the last position, rows config-major."""
    model = cache.model
    layers = ablation.decoder_layers(model)
    n = len(group.prompts)
    ablator = HeadAblator.from_configs(model, configs, method, epsilon, repeat=n,
                                       mean_values=cache.head_means if method == "mean" else None)
    hidden: torch.Tensor | None = None  # [rows, T, D]
    joined = 0
    with ablator:
        for layer in range(starts[0], cache.n_layers):
            k = 0
            while joined + k < len(configs) and starts[joined + k] == layer:
                k += 1
            if k:
                x = group.inputs[layer]  # [n, T, D]
                x = x.repeat(k, 1, 1) if k > 1 else x
                hidden = x if hidden is None else torch.cat([hidden, x], dim=0)
                joined += k
            rows = hidden.shape[0]
            ablator.batch_rows = rows
            out = layers[layer](hidden, *_expand(group.args[layer], n, rows), **_expand(group.kwargs[layer], n, rows))
            hidden = out[0] if isinstance(out, (tuple, list)) else out
    return ablation.final_norm(model)(hidden[:, -1:])[:, 0]  # [rows, D]


def _default_batch_size(cache: CleanCache) -> int:
    """Rows (config x prompt) per chunk: from free memory on CUDA; on CPU enough rows for efficient
    matrix products without holding gigabytes of activations."""
    config = ablation.text_config(cache.model)
    T = max(g.length for g in cache.groups)
    D = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * D) or 4 * D)
    V = cache.clean_logprobs.shape[-1]
    itemsize = next(cache.model.parameters()).element_size()
    per_row = itemsize * T * (8 * D + 3 * inter + 2 * cache.n_heads * T) + 4 * 8 * V  # activations + KL in float64
    device = _model_device(cache.model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
        return max(1, int(budget // per_row))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 << 30
    budget = min(2 << 30, 0.25 * avail)
    return max(1, min(int(budget // per_row), max(1, 8192 // T)))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


@torch.no_grad()
def sweep(
    cache: CleanCache,
    configs: Sequence[Sequence[Head]],
    method: str,
    epsilon: float = 1e-5,
    *,
    want: Sequence[str] = ("kl", "hidden"),
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """For every configuration (a list of heads) and prompt: KL(p_clean || p_ablated) at the last
    position, the final-norm last hidden state, and (if asked) the ablated log-probs."""
    ablation.check_method(method)
    if method in ("undifferentiated", "scaling"):
        ablation.check_epsilon(epsilon)
    unknown = set(want) - set(WANTS)
    if unknown:
        raise UsageError(f"unknown sweep outputs {sorted(unknown)}; choose from {', '.join(WANTS)}")
    configs = [ablation._check_heads(c, cache.n_layers, cache.n_heads) for c in configs]
    C, P = len(configs), cache.n_prompts
    V, D = cache.clean_logprobs.shape[-1], cache.clean_hidden.shape[-1]
    kl = torch.zeros(C, P, dtype=torch.float64) if "kl" in want else None
    hidden = cache.clean_hidden.expand(C, P, D).clone() if "hidden" in want else None
    logprobs = cache.clean_logprobs.expand(C, P, V).clone() if "logprobs" in want else None

    starts_all = [_start_layer(c, cache.n_layers) for c in configs]
    order = sorted((i for i in range(C) if starts_all[i] < cache.n_layers), key=lambda i: starts_all[i])
    rows_max = int(batch_size) if batch_size else _default_batch_size(cache)
    if rows_max < 1:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    bar = tqdm(total=C * P, unit="abl", desc=f"sweep {method}", disable=not progress, dynamic_ncols=True)
    bar.update((C - len(order)) * P)  # empty configs are the clean model: KL 0, clean hidden
    for group in cache.groups:
        n = len(group.prompts)
        clean_lp = torch.log_softmax(group.clean_logits.double(), -1)  # [n, V] float64
        pos = 0
        while pos < len(order):
            per_chunk = max(1, rows_max // n)
            chunk = order[pos:pos + per_chunk]
            try:
                last = _replay(cache, group, [configs[i] for i in chunk], [starts_all[i] for i in chunk], method, epsilon)
                logits = _logits(cache.model, last) if (kl is not None or logprobs is not None) else None
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or per_chunk == 1:
                    raise
                rows_max = max(n, (per_chunk // 2) * n)  # halve and retry this chunk
                if _model_device(cache.model).type == "cuda":
                    torch.cuda.empty_cache()
                continue
            index = torch.tensor(chunk)
            prompts = torch.tensor(group.prompts)
            if hidden is not None:
                hidden[index[:, None], prompts[None, :]] = last.float().cpu().view(len(chunk), n, D)
            if logits is not None:
                lp = torch.log_softmax(logits.double(), -1).view(len(chunk), n, V)  # [k, n, V] float64
                if kl is not None:
                    # KL(p || q) = sum p (log p - log q), from log-probs: no underflow, no 0*log0.
                    value = (clean_lp.exp() * (clean_lp - lp)).sum(-1).clamp_min(0.0)  # [k, n]
                    kl[index[:, None], prompts[None, :]] = value.cpu()
                if logprobs is not None:
                    logprobs[index[:, None], prompts[None, :]] = lp.float().cpu()
                del lp
            pos += len(chunk)
            bar.update(len(chunk) * n)
    bar.close()
    cache.extra.setdefault("batch_sizes", []).append(rows_max)  # [scale-out] for the run manifest
    return SweepResult(cache.clean_logprobs, cache.clean_hidden, kl, hidden, logprobs, rows_max)


def single_head_configs(n_layers: int, n_heads: int, layers: Sequence[int] | None = None) -> list[list[Head]]:
    """[[(l, h)] for every head] in layer-major order (optionally only some layers)."""
    return [[(l, h)] for l in (range(n_layers) if layers is None else layers) for h in range(n_heads)]
