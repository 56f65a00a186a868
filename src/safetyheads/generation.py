"""Batched text generation, optionally with attention heads ablated for the whole generation.

`generate_responses` formats raw prompts (chat / paper / raw), left-pads them, and calls
`model.generate` with the KV cache on, inside `ablation.ablated(...)`, so every decoding step -
the prompt pass and each cached single-token step - runs with the same heads ablated.
`generate_texts` is the same without formatting or ablation (used by model judges).
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
    On CUDA out-of-memory the batch size is halved and the batch retried."""
    from .prompts import encode

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    seed = resolve_seed(greedy, seed)
    stop_ids = stop_token_ids(model, tokenizer)
    gc = _generation_config(model, tokenizer, stop_ids, max_new_tokens, greedy, top_k, temperature)
    device = next(model.parameters()).device

    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: OOM shows up at once
    results: dict[int, tuple[list[int], bool]] = {}
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="prompt")
    stop_set = set(stop_ids)
    with _sampling_rng(seed, device), torch.inference_mode():
        start = 0
        while start < len(order):
            idx = order[start:start + batch_size]
            enc = encode(tokenizer, [texts[i] for i in idx], device=device)
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
                cut = next((k for k, t in enumerate(ids) if t in stop_set), None)
                results[i] = (ids if cut is None else ids[:cut], cut is not None)
            bar.update(len(idx))
            start += len(idx)
    bar.close()

    token_ids = [results[i][0] for i in range(len(texts))]
    return Generations(
        responses=[tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
        token_ids=token_ids,
        finished=[results[i][1] for i in range(len(texts))],
        seed=seed,
        settings={"max_new_tokens": max_new_tokens, "greedy": greedy, "top_k": top_k,
                  "temperature": None if greedy else temperature, "seed": seed, "stop_token_ids": stop_ids,
                  "use_cache": True},
    )


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
