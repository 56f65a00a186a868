"""Batched sweeps over many head-ablation configurations, with prefix reuse.

`prepare` runs the clean model once. Forward pre-hooks on the decoder layers record each layer's
input hidden states and the exact keyword arguments the model passed it (masks for that layer's
type, position embeddings, position ids...), so a replay needs no model-specific code; an argument
that is an extra output of the previous layer (HY V4's `prev_topk_indices`) is marked as carried, and
a replay takes it from the replayed previous layer. Prompts are regrouped by length and run without
padding: no compute is spent on pad tokens. A model the layer-by-layer replay cannot reproduce (a
layer run twice per forward, a backbone step before the final norm) is refused, and the result is
checked against the model's own forward (`check_against_forward`).

`sweep` evaluates configurations (each a list of heads). An ablation whose earliest head is in
layer l cannot change layers < l, so its replay starts from the recorded input of layer l. A
chunk of configurations is replayed in ONE pass over the layers whose batch grows: at layer l the
rows of the configurations that start there join the batch (each config × each prompt of the
length group is one row, with its own factors in the `HeadAblator` table). After the last layer
only the last position (the last k with teacher-forced targets) goes through the final norm and the
LM head; the final layer's feed-forward block too, where `prepare` found that leaves them unchanged.

Shared prefix: chat templates put the same tokens (system message, user header) in front of every
prompt, e.g. 24 of Qwen2.5's ~44 tokens. Under an ablation those positions are the same for every
prompt (causal attention: they never see the prompt's own tokens), so each configuration replays
the shared prefix ONCE (one row, not one per prompt) and keeps that row's keys/values; the prompts'
own tokens are then replayed against them through the model's KV-cache interface
(`past_key_values.update`), with the masks and positions the model itself computed for that case
in the clean pass.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from . import ablation, layout, lm_head, methods
from .ablation import Head, HeadAblator, MeanRecorder
from .errors import UnsupportedModelError, UsageError
from .scores import kl_from_logprobs

WANTS = ("kl", "hidden", "logprobs", "target_logprobs")
MAX_GROUP = 64  # prompts per clean-pass mini-batch


@dataclass
class SweepResult:
    clean_logprobs: torch.Tensor  # [P, V] float32, next-token log-probs at the last position
    clean_hidden: torch.Tensor  # [P, D] float32, last position, after the final norm
    kl: torch.Tensor | None  # [C, P] float64, KL(p_clean || p_ablated)
    hidden: torch.Tensor | None  # [C, P, D] float32
    logprobs: torch.Tensor | None  # [C, P, V] float32, only when asked (tests)
    batch_size: int  # rows (config x prompt) per replay chunk finally used
    target_logprobs: torch.Tensor | None = None  # [C, P, k] float64, log p_ablated(target) (prepare's targets)


@dataclass
class _Group:
    """Prompts of one length, run unpadded together."""

    prompts: list[int]  # indices into the prompt list
    inputs: list[torch.Tensor]  # per layer: [n, T, D] the layer's clean input hidden states
    args: list[tuple]  # per layer: positional args after hidden_states
    kwargs: list[dict]  # per layer: keyword args exactly as the model passed them
    clean_logits: torch.Tensor | None  # [n, V] float32, last position (None for the shared prefix)

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
    prefix: _Group | None = None  # the shared prefix's clean pass (one row); groups then hold only the rest
    extra: dict = field(default_factory=dict)
    # teacher-forced targets (`prepare(targets=...)`): the tokens the last k positions predict
    targets: torch.Tensor | None = None  # [P, k] long
    clean_target_logprobs: torch.Tensor | None = None  # [P, k] float64, log p_clean(target)

    @property
    def tail(self) -> int:
        """Positions read at the end of every prompt: k with targets, else the last one."""
        return 1 if self.targets is None else int(self.targets.shape[1])

    @property
    def prefix_length(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    @property
    def n_prompts(self) -> int:
        return self.clean_logprobs.shape[0]


def _field(encoded: Any, name: str):
    return encoded[name] if isinstance(encoded, dict) or hasattr(encoded, "keys") else getattr(encoded, name)


def _tree_map(fn, obj: Any) -> Any:
    """`fn` applied to every leaf of nested tuples/lists/dicts (the recorded layer arguments)."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(fn, x) for x in obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


MIN_SHARED_PREFIX = 4  # shorter common prefixes are not worth a second code path


class _CacheSlot:
    """Placeholder for the model's KV cache in recorded layer arguments (the clean pass's cache
    holds every prompt's keys/values; a replay substitutes its own `_PrefixKV`)."""


_CACHE = _CacheSlot()


def _for_record(leaf: Any) -> Any:
    """A layer argument as the clean pass keeps it: tensors detached, the KV cache a placeholder."""
    if isinstance(leaf, torch.Tensor):
        return leaf.detach()
    return _CACHE if isinstance(leaf, Cache) else leaf


@dataclass
class _Carried:
    """A layer argument that is an extra output of the previous layer (HY V4 / GLM-DSA pass each
    layer's sparse-attention top-k indices to the next as `prev_topk_indices`). It depends on the
    ablation, so a replay takes it from the replayed previous layer's output `index`, not from
    the clean record; `clean` (the recorded value) serves the rows that join at this layer."""

    index: int  # position in the previous layer's output tuple (>= 1; 0 is the hidden state)
    clean: torch.Tensor  # the clean pass's value, detached


