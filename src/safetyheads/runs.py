"""Run folders: every command writes its results into one, with a `manifest.json` that traces them back
to the exact config, weights, package versions, code commit and machine.

Results are written in chunks (`chunks/<key>.parquet`), each atomically (temporary file, then os.replace),
so a run killed at any moment (Ctrl-C, kill -9) leaves only whole chunks behind; `resume=True` skips them.
Final tables are assembled from the chunks alone and written deterministically, so a resumed run's files are
byte-identical to an uninterrupted run's.

The manifest's `compute_seconds` is the wall time that produced the results on disk: every session of the
run (the first and each `--resume`) adds its time up to the last chunk it saved (a chunk a kill cut short
costs time that is not counted), updated as each chunk lands and at `finish`. `started`/`finished`, in
contrast, span any pause between sessions.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UsageError
from .files import MANIFEST
from .manifest import Manifest
CHUNKS = "chunks"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
_PACKAGES = ("safetyheads", "torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers", "numpy",
             "pandas", "pyarrow", "scipy")


# The command line being run, set by the CLI's main() for the duration of one command (None under the
# Python API). The manifest records it as `argv` (with the working folder) for `safetyheads rerun`;
# sys.argv would be wrong there: under the API it holds a notebook's or a test runner's arguments.
_CLI_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("safetyheads_cli_argv", default=None)


@contextlib.contextmanager
def cli_invocation(argv: list[str]):
    """Mark the code run inside as the CLI command `safetyheads ARGV...` (see `_CLI_ARGV`)."""
    token = _CLI_ARGV.set(list(argv))
    try:
        yield
    finally:
        _CLI_ARGV.reset(token)


def argv_out(argv: list[str]) -> str | None:
    """The value of `--out` in a command line (None when it has none)."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg[len("--out="):]
    return None


