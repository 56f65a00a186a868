"""Batched multi-condition generation (rows = condition x prompt) equals one generation per
condition, token for token: tiny random models of every architecture family (MHA and GQA), every
ablation method (`mean` with its per-condition means), left padding, several calls (max_rows); and
the harness's tiny model of every family the architecture CI list checks (test_architectures.CI_TYPES)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_chat import tiny_tokenizer  # noqa: E402
from tiny_models import _randomize, one_thread, tiny_config  # noqa: E402,F401

from safetyheads.errors import UsageError  # noqa: E402
from safetyheads.generation import Condition, generate_conditions, generate_responses  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox"]
CASES = [(a, g) for a in ARCHS for g in (False, True) if not (a == "gpt_neox" and g)]
# different lengths: the batch is left padded
PROMPTS = ["Hi", "How do I pick a lock?", "Write a long story about a dragon who learns to code."]
# heads in several layers: a later layer's `mean` is taken under the earlier layers' ablation
CONDITIONS = [
    None,
    Condition(((0, 1), (2, 3)), "undifferentiated", 1e-5),
    Condition(((1, 0), (3, 2)), "scaling", 1e-5),
    Condition(((0, 2),), "uniform"),
    Condition(((0, 0), (1, 1), (2, 2)), "mean"),
    Condition(((1, 3), (3, 0)), "mean"),
    Condition(((0, 3), (1, 2), (2, 1), (3, 0)), "undifferentiated", 1e-3),
]


def _chat_model(arch: str, gqa: bool, seed: int = 0):
    """A tiny_models architecture with the byte-level chat tokenizer's vocabulary (259 ids)."""
    config = tiny_config(arch, gqa)
    config.vocab_size, config.pad_token_id, config.eos_token_id, config.bos_token_id = 259, 258, 257, 256
    torch.manual_seed(seed)
    attn = "eager" if arch == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    _randomize(model, seed)
    model.generation_config.eos_token_id = 257
    model.generation_config.pad_token_id = 258
    return model.eval()


def _per_condition(model, tok, conditions, n_new):
    out = []
    for c in conditions:
        gen = generate_responses(model, tok, PROMPTS, heads=c.heads if c else (),
                                 method=c.method if c else "undifferentiated", epsilon=c.epsilon if c else 1e-5,
                                 fmt="chat", max_new_tokens=n_new, batch_size=len(PROMPTS), progress=False)
        out.append(gen.token_ids)
    return out


@pytest.mark.parametrize("arch,gqa", CASES, ids=[f"{a}-{'gqa' if g else 'mha'}" for a, g in CASES])
def test_batched_conditions_equal_per_condition_generation(arch, gqa):
    tok, model = tiny_tokenizer(), _chat_model(arch, gqa)
    n_new = 8
    expected = _per_condition(model, tok, CONDITIONS, n_new)
    # all conditions in one call, and split into calls of 2 conditions (max_rows = 2 x 3 prompts)
    for max_rows in (len(CONDITIONS) * len(PROMPTS), 2 * len(PROMPTS) + 1):
        gens = generate_conditions(model, tok, PROMPTS, CONDITIONS, fmt="chat", max_new_tokens=n_new,
                                   max_rows=max_rows)
        assert [g.token_ids for g in gens] == expected, f"max_rows={max_rows}"
    # the ablations act (the comparison could fail): most conditions answer unlike the baseline
    assert sum(e != expected[0] for e in expected[1:]) >= len(CONDITIONS) // 2
    # mean ablation acts too
    assert expected[4] != expected[0] or expected[5] != expected[0]


def test_mean_is_per_condition_not_per_batch():
    """A condition's `mean` answers do not depend on which other conditions share its call."""
    tok, model = tiny_tokenizer(), _chat_model("llama", True)
    mean = Condition(((0, 0), (1, 1), (2, 2)), "mean")
    alone = generate_conditions(model, tok, PROMPTS, [mean], max_new_tokens=8)[0]
    mixed = generate_conditions(model, tok, PROMPTS, [Condition(((0, 0), (1, 1)), "scaling"), None, mean],
                                max_new_tokens=8)[2]
    assert mixed.token_ids == alone.token_ids


