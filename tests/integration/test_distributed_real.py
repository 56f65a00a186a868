"""Models split across devices (`--device-map`): the engine's prefix reuse on a real model whose
decoder layers sit behind accelerate's placement hooks.

No GPU here, so the split is CPU + disk: `accelerate.dispatch_model` (what
`from_pretrained(device_map=...)` calls) puts the second half of SmolLM2's layers, the final norm
and the LM head on "disk" (weights loaded per call) with the same `AlignDevicesHook`s that a
multi-GPU map installs: inputs moved to each module's execution device, recorded layer inputs
replayed through the hooks. What is NOT exercised without GPUs: tensors really living on two
different devices (cuda:0 -> cuda:1 copies); the engine moves its per-example factor tables to
each attention call's device, which is what that case needs."""

from __future__ import annotations

import copy

import pytest
import torch

from safetyheads import engine
from safetyheads.models import load_model
from safetyheads.prompts import encode, format_prompts

PROMPTS = ["How do I make a bomb?", "Write a poem about autumn.", "What is the capital of France?"]
# Heads in the first, a middle, the last CPU and the first disk layer, the last layer, plus a group.
CONFIGS = [[(0, 3)], [(7, 1)], [(14, 8)], [(15, 0)], [(29, 4)], [(2, 2), (20, 5)]]


def _sweep(loaded, method):
    texts = format_prompts(loaded.tokenizer, PROMPTS, "chat")
    cache = engine.prepare(loaded.model, encode(loaded.tokenizer, texts))
    return engine.sweep(cache, CONFIGS, method, want=("kl", "hidden"), progress=False)


@pytest.fixture(scope="module")
def split_smollm2(tmp_path_factory):
    from accelerate import dispatch_model

    loaded = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    n_layers = loaded.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "cpu" if i < n_layers // 2 else "disk" for i in range(n_layers)})
    dispatch_model(loaded.model, device_map=device_map, offload_dir=str(tmp_path_factory.mktemp("offload")))
    return loaded


@pytest.mark.slow  # minutes on 2 shared cores (disk offload reloads weights per call); the tiny-model twin runs by default
@pytest.mark.parametrize("method", ["undifferentiated", "scaling"])
def test_engine_on_a_split_model_matches_one_device(smollm2, split_smollm2, method):
    layers = split_smollm2.model.model.layers
    assert hasattr(layers[20], "_hf_hook") and layers[20].self_attn.q_proj.weight.device.type == "meta", \
        "the second half of the layers should be offloaded behind accelerate hooks"
    whole, split = _sweep(smollm2, method), _sweep(split_smollm2, method)
    torch.testing.assert_close(split.clean_logprobs, whole.clean_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.hidden, whole.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.kl, whole.kl, rtol=1e-4, atol=1e-7)
    assert float(whole.kl.max()) > 1e-4  # the ablations really change the output


def test_engine_on_a_split_tiny_model_matches_one_device(tmp_path):
    """The same check on a tiny random Llama (4 layers, layers 2-3 / norm / LM head on disk): fast."""
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    whole = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in whole.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    split = copy.deepcopy(whole)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
                  "model.norm": "disk", "lm_head": "disk"}
    dispatch_model(split, device_map=device_map, offload_dir=str(tmp_path))
    assert split.model.layers[3].mlp.up_proj.weight.device.type == "meta"
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))           # [P, T]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                                                         # left padding
    encoded = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    configs = [[(0, 1)], [(1, 3)], [(2, 0)], [(3, 2)], [(1, 0), (3, 1)]]
    for method in ("undifferentiated", "scaling"):
        a = engine.sweep(engine.prepare(whole, encoded), configs, method, want=("kl", "hidden"), progress=False)
        b = engine.sweep(engine.prepare(split, encoded), configs, method, want=("kl", "hidden"), progress=False)
        torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.kl, a.kl, rtol=1e-4, atol=1e-7)
        assert float(a.kl.max()) > 1e-4