def _carried_outputs(obj: Any, previous: Any) -> Any:
    """`obj` (a layer's recorded arguments) with every tensor that IS (same object) an extra output
    of the previous layer replaced by a `_Carried` marker: that is how the model's own loop hands a
    layer's result to the next one."""
    if not isinstance(previous, (tuple, list)) or len(previous) < 2:
        return obj
    extra = {id(t): j for j, t in enumerate(previous) if j >= 1 and isinstance(t, torch.Tensor)}
    if not extra:
        return obj

    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and id(x) in extra:
            return _Carried(extra[id(x)], x.detach())
        return x

    return _tree_map(leaf, obj)


def _refuse_skipped_outputs(layer: int, obj: Any, earlier: dict[int, tuple[int, torch.Tensor]],
                            previous: Any) -> None:
    """UnsupportedModelError when a layer's arguments hold an extra output of a layer before the
    previous one that the previous layer did not pass on (a tensor handed along the chain, returned
    unchanged by each layer as HY-V4's top-k indices are, is carried): the replay carries outputs only
    from one layer to the next, so such a model's ablated rows would silently get the clean value."""
    found: list[int] = []
    passed_on = {id(t) for t in previous[1:]} if isinstance(previous, (tuple, list)) else set()

    def leaf(x: Any) -> Any:
        if (isinstance(x, torch.Tensor) and id(x) in earlier and earlier[id(x)][1] is x
                and id(x) not in passed_on):
            found.append(earlier[id(x)][0])
        return x

    _tree_map(leaf, obj)
    if found:
        raise UnsupportedModelError(
            f"decoder layer {layer} takes an output of layer {found[0]} (not of the layer before it): the "
            "layer-by-layer replay carries outputs only from one layer to the next")


