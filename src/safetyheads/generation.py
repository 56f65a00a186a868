"""Batched text generation, optionally with attention heads ablated for the whole generation.

`generate_responses` formats raw prompts (chat / paper / raw), left-pads them, and calls
`model.generate` with the KV cache on, inside `ablation.ablated(...)`, so every decoding step -
the prompt pass and each cached single-token step - runs with the same heads ablated.
`generate_texts` is the same without formatting or ablation (used by model judges).
`generate_conditions` answers the same prompts under many conditions (baseline and head
ablations, any methods) in one batched `generate` call: rows = condition x prompt, each row with
its own factors (`ablation.HeadAblator` tables), in the prompt pass and in every cached decoding
step; greedy outputs equal one `generate_responses` call per condition token for token.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .errors import UsageError

# End-of-turn tokens of common chat templates. GGUF-converted tokenizers often name only one EOS
# (e.g. Qwen's <|endoftext|>) while the chat turn ends with another (<|im_end|>): stop at either.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class Generations:
    """What a generation produced, in the order of the input prompts."""

    responses: list[str]
    token_ids: list[list[int]]          # new tokens, cut before the first stop token
    finished: list[bool]                # True when the model stopped by itself (stop token)
    seed: int | None                    # the sampling seed used (None for greedy)
    settings: dict = field(default_factory=dict)  # decoding settings, for the run manifest


def check_decoding(max_new_tokens: int, greedy: bool, top_k: int | None, temperature: float) -> None:
    """User-facing validation of the decoding options."""
    if max_new_tokens is None or max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not greedy:
        if temperature is None or temperature <= 0:
            raise UsageError(f"--temperature must be > 0 when sampling (got {temperature})")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1 (got {top_k})")


def resolve_seed(greedy: bool, seed: int | None) -> int | None:
    """Sampling needs a seed to be reproducible: without one, warn, pick one and return it."""
    if greedy:
        return None
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        warnings.warn(f"sampling without --seed: using seed {seed} (recorded in the run manifest)", stacklevel=3)
    return int(seed)


def stop_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the generation config's EOS plus known end-of-turn tokens."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab_special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {})
    for tok in _END_OF_TURN:
        if tok in vocab_special:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
    return sorted(ids)


def _generation_config(model, tokenizer, stop_ids, max_new_tokens, greedy, top_k, temperature):
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    gc.min_new_tokens = None
    gc.use_cache = True
    gc.eos_token_id = stop_ids or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    gc.pad_token_id = pad
    gc.num_beams = 1
    gc.repetition_penalty = None
    gc.return_dict_in_generate = True
    if greedy:
        # the model's own defaults (e.g. Qwen's temperature 0.7) must not turn greedy into sampling
        gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.min_p = False, None, None, None, None
    else:
        gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.min_p = True, float(temperature), top_k, None, None
    return gc


def _sampling_rng(seed: int | None, device):
    """Seed torch for sampling without leaking the seed into the caller's global RNG state."""
    if seed is None:
        return contextlib.nullcontext()
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    ctx = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def seeded():
        with ctx:
            torch.manual_seed(seed)
            yield

    return seeded()


def generate_texts(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int = 128, greedy: bool = True,
                   top_k: int | None = None, temperature: float = 1.0, seed: int | None = None,
                   batch_size: int = 16, progress: bool = True, desc: str = "generate") -> Generations:
    """Generate continuations of already formatted `texts`, batched and left-padded, KV cache on.

    Texts are sorted by length so each batch carries little padding; the output is in input order.
    A model whose outputs change under left padding (`prompts.pads_safely`: BART-style positions,
    recurrences) gets batches of texts of one length only, no padding.
    On CUDA out-of-memory the batch size is halved and the batch retried."""
    from .prompts import encode, pads_safely

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    seed = resolve_seed(greedy, seed)
    stop_ids = stop_token_ids(model, tokenizer)
    gc = _generation_config(model, tokenizer, stop_ids, max_new_tokens, greedy, top_k, temperature)
    device = next(model.parameters()).device

    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: OOM shows up at once
    padded = pads_safely(model)
    results: dict[int, tuple[list[int], bool]] = {}
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="prompt")
    stop_set = set(stop_ids)
    with _sampling_rng(seed, device), torch.inference_mode():
        start = 0
        while start < len(order):
            idx = order[start:start + batch_size]
            if not padded:  # sorted by length: the texts of the first one's length lead
                idx = [i for i in idx if lengths[i] == lengths[idx[0]]]
            enc = encode(tokenizer, [texts[i] for i in idx], device=device)
            _check_unpadded(enc, padded)
            try:
                out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                     generation_config=gc)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                continue
            new = out.sequences[:, enc.input_ids.shape[1]:].tolist()  # [batch, new_tokens]
            for i, ids in zip(idx, new):
                results[i] = _cut_at_stop(ids, stop_set)
            bar.update(len(idx))
            start += len(idx)
    bar.close()

    return _generations(tokenizer, [results[i] for i in range(len(texts))], seed,
                        _settings(max_new_tokens, greedy, top_k, temperature, seed, stop_ids))


