"""Surgery (issue 3, acceptance 5): a checkpoint whose weights realise the ablation, reloaded with
plain AutoModelForCausalLM, gives the hook ablation's logits; refused where no weight edit is
equivalent. Also the heads/layers syntax and the supported-architecture check."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from safetyheads.ablation import (
    SUPPORTED_ARCHITECTURES,
    ablated,
    check_supported,
    parse_heads,
    parse_layers,
    surgery,
)
from safetyheads.cli.main import main
from safetyheads.errors import UnsupportedModelError, UsageError
from tiny_chat import tiny_tokenizer
from tiny_models import CASE_IDS, CASES, LAYERS, Q_NORM_ARCHS, one_thread, random_ids, tiny_model  # noqa: F401

HEADS_SET = [(0, 2), (1, 0), (LAYERS - 1, 3)]


@pytest.mark.parametrize("method", ["undifferentiated", "uniform", "scaling"])
@pytest.mark.parametrize("arch,gqa", CASES, ids=CASE_IDS)
def test_surgery_checkpoint_matches_hook_ablation(tmp_path, arch, gqa, method):
    model = tiny_model(arch, gqa)
    ids = random_ids(2, 9, seed=11)
    if method != "scaling" and arch in Q_NORM_ARCHS:
        with pytest.raises(UnsupportedModelError, match="normalises the query"):
            surgery(model, HEADS_SET, method, 1e-4)
        return
    with torch.no_grad(), ablated(model, HEADS_SET, method, 1e-4):
        expected = model(ids).logits
    surgery(model, HEADS_SET, method, 1e-4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(ids).logits
        stock = tiny_model(arch, gqa)(ids).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (got - stock).abs().max() > 1e-3  # the edit did something


def test_surgery_command_writes_a_loadable_checkpoint(tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    model = tiny_model("qwen2", True)  # q bias: rows of weight AND bias must be scaled
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    code = main(["surgery", "--model", str(source), "--device", "cpu", "--heads", "1-2,3-0",
                 "--method", "undifferentiated", "--epsilon", "1e-3", "--out", str(out)])
    assert code == 0
    note = json.loads((out / "safetyheads_surgery.json").read_text())
    assert note["heads"] == [[1, 2], [3, 0]] and note["method"] == "undifferentiated"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(1, 8, seed=12)
    with torch.no_grad(), ablated(model, [(1, 2), (3, 0)], "undifferentiated", 1e-3):
        expected = model(ids).logits
    with torch.no_grad():
        assert (reloaded(ids).logits - expected).abs().max() <= 1e-4
    # a second write into the same folder needs --force
    assert main(["surgery", "--model", str(source), "--device", "cpu", "--heads", "1-2", "--out", str(out)]) == 2


def test_surgery_command_refuses_q_norm_models(tmp_path, capsys):
    source = tmp_path / "src"
    tiny_model("qwen3").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    code = main(["surgery", "--model", str(source), "--device", "cpu", "--heads", "0-0", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "normalises the query" in capsys.readouterr().err


def test_parse_heads_and_layers():
    assert parse_heads("2-26,3-8", 30, 32) == [(2, 26), (3, 8)]
    assert parse_heads(" 0-0 , 29-31,0-0", 30, 32) == [(0, 0), (29, 31)]
    for bad in ("30-0", "0-32", "2_26", "2-", "", "a-b", "1-2-3"):
        with pytest.raises(UsageError) as err:
            parse_heads(bad, 30, 32)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="layers 0-29 and heads 0-31"):
        parse_heads("30-1", 30, 32)
    assert parse_layers("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_layers("all", 3) == [0, 1, 2]
    for bad in ("10", "3-1", "x", ""):
        with pytest.raises(UsageError):
            parse_layers(bad, 10)


def test_unsupported_model_says_why():
    """The guard refuses what the architecture harness did not accept, in one line naming the
    class of problem (Mamba: no softmax attention) and how many types are supported."""
    with pytest.raises(UnsupportedModelError) as err:
        check_supported(AutoConfig.for_model("mamba"))
    message = str(err.value)
    assert "mamba" in message and "no softmax attention" in message and "\n" not in message
    assert f"{len(SUPPORTED_ARCHITECTURES)} model types" in message
    check_supported(AutoConfig.for_model("gpt2"))  # GPT-2's layout (transformer.h, ln_f) is resolved
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="epsilon"):
        with ablated(model, [(0, 0)], "undifferentiated", 0.0):
            pass
    with pytest.raises(UsageError, match="method"):
        with ablated(model, [(0, 0)], "zero"):
            pass
    with pytest.raises(UnsupportedModelError, match="mean"):
        surgery(model, [(0, 0)], "mean")
