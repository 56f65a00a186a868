"""`safetyheads surgery`: write a checkpoint whose weights realise a head ablation."""

from __future__ import annotations

import argparse

from .. import methods
from .common import add_model_args, model_config_from_args


def cmd_surgery(args: argparse.Namespace) -> int:
    from ..ablation import surgery_checkpoint

    out = surgery_checkpoint(model_config_from_args(args), args.heads, args.method, args.epsilon, args.out,
                             force=args.force)
    print(f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "surgery",
        help="save a copy of the model with heads ablated in its weights",
        description="Edit the weights so the plain model computes the ablation: undifferentiated/uniform scale "
                    "the heads' query rows (refused where a q-norm follows), scaling scales their output columns. "
                    "Writes an ordinary Hugging Face checkpoint (safetensors, config, tokenizer).",
    )
    add_model_args(p)
    p.add_argument("--heads", required=True, metavar="L-H,...", help="heads to ablate, zero-based LAYER-HEAD, e.g. 2-26,3-8")
    p.add_argument("--method", default="undifferentiated",
                   choices=tuple(m for m in methods.names() if methods.get(m).surgery),
                   help=methods.cli_help() + " (default undifferentiated)")
    p.add_argument("--epsilon", type=float, default=1e-5, help="scale factor, 0 < epsilon < 1 (default 1e-5)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the new checkpoint")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_surgery)
