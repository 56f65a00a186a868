"""Tiny random-weight causal LMs of every architecture the ablation engine supports, MHA and GQA.

Weights are drawn larger than transformers' default init (std 0.02 would give near-uniform
attention everywhere, so ablations would hardly change anything and tests could not fail).
Sliding windows are shorter than the test sequences and Gemma 2's attention soft-capping is
small, so those code paths really act.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
LAYERS = 4
WINDOW = 4  # sliding window, shorter than the test prompts

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox")
# (arch, gqa) pairs; GPT-NeoX has no grouped-query attention.
CASES = [(arch, gqa) for arch in ARCHS for gqa in (False, True) if not (arch == "gpt_neox" and gqa)]
CASE_IDS = [f"{arch}-{'gqa' if gqa else 'mha'}" for arch, gqa in CASES]
# Surgery realises undifferentiated attention only where no q-norm follows q_proj.
Q_NORM_ARCHS = ("qwen3", "gemma3_text", "olmo2")


def tiny_config(arch: str, gqa: bool = False, window: int | None = None):
    """`window`: sliding-window size of the archs that have one (default WINDOW, shorter than the test prompts)."""
    sliding = window or WINDOW
    kv = HEADS // 2 if gqa else HEADS
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(LAYERS)]
    if arch == "gpt_neox":
        return AutoConfig.for_model(arch, **common, rotary_pct=0.5, use_parallel_residual=True)
    common.update(num_key_value_heads=kv, head_dim=HEAD_DIM)
    if arch == "mistral":
        return AutoConfig.for_model(arch, **common, sliding_window=sliding)
    if arch == "qwen2":
        return AutoConfig.for_model(
            arch, **common, use_sliding_window=True, sliding_window=sliding, max_window_layers=2, layer_types=None
        )
    if arch == "qwen3":
        return AutoConfig.for_model(arch, **common, use_sliding_window=True, sliding_window=sliding, layer_types=alternating)
    if arch == "gemma2":
        return AutoConfig.for_model(
            arch, **common, sliding_window=sliding, layer_types=alternating,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=HEAD_DIM,
        )
    if arch == "gemma3_text":
        return AutoConfig.for_model(
            arch, **common, sliding_window=sliding, layer_types=alternating, query_pre_attn_scalar=HEAD_DIM,
        )
    if arch == "phi3":
        common.pop("head_dim")
        return AutoConfig.for_model(arch, **common)
    return AutoConfig.for_model(arch, **common)  # llama, olmo2


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif "norm" in name or "layernorm" in name:
            # Gemma stores norm weights as an offset from 1; others as the gain itself.
            base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def tiny_model(arch: str, gqa: bool = False, attn: str | None = None, seed: int = 0, window: int | None = None):
    """float32, eval mode; `attn` defaults to sdpa (eager for Gemma 2, whose soft-capping sdpa lacks)."""
    config = tiny_config(arch, gqa, window)
    attn = attn or ("eager" if arch == "gemma2" else "sdpa")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids avoiding the special ids 0..2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def left_pad(ids: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors -> (input_ids [B,T], attention_mask [B,T], position_ids [B,T])."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = x
        mask[i, width - len(x):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return input_ids, mask, position_ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads make
    each small op ~15x slower. Import this fixture into a test module to use it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