def _check_unpadded(enc, padded: bool) -> None:
    """A batch for a model that must not see padding has none (texts of one length can still
    tokenise to different lengths in a batch when special tokens differ between them)."""
    if not padded and not bool(enc.attention_mask.bool().all()):
        raise UsageError("this model's outputs change under left padding, and prompts of one length "
                         "tokenised to different lengths in a batch; use a batch size of 1")


def _cut_at_stop(ids: list[int], stop_set: set[int]) -> tuple[list[int], bool]:
    """The new tokens up to the first stop token, and whether the model stopped by itself."""
    cut = next((k for k, t in enumerate(ids) if t in stop_set), None)
    return (ids if cut is None else ids[:cut]), cut is not None


def _settings(max_new_tokens: int, greedy: bool, top_k: int | None, temperature: float, seed: int | None,
              stop_ids: list[int]) -> dict:
    """The decoding settings a run manifest records."""
    return {"max_new_tokens": max_new_tokens, "greedy": greedy, "top_k": top_k,
            "temperature": None if greedy else temperature, "seed": seed, "stop_token_ids": stop_ids,
            "use_cache": True}


def _generations(tokenizer, per_prompt: list[tuple[list[int], bool]], seed: int | None, settings: dict) -> Generations:
    """`Generations` from (token ids, finished) per prompt, in prompt order."""
    token_ids = [ids for ids, _ in per_prompt]
    return Generations(responses=[tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
                       token_ids=token_ids, finished=[f for _, f in per_prompt], seed=seed, settings=settings)


def generate_responses(model, tokenizer, prompts: Sequence[str], *, heads: Sequence[tuple[int, int]] = (),
                       method: str = "undifferentiated", epsilon: float = 1e-5, fmt: str = "chat",
                       system_prompt: str | None = None, max_new_tokens: int = 128, greedy: bool = True,
                       top_k: int | None = None, temperature: float = 1.0, seed: int | None = None,
                       batch_size: int = 16, progress: bool = True, desc: str = "generate",
                       chat_template_kwargs: dict | None = None) -> Generations:
    """Answer raw `prompts` (formatted with `fmt`) with `heads` ablated during the whole generation.

    `heads=()` generates with the unablated model. Greedy by default; sampling (`greedy=False`)
    uses `top_k` / `temperature` and `seed` (warned about and chosen when missing).
    `chat_template_kwargs`: template variables of the chat format (prompts.format_prompts; templates
    with a thinking switch answer without thinking unless they say otherwise)."""
    from .prompts import format_prompts, template_kwargs

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    seed = resolve_seed(greedy, seed)
    texts = format_prompts(tokenizer, list(prompts), fmt, system_prompt=system_prompt,
                           chat_template_kwargs=chat_template_kwargs)
    if heads:
        from .ablation import ablated

        ctx = ablated(model, list(heads), method, epsilon)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        gen = generate_texts(model, tokenizer, texts, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                             temperature=temperature, seed=seed, batch_size=batch_size, progress=progress,
                             desc=desc)
    gen.settings.update({"format": fmt, "system_prompt": system_prompt})
    variables = template_kwargs(tokenizer, chat_template_kwargs, note=False) if fmt == "chat" else {}
    if variables:  # only when there are any: settings of earlier generations stay comparable
        gen.settings["chat_template_kwargs"] = variables
    return gen


# ---------------------------------------------------------------------------------------------
# Many conditions in one batched generate call

#: Rows (conditions x prompts) per `generate` call by default: large enough that a CPU decoding
#: step is dominated by the weight matmuls rather than per-step overhead, small enough that the KV
#: cache stays modest (Qwen2.5-0.5B, 128 rows x 200 tokens: ~0.6 GB in float32).
DEFAULT_MAX_ROWS = 128


@dataclass(frozen=True)
class Condition:
    """One generation condition: these heads ablated by this method (no heads = the unablated model)."""

    heads: tuple[tuple[int, int], ...] = ()
    method: str = "undifferentiated"
    epsilon: float = 1e-5


def _as_condition(cond) -> Condition:
    """None (baseline), a Condition, or anything with heads / method / epsilon (evaluate.Ablation)."""
    if cond is None:
        return Condition()
    if isinstance(cond, Condition):
        return cond
    return Condition(tuple((int(l), int(h)) for l, h in cond.heads), cond.method, float(cond.epsilon))


class ConditionAblator:
    """`ablation.HeadAblator` for rows = condition x prompt (condition-major: row c * P + p).

    Query and output factors are the per-row tables of HeadAblator (the prompt pass and every
    cached decoding step see the same batch of rows, so each row keeps its factors throughout).
    `mean` needs one mean per condition, not one over the whole batch: each mean-ablated row gets
    its head's mean output over its own condition's rows and real (non-padding) positions of the
    first forward pass (the prompt pass), exactly what `ablation.ablated` computes when the same
    condition runs alone on the same prompts. It is applied by wrapping the attention function
    HeadAblator calls, so the order of operations is HeadAblator's (query factor, attention, mean,
    output factor)."""

    def __init__(self, model, conditions: Sequence[Condition], n_prompts: int):
        from .ablation import FactorTables, HeadAblator, factor_tables, num_layers_heads

        n_layers, n_heads = num_layers_heads(model)
        C = len(conditions)
        q = torch.ones(C, n_layers, n_heads)  # [C, L, H]
        o = torch.ones(C, n_layers, n_heads)
        mean = torch.zeros(C, n_layers, n_heads, dtype=torch.bool)
        used = {"q": False, "o": False, "mean": False}
        for c, cond in enumerate(conditions):
            if not cond.heads:
                continue
            t = factor_tables([list(cond.heads)], cond.method, cond.epsilon, n_layers, n_heads)
            if t.q_scale is not None:
                q[c], used["q"] = t.q_scale[0], True
            if t.o_scale is not None:
                o[c], used["o"] = t.o_scale[0], True
            if t.mean_mask is not None:
                mean[c], used["mean"] = t.mean_mask[0], True
        rows = lambda t: t.repeat_interleave(n_prompts, dim=0)  # noqa: E731  [C*P, L, H]
        tables = FactorTables(q_scale=rows(q) if used["q"] else None, o_scale=rows(o) if used["o"] else None)
        self.active = any(used.values())
        self._base = HeadAblator(model, tables) if (used["q"] or used["o"]) else None
        self._mean_mask = rows(mean) if used["mean"] else None  # [C*P, L, H] bool
        self._groups = torch.arange(C).repeat_interleave(n_prompts)  # [C*P]: each row's condition
        self._means: dict[int, torch.Tensor] = {}
        self.model = model

    def __enter__(self):
        from .ablation import attached

        if self._base is not None:
            # the mean replacement rides inside HeadAblator's call of the attention function
            self._base.attend = self._wrap(self._base.attend)
            self._ctx = self._base
        else:
            self._ctx = attached(self.model, self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def _wrap(self, base_attend):
        def attend(fn, layer, module, query, key, value, *args, **kwargs):
            return base_attend(self._with_means(fn, layer), layer, module, query, key, value, *args, **kwargs)
        return attend

    def attend(self, fn, layer, module, query, key, value, *args, **kwargs):  # no query/output factors at all
        return self._with_means(fn, layer)(module, query, key, value, *args, **kwargs)

    def _with_means(self, fn, layer: int):
        if self._mean_mask is None or not bool(self._mean_mask[:, layer].any()):
            return fn

        def fn_with_means(module, query, key, value, *args, **kwargs):
            out, weights = fn(module, query, key, value, *args, **kwargs)  # out: [B, q, H, hd]
            means = self._row_means(layer, out, args[0] if args else kwargs.get("attention_mask"))  # [B, H, hd]
            replace = self._mean_mask[:, layer].to(out.device)[:, None, :, None]  # [B, 1, H, 1]
            return torch.where(replace, means[:, None].to(out), out), weights

        return fn_with_means

    def _row_means(self, layer: int, out: torch.Tensor, attention_mask) -> torch.Tensor:
        from .ablation import _real_query_rows

        if layer not in self._means:
            B = out.shape[0]
            if B != len(self._groups):
                raise UsageError(f"condition table has {len(self._groups)} rows but the batch has {B}")
            real = _real_query_rows(attention_mask, B, out.shape[1], out.device)  # [B, q]
            filled = out.masked_fill(~real[:, :, None, None], 0)  # a padding row may hold NaN
            groups = self._groups.to(out.device)
            means = torch.zeros(B, *out.shape[2:], dtype=out.dtype, device=out.device)  # [B, H, hd]
            for g in range(int(groups.max()) + 1):
                rows = groups == g
                # the same reduction as HeadAblator._head_means over this condition's rows alone
                means[rows] = filled[rows].sum((0, 1)) / real[rows].sum().clamp_min(1)
            self._means[layer] = means.detach()
        return self._means[layer]


def generate_conditions(model, tokenizer, prompts: Sequence[str], conditions: Sequence, *, fmt: str = "chat",
                        system_prompt: str | None = None, chat_template_kwargs: dict | None = None,
                        max_new_tokens: int = 128, greedy: bool = True, top_k: int | None = None,
                        temperature: float = 1.0, seed: int | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                        progress: bool = False, desc: str = "generate") -> list[Generations]:
    """Answer raw `prompts` under every condition, many conditions per batched `generate` call.

    `conditions`: None (the unablated model), `Condition`s, or objects with heads / method /
    epsilon (evaluate.Ablation); methods may differ between conditions. Each `generate` call holds
    whole conditions: max(1, max_rows // len(prompts)) of them, i.e. rows = condition x prompt
    (condition-major), every prompt of a call left-padded to the longest one (prompts sorted
    longest first, as `generate_texts` does). Returns one `Generations` per condition, in order.

    Greedy outputs equal `generate_responses(..., heads=c.heads, method=c.method)` per condition
    on the same prompts in one batch (tests/unit/test_batched_generation.py), `mean` included:
    its means are per condition (ConditionAblator). Sampled outputs depend on which rows share a
    call (one random stream per call, seeded with `seed`), so they differ from per-condition
    sampling; they are reproducible for the same prompts, conditions and `max_rows`.
    A model whose outputs change under left padding (`prompts.pads_safely`) gets calls over the
    prompts of one length at a time instead (no padding); `mean` then averages over those prompts,
    as `generate_responses` does for the same batches.
    On CUDA out-of-memory the conditions per call are halved and the call retried."""
    from .prompts import batch_rows, encode, format_prompts, pads_safely, template_kwargs

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    if max_rows < 1:
        raise UsageError(f"max_rows must be at least 1 (got {max_rows})")
    if not prompts:
        raise UsageError("no prompts to generate for")
    conds = [_as_condition(c) for c in conditions]
    seed = resolve_seed(greedy, seed)
    texts = format_prompts(tokenizer, list(prompts), fmt, system_prompt=system_prompt,
                           chat_template_kwargs=chat_template_kwargs)
    stop_ids = stop_token_ids(model, tokenizer)
    gc = _generation_config(model, tokenizer, stop_ids, max_new_tokens, greedy, top_k, temperature)
    device = next(model.parameters()).device
    P = len(texts)
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(P), key=lambda i: -lengths[i])  # the row order generate_texts uses
    padded = pads_safely(model)
    # the prompts of each call (positions in `order`): all of them, or those of one length
    parts = batch_rows([lengths[i] for i in order], P, padded)
    results: list[list] = [[None] * P for _ in conds]
    stop_set = set(stop_ids)
    bar = tqdm(total=len(conds) * P, desc=desc, disable=not progress, unit="answer")
    with _sampling_rng(seed, device), torch.inference_mode():
        for part in parts:
            members = [order[j] for j in part]  # prompt indices, longest first
            Pg = len(members)
            enc = encode(tokenizer, [texts[i] for i in members], device=device)  # [Pg, T]
            _check_unpadded(enc, padded)
            width = enc.input_ids.shape[1]
            per_call = max(1, max_rows // Pg)
            start = 0
            while start < len(conds):
                chunk = conds[start:start + per_call]
                n = len(chunk)
                ablator = ConditionAblator(model, chunk, Pg)
                ctx = ablator if ablator.active else contextlib.nullcontext()
                try:
                    with ctx:
                        out = model.generate(input_ids=enc.input_ids.repeat(n, 1),  # [n*Pg, T], row c*Pg + p
                                             attention_mask=enc.attention_mask.repeat(n, 1), generation_config=gc)
                except torch.cuda.OutOfMemoryError:
                    if per_call == 1:
                        raise
                    per_call = max(1, per_call // 2)
                    torch.cuda.empty_cache()
                    continue
                new = out.sequences[:, width:].tolist()  # [n*Pg, new_tokens]
                for r, ids in enumerate(new):
                    c, j = divmod(r, Pg)
                    results[start + c][members[j]] = _cut_at_stop(ids, stop_set)
                bar.update(n * Pg)
                start += n
    bar.close()

    settings = {**_settings(max_new_tokens, greedy, top_k, temperature, seed, stop_ids),
                "format": fmt, "system_prompt": system_prompt}
    variables = template_kwargs(tokenizer, chat_template_kwargs, note=False) if fmt == "chat" else {}
    if variables:
        settings["chat_template_kwargs"] = variables
    return [_generations(tokenizer, per_prompt, seed, dict(settings)) for per_prompt in results]
