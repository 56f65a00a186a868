"""Prompt formats and left-padded batching, on a tiny in-memory tokenizer and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safetyheads.errors import UsageError
from safetyheads.prompts import FORMATS, PAPER_TEMPLATE, encode, format_prompts, position_ids_from_mask

WORDS = "<s> </s> <pad> <|user|> <|assistant|> <|system|> hello world how do i bake bread what is the capital of france".split()
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that prepends <s> on its own (like Llama's), with an optional chat template."""
    from tokenizers import processors

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


def test_raw_and_paper_formats():
    tok = make_tokenizer()
    assert format_prompts(tok, ["hello world"], "raw") == ["hello world"]
    assert format_prompts(tok, ["how do i bake bread"], "paper") == ["## Query: how do i bake bread\n## Answer:"]
    assert format_prompts(tok, ["how do i bake bread"], "reference") == ["## Query:how do i bake bread\n## Answer:"]
    assert PAPER_TEMPLATE.format(query="x") == "## Query: x\n## Answer:"


def test_chat_format_uses_template_and_system_prompt():
    tok = make_tokenizer()
    (text,) = format_prompts(tok, ["hello world"], "chat")
    assert text == "<s><|user|> hello world <|assistant|>"
    (text,) = format_prompts(tok, ["hello world"], "chat", system_prompt="be nice")
    assert text.startswith("<s><|system|> be nice <|user|> hello world")


def test_unknown_format_is_usage_error():
    with pytest.raises(UsageError, match="unknown prompt format 'fancy'"):
        format_prompts(make_tokenizer(), ["hello"], "fancy")
    assert set(FORMATS) == {"chat", "paper", "reference", "raw"}


def test_chat_without_template_is_usage_error():
    with pytest.raises(UsageError, match="no chat template"):
        format_prompts(make_tokenizer(chat_template=None), ["hello"], "chat")


def test_system_prompt_outside_chat_is_usage_error():
    with pytest.raises(UsageError, match="system-prompt"):
        format_prompts(make_tokenizer(), ["hello"], "raw", system_prompt="x")


def test_encode_left_pads_with_masks_and_positions():
    tok = make_tokenizer()
    enc = encode(tok, ["hello", "how do i bake bread"])
    # row 0: <s> hello -> 2 real tokens, 4 pads; row 1: <s> + 5 words
    assert enc.input_ids.shape == (2, 6)
    assert enc.attention_mask.tolist() == [[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert enc.input_ids[0, :4].tolist() == [tok.pad_token_id] * 4
    assert enc.input_ids[:, -1].tolist() == [tok.convert_tokens_to_ids("hello"), tok.convert_tokens_to_ids("bread")]
    assert enc.position_ids.tolist() == [[1, 1, 1, 1, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert enc.input_ids.dtype == enc.attention_mask.dtype == enc.position_ids.dtype == torch.long


def test_no_second_bos_after_chat_template():
    tok = make_tokenizer()
    texts = format_prompts(tok, ["hello world"], "chat")
    ids = encode(tok, texts).input_ids[0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # paper/raw texts carry no BOS: the tokenizer adds its own, once
    ids = encode(tok, format_prompts(tok, ["hello"], "raw")).input_ids[0].tolist()
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("hello")]


def test_position_ids_match_generate_convention():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    expected = mask.cumsum(-1) - 1
    expected.masked_fill_(mask == 0, 1)
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_encode_empty_is_usage_error():
    with pytest.raises(UsageError):
        encode(make_tokenizer(), [])


def test_padded_batch_gives_same_last_logits_as_single_prompts():
    """The point of masks and position ids: padding must not change any prompt's next-token distribution."""
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    texts = ["hello", "how do i bake bread", "what is the capital of france"]
    enc = encode(tok, texts)
    with torch.no_grad():
        batched = model(**enc.as_kwargs()).logits[:, -1]
        for i, t in enumerate(texts):
            single = encode(tok, [t])
            assert single.attention_mask.all()
            alone = model(**single.as_kwargs()).logits[:, -1]
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # sub-batches drop all-pad columns and keep rows aligned
    sub = enc[0:1]
    assert sub.input_ids.shape == (1, 2) and sub.attention_mask.all()
