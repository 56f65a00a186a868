"""The manifest schema: what a run folder's manifest.json holds, in one dataclass.

`runs.RunDir` writes it (`Manifest.to_dict`); `results`, `report`, `reproduce` and `evaluate` read it
with `read` (once per run folder) and the typed readers below, so no reader guesses alternative key
names: a field lives where this file says. `config` is the command's own config (what `--resume` compares);
where the readers look in it, per command:
- ships, gships, sahara, screen, refusal: model, dataset, data {n_prompts, ids, options, sha256},
  method, epsilon, format, n_layers, n_heads, weights_sha256 (+ target for screen);
- evaluate: model, datasets, ablations [{method, heads, epsilon, ranking, k, draw, source}], format,
  decoding and judge settings; the minimal one-ablation form also has method and heads.
Command-specific provenance recorded while a run goes (batch sizes, the shared-prefix length, ...)
lives at the top level of the JSON and in `extra` here, so files keep their flat layout.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .errors import UsageError

# Written by every `RunDir.open`, even when None (a reader can tell "not recorded" from "absent").
_ALWAYS = ("command", "argv", "cwd", "config", "model", "datasets", "versions", "git", "machine", "started")
# Written once known: part_of_command (a torchrun/accelerate launcher's argv), resumed (one time per
# --resume), finished, compute_seconds (summed over resumed sessions), summary (top heads, files).
_WHEN_SET = ("part_of_command", "resumed", "finished", "compute_seconds", "summary")


@dataclass
class Manifest:
    command: str | None = None                    # "ships", "gships", "evaluate", ...
    config: dict = field(default_factory=dict)    # the command's config, JSON-normalised (keys: module docstring)
    argv: list[str] | None = None                 # the CLI command line (safetyheads' own arguments)
    cwd: str | None = None                        # where it was run (reproduce replays from there)
    model: dict | str | None = None               # LoadedModel.describe(): spec, source, weights_sha256, sizes
    datasets: list | None = None                  # [{name, n, sha256, source, ...}] per prompt set
    versions: dict | None = None                  # package versions
    git: dict | None = None                       # {commit, dirty, root} of the checkout, if any
    machine: dict | None = None                   # hostname, platform, cpu_count, gpus
    started: str | None = None                    # ISO time, UTC
    part_of_command: list[str] | None = None
    resumed: list[str] | None = None
    finished: str | None = None
    compute_seconds: float | None = None
    summary: dict | None = None
    extra: dict = field(default_factory=dict)     # other top-level provenance (flat in the JSON)

    # -- JSON -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out: dict[str, Any] = {name: getattr(self, name) for name in _ALWAYS}
        out.update({name: getattr(self, name) for name in _WHEN_SET if getattr(self, name) is not None})
        clash = set(self.extra) & {f.name for f in dataclasses.fields(self)}
        if clash:
            raise ValueError(f"manifest extra keys shadow schema fields: {sorted(clash)}")
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "Manifest":
        """Any manifest.json (unknown top-level keys go to `extra`; a missing or non-dict one is empty)."""
        data = data if isinstance(data, dict) else {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if not isinstance(known.get("config"), dict):
            known["config"] = {}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def set(self, name: str, value: Any) -> None:
        """Record a field (a schema field, or extra provenance under its own top-level key)."""
        if name == "extra" or name == "config":
            raise ValueError(f"{name!r} cannot be set this way")
        if name in {f.name for f in dataclasses.fields(self)}:
            setattr(self, name, value)
        else:
            self.extra[name] = value

    # -- typed readers (what results/report/evaluate show) ------------------------------------------------------

    @property
    def model_name(self) -> str | None:
        """The model spec the user gave (config.model), else the loaded model's spec."""
        name = self.config.get("model")
        if isinstance(name, str) and name:
            return name
        if isinstance(self.model, dict) and isinstance(self.model.get("spec"), str):
            return self.model["spec"]
        return self.model if isinstance(self.model, str) and self.model else None

    @property
    def dataset(self) -> str | None:
        """The one prompt set of a scores run (config.dataset); None for evaluate (see `dataset_names`)."""
        name = self.config.get("dataset")
        return name if isinstance(name, str) and name else None

    @property
    def dataset_names(self) -> list[str]:
        """Every prompt set of the run: config.dataset, else evaluate's config.datasets, else the manifest's."""
        if self.dataset:
            return [self.dataset]
        for value in (self.config.get("datasets"), self.datasets):
            if isinstance(value, list) and value:
                return [str(v.get("name")) if isinstance(v, dict) else str(v) for v in value]
        return []

    @property
    def prompt_counts(self) -> list[int]:
        """Prompts per set (the manifest's datasets), else the scores config's data.n_prompts."""
        if isinstance(self.datasets, list) and self.datasets and all(isinstance(d, dict) for d in self.datasets):
            return [d.get("n") for d in self.datasets]
        data = self.config.get("data")
        if isinstance(data, dict) and isinstance(data.get("n_prompts"), int):
            return [data["n_prompts"]]
        return []

    def _config_str(self, key: str) -> str | None:
        value = self.config.get(key)
        return value if isinstance(value, str) and value else None

    def _config_int(self, key: str) -> int | None:
        value = self.config.get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def method(self) -> str | None:
        """A scores run's method (config.method); evaluate's minimal one-ablation form has it too."""
        return self._config_str("method")

    @property
    def heads(self) -> Any:
        """The ablated heads of a one-ablation evaluate run (config.heads), as written."""
        return self.config.get("heads")

    @property
    def ablations(self) -> list[dict]:
        """evaluate's conditions: [{method, heads, epsilon, ranking, k, draw, source}]."""
        value = self.config.get("ablations")
        return [a for a in value if isinstance(a, dict)] if isinstance(value, list) else []

    @property
    def target(self) -> str | None:
        """What a screen estimated (config.target: gships or ships)."""
        return self._config_str("target")

    @property
    def epsilon(self) -> float | None:
        value = self.config.get("epsilon")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def format(self) -> str | None:
        return self._config_str("format")

    @property
    def n_layers(self) -> int | None:
        return self._config_int("n_layers")

    @property
    def n_heads(self) -> int | None:
        return self._config_int("n_heads")

    @property
    def weights_sha256(self) -> str | None:
        sha = self.config.get("weights_sha256")
        if not (isinstance(sha, str) and sha) and isinstance(self.model, dict):
            sha = self.model.get("weights_sha256")
        return sha if isinstance(sha, str) and sha else None

    @property
    def seconds(self) -> float | None:
        """Compute time: compute_seconds (summed over resumed sessions) when recorded, else the
        command's own timer (summary.seconds), else the calendar span started -> finished."""
        if isinstance(self.compute_seconds, (int, float)):
            return float(self.compute_seconds)
        timer = (self.summary or {}).get("seconds")
        if isinstance(timer, (int, float)):
            return float(timer)
        try:
            return (dt.datetime.fromisoformat(self.finished) - dt.datetime.fromisoformat(self.started)).total_seconds()
        except (TypeError, ValueError):
            return None



def read(run: str | Path) -> Manifest:
    """The manifest of run folder `run`; an empty one when the folder has none (readers show such a
    folder's files with model and dataset unknown). A manifest that is not valid JSON is an error."""
    path = Path(run) / files.MANIFEST
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg})") from exc
    return Manifest.from_dict(data)
