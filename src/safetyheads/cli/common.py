"""Options every command shares, so `--model`, `--dataset`, `--format`, `--out` ... mean the same everywhere.

Each `add_*_args(parser)` adds one option group; each `*_config_from_args(args)` turns the parsed options
into the matching config dataclass (which validates them and raises UsageError on bad values)."""

from __future__ import annotations

import argparse
import json

from ..config import (
    ATTN_IMPLEMENTATIONS,
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    FORMATS,
    DataConfig,
    ModelConfig,
    PromptConfig,
    RunConfig,
)
from ..errors import UsageError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                   help=f"built-in name, .gguf file, model directory or hub id ORG/NAME (default {DEFAULT_MODEL})")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for a hub id")
    g.add_argument("--device", default="auto", metavar="|".join(DEVICES),
                   help="where to run: auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype (default float32)")
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="transformers device_map for multi-GPU placement, e.g. auto (overrides --device)")
    g.add_argument("--attn-implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel (default sdpa)")


def add_data_args(parser: argparse.ArgumentParser, default_dataset: str | None = DEFAULT_DATASET) -> None:
    g = parser.add_argument_group("prompts")
    g.add_argument("--dataset", default=default_dataset, metavar="NAME|PATH",
                   help="jailbreakbench, maliciousinstruct, advbench, harmless, or a .csv/.jsonl/.txt file"
                        + (f" (default {default_dataset})" if default_dataset else ""))
    g.add_argument("--column", default=None, metavar="NAME", help="prompt column of a .csv/.jsonl file")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts")
    g.add_argument("--sample", type=int, default=None, metavar="N", help="use N prompts drawn at random (see --seed)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="seed for --sample (default 0)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder searched first for the registered datasets' files (also SAFETYHEADS_DATA_DIR)")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt format")
    g.add_argument("--format", default="chat", choices=FORMATS,
                   help="chat: the model's chat template; paper: '## Query: ...\\n## Answer:'; reference: the same without the space, as the reference code; raw: as is (default chat)")
    g.add_argument("--system-prompt", default=None, metavar="TEXT", help="system message (chat format only)")
    g.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="extra chat-template variables as a JSON object, e.g. '{\"enable_thinking\": true}' "
                        "(chat format only; templates with a thinking switch default to enable_thinking=false)")


def add_run_args(parser: argparse.ArgumentParser, out_required: bool = False) -> None:
    g = parser.add_argument_group("run folder")
    g.add_argument("--out", default=None, required=out_required, metavar="RUN_DIR",
                   help="run folder for results and manifest.json")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same config)")
    g.add_argument("--force", action="store_true", help="replace the run already in --out")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    device_map = args.device_map if args.device_map not in (None, "", "none") else None
    return ModelConfig(model=args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                       device_map=device_map, attn_implementation=getattr(args, "attn_implementation", "sdpa"))


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    return DataConfig(dataset=args.dataset, column=args.column, limit=args.limit, sample=args.sample,
                      seed=args.seed, data_dir=args.data_dir)


def template_kwargs_from_arg(text: str | None) -> dict | None:
    """--chat-template-kwargs JSON -> dict (PromptConfig checks it is an object of template variables)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--chat-template-kwargs is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--chat-template-kwargs must be a JSON object, e.g. '{{\"enable_thinking\": true}}', got {text!r}")
    return value


def prompt_config_from_args(args: argparse.Namespace) -> PromptConfig:
    return PromptConfig(format=args.format, system_prompt=args.system_prompt,
                        chat_template_kwargs=template_kwargs_from_arg(getattr(args, "chat_template_kwargs", None)))


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(out=args.out, resume=args.resume, force=args.force, quiet=args.quiet)
