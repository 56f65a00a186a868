"""Prompt datasets: a registry of the paper's harmful sets plus a built-in harmless set, and user files.

A registered dataset is looked up, in order, in the `data_dir` argument, in `$SAFETYHEADS_DATA_DIR` (as
`<dir>/<name>/<file>` or `<dir>/<file>`, upstream file names), in the cache, and finally downloaded from its
upstream URL into the cache. Every registered file is checked against its sha256, wherever it comes from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import DownloadError, UsageError
from .models import cache_dir, offline

USER_SUFFIXES = (".csv", ".jsonl", ".txt")
# Tried, in order, when a user's .csv/.jsonl has several columns and no --column was given.
_PROMPT_COLUMNS = ("prompt", "goal", "instruction", "question", "query", "request", "text")


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry. `url` is None for sets the project ships itself (`resource`)."""

    name: str
    description: str
    file: str  # upstream file name (also the name looked up in data dirs and the cache)
    sha256: str | None
    rows: int
    column: str | None = None  # prompt column of a .csv/.jsonl file; None for .txt
    category_column: str | None = None
    url: str | None = None
    resource: str | None = None  # file under safetyheads/resources
    harmful: bool = True


DATASETS: dict[str, DatasetSpec] = {
    d.name: d
    for d in (
        DatasetSpec(
            name="jailbreakbench",
            description="JailbreakBench JBB-Behaviors, harmful split (10 categories x 10)",
            file="harmful-behaviors.csv",
            sha256="4a8ec6832056b631eb092dccc60d37a61c3d441268268888b3d006288afeffa1",
            rows=100,
            column="Goal",
            category_column="Category",
            url="https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors/resolve/main/data/harmful-behaviors.csv",
        ),
        DatasetSpec(
            name="maliciousinstruct",
            description="MaliciousInstruct (Huang et al. 2023), one question per line",
            file="MaliciousInstruct.txt",
            sha256="a64d69dd1004aac4a23aaff3748fb8f17161893f74db36f45b8bc849eb1bcce5",
            rows=100,
            url="https://raw.githubusercontent.com/Princeton-SysML/Jailbreak_LLM/main/data/MaliciousInstruct.txt",
        ),
        DatasetSpec(
            name="advbench",
            description="AdvBench harmful behaviours (Zou et al. 2023)",
            file="harmful_behaviors.csv",
            sha256="6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
            rows=520,
            column="goal",
            url="https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv",
        ),
        DatasetSpec(
            name="harmless",
            description="built-in everyday harmless requests (utility checks)",
            file="harmless.txt",
            sha256=None,  # shipped with the package: versioned with the code
            rows=100,
            resource="harmless.txt",
            harmful=False,
        ),
    )
}


@dataclass
class PromptSet:
    """Prompts with their original row indices (`ids`) and categories (None where the set has none)."""

    name: str
    prompts: list[str]
    ids: list[int]
    categories: list[str | None]
    source: str
    sha256: str | None
    selection: dict = field(default_factory=dict)  # limit / sample / seed / column actually applied

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict:
        """For manifests: what was read, from where, with which hash and selection."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "n": len(self), **self.selection}


# ----------------------------------------------------------------------------------------------- locate / fetch


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    env = os.environ.get("SAFETYHEADS_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    return dirs


def _cached_path(spec: DatasetSpec) -> Path:
    return cache_dir() / "datasets" / spec.name / spec.file


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where a registered dataset's file is found without downloading (data dirs, then cache), else None."""
    spec = _spec(name)
    if spec.resource:
        return Path(str(resources.files("safetyheads") / "resources" / spec.resource))
    for d in _data_dirs(data_dir):
        for candidate in (d / spec.name / spec.file, d / spec.file):
            if candidate.is_file():
                return candidate
    cached = _cached_path(spec)
    return cached if cached.is_file() else None


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(
            f"unknown dataset {name!r}; registered datasets: {', '.join(DATASETS)}; "
            f"or give a file ({', '.join(USER_SUFFIXES)})"
        ) from None


def _how_to_provide(spec: DatasetSpec) -> str:
    return (
        f"place {spec.file} (sha256 {spec.sha256}) in a folder and pass it with --data-dir or SAFETYHEADS_DATA_DIR "
        f"(as DIR/{spec.name}/{spec.file} or DIR/{spec.file})"
    )


