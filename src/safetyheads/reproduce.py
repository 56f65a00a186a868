"""Reproduce a run from its manifest, and compare two run folders.

`rerun` replays the command line recorded in a run's manifest (`argv`, in the folder it was run from)
into a new folder, then `compare_runs` checks every result file of the original against the new one:
tables cell by cell (floats within rtol/atol, everything else exactly, rows matched on their key
columns so a tie broken differently is not a false alarm on every later row), JSONL records the same
way. It also lists what differs in the provenance (weights and dataset hashes, package versions, code
commit, machine), which is usually why results differ when they do.

`compare_runs` alone answers "is this GPU run the same as that CPU run?" for any two folders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import UsageError
from . import manifest as manifests
from .manifest import Manifest
from .runs import MANIFEST

# Columns that identify a row (never compared with a tolerance; rows are matched on them).
KEY_COLUMNS = ("dataset", "category", "condition", "method", "heads", "judge", "metric", "prompt_id", "id", "step",
               "layer", "head")
RESULT_SUFFIXES = (".csv", ".jsonl")
STATUSES = ("identical", "close", "DIFFERENT", "missing")


@dataclass
class Comparison:
    """Result files compared (file, status, rows, max_abs, max_rel, detail) and provenance (field, a, b, same)."""

    a: Path
    b: Path
    files: pd.DataFrame
    provenance: pd.DataFrame

    @property
    def ok(self) -> bool:
        """Every result file of `a` is in `b`, identical or within tolerance."""
        return bool(len(self.files)) and bool(self.files["status"].isin(["identical", "close"]).all())


def _read_manifest(run: Path) -> Manifest:
    """The manifest of a run folder; a folder without one is an error here (manifest.read, which
    parses it, tolerates it for display)."""
    if not (run / MANIFEST).is_file():
        raise UsageError(f"{run} is not a run folder (no {MANIFEST})")
    return manifests.read(run)


def _result_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.is_file() and p.suffix in RESULT_SUFFIXES)


def _aligned(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables in the same row order: sorted on their key columns when those identify rows."""
    keys = [c for c in KEY_COLUMNS if c in a.columns]
    if keys and not a.duplicated(keys).any() and not b.duplicated(keys).any():
        a = a.sort_values(keys, kind="stable", key=lambda s: s.astype(str) if s.dtype == object else s)
        b = b.sort_values(keys, kind="stable", key=lambda s: s.astype(str) if s.dtype == object else s)
    return a.reset_index(drop=True), b.reset_index(drop=True)


def _compare_tables(a: pd.DataFrame, b: pd.DataFrame, rtol: float, atol: float) -> dict:
    """Status, max abs/rel float difference and a one-line detail for two tables."""
    if list(a.columns) != list(b.columns):
        return {"status": "DIFFERENT", "detail": f"columns differ: {list(a.columns)} vs {list(b.columns)}"}
    if len(a) != len(b):
        return {"status": "DIFFERENT", "detail": f"{len(a)} rows vs {len(b)}"}
    a, b = _aligned(a, b)
    max_abs = max_rel = 0.0
    exact, problems = True, []
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_float_dtype(x) and pd.api.types.is_numeric_dtype(y) and col not in KEY_COLUMNS:
            xv, yv = x.to_numpy(np.float64), y.to_numpy(np.float64)
            same_nan = np.isnan(xv) == np.isnan(yv)
            both = ~np.isnan(xv) & ~np.isnan(yv)
            diff = np.abs(xv[both] - yv[both])
            if len(diff):
                max_abs = max(max_abs, float(diff.max()))
                scale = np.maximum(np.abs(xv[both]), np.abs(yv[both]))
                rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
                max_rel = max(max_rel, float(rel.max()))
            exact &= bool(same_nan.all()) and not bool(diff.any())
            bad = int((~same_nan).sum()) + int((~np.isclose(xv[both], yv[both], rtol=rtol, atol=atol)).sum())
            if bad:
                problems.append(f"{col}: {bad} of {len(xv)} values outside tolerance")
        else:
            unequal = int((x.astype(str).to_numpy() != y.astype(str).to_numpy()).sum())
            if unequal:
                exact = False
                problems.append(f"{col}: {unequal} of {len(x)} values differ")
    status = "DIFFERENT" if problems else ("identical" if exact else "close")
    return {"status": status, "max_abs": max_abs, "max_rel": max_rel, "detail": "; ".join(problems)}


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # nested values (lists, dicts) are compared as their JSON text
    return pd.DataFrame([{k: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
                          for k, v in r.items()} for r in rows])


def _provenance(ma: Manifest, mb: Manifest) -> pd.DataFrame:
    def get(m: Any, *path: str) -> Any:
        for p in path:
            m = m.get(p) if isinstance(m, dict) else None
        return m

    a, b = ma.to_dict(), mb.to_dict()

    fields = {
        "model weights sha256": ("model", "weights_sha256"),
        "model revision": ("model", "revision"),
        "git commit": ("git", "commit"),
        "git tree dirty": ("git", "dirty"),
        "machine": ("machine", "platform"),
        "gpus": ("machine", "gpus"),
    }
    pairs = [(name, get(a, *path), get(b, *path)) for name, path in fields.items()]
    for name in sorted(set((a.get("versions") or {})) | set((b.get("versions") or {}))):
        pairs.append((f"version: {name}", get(a, "versions", name), get(b, "versions", name)))
    da, db = a.get("datasets") or [], b.get("datasets") or []
    for i in range(max(len(da), len(db))):
        pick = lambda d: d[i].get("sha256") if i < len(d) and isinstance(d[i], dict) else None  # noqa: E731
        pairs.append((f"dataset {i + 1} sha256", pick(da), pick(db)))
    rows = [{"field": name, "a": va, "b": vb, "same": va == vb} for name, va, vb in pairs]
    same_config = a.get("config") == b.get("config")   # too long to show: say whether it is the same
    rows.append({"field": "config", "a": "(same)" if same_config else "(differs)", "b": "", "same": same_config})
    return pd.DataFrame(rows, columns=["field", "a", "b", "same"])


