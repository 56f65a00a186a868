"""The architecture harness (safetyheads.archcheck, issue 15) on the families researchers study
now, MHA and GQA where the config has KV heads: every semantic check against its independent
oracle (stock model, eager attention weights, a direct forward under `ablated()`, surgery). The
full run over every causal-LM type is `make test-archs` (also `pytest -m slow` here)."""

from __future__ import annotations

import pytest

from safetyheads import ablation, archcheck
from safetyheads.errors import UnsupportedModelError

from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

CI_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_next", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "gpt_oss",
    "deepseek_v3", "llama4_text", "granite", "cohere2", "falcon_h1", "jamba", "olmo3", "phi3",
    "gpt2", "gpt_neox", "deepseek_v4",
)


@pytest.mark.parametrize("model_type", CI_TYPES)
def test_harness_accepts(model_type):
    result = archcheck.check_type(model_type)
    assert result["status"] == "accepted", result.get("reason")
    for name, info in result["variants"].items():
        assert {"causal", "empty", "uniform-changes", "scaling", "uniform-weights", "sweep"} <= set(info["checks"]), name
    if archcheck.has_gqa(model_type):
        assert set(result["variants"]) == {"mha", "gqa"}


def test_deepseek_v4_is_accepted_with_unpadded_batches():
    """DeepSeek V4's own forward on a left-padded batch differs from each prompt run alone (its
    compressor pools fixed token columns, pads included), but on batches of prompts of one length
    it does not: the harness accepts it with `left_padding` off, and the engine's self-check,
    generation and log-probs then feed it only such batches (prompts.pads_safely)."""
    result = archcheck.check_type("deepseek_v4")
    assert result["status"] == "accepted", result.get("reason")
    assert result["left_padding"] is False and "left padding" in result["reason"]


def test_matrix_agrees_with_the_guard():
    """What the committed matrix says is what check_supported does."""
    matrix = ablation.architecture_matrix()
    assert len(matrix) == len(archcheck.causal_lm_types())
    for model_type in CI_TYPES:
        assert matrix[model_type]["status"] == "accepted", model_type
        assert model_type in ablation.SUPPORTED_ARCHITECTURES
    refused = [t for t, r in matrix.items() if r["status"] != "accepted"]
    assert refused
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[refused[0]]()
    with pytest.raises(UnsupportedModelError) as err:
        ablation.check_supported(config)
    message = str(err.value)
    assert "\n" not in message and refused[0] in message
    assert (matrix[refused[0]].get("reason") or matrix[refused[0]]["status"])[:40] in message


class _Broken(Exception):
    pass


def test_the_checks_can_fail(monkeypatch):
    """Break the wrapper on purpose: the harness must notice (its oracles are not the code under test)."""
    real = ablation.HeadAblator.attend

    def no_uniform(self, fn, layer, module, query, key, value, *args, **kwargs):  # ablation silently dropped
        return fn(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(ablation.HeadAblator, "attend", no_uniform)
    result = archcheck.check_type("llama")
    assert result["status"] == "refused" and "does not change the logits" in result["reason"]

    def leaky(self, fn, layer, module, query, key, value, *args, **kwargs):  # uniform over the wrong keys
        out, w = real(self, fn, layer, module, query, key, value, *args, **kwargs)
        return out * 1.01, w

    monkeypatch.setattr(ablation.HeadAblator, "attend", leaky)
    result = archcheck.check_type("llama")
    assert result["status"] == "refused"


@pytest.mark.slow
def test_every_type_matches_the_committed_matrix():
    """`make test-archs` regenerates the matrix; this asserts a fresh run agrees with it."""
    runner = archcheck.Runner(timeout=240)
    matrix = ablation.architecture_matrix()
    try:
        for model_type in archcheck.causal_lm_types():
            result = runner.check(model_type)
            assert (result["status"] == "accepted") == (matrix.get(model_type, {}).get("status") == "accepted"), \
                (model_type, result.get("reason"))
    finally:
        runner.close()