def shared_prefix_length(model: nn.Module, tokens: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares and the sweep can replay once per configuration
    (0 when it cannot). Each prompt keeps at least one token of its own (its last position is what
    is scored). Off for a single prompt, for attention kernels other than sdpa/eager (flash
    kernels align a short query to the keys differently) and when a sliding window could cut the
    prefix off (the replayed cache keeps every key)."""
    if len(tokens) < 2:
        return 0
    config = ablation.text_config(model)
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return 0
    if len(layout.attention_layers(model)) < len(layout.decoder_layers(model)):
        return 0  # hybrid layers (Mamba, linear attention) keep states `_PrefixKV` does not stand in for
    entry = ablation.architecture_matrix().get(getattr(model.config, "model_type", None), {})
    if entry.get("share_prefix") is False:
        return 0  # the harness found this model's prefix replay wrong (docs/architectures.md)
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    longest = max(len(t) for t in tokens)
    if window and int(window) < longest:
        return 0
    first, limit = tokens[0], min(len(t) for t in tokens) - 1
    n = 0
    while n < limit and all(t[n] == first[n] for t in tokens):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _plain_kv_cache(cache: Any) -> bool:
    """Whether a model's KV cache holds only keys and values per layer (what `_PrefixKV` stands
    in for): a DynamicCache of full or sliding-window layers."""
    from transformers.cache_utils import DynamicCache

    if type(cache) is not DynamicCache:
        return False
    return all(type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in cache.layers)


def _cache_kwarg(backbone: nn.Module) -> str:
    """The name a model's forward takes its KV cache under (transformers 5 is renaming
    `past_key_values` to `cache`, model by model)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def prepare(model: nn.Module, encoded: Any, *, share_prefix: bool = True, self_check: bool = True,
            targets: torch.Tensor | None = None, left_padding: bool | None = None) -> CleanCache:
    """One clean forward over the prompts (grouped by length, unpadded), recording every decoder
    layer's inputs, the clean last-position log-probs and final-norm hidden states.

    With `share_prefix` (default) and a common prefix of at least MIN_SHARED_PREFIX tokens, the
    prefix is recorded once and each group's record covers only its prompts' own tokens (run
    against the prefix's KV cache), which is what `sweep` replays.

    With `self_check` (default; always on in the CLI) the clean log-probs are then compared with
    the model's own forward on the same left-padded batch (`check_against_forward`), and a model
    the engine does not reproduce raises UnsupportedModelError instead of being scored. A model
    whose forward changes under left padding (`left_padding=False`; default: what the harness
    found for its type, `prompts.pads_safely`) is checked on unpadded equal-length batches instead.

    `targets` [P, k] (token ids) turns on a teacher-forced readout: the prompts then end with the
    first k - 1 target tokens, position -k..-1 of prompt p predicts targets[p], and the cache keeps
    log p_clean(targets) for `sweep(want=("target_logprobs",))` (the refusal score)."""
    ablation.check_supported(model)
    transform = lm_head.logit_transform(model)
    input_ids = _field(encoded, "input_ids")  # [P, T] left padded
    mask = _field(encoded, "attention_mask")  # [P, T]
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise UsageError("no prompts to run")
    device = _model_device(model)
    lengths = mask.sum(-1).tolist()
    if min(lengths) == 0:
        raise UsageError("a prompt is empty after tokenisation")
    tail = 1
    if targets is not None:
        targets = torch.as_tensor(targets).long().cpu()  # [P, k]
        if targets.ndim != 2 or targets.shape[0] != input_ids.shape[0] or targets.shape[1] < 1:
            raise UsageError(f"targets must be [prompts, k] token ids, got shape {tuple(targets.shape)}")
        tail = int(targets.shape[1])
        if min(lengths) < tail:
            raise UsageError(f"a prompt has fewer tokens than the {tail} target positions read from its end")
    by_length: dict[int, list[int]] = {}
    for p, n in enumerate(lengths):
        by_length.setdefault(int(n), []).append(p)
    # mini-batches of at most MAX_GROUP prompts bound the clean pass's memory
    batches = [(n, ps[i:i + MAX_GROUP]) for n, ps in sorted(by_length.items()) for i in range(0, len(ps), MAX_GROUP)]
    S = 0
    if share_prefix:
        tokens = [input_ids[p, input_ids.shape[1] - int(n):].tolist() for p, n in enumerate(lengths)]
        S = shared_prefix_length(model, tokens)

    layers = layout.decoder_layers(model)
    norm = layout.final_norm(model)
    backbone = layout.decoder_backbone(model)
    n_layers, n_heads = ablation.num_layers_heads(model)
    record: dict[int, tuple] = {}

    outputs: dict[int, Any] = {}  # each layer's output in the current forward (the next layer may take parts of it)
    # extra outputs of the layers before the previous one, in this forward: id -> (layer, tensor); the
    # tensor is kept so its id cannot be reused. The replay carries only the previous layer's.
    earlier: dict[int, tuple[int, torch.Tensor]] = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                earlier.clear()
            previous = outputs.pop(i - 1, None)
            if i in record:
                looped.add(i)
            _refuse_skipped_outputs(i, (args[1:], kw), earlier, previous)
            rest, kw = _carried_outputs(tuple(args[1:]), previous), _carried_outputs(kw, previous)
            if isinstance(previous, (tuple, list)):
                earlier.update({id(t): (i - 1, t) for t in previous[1:] if isinstance(t, torch.Tensor)})
            record[i] = (hidden.detach(), _tree_map(_for_record, rest), _tree_map(_for_record, kw))

        return hook

    def post_hook(i):
        def hook(module, args, out):
            if i + 1 < n_layers and isinstance(out, (tuple, list)) and len(out) > 1:
                outputs[i] = out

        return hook

    def recorded(prompts: list[int], logits: torch.Tensor | None) -> _Group:
        return _Group(prompts=prompts, inputs=[record[i][0] for i in range(n_layers)],
                      args=[record[i][1] for i in range(n_layers)], kwargs=[record[i][2] for i in range(n_layers)],
                      clean_logits=logits)

    last_normed: list[torch.Tensor] = []
    last_out: list[torch.Tensor] = []  # the last layer's output at the read positions [n, tail, D]
    looped: set[int] = set()  # layers that ran more than once in one forward
    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post_hook(i)) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, out: last_out.append((out[0] if isinstance(out, (tuple, list)) else out)[:, -tail:].detach())))
    # the final norm's output (a model without one: the last layer's)
    tap = layers[-1] if isinstance(norm, layout._NoNorm) else getattr(norm, "tap", norm)
    handles.append(tap.register_forward_hook(
        lambda m, a, out: last_normed.append((out[0] if isinstance(out, (tuple, list)) else out)[:, -tail:].detach())))
    groups: list[_Group] = []
    clean_targets = torch.zeros(input_ids.shape[0], tail, dtype=torch.float64) if targets is not None else None
    prefix: _Group | None = None
    P = input_ids.shape[0]
    clean_logprobs: torch.Tensor | None = None
    clean_hidden: torch.Tensor | None = None
    try:
        with MeanRecorder(model) as recorder:  # head means over every position of every prompt
            prefix_cache, cache_kwarg = None, _cache_kwarg(backbone)
            if S:
                # the shared prefix, once: the replay's record of it (one row, square causal masks)
                # and the KV cache every group's own tokens are run against
                record.clear()
                recorder.weight = P  # its positions stand for the first S positions of all P prompts
                out = backbone(input_ids=torch.tensor([tokens[0][:S]], device=device), use_cache=True)
                recorder.weight = 1.0
                prefix_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                prefix = recorded([], None)
                if not _plain_kv_cache(prefix_cache):
                    # a cache with more than keys/values per layer (conv / SSM / indexer states):
                    # `_PrefixKV` cannot stand in for it, so this model runs without sharing
                    S, prefix, prefix_cache = 0, None, None
                    recorder._sum.clear()
                    recorder._count.clear()
            for n, prompts in batches:
                ids = input_ids[prompts][:, -n:].to(device)  # left padding: the real tokens are the last n
                record.clear()
                last_normed.clear()
                if S:
                    past = copy.deepcopy(prefix_cache)
                    past.batch_repeat_interleave(len(prompts))
                    # the prompts' own tokens against the prefix's cache: the masks and positions
                    # recorded here are the model's own for a short query after S cached keys
                    backbone(input_ids=ids[:, S:], use_cache=True, **{cache_kwarg: past})
                    del past
                else:
                    backbone(input_ids=ids, use_cache=False)  # the LM head runs below, at the last position only
                normed = last_normed[-1]  # [n, tail, D]
                _check_replayable(model, looped, last_out[-1], normed, norm)
                hidden = normed[:, -1]  # [n, D]
                if clean_targets is not None:
                    clean_targets[prompts] = _target_logprobs(model, normed, targets[prompts], transform).cpu()
                logits = lm_head.logits(model, hidden, transform)
                groups.append(recorded(prompts, logits))
                if clean_logprobs is None:
                    clean_logprobs = torch.empty(P, logits.shape[-1], dtype=torch.float32)
                    clean_hidden = torch.empty(P, hidden.shape[-1], dtype=torch.float32)
                clean_logprobs[prompts] = torch.log_softmax(logits.double(), -1).float().cpu()
                clean_hidden[prompts] = hidden.float().cpu()
        means = recorder.means()
    finally:
        for h in handles:
            h.remove()
    if self_check:
        check_against_forward(model, encoded, clean_logprobs, left_padding=left_padding)
    longest = max(range(P), key=lambda p: lengths[p])
    shortcut = _tail_shortcut_holds(model, input_ids[longest:longest + 1, -int(lengths[longest]):].to(device), tail)
    return CleanCache(model, groups, clean_logprobs, clean_hidden, means, n_layers, n_heads, prefix=prefix,
                      targets=targets, clean_target_logprobs=clean_targets, extra={"tail_shortcut": shortcut})