def _command_line_of(path: Path) -> tuple[list[str] | None, list[str] | None]:
    """(argv, part_of) for a run opened at `path`: the CLI command line when this folder is its --out (so
    replaying it with another --out reproduces the run), else None and the command that made the run as
    one part of its work (e.g. `safetyheads demo`, whose runs live in sub-folders of its --out)."""
    argv = _CLI_ARGV.get()
    if not argv:
        return None, None
    out = argv_out(argv)
    if out is not None and Path(out).expanduser().resolve() == path.resolve():
        return list(argv), None
    return None, list(argv)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_default(obj: Any):
    """numpy scalars/arrays, paths, dataclasses and objects with describe()/to_dict() as JSON."""
    import dataclasses

    if hasattr(obj, "describe"):
        return obj.describe()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy / torch
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def _clean_floats(obj: Any) -> Any:
    """NaN/inf are not JSON: written as null so every JSON reader accepts the files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def to_json_text(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    plain = _clean_floats(json.loads(json.dumps(obj, default=_json_default)))
    return json.dumps(plain, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def normalise_config(config: Any) -> Any:
    """The config as JSON would hold it (tuples → lists, dataclasses → dicts): what resume compares."""
    return _clean_floats(json.loads(json.dumps(config, default=_json_default, sort_keys=True)))


def _atomic(path: Path, write) -> None:
    """Call `write(tmp_path)`, then move the file into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict | None:
    """Commit (and whether the tree has uncommitted changes) of the package's source tree, else of the cwd."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            root = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True,
                                  text=True, timeout=10)
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()),
                    "root": root.stdout.strip() or None}
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def machine_info() -> dict:
    info: dict = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "gpus": []}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------- run folder


class RunDir:
    """One run's folder: manifest.json, `chunks/` and the final tables. Create with `RunDir.open`."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.record = manifest
        # this session's clock starts at opening; earlier sessions' time is already in the manifest
        self._opened = time.monotonic()
        self._before = float(manifest.compute_seconds or 0.0)

    @property
    def manifest(self) -> dict:
        """The manifest as manifest.json holds it (a copy: change it through the methods below)."""
        return self.record.to_dict()

    def _count_time(self) -> None:
        self.record.compute_seconds = round(self._before + time.monotonic() - self._opened, 3)

    # -- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: Any,
        *,
        resume: bool = False,
        force: bool = False,
        command: str | None = None,
        model: Any = None,
        datasets: Any = None,
    ) -> "RunDir":
        """Create the run folder, or continue the one there.

        An existing run with the same config is continued with `resume`; anything else in the folder is
        refused unless `force` (which deletes the old run). A non-empty folder that is not a run folder is
        never deleted. `model` (a LoadedModel) and `datasets` (PromptSets) go into the manifest."""
        if resume and force:
            raise UsageError("--resume and --force contradict each other; pass one")
        path = Path(path).expanduser()
        config = normalise_config(config)
        if path.exists() and not path.is_dir():
            raise UsageError(f"run folder {path} is a file")
        manifest_path = path / MANIFEST
        if path.is_dir() and any(path.iterdir()):
            if not manifest_path.is_file():
                raise UsageError(f"{path} is not empty and is not a run folder (no {MANIFEST}); choose another --out")
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                old = None
            same = isinstance(old, dict) and old.get("config") == config and old.get("command") == command
            if force:
                shutil.rmtree(path)
            elif resume and same:
                run = cls(path, Manifest.from_dict(old))
                run.record.resumed = [*(run.record.resumed or []), _now()]
                run.record.finished = None
                run._write_manifest()
                return run
            elif resume:
                raise UsageError(
                    f"{path} holds a run with a different config; --resume needs the same options "
                    "(use another --out, or --force to replace it)"
                )
            else:
                what = "the same run" if same else "a different run"
                raise UsageError(f"{path} already holds {what}; pass --resume to continue it or --force to replace it")
        path.mkdir(parents=True, exist_ok=True)
        argv, part_of = _command_line_of(path)
        manifest = Manifest(
            command=command,
            argv=argv,
            part_of_command=part_of or None,
            cwd=os.getcwd(),
            config=config,
            model=model.describe() if hasattr(model, "describe") else model,
            datasets=_describe_all(datasets),
            versions=package_versions(),
            git=git_info(),
            machine=machine_info(),
            started=_now(),
        )
        run = cls(path, manifest)
        run._write_manifest()
        return run

    # -- manifest ----------------------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        write_text_atomic(self.path / MANIFEST, to_json_text(self.record.to_dict()))

    def update_manifest(self, **fields: Any) -> None:
        """Add provenance known only later (e.g. `model=loaded` after loading). `config` cannot change."""
        if "config" in fields:
            raise ValueError("a run's config is fixed when it is opened")
        for k, v in fields.items():
            if k == "model" and hasattr(v, "describe"):
                v = v.describe()
            elif k == "datasets":
                v = _describe_all(v)
            self.record.set(k, v)
        self._write_manifest()

    def finish(self, extra: dict | None = None, **more: Any) -> None:
        """Record the end time and a summary (e.g. the top heads, output files) in the manifest."""
        summary = dict(self.record.summary or {})
        summary.update(extra or {})
        summary.update(more)
        self.record.summary = summary
        self.record.finished = _now()
        self._count_time()
        self._write_manifest()

    # -- chunks ------------------------------------------------------------------------------------------------

    def _chunk_path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"bad chunk key {key!r}: letters, digits and _ . = + - only")
        return self.path / CHUNKS / f"{key}.parquet"

    def chunk_done(self, key: str) -> bool:
        return self._chunk_path(key).is_file()

    def chunk_keys(self, prefix: str = "") -> list[str]:
        folder = self.path / CHUNKS
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.parquet") if p.stem.startswith(prefix))

    def write_chunk(self, key: str, df) -> None:
        """Store one piece of results atomically (parquet keeps dtypes and floats exactly)."""
        path = self._chunk_path(key)
        frame = df.reset_index(drop=True)
        _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
        self._count_time()
        self._write_manifest()

    def read_chunk(self, key: str):
        import pandas as pd

        return pd.read_parquet(self._chunk_path(key))

    def read_chunks(self, prefix: str = ""):
        """All chunks whose key starts with `prefix`, concatenated in key order (empty frame if none)."""
        import pandas as pd

        frames = [self.read_chunk(k) for k in self.chunk_keys(prefix)]
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    # -- final files -------------------------------------------------------------------------------------------

    def write_table(self, name: str, df, formats: tuple[str, ...] = ("csv", "parquet")) -> list[Path]:
        """`name.csv` and `name.parquet`, each written atomically, without the index."""
        frame = df.reset_index(drop=True)
        written = []
        for fmt in formats:
            path = self.path / f"{name}.{fmt}"
            if fmt == "csv":
                _atomic(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))
            elif fmt == "parquet":
                _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
            else:
                raise ValueError(f"unknown table format {fmt!r}")
            written.append(path)
        return written

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / (name if name.endswith(".json") else f"{name}.json")
        write_text_atomic(path, to_json_text(obj))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        write_text_atomic(path, text)
        return path

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _describe_all(datasets: Any) -> Any:
    if datasets is None:
        return None
    if isinstance(datasets, dict):
        return {k: (v.describe() if hasattr(v, "describe") else v) for k, v in datasets.items()}
    if hasattr(datasets, "describe"):
        return [datasets.describe()]
    return [d.describe() if hasattr(d, "describe") else d for d in datasets]
