"""Prompt formats (chat / paper / reference / raw) and batched, left-padded tokenisation.

Left padding puts every prompt's last real token at position -1, so "the next-token distribution" is always
`logits[:, -1]`, and generation continues every row from the same column. Models whose own outputs change
under left padding (`pads_safely`) get batches of equal-length prompts instead (`batch_rows`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import UsageError

from .config import FORMATS  # noqa: E402  (one list; config.py is import-light)

# The paper's "template" setting as the paper writes it.
PAPER_TEMPLATE = "## Query: {query}\n## Answer:"
# The same template exactly as the reference implementation builds it: no space after the colon (see
# ../shared/reference/README.md; its Generalized Ships scores were computed on these inputs).
REFERENCE_TEMPLATE = "## Query:{query}\n## Answer:"


# apply_chat_template arguments format_prompts sets itself (a template variable of that name cannot be passed)
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
THINKING_SWITCH = "enable_thinking"  # Qwen3 / Qwen3.5 templates: thinking unless it is false
_noted_thinking: set[int] = set()  # templates the non-thinking default was printed for (once per process)


def check_template_kwargs(chat_template_kwargs: Any) -> dict[str, Any] | None:
    """`chat_template_kwargs` as a plain dict of template variables (None stays None); UsageError
    for anything else, so a typo in --chat-template-kwargs fails before the model loads."""
    if chat_template_kwargs is None:
        return None
    if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
        raise UsageError(f"--chat-template-kwargs must be a JSON object of template variables, "
                         f"got {chat_template_kwargs!r}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(chat_template_kwargs))
    if reserved:
        raise UsageError(f"--chat-template-kwargs cannot set {', '.join(reserved)} (safetyheads sets them itself)")
    return dict(chat_template_kwargs)


def _template_source(tokenizer) -> str:
    """The chat template apply_chat_template would render (the default one of a named set)."""
    get = getattr(tokenizer, "get_chat_template", None)
    if callable(get):
        try:
            return str(get())
        except Exception:  # no usable template: format_prompts says so
            pass
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return str(template.get("default", ""))
    return str(template or "")


def template_kwargs(tokenizer, chat_template_kwargs: dict[str, Any] | None = None, *,
                    note: bool = True) -> dict[str, Any]:
    """The template variables the chat format renders with: the user's `chat_template_kwargs`,
    plus `enable_thinking=False` when the template has that switch (its source mentions it) and
    the user did not set it. Qwen3-style templates otherwise open the answer in thinking mode:
    the scored last position then predicts `<think>` for every prompt (Ships would measure the
    format, not refusal) and a judge reads reasoning instead of the answer. The default is printed
    once per template and process (`note`), since it changes the model input."""
    kwargs = check_template_kwargs(chat_template_kwargs) or {}
    source = _template_source(tokenizer)
    if THINKING_SWITCH in source and THINKING_SWITCH not in kwargs:
        kwargs[THINKING_SWITCH] = False
        if note and hash(source) not in _noted_thinking:
            _noted_thinking.add(hash(source))
            print("note: this chat template has a thinking mode; prompts are formatted for non-thinking answers "
                  "(enable_thinking=False). Pass --chat-template-kwargs '{\"enable_thinking\": true}' to study "
                  "thinking mode.", file=sys.stderr)
    return kwargs


def format_prompts(tokenizer, prompts: list[str], fmt: str, system_prompt: str | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Turn plain requests into model input text.

    `chat`: the tokenizer's chat template with the generation prompt (assistant turn opened), optional system
    message, and the template variables of `template_kwargs` (`chat_template_kwargs`, non-thinking answers by
    default where the template can think); `paper`: PAPER_TEMPLATE; `reference`: REFERENCE_TEMPLATE (the
    reference code's spacing); `raw`: the request itself."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if system_prompt is not None and fmt != "chat":
        raise UsageError(f"--system-prompt only applies to the chat format, not {fmt!r}")
    if chat_template_kwargs and fmt != "chat":
        raise UsageError(f"--chat-template-kwargs only applies to the chat format, not {fmt!r}")
    if fmt == "raw":
        return list(prompts)
    if fmt == "paper":
        return [PAPER_TEMPLATE.format(query=q) for q in prompts]
    if fmt == "reference":
        return [REFERENCE_TEMPLATE.format(query=q) for q in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this model's tokenizer has no chat template; use --format paper or --format raw")
    variables = template_kwargs(tokenizer, chat_template_kwargs)
    texts = []
    for q in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
        messages.append({"role": "user", "content": q})
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **variables))
    return texts


@dataclass
class Encoded:
    """A left-padded batch. Pads have attention_mask 0 and position id 1 (as transformers' generate() does)."""

    input_ids: "torch.Tensor"  # [B, T] long
    attention_mask: "torch.Tensor"  # [B, T] long, 1 on real tokens
    position_ids: "torch.Tensor"  # [B, T] long, 0 at each row's first real token

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Encoded":
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))

    def __getitem__(self, rows) -> "Encoded":
        """A sub-batch (slice or index tensor); columns that are padding in every kept row are dropped."""
        ids, mask, pos = self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows]
        if ids.dim() == 1:
            ids, mask, pos = ids[None], mask[None], pos[None]
        real_cols = mask.any(0).nonzero()
        start = int(real_cols[0]) if len(real_cols) else mask.shape[1]
        return Encoded(ids[:, start:], mask[:, start:], pos[:, start:])

    def as_kwargs(self) -> dict:
        """Keyword arguments for `model(**enc.as_kwargs())` / `model.generate(...)`."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def position_ids_from_mask(attention_mask):
    """0 at the first real token of each row; pads get 1 (same as transformers' generate: cumsum - 1, masked fill)."""
    pos = attention_mask.long().cumsum(-1) - 1  # [B, T]
    return pos.masked_fill(attention_mask == 0, 1)


def pads_safely(model) -> bool:
    """Whether `model`'s own forward gives each prompt of a left-padded batch what the prompt gives
    alone. True unless the architecture harness found otherwise for its type (the `left_padding`
    entry of docs/architectures.md): a position embedding that counts the pads (BART-style learned
    positions from `arange`, ignoring position_ids), or a state that runs over the pads whatever the
    mask says (a recurrence, DeepSeek-V4's compressor windows, fixed in token columns). Such a
    model is only ever fed batches of prompts of one length (`batch_rows`), never padding."""
    from .ablation import architecture_matrix  # here: prompts.py is read by the CLI's --help, which needs no torch

    entry = architecture_matrix().get(getattr(getattr(model, "config", None), "model_type", None), {})
    return entry.get("left_padding") is not False


def batch_rows(lengths: Sequence[int], size: int, padded: bool = True) -> list[list[int]]:
    """Row indices in batches of at most `size`, in the order given. With `padded` (the common
    path) consecutive rows, whatever their lengths; without, a batch holds rows of one length only
    (each length's rows in order of first appearance), so slicing it (`Encoded[rows]`) leaves no pad."""
    if size < 1:
        raise UsageError(f"batch size must be at least 1 (got {size})")
    if padded:
        return [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
    by_length: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_length.setdefault(int(n), []).append(row)
    return [rows[i:i + size] for rows in by_length.values() for i in range(0, len(rows), size)]


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> Encoded:
    """Token-id lists (already tokenised) as one left-padded batch, the layout `encode` returns."""
    import torch  # here: prompts.py is read by the CLI's --help, which needs no torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    enc = Encoded(ids, mask, position_ids_from_mask(mask))
    return enc.to(device) if device is not None else enc


def encode(tokenizer, texts: list[str], device=None) -> Encoded:
    """Tokenise `texts` as one left-padded batch.

    Special tokens (e.g. a BOS) are added the way the tokenizer adds them, unless the texts already start with
    the BOS token (chat templates that write it themselves), so a prompt never gets a second BOS."""
    if not texts:
        raise UsageError("no prompts to encode")
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = bool(bos) and all(t.startswith(bos) for t in texts)
    if tokenizer.pad_token is None:  # load_model sets one; a bare tokenizer may lack it
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt", add_special_tokens=not has_bos)
    finally:
        tokenizer.padding_side = old_side
    mask = batch["attention_mask"].long()
    enc = Encoded(batch["input_ids"].long(), mask, position_ids_from_mask(mask))
    return enc.to(device) if device is not None else enc