def compare_runs(a: str | Path, b: str | Path, *, rtol: float = 1e-4, atol: float = 1e-6) -> Comparison:
    """Compare every result file (*.csv, *.jsonl) of run folder `a` with the same file in `b`.

    Floats agree when |x - y| <= atol + rtol * |y| (numpy's isclose); other columns must be equal.
    The default rtol, 1e-4, allows float32 rounding: batching different ablations together changes
    the order of float32 sums (scores then differ around the 6th digit)."""
    if rtol < 0 or atol < 0:
        raise UsageError("--rtol and --atol must be at least 0")
    a, b = Path(a), Path(b)
    ma, mb = _read_manifest(a), _read_manifest(b)
    files = _result_files(a)
    if not files:
        raise UsageError(f"{a} holds no result files (*.csv, *.jsonl): is the run finished?")
    rows = []
    for name in files:
        row: dict = {"file": name, "status": "missing", "rows": None, "max_abs": np.nan, "max_rel": np.nan,
                     "detail": f"not in {b}"}
        if (b / name).is_file():
            read = _read_jsonl if name.endswith(".jsonl") else pd.read_csv
            ta, tb = read(a / name), read(b / name)
            row.update({"rows": len(ta), "detail": "", **_compare_tables(ta, tb, rtol, atol)})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["file", "status", "rows", "max_abs", "max_rel", "detail"])
    table["rows"] = table["rows"].astype("Int64")                     # None for a missing file
    return Comparison(a, b, table, _provenance(ma, mb))


def _replace_out(argv: Sequence[str], out: str) -> list[str]:
    """The recorded command line with `--out` pointing at `out`, without --resume/--force."""
    args, i, found = [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg in ("--resume", "--force"):
            i += 1
            continue
        if arg == "--out":
            args += ["--out", out]
            i += 2
            found = True
            continue
        if arg.startswith("--out="):
            args.append(f"--out={out}")
            found = True
        else:
            args.append(arg)
        i += 1
    if not found:
        raise UsageError("the recorded command has no --out: it cannot be rerun into another folder")
    return args


@contextlib.contextmanager
def _working_dir(path: str | None):
    """Run in the folder the original ran in (relative paths in its command line), when it still exists."""
    old = os.getcwd()
    if path and Path(path).is_dir():
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def rerun(run: str | Path, out: str | Path, *, rtol: float = 1e-4, atol: float = 1e-6, force: bool = False,
          quiet: bool = False) -> Comparison:
    """Replay the command recorded in `run`'s manifest into `out` (a new folder), then compare.

    Only runs started from the command line record their command (`argv`); a run written through
    the Python API records its config, and is reproduced by calling the same function with it."""
    from .cli.main import main

    run, out = Path(run).resolve(), Path(out).resolve()
    manifest = _read_manifest(run)
    argv = manifest.argv
    if not argv and manifest.part_of_command:
        raise UsageError(f"{run} was written as one part of `safetyheads {' '.join(manifest.part_of_command)}`: "
                         "rerun that command")
    if not argv:
        raise UsageError(f"{run} was written through the Python API (no command line in its manifest): call the "
                         "same function with manifest['config'] to reproduce it")
    if not manifest.finished:
        raise UsageError(f"{run} did not finish: resume it first (its command with --resume)")
    if out == run:
        raise UsageError("--out must be a new folder, not the run being reproduced")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty; pass --force to replace it")
    command = _replace_out(argv, str(out))
    if force and out.exists():
        command.append("--force")
    if quiet and "--quiet" not in command:
        command.append("--quiet")
    with _working_dir(manifest.cwd):
        rc = main(command)
    if rc != 0:
        raise UsageError(f"the rerun failed (exit {rc}): {' '.join(command)}")
    return compare_runs(run, out, rtol=rtol, atol=atol)


def format_comparison(result: Comparison) -> str:
    """Human-readable text: the files table, the provenance that differs, and a verdict."""
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        files = result.files.astype(object)
        for col in ("max_abs", "max_rel"):
            files[col] = [("" if isinstance(v, float) and math.isnan(v) else f"{v:.3g}") for v in files[col]]
        files["rows"] = ["" if pd.isna(v) else str(v) for v in files["rows"]]
        lines = [f"{result.a}  vs  {result.b}", files.fillna("").to_string(index=False)]
        differs = result.provenance[~result.provenance["same"]]
        if len(differs):
            lines += ["", "provenance that differs:", differs.drop(columns=["same"]).to_string(index=False)]
    counts = result.files["status"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    lines += ["", ("reproduced: " if result.ok else "NOT reproduced: ") + summary]
    return "\n".join(lines)