def _rounding_tolerance(model: nn.Module) -> float:
    """Relative gap two evaluations of the same computation may show (fewer rows in a matmul, a
    norm run separately): separates rounding from a different result."""
    return 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-2


def _same_hidden(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two evaluations of hidden states [..., D] agree to rounding, position by position:
    ‖a − b‖ ≤ tol·‖b‖ for every row. Relative per row, not to the largest element: final hidden
    states have a few outlier dimensions, and a tolerance scaled by those would let a real change
    elsewhere pass."""
    if a.shape != b.shape:
        return False
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])  # [rows, D]
    gap, size = (a - b).norm(dim=-1), b.norm(dim=-1)
    return bool((gap <= _rounding_tolerance(model) * size + 1e-30).all())


def _check_replayable(model: nn.Module, looped: set[int], last_out: torch.Tensor, normed: torch.Tensor,
                      norm: nn.Module) -> None:
    """UnsupportedModelError unless a layer-by-layer replay reproduces this clean forward: every
    decoder layer ran once (a looped / recurrent-depth model runs some several times, the replay
    once each), and the final hidden state is the final norm of the last layer's output
    (`last_out`, `normed`: [n, tail, D]). A backbone that does more in between, such as Inkling 2's
    block attention residual over earlier layers' outputs or Gemma 3n's collapse of its AltUp
    streams, is not a chain of layers the replay can rerun (a module there, like DeepSeek V4's
    `hc_head`, is part of `layout.final_norm` instead)."""
    if looped:
        raise UnsupportedModelError(
            f"looped layers: decoder layer {min(looped)} runs more than once per forward (a recurrent-depth "
            "model), but the engine replays each layer once")
    if not _same_hidden(model, norm(last_out), normed):
        raise UnsupportedModelError(
            "a backbone step before the final norm (cross-layer residuals, parallel streams collapsed): "
            "the layer-by-layer replay would skip it")


def _tail_shortcut_holds(model: nn.Module, ids: torch.Tensor, tail: int) -> bool:
    """Whether `_last_position_only` leaves the model's last `tail` final hidden states as they are,
    tried on one prompt `ids` [1, T]: it assumes nothing in the final layer reads its feed-forward
    block's output at other positions, which a layer that mixes positions after that block breaks
    (Inkling's short convolution `mlp_sconv`). Where it changes them, the sweep runs the block on
    every position. The tolerance (`_same_hidden`, relative per position) separates rounding (a
    matmul over fewer rows) from a changed result."""
    if ids.shape[1] <= tail:
        return True
    backbone = layout.decoder_backbone(model)

    def last_hidden() -> torch.Tensor:
        out = backbone(input_ids=ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, -tail:].float()  # [1, tail, D]

    whole = last_hidden()
    with _last_position_only(layout.decoder_layers(model)[-1], tail):
        short = last_hidden()
    return _same_hidden(model, short, whole)


def _target_logprobs(model: nn.Module, normed: torch.Tensor, targets: torch.Tensor, transform) -> torch.Tensor:
    """log p(targets) [n, k] float64 from final-norm hidden states [n, k, D], one position at a time
    (an [n, V] logit block at a time, as for the last position alone)."""
    out = torch.empty(targets.shape, dtype=torch.float64)
    for j in range(targets.shape[1]):
        lp = torch.log_softmax(lm_head.logits(model, normed[:, j], transform).double(), -1)  # [n, V]
        out[:, j] = lp.gather(1, targets[:, j:j + 1].to(lp.device))[:, 0].cpu()
    return out


# Largest |log p_engine - log p_model| allowed on the top tokens, by the LM head's dtype. The two
# sides run the same weights along different paths (unpadded length groups, a shared prefix's KV
# cache vs one padded batch), so they agree to rounding. Measured on 32 JailbreakBench +
# MaliciousInstruct prompts (chat and paper formats, CPU): float32 at most 2e-5 (SmolLM2, Qwen2.5),
# float16 0.03 (SmolLM2), bfloat16 0.37 (SmolLM2) and 0.23 (Qwen2.5): bf16 resolves logits of
# magnitude 16-32 only to 0.125. The errors the check is for are whole nats (a missed Cohere
# logit_scale moves log-probs by ~5, a missed Gemma soft-cap by several).
SELF_CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 1.0}
SELF_CHECK_TOP = 5  # top tokens of each side compared (the far tail of a peaked distribution is all rounding)
_SELF_CHECK_LOGIT_BYTES = 256 << 20  # all-position logits per forward, for a model without logits_to_keep


def forward_kwargs(model: nn.Module) -> tuple[dict, bool, bool]:
    """(`logits_to_keep=1` where the model's forward takes it: the LM head on the last position
    only, as in the engine; whether it did; whether the forward takes position_ids: not for a
    model that numbers its positions itself, RoBERTa-style, as the engine's clean pass lets it)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}, False, True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes_positions = ("position_ids" in params or takes_any) and not layout.numbers_own_positions(model)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}, True, takes_positions
    return {}, False, takes_positions


@torch.no_grad()
def own_last_logits(model: nn.Module, encoded: Any, batch_size: int, padded: bool) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The model's own forward at the last position, batch by batch, as a user calls it: (the batch's
    prompt indices, its last-position logits [n, V']). `padded`: consecutive rows of the left-padded
    batch; else prompts of one length with only their real columns (a model whose outputs change
    under left padding, `prompts.pads_safely`). `logits_to_keep` where the forward takes it (else the
    batch is cut so all-position logits stay bounded), position ids only where the forward takes them
    and does not number positions itself (RoBERTa-style). Used by the self-check, evaluate's
    helpfulness log-probs and the harness: one way to run "the model itself"."""
    from .prompts import batch_rows, position_ids_from_mask

    input_ids, mask = _field(encoded, "input_ids"), _field(encoded, "attention_mask")
    try:
        position_ids = _field(encoded, "position_ids")
    except (KeyError, AttributeError):
        position_ids = None
    if position_ids is None:
        position_ids = position_ids_from_mask(mask)
    extra, last_only, takes_positions = forward_kwargs(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if isinstance(getattr(head, "weight", None), torch.Tensor) else 1
    if not last_only:  # every position's logits come back: bound their memory
        batch_size = max(1, min(batch_size, _SELF_CHECK_LOGIT_BYTES // (4 * input_ids.shape[1] * max(1, vocab))))
    device = _model_device(model)
    lengths = mask.sum(-1).tolist()
    for batch in batch_rows(lengths, batch_size, padded):
        rows = slice(batch[0], batch[-1] + 1) if padded else torch.tensor(batch)
        cols = slice(None) if padded else slice(input_ids.shape[1] - int(lengths[batch[0]]), None)
        kw = dict(extra)
        if takes_positions:
            kw["position_ids"] = position_ids[rows][:, cols].to(device)
        out = model(input_ids=input_ids[rows][:, cols].to(device), attention_mask=mask[rows][:, cols].to(device),
                    use_cache=False, **kw)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [n, 1 or T, V']
        yield batch, logits[:, -1]


@torch.no_grad()
def check_against_forward(model: nn.Module, encoded: Any, clean_logprobs: torch.Tensor,
                          tolerance: float | None = None, *, left_padding: bool | None = None) -> float:
    """Compare the engine's clean last-position log-probs [P, V] with `model`'s own forward on the
    same prompts: the left-padded batch, or unpadded batches of prompts of one length for a model
    whose outputs change under left padding (`left_padding`, default `prompts.pads_safely`); in
    mini-batches of up to MAX_GROUP prompts, one forward of the clean batch in all, the LM head at
    the last position only where the forward takes `logits_to_keep`. Returns the largest |Δ log p|
    over each prompt's top SELF_CHECK_TOP tokens of either side.

    Raises UnsupportedModelError when it exceeds `tolerance` (default: SELF_CHECK_TOLERANCE for
    the LM head's dtype): the engine re-implements the final norm + LM head and replays layers from
    recorded inputs, so anything the model's forward does that the engine does not (an LM-head
    scaling it does not know, a looped layer, ...) would otherwise give wrong scores silently.

    `left_padding=False` (default: `prompts.pads_safely(model)`, what the harness found for the
    type): the model's own forward changes under left padding, so it runs mini-batches of prompts
    of one length, unpadded, as the engine's clean pass does."""
    from .prompts import pads_safely

    head = model.get_output_embeddings()
    dtype = head.weight.dtype if isinstance(getattr(head, "weight", None), torch.Tensor) else torch.float32
    tol = SELF_CHECK_TOLERANCE.get(dtype, 0.5) if tolerance is None else float(tolerance)
    padded = pads_safely(model) if left_padding is None else bool(left_padding)
    worst = 0.0
    for batch, last in own_last_logits(model, encoded, MAX_GROUP, padded):
        ref = torch.log_softmax(last.double(), -1).cpu()  # [n, V'] float64
        ours = clean_logprobs[torch.tensor(batch)].double()  # [n, V]
        if ref.shape[-1] != ours.shape[-1]:
            raise UnsupportedModelError(
                f"self-check: the engine's LM head gives {ours.shape[-1]} logits, {type(model).__name__}'s own "
                f"forward {ref.shape[-1]}; not scoring a model the engine does not reproduce")
        k = min(SELF_CHECK_TOP, ref.shape[-1])
        top = torch.cat([ref.topk(k, -1).indices, ours.topk(k, -1).indices], -1)  # [n, 2k]
        delta = (ref.gather(-1, top) - ours.gather(-1, top)).abs()
        worst = max(worst, float(delta.max()) if delta.isfinite().all() else math.inf)
        if not worst <= tol:
            model_type = getattr(model.config, "model_type", None)
            raise UnsupportedModelError(
                f"self-check failed: the engine's clean next-token log-probs differ from {type(model).__name__}'s "
                f"own forward by up to {worst:.3g} nats on the top tokens (tolerance {tol:g} for {str(dtype)[6:]}); "
                f"model type {model_type!r} does something after or between its layers that the engine does "
                f"not reproduce (e.g. an LM-head scaling), so it is not scored")
    return worst


# ----------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------

def _for_replay(obj: Any, n: int, rows: int, kv: Any, previous: Any = None) -> Any:
    """Recorded layer arguments for a replay of `rows` rows: tensors with the group's n prompts in
    their batch dimension repeated to `rows` (config-major: row c*n + p is prompt p; in a group of
    several prompts batch-1 tensors broadcast, 1-D ones such as cache positions have no batch
    dimension), and the KV-cache
    placeholder replaced by `kv`. A group of one prompt cannot tell its batch-1 tensors from
    broadcast ones, so they are all expanded to `rows` (a view): a per-token tensor the model
    reshapes or concatenates with its batch (DeepSeek-V4's hash-routing input_ids, a mask it
    extends with a compressor's per-row bias) must match the replay's rows, and a broadcast one
    means the same at any batch size. A `_Carried` output of the previous layer comes from
    `previous` (the replayed previous layer's output; None where the replay starts) for the rows
    it has, from the clean record for the rows that join at this layer."""
    def leaf(x: Any) -> Any:
        if x is _CACHE:
            return kv
        if isinstance(x, _Carried):
            clean = x.clean.repeat(rows // x.clean.shape[0], *([1] * (x.clean.ndim - 1)))  # [rows, ...]
            if previous is None:
                return clean
            done = previous[x.index]  # [rows of the previous layer, ...]
            return torch.cat([done, clean[done.shape[0]:]], dim=0) if done.shape[0] < rows else done
        if isinstance(x, torch.Tensor) and x.ndim >= 2 and rows > 1:
            if n > 1 and x.shape[0] == n:
                return x.repeat(rows // n, *([1] * (x.ndim - 1)))
            if n == 1 and x.shape[0] == 1:
                return x.expand(rows, *x.shape[1:])
        return x

    return _tree_map(leaf, obj)


def _start_layer(heads: Sequence[Head], n_layers: int) -> int:
    return min((int(layer) for layer, _ in heads), default=n_layers)


class _PrefixKV:
    """Stands in for the model's KV cache during a replay (attention layers call its `update`).

    Prefix stage (`prompts is None`): keeps each layer's keys/values of the configurations' prefix
    rows ([configs joined so far, kv_heads, S, head_dim]) and returns them unchanged. Suffix stage:
    rows are config-major (config c, prompt p -> c*prompts + p) over the configurations
    `first, first+1, ...`; each row gets its configuration's prefix keys/values in front of its own."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.prompts: int | None = None
        self.first = 0

    def for_prompts(self, prompts: int, first: int) -> "_PrefixKV":
        view = _PrefixKV()
        view.keys, view.values, view.prompts, view.first = self.keys, self.values, prompts, first
        return view

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [rows, kv_heads, q_len, head_dim]
        if self.prompts is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        configs = key.shape[0] // self.prompts
        pick = slice(self.first, self.first + configs)
        pk = self.keys[layer_idx][pick].repeat_interleave(self.prompts, dim=0)  # [rows, kv_heads, S, head_dim]
        pv = self.values[layer_idx][pick].repeat_interleave(self.prompts, dim=0)
        return torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2)


FEED_FORWARD_NAMES = ("mlp", "feed_forward", "block_sparse_moe")  # the position-wise block of a decoder layer


@contextlib.contextmanager
def _last_position_only(layer: nn.Module, tail: int = 1):
    """Inside the final decoder layer only the last position's output is ever read (the KL and the
    hidden state are taken there), and the feed-forward block is position-wise: run it on the last
    position alone and return zeros for the others. That skips about 90% of the final layer's work
    (~7% of a single-head sweep of a 24-layer model). The attention still sees every position's
    keys and values. A block that returns more than a tensor (a mixture of experts with router
    logits) is left to compute every position."""
    block = next((getattr(layer, n) for n in FEED_FORWARD_NAMES if isinstance(getattr(layer, n, None), nn.Module)),
                 None)
    if block is None:
        yield
        return
    own = block.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's device hooks) to restore
    original = block.forward
    whole = []  # set once the block turned out not to return a plain tensor

    def forward(x: torch.Tensor, *args, **kwargs):
        # a block fed other tensors too (ZAYA's router states carried across layers) cannot be cut
        # to the last position without knowing their layout: it computes every position
        if whole or x.ndim != 3 or x.shape[1] <= tail \
                or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            return original(x, *args, **kwargs)
        last = original(x[:, -tail:], *args, **kwargs)  # [rows, tail, D]
        if not isinstance(last, torch.Tensor):
            whole.append(True)
            return original(x, *args, **kwargs)
        out = last.new_zeros(*x.shape[:2], last.shape[-1])  # [rows, T, D]
        out[:, -tail:] = last
        return out

    block.forward = forward
    try:
        yield
    finally:
        if own is not None:
            block.forward = own
        else:
            del block.forward


def _replay(cache: CleanCache, group: _Group, configs: list[Sequence[Head]], starts: list[int],
            method: str, epsilon: float, kv: _PrefixKV | None = None) -> torch.Tensor | None:
    """Run `configs` (sorted by start layer) over the group's prompts; -> [C*n, tail, D] final-norm
    hidden states at the last `cache.tail` positions, rows config-major. `group` may be the shared prefix
    (`kv` then collects its keys/values and nothing is returned) or a group of prompts whose
    prefix is in `kv`."""
    model = cache.model
    layers = layout.decoder_layers(model)
    n = max(1, len(group.prompts))  # the prefix record has one row
    ablator = HeadAblator.from_configs(model, configs, method, epsilon, repeat=n,
                                       mean_values=cache.head_means if methods.get(method).acts_on == "mean" else None)
    hidden: torch.Tensor | None = None  # [rows, T, D]
    previous: Any = None  # the replayed previous layer's output (its extra parts may feed this layer)
    joined = 0
    with ablator:
        for layer in range(starts[0], cache.n_layers):
            k = 0
            while joined + k < len(configs) and starts[joined + k] == layer:
                k += 1
            if k:
                x = group.inputs[layer]  # [n, T, D]
                x = x.repeat(k, *([1] * (x.ndim - 1))) if k > 1 else x
                hidden = x if hidden is None else torch.cat([hidden, x], dim=0)
                joined += k
            rows = hidden.shape[0]
            ablator.batch_rows = rows
            last = (layer == cache.n_layers - 1 and group.clean_logits is not None
                    and cache.extra.get("tail_shortcut", True))
            with _last_position_only(layers[layer], cache.tail) if last else contextlib.nullcontext():
                out = layers[layer](hidden, *_for_replay(group.args[layer], n, rows, kv, previous),
                                    **_for_replay(group.kwargs[layer], n, rows, kv, previous))
            previous = out if isinstance(out, (tuple, list)) else None
            hidden = out[0] if isinstance(out, (tuple, list)) else out
    if group.clean_logits is None:
        return None
    return layout.final_norm(model)(hidden[:, -cache.tail:])  # [rows, tail, D]


#: Replayed tokens (rows x tokens per row) per chunk on a CPU. Enough for matrix products at full speed,
#: few enough that a layer's activations stay in the last-level cache: on a 2-core EPYC (32 MiB L3),
#: SmolLM2 over 5 AdvBench prompts x 270 heads ran 10.5-10.9 ms per (prompt, head) at 1,024-2,048
#: tokens per chunk against 12.3 ms at 8,192 (eight interleaved runs, same scores to 2e-6).
CPU_TOKENS_PER_CHUNK = 1024


def _default_batch_size(cache: CleanCache) -> int:
    """Rows (config x prompt) per chunk: from free memory on CUDA; on CPU enough rows for efficient
    matrix products without holding gigabytes of activations."""
    config = ablation.text_config(cache.model)
    T = max(g.length for g in cache.groups)  # tokens replayed per row (after a shared prefix)
    K = T + cache.prefix_length  # keys each of them attends to
    D = int(config.hidden_size)
    inter = getattr(config, "intermediate_size", None) or 4 * D
    inter = int(max(inter) if isinstance(inter, (list, tuple)) else inter)  # per-layer sizes (Gemma 3n)
    V = cache.clean_logprobs.shape[-1]
    itemsize = next(cache.model.parameters()).element_size()
    per_row = itemsize * T * (8 * D + 3 * inter + 2 * cache.n_heads * K) + 4 * 8 * V  # activations + KL in float64
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
    return max(1, min(int(budget // per_row), max(1, CPU_TOKENS_PER_CHUNK // T)))


def _prefix_block_limit(cache: CleanCache) -> int:
    """Configurations per block, bounded so their prefix keys/values stay within about 1 GiB."""
    if cache.prefix is None:
        return 1 << 30
    config = ablation.text_config(cache.model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_heads = int(max(kv_heads) if isinstance(kv_heads, (list, tuple)) else kv_heads)
    head_dim = ablation._head_dim(cache.model)
    itemsize = next(cache.model.parameters()).element_size()
    per_config = 2 * cache.n_layers * cache.prefix_length * kv_heads * head_dim * itemsize  # keys + values
    return max(1, (1 << 30) // per_config)


def _block_size(cache: CleanCache, rows_max: int) -> int:
    """Configurations per block: their prefix rows (one per config, S tokens each) must fit the
    same activation budget as rows_max rows of the groups' own T tokens, and their keys/values
    the prefix memory limit."""
    if cache.prefix is None:
        return rows_max
    T = max(g.length for g in cache.groups)
    S = cache.prefix_length
    return max(1, min(rows_max * T // max(T, S), _prefix_block_limit(cache)))


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
    on_work: Callable[[int], None] | None = None,
) -> SweepResult:
    """For every configuration (a list of heads) and prompt: KL(p_clean || p_ablated) at the last
    position, the final-norm last hidden state, and (if asked) the ablated log-probs, or the
    ablated log-probs of the teacher-forced targets the cache was prepared with.

    `on_work(n)` is told after every chunk the layer passes x prompts it replayed (a config that
    starts in layer l costs L - l per prompt), for a caller's progress bar; after an out-of-memory
    retry it is told the block's work back as a negative number."""
    methods.checked(method, epsilon)
    unknown = set(want) - set(WANTS)
    if unknown:
        raise UsageError(f"unknown sweep outputs {sorted(unknown)}; choose from {', '.join(WANTS)}")
    configs = [ablation._check_heads(c, cache.n_layers, cache.n_heads) for c in configs]
    C, P = len(configs), cache.n_prompts
    V, D = cache.clean_logprobs.shape[-1], cache.clean_hidden.shape[-1]
    transform = lm_head.logit_transform(cache.model)
    kl = torch.zeros(C, P, dtype=torch.float64) if "kl" in want else None
    hidden = cache.clean_hidden.expand(C, P, D).clone() if "hidden" in want else None
    logprobs = cache.clean_logprobs.expand(C, P, V).clone() if "logprobs" in want else None
    target_lp = None
    if "target_logprobs" in want:
        if cache.targets is None:
            raise UsageError("target_logprobs needs a clean cache prepared with targets")
        target_lp = cache.clean_target_logprobs.expand(C, *cache.clean_target_logprobs.shape).clone()  # [C, P, k]

    starts_all = [_start_layer(c, cache.n_layers) for c in configs]
    order = sorted((i for i in range(C) if starts_all[i] < cache.n_layers), key=lambda i: starts_all[i])
    rows_max = int(batch_size) if batch_size else _default_batch_size(cache)
    if rows_max < 1:
        raise UsageError(f"batch size must be positive, got {batch_size}")
    bar = tqdm(total=C * P, unit="abl", desc=f"sweep {method}", disable=not progress, dynamic_ncols=True)
    bar.update((C - len(order)) * P)  # empty configs are the clean model: KL 0, clean hidden
    clean_lps = [torch.log_softmax(g.clean_logits.double(), -1) for g in cache.groups]  # [n, V] float64 each
    outer = 0
    while outer < len(order):
        # One block of configurations: its shared prefix is replayed once (one row per config),
        # then every group of prompts replays its own tokens in chunks of at most rows_max rows.
        block = order[outer:outer + _block_size(cache, rows_max)]
        reported = 0  # work of this block told to on_work
        try:
            kv = None
            if cache.prefix is not None:
                kv = _PrefixKV()
                _replay(cache, cache.prefix, [configs[i] for i in block], [starts_all[i] for i in block],
                        method, epsilon, kv)
            for group, clean_lp in zip(cache.groups, clean_lps):
                n = len(group.prompts)
                per_chunk = max(1, rows_max // n)
                prompts = torch.tensor(group.prompts)
                for pos in range(0, len(block), per_chunk):
                    chunk = block[pos:pos + per_chunk]
                    tail = _replay(cache, group, [configs[i] for i in chunk], [starts_all[i] for i in chunk],
                                   method, epsilon, kv.for_prompts(n, pos) if kv is not None else None)
                    last = tail[:, -1]  # [rows, D]
                    index = torch.tensor(chunk)
                    if target_lp is not None:
                        want_t = cache.targets[prompts].repeat(len(chunk), 1)  # [rows, k], config-major
                        target_lp[index[:, None], prompts[None, :]] = _target_logprobs(
                            cache.model, tail, want_t, transform).view(len(chunk), n, -1)
                    del tail
                    logits = lm_head.logits(cache.model, last, transform) if (kl is not None or logprobs is not None) else None
                    if hidden is not None:
                        hidden[index[:, None], prompts[None, :]] = last.float().cpu().view(len(chunk), n, D)
                    if logits is not None:
                        lp = torch.log_softmax(logits.double(), -1).view(len(chunk), n, V)  # [k, n, V] float64
                        if kl is not None:
                            value = kl_from_logprobs(clean_lp, lp).clamp_min(0.0)  # [k, n], from log-probs
                            kl[index[:, None], prompts[None, :]] = value.cpu()
                        if logprobs is not None:
                            logprobs[index[:, None], prompts[None, :]] = lp.float().cpu()
                        del lp
                    bar.update(len(chunk) * n)
                    if on_work is not None:
                        work = sum(cache.n_layers - starts_all[i] for i in chunk) * n
                        on_work(work)
                        reported += work
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or rows_max == 1:
                raise
            # halve and redo the whole block (its finished chunks are simply overwritten)
            rows_max = max(1, rows_max // 2)
            if on_work is not None and reported:
                on_work(-reported)
            del kv
            if _model_device(cache.model).type == "cuda":
                torch.cuda.empty_cache()
            bar.reset(total=C * P)
            bar.update((C - len(order)) * P + outer * P)
            continue
        outer += len(block)
    bar.close()
    cache.extra.setdefault("batch_sizes", []).append(rows_max)  # [scale-out] for the run manifest
    return SweepResult(cache.clean_logprobs, cache.clean_hidden, kl, hidden, logprobs, rows_max, target_lp)


def single_head_configs(n_layers: int, n_heads: int, layers: Sequence[int] | None = None) -> list[list[Head]]:
    """[[(l, h)] for every head] in layer-major order (optionally only some layers)."""
    return [[(l, h)] for l in (range(n_layers) if layers is None else layers) for h in range(n_heads)]