def fetch_dataset(name: str, data_dir: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """The verified bytes of a registered dataset and where they came from (path or URL)."""
    spec = _spec(name)
    path = locate(name, data_dir)
    if spec.resource:
        return path.read_bytes(), f"builtin:{spec.resource}"
    if path is not None:
        data = path.read_bytes()
        digest = _sha256_bytes(data)
        if digest == spec.sha256:
            return data, str(path)
        if path == _cached_path(spec):  # a corrupted cache copy: drop it and download again
            path.unlink()
        else:
            raise DownloadError(
                f"{path} has sha256 {digest}, expected {spec.sha256} for {name!r}; it is not the upstream file "
                "(pass the file path as --dataset to use it anyway)"
            )
    return _download(spec), spec.url


def _download(spec: DatasetSpec) -> bytes:
    if offline():
        raise DownloadError(f"dataset {spec.name!r} is not available locally and SAFETYHEADS_OFFLINE is set; {_how_to_provide(spec)}")
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {reason}"
        raise DownloadError(f"could not download {spec.name!r} from {spec.url} ({reason}); {_how_to_provide(spec)}") from None
    digest = _sha256_bytes(data)
    if digest != spec.sha256:
        # Never stored, never used.
        raise DownloadError(f"downloaded {spec.file} has sha256 {digest}, expected {spec.sha256}; the file was discarded")
    target = _cached_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return data


# ----------------------------------------------------------------------------------------------- parse


def _pick_column(columns: list[str], column: str | None, what: str) -> str:
    if column is not None:
        if column not in columns:
            raise UsageError(f"{what} has no column {column!r}; available columns: {', '.join(map(str, columns))}")
        return column
    if len(columns) == 1:
        return columns[0]
    lower = {str(c).lower(): c for c in columns}
    for name in _PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    raise UsageError(f"{what} has several columns; choose the prompt column with --column (one of: {', '.join(map(str, columns))})")


def _parse(data: bytes, suffix: str, what: str, column: str | None, category_column: str | None):
    """(prompts, ids, categories) from a file's bytes; ids are original row/line indices."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None
    if suffix == ".txt":
        if column is not None:
            raise UsageError(f"--column applies to .csv and .jsonl files, not to {what} (one prompt per line)")
        rows = [(i, line.strip()) for i, line in enumerate(text.splitlines())]
        rows = [(i, p) for i, p in rows if p]
        return [p for _, p in rows], [i for i, _ in rows], [None] * len(rows)
    if suffix == ".csv":
        import pandas as pd

        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise UsageError(f"cannot read {what} as CSV: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None
        records = df.to_dict("records")
        columns = list(df.columns)
    elif suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{what} line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{what} line {n} is not a JSON object")
            records.append(obj)
        columns = list(dict.fromkeys(k for r in records for k in r))
    else:
        raise UsageError(f"unsupported dataset file type {suffix!r}; use {', '.join(USER_SUFFIXES)}")
    if not records:
        raise UsageError(f"{what} has no prompts")
    col = _pick_column(columns, column, what)
    prompts, ids, cats = [], [], []
    for i, r in enumerate(records):
        value = r.get(col)
        if value is None or not str(value).strip():
            continue
        prompts.append(str(value).strip())
        ids.append(i)
        cat = r.get(category_column) if category_column else None
        cats.append(None if cat is None or cat == "" else str(cat))
    return prompts, ids, cats


# ----------------------------------------------------------------------------------------------- public


def load_prompts(
    dataset: str,
    *,
    column: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> PromptSet:
    """Load a registered dataset by name, or a user file (.csv / .jsonl with `column`, .txt one per line).

    `limit` keeps the first N prompts; `sample` then draws N of them at random with `seed` (same seed, same
    subset, kept in file order). An empty result is a usage error."""
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of prompts, got {limit}")
    if sample is not None and sample <= 0:
        raise UsageError(f"--sample must be a positive number of prompts, got {sample}")
    if not dataset:
        raise UsageError("no dataset given; pass a registered name or a file path")

    path = Path(dataset).expanduser()
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        data, source = fetch_dataset(dataset, data_dir)
        sha = spec.sha256 or _sha256_bytes(data)
        suffix = Path(spec.file).suffix
        prompts, ids, cats = _parse(data, suffix, f"dataset {dataset!r}", column if column is not None else spec.column,
                                    spec.category_column)
        name = dataset
    elif path.suffix.lower() in USER_SUFFIXES or path.exists():
        if not path.is_file():
            raise UsageError(f"dataset file {dataset!r} does not exist")
        if path.suffix.lower() not in USER_SUFFIXES:
            raise UsageError(f"unsupported dataset file type {path.suffix!r}; use {', '.join(USER_SUFFIXES)}")
        data = path.read_bytes()
        sha, source, name = _sha256_bytes(data), str(path.resolve()), path.stem
        prompts, ids, cats = _parse(data, path.suffix.lower(), f"dataset file {dataset!r}", column, None)
    else:
        _spec(dataset)  # raises the "unknown dataset" usage error
        raise AssertionError("unreachable")

    if not prompts:
        raise UsageError(f"dataset {dataset!r} has no prompts")
    selection: dict = {}
    if column is not None:
        selection["column"] = column
    if limit is not None:
        prompts, ids, cats = prompts[:limit], ids[:limit], cats[:limit]
        selection["limit"] = limit
    if sample is not None:
        if sample > len(prompts):
            raise UsageError(f"--sample {sample} is more than the {len(prompts)} prompts available")
        import numpy as np

        keep = sorted(np.random.default_rng(seed).choice(len(prompts), size=sample, replace=False).tolist())
        prompts, ids, cats = [prompts[i] for i in keep], [ids[i] for i in keep], [cats[i] for i in keep]
        selection.update(sample=sample, seed=seed)
    return PromptSet(name=name, prompts=prompts, ids=ids, categories=cats, source=source, sha256=sha, selection=selection)
