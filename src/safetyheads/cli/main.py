"""`safetyheads` entry point: builds the argument parser from the command modules and turns
user errors into one-line messages (never a traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SafetyHeadsError

# Each module defines `register(subparsers)`; adding a command group is one entry here.
COMMAND_MODULES = [
    "safetyheads.cli.cmd_basic",     # models, datasets, fetch
    "safetyheads.cli.cmd_engine",    # surgery
    "safetyheads.cli.cmd_scores",    # ships, gships, sahara
    "safetyheads.cli.cmd_screen",    # screen: gradient estimates (+ exact top K)
    "safetyheads.cli.cmd_evaluate",  # evaluate
    "safetyheads.cli.cmd_report",    # figure, report, summary
    "safetyheads.cli.cmd_reproduce", # rerun, compare
    "safetyheads.cli.cmd_demo",      # demo: the whole method end to end
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safetyheads",
        description="Find the attention heads an LLM's safety behaviour depends on, ablate them, show the result.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command group not written yet
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from ..runs import cli_invocation

    try:
        with cli_invocation(sys.argv[1:] if argv is None else argv):
            result = args.func(args)
    except SafetyHeadsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: partial results are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
