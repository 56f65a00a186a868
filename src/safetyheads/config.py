"""Configuration dataclasses shared by the API and the CLI; they round-trip to dicts, JSON and YAML so a
run's manifest holds the full config and the config can be rebuilt from it."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import UsageError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"  # same as models.DEFAULT_MODEL (not imported: keeps this module light)
DEFAULT_DATASET = "jailbreakbench"
FORMATS = ("chat", "paper", "reference", "raw")  # prompts.py implements them (and imports this list)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# Probes of the Ships screen (screen.fisher_probes; here so the CLI's --help needs no torch): the top 8
# Fisher eigen-directions, one backward pass each, and no random probes. benchmarks/screen_vs_exact.md:
# 8+0 puts 9-10 of the exact top 10 in the screen's top 40 (Spearman 0.96-0.99); 1 eigen + 2 Gaussian
# probes of the rest (--probes 1 --random-probes 2) is 1.5-2x faster and as good with 20 prompts, but noisier
# with 8 (Qwen2.5-0.5B: Spearman 0.93-0.96, 8-9 of 10 in the top 40): the random part averages over prompts.
SCREEN_PROBES = 8
SCREEN_RANDOM_PROBES = 0
# Extra backward passes of the Generalized Ships screen for the second term of the subspace rotation
# (screen.SubspaceProbes): the largest 2 singular directions beyond the rank exactly, 2 random-sign probes
# for the rest. Up to 4 + rank prompts this is the complete first-order formula.
SUBSPACE_PROBES = 4
# A sweep chunk gathers whole consecutive layers until it holds at least this many rows (ablation
# configurations x prompts): a sweep call over few rows runs small, slow matrix products (one SmolLM2
# layer with 5 prompts is 45 rows), while a chunk is also what a kill can lose (pipeline.plan_chunks).
CHUNK_ROWS = 1024
# The refusal score (refusal.py): tokens of the clean refusal scored, and tokens the judge reads.
REFUSAL_TOKENS = 8
REFUSAL_JUDGE_TOKENS = 64

T = TypeVar("T")


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Which model to load and how (see `models.load_model`)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    device_map: str | None = None
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise UsageError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
        _choice("dtype", self.dtype, DTYPES)
        _choice("attention implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)

    def load(self, check_supported: bool = True):
        """The `LoadedModel` this config describes."""
        from .models import load_model

        return load_model(self.model, revision=self.revision, device=self.device, dtype=self.dtype,
                          device_map=self.device_map, check_supported=check_supported,
                          attn_implementation=self.attn_implementation)


@dataclass
class DataConfig:
    """Which prompts to read (see `data.load_prompts`)."""

    dataset: str = DEFAULT_DATASET
    column: str | None = None
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit must be a positive number of prompts, got {self.limit}")
        if self.sample is not None and self.sample <= 0:
            raise UsageError(f"--sample must be a positive number of prompts, got {self.sample}")

    def load(self):
        """The `PromptSet` this config describes."""
        from .data import load_prompts

        return load_prompts(self.dataset, column=self.column, limit=self.limit, sample=self.sample,
                            seed=self.seed, data_dir=self.data_dir)


@dataclass
class PromptConfig:
    """How a request becomes model input (see `prompts.format_prompts`)."""

    format: str = "chat"
    system_prompt: str | None = None
    # extra chat-template variables (e.g. {"enable_thinking": true}); None: the template's defaults,
    # except that templates with a thinking switch get enable_thinking=False (prompts.template_kwargs)
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _choice("prompt format", self.format, FORMATS)
        if self.chat_template_kwargs is not None:
            from .prompts import check_template_kwargs  # light: no torch

            self.chat_template_kwargs = check_template_kwargs(self.chat_template_kwargs)
            if self.chat_template_kwargs and self.format != "chat":
                raise UsageError(f"--chat-template-kwargs only applies to the chat format, not {self.format!r}")

    def apply(self, tokenizer, prompts: list[str]) -> list[str]:
        from .prompts import format_prompts

        return format_prompts(tokenizer, prompts, self.format, self.system_prompt, self.chat_template_kwargs)


@dataclass
class RunConfig:
    """Where results go and what to do when the folder already holds a run."""

    out: str | None = None
    resume: bool = False
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.force:
            raise UsageError("--resume and --force contradict each other; pass one")


# ----------------------------------------------------------------------------------------------- round trips


def to_dict(cfg: Any) -> dict:
    """A (possibly nested) config dataclass as a plain dict of JSON/YAML-safe values."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"not a config dataclass: {cfg!r}")
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild `cls` from `to_dict` output; unknown keys are a usage error (typos must not pass silently)."""
    if not isinstance(data, dict):
        raise UsageError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        values[name] = value
    return cls(**values)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(cls: type[T], text: str) -> T:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"invalid YAML config: {str(exc).splitlines()[0]}") from None
    return from_dict(cls, data or {})