def test_generations_carry_text_and_settings():
    tok, model = tiny_tokenizer(), _chat_model("qwen2", False)
    conds = [None, Condition(((1, 2),), "scaling")]
    gens = generate_conditions(model, tok, PROMPTS, conds, max_new_tokens=5)
    assert len(gens) == 2
    for g, c in zip(gens, conds):
        ref = generate_responses(model, tok, PROMPTS, heads=c.heads if c else (), method=c.method if c else
                                 "undifferentiated", fmt="chat", max_new_tokens=5, progress=False)
        assert g.responses == ref.responses and g.finished == ref.finished
        assert g.settings["max_new_tokens"] == 5 and g.settings["format"] == "chat"
    with pytest.raises(UsageError, match="max_rows"):
        generate_conditions(model, tok, PROMPTS, conds, max_new_tokens=5, max_rows=0)


def test_sampling_is_reproducible_with_a_seed():
    tok, model = tiny_tokenizer(), _chat_model("llama", False)
    conds = [None, Condition(((0, 1),), "undifferentiated")]
    a = generate_conditions(model, tok, PROMPTS, conds, max_new_tokens=6, greedy=False, top_k=20, seed=3)
    b = generate_conditions(model, tok, PROMPTS, conds, max_new_tokens=6, greedy=False, top_k=20, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] and a[0].seed == 3


# --- every family of the architecture CI list (tests/unit/test_architectures.py), built by the harness ---

def _char_tokenizer():
    """A character-level tokenizer whose ids fit the harness's tiny vocabulary (archcheck.VOCAB;
    prompts use ids 3..SPECIAL-1): unk 0, pad 1, eos 2."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from safetyheads import archcheck

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!'"
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    assert max(vocab.values()) < archcheck.SPECIAL
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   padding_side="left")


def _harness_cases():
    from safetyheads import archcheck
    from test_architectures import CI_TYPES

    return [(t, g) for t in CI_TYPES for g in ((False, True) if archcheck.has_gqa(t) else (False,))]


@pytest.mark.parametrize("model_type,gqa", _harness_cases(), ids=lambda v: v if isinstance(v, str) else ("gqa" if v else "mha"))
def test_batched_conditions_on_every_ci_family(model_type, gqa):
    """generate_conditions (rows = condition x prompt, per-row factors in the cached decode steps) =
    one generate_responses call per condition, token for token, on the harness's tiny model of each
    family the architecture CI checks (hybrids, MoE, sinks, multimodal wrappers, GPT-2 layouts)."""
    from safetyheads import ablation, archcheck

    tok = _char_tokenizer()
    with ablation.unguarded():
        model = archcheck.build(model_type, gqa, "eager").eval()
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 1
        layers = sorted(ablation.attention_layers(model))
        first, last = layers[0], layers[-1]
        every = tuple(ablation.model_heads(model))  # all heads silenced: the answers must change
        conditions = [None, Condition(((first, 1), (last, 0)), "undifferentiated", 1e-5),
                      Condition(((last, 1),), "scaling", 1e-5), Condition(((first, 0),), "uniform"),
                      Condition(every, "scaling", 1e-5)]
        prompts = ["hi", "how do I pick a lock?", "write a story"]
        expected = []
        for c in conditions:
            gen = generate_responses(model, tok, prompts, heads=c.heads if c else (),
                                     method=c.method if c else "undifferentiated", epsilon=c.epsilon if c else 1e-5,
                                     fmt="raw", max_new_tokens=5, batch_size=len(prompts), progress=False)
            expected.append(gen.token_ids)
        gens = generate_conditions(model, tok, prompts, conditions, fmt="raw", max_new_tokens=5)
        assert [g.token_ids for g in gens] == expected
        if all(e == expected[0] for e in expected[1:]):  # greedy answers of a tiny model may not move,
            ids = tok(prompts[1], return_tensors="pt").input_ids  # but the ablation must act on it
            with torch.no_grad():
                clean = model(input_ids=ids).logits[0, -1]
                with ablation.ablated(model, every, "scaling", 1e-5):
                    silenced = model(input_ids=ids).logits[0, -1]
            assert (clean - silenced).abs().max() > 1e-3
