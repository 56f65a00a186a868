"""A tiny random-weight chat model with a byte-level tokenizer, built in memory (no files, no downloads).

Used by the judge and evaluation unit tests: the tokenizer has a ChatML-style chat template, an
end-of-turn token and a pad token, like the real instruct models."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """Byte-level tokenizer: 256 byte tokens + <|im_start|> <|im_end|> <|pad|> (259 ids); left padding."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|pad|>"]})
    tok.padding_side = "left"
    tok.chat_template = chat_template
    return tok


def tiny_model(arch: str = "llama", *, seed: int = 0, vocab_size: int = 259, layers: int = 2, heads: int = 4,
               kv_heads: int = 2):
    """Random-weight causal LM; `arch` in llama / qwen2 (q bias)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                 eos_token_id=257, pad_token_id=258, bos_token_id=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    # random init gives nearly flat logits; larger weights make greedy decoding far from ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.generation_config.eos_token_id = 257
    model.generation_config.pad_token_id = 258
    return model.eval()
