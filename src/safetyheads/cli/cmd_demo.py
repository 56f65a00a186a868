"""`safetyheads demo`: the whole method end to end (see safetyheads.demo)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole method on the default model and write a report",
                       description="Generalized Ships for both ablations on JailbreakBench and MaliciousInstruct, "
                                   "the paper's figure, ASR before/after ablating the top heads, helpfulness, and an "
                                   "HTML report. Sized for ~15 minutes on 2 CPU cores; --full runs the paper scale.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model spec (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s); rerunning resumes")
    p.add_argument("--full", action="store_true", help="all prompts, 128 new tokens (for a GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data-dir", default=None, help="folder with the datasets (default: $SAFETYHEADS_DATA_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.model, out=args.out, full=args.full, device=args.device, dtype=args.dtype,
             data_dir=args.data_dir, quiet=args.quiet)
    return 0
