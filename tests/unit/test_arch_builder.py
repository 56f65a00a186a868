"""The architecture harness's tiny-config builder (safetyheads.archcheck, issue 15) on the types it
could not build before: each becomes a tiny random model of the type's own causal-LM class (the
class's own config validation is the oracle that the config is coherent), the ones whose checks
all pass are accepted by `check_type`, and the ones refused carry the true class of problem."""

from __future__ import annotations

import pytest
import torch

from safetyheads import archcheck

from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

# types the builder failed on: run-length layer patterns (GPT-Neo), sub-config attributes the
# modelling code reads (DBRX), validators that name what they require (ZAYA, Gemma 4 assistant),
# per-layer overrides derived at full size (Dots 3 Note), a causal LM built from a sub-config of the
# composite config (MusicGen), a derived layer count (ProphetNet), per-layer-type RoPE left empty
# (Cohere Compass), a constructor's stated requirement (Reformer's is_decoder)
BUILT = ("gpt_neo", "dbrx", "mamba2", "zaya", "dots3_note", "dots3_note_text", "gemma4_assistant",
         "cohere_compass_text", "qwen4_exp", "qwen4_exp_text", "gemma3n_text", "zamba", "musicgen",
         "musicgen_melody", "prophetnet", "reformer")
ACCEPTED = ("dbrx", "zaya", "dots3_note_text", "cohere_compass_text", "zamba")
CHECKS = {"causal", "empty", "uniform-changes", "scaling", "uniform-weights", "sweep"}


@pytest.mark.parametrize("model_type", BUILT)
def test_builder_makes_a_tiny_model_of_the_types_causal_lm(model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config, model_cls = archcheck._tiny_causal_config(model_type, archcheck.has_gqa(model_type))
    with torch.device("meta"):
        model = archcheck._instantiate(model_cls, config, dtype=torch.float32)
    assert type(model).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    n = sum(p.numel() for p in model.parameters())  # [parameters]
    assert n < 5_000_000, f"{model_type}: {n / 1e6:.1f}M parameters"


def test_gpt_neo_layer_pattern_is_cut_to_the_tiny_stack():
    """GPT-Neo's run-length `attention_types` expand to one kind per layer: the tiny stack keeps both
    kinds and as many entries as layers (the config's own validator checks the count)."""
    config = archcheck.tiny_config("gpt_neo")
    assert len(config.attention_layers) == config.num_layers == archcheck.LAYERS
    assert set(config.attention_layers) == {"global", "local"}
    assert config.window_size < 10  # the local layers' window is shorter than the test prompts


def test_validator_stated_values_are_used():
    """ZAYA supports one expert per token and the Gemma 4 assistant a text model without per-layer
    inputs whose layers all share KV: the tiny configs carry exactly what the validators require,
    and are small otherwise."""
    zaya = archcheck.tiny_config("zaya")
    assert zaya.num_experts_per_tok == 1 and zaya.hidden_size == archcheck.HIDDEN
    text = archcheck.tiny_config("gemma4_assistant").text_config
    assert text.hidden_size_per_layer_input == 0 and text.vocab_size_per_layer_input == 0
    assert text.num_kv_shared_layers == text.num_hidden_layers and text.hidden_size == archcheck.HIDDEN


def test_heterogeneous_overrides_are_shrunk():
    """Dots 3 Note derives its sliding layers' overrides (64 heads of 256) itself: they are shrunk,
    keeping the MLA head as its no-RoPE and RoPE parts."""
    config, _ = archcheck._tiny_causal_config("dots3_note_text", False)
    for i, kind in enumerate(config.layer_types):
        layer = config.per_layer_config[i]
        assert layer.num_attention_heads == archcheck.HEADS, kind
        if kind == "sliding_attention":
            assert layer.head_dim == layer.qk_nope_head_dim + layer.qk_rope_head_dim


@pytest.mark.parametrize("model_type", ACCEPTED)
def test_newly_built_types_pass_every_check(model_type):
    result = archcheck.check_type(model_type)
    assert result["status"] == "accepted", result.get("reason")
    for name, info in result["variants"].items():
        assert CHECKS <= set(info["checks"]), name


@pytest.mark.parametrize("model_type, status, words", [
    ("mamba2", "refused", "no softmax attention"),
    ("gemma4_assistant", "refused", "check 'forward' failed"),
    ("gpt_neo", "refused", "computes it itself"),
    ("rwkv", "refused", "recurrent"),
    ("xlnet", "refused", "relative-position"),
])
def test_refused_types_say_why(model_type, status, words):
    result = archcheck.check_type(model_type)
    assert result["status"] == status and words in result["reason"], result["reason"]
    assert "\n" not in result["reason"]


def test_validation_error_reason_is_its_cause():
    """A strict-dataclass validation error's first line only names the validator: the reason is
    the cause the validator gave."""
    from transformers import CONFIG_MAPPING

    with pytest.raises(Exception) as info:
        CONFIG_MAPPING["zaya"](num_experts_per_tok=2)
    reason = archcheck._classify(info.value)
    assert "num_experts_per_tok=1" in reason and "\n" not in reason
