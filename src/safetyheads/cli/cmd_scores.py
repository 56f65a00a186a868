"""`safetyheads ships | gships | sahara`: argument parsing only; each calls one API function in
`safetyheads.analyses`."""

from __future__ import annotations

import argparse

from .. import methods
from . import common


def _add_ablation_args(parser: argparse.ArgumentParser) -> None:
    # --method is checked by the API (one-line UsageError), not by argparse choices (a usage dump)
    p = parser.add_argument_group("ablation")
    p.add_argument("--method", default="undifferentiated", metavar="|".join(methods.names()),
                   help=methods.cli_help() + " (default undifferentiated)")
    p.add_argument("--epsilon", type=float, default=1e-5, help="ablation factor in (0, 1) (default 1e-5)")
    p.add_argument("--layers", default=None, metavar="SPEC", help="only heads in these layers, e.g. 0-5,7")
    p.add_argument("--heads", default=None, metavar="SPEC", help="only these heads, LAYER-HEAD, e.g. 2-26,3-8")


def _add_common(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_prompt_args(p)
    _add_ablation_args(p)
    common.add_run_args(p)
    add_chunk_args(p)


def add_chunk_args(p: argparse.ArgumentParser) -> None:
    from ..config import CHUNK_ROWS
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, metavar="N",
                   help="save results every N rows of work or more (heads x prompts, whole layers): smaller "
                        "loses less to a kill, larger runs bigger batches (default %(default)s)")


def _inputs(args) -> tuple:
    return common.model_config_from_args(args), common.data_config_from_args(args), \
        common.prompt_config_from_args(args)


def _ablation(args) -> dict:
    return dict(method=args.method, epsilon=args.epsilon, layers=args.layers, heads=args.heads,
                out=args.out, chunk_rows=args.chunk_rows, resume=args.resume, force=args.force, quiet=args.quiet)


def _print_top(df, columns, quiet: bool, n: int = 10) -> None:
    if not quiet:
        print(df.head(n)[columns].to_string(index=False))


def cmd_ships(args) -> int:
    from ..analyses import run_ships
    from .cmd_screen import screen_instead  # --mode screen|auto (issue 7)
    if (code := screen_instead(args, "ships")) is not None:
        return code
    result = run_ships(*_inputs(args), smoothed=args.smoothed, with_gships=args.with_gships, rank=args.rank,
                       center=args.center, **_ablation(args))
    _print_top(result.summary, ["layer", "head", "mean", "median", "top10_count"], args.quiet)
    extra = ", generalized_ships.csv" if args.with_gships else ""
    print(f"wrote {result.out}/ships.csv, ships_summary.csv{extra}")
    return 0


def cmd_gships(args) -> int:
    from ..analyses import run_gships
    from .cmd_screen import screen_instead  # --mode screen|auto (issue 7)
    if (code := screen_instead(args, "gships")) is not None:
        return code
    result = run_gships(*_inputs(args), rank=args.rank, center=args.center, **_ablation(args))
    _print_top(result.table, ["rank", "layer", "head", "score"], args.quiet)
    print(f"wrote {result.out}/generalized_ships.csv")
    return 0


def cmd_sahara(args) -> int:
    from ..analyses import run_sahara
    result = run_sahara(*_inputs(args), group_size=args.group_size, candidates=args.candidates,
                        gships_from=args.gships_from, rank=args.rank, center=args.center, **_ablation(args))
    _print_top(result.steps, ["step", "layer", "head", "score"], args.quiet)
    from ..scores import heads_text
    print("group: " + heads_text(result.group))
    print(f"wrote {result.out}/sahara.csv")
    return 0


def cmd_refusal(args) -> int:
    from ..refusal import run_refusal
    result = run_refusal(*_inputs(args), judge=args.judge, tokens=args.tokens, max_new_tokens=args.max_new_tokens,
                         **_ablation(args))
    prompts = result.prompts
    left_out = prompts[~prompts["used"]]
    if not args.quiet:
        _print_top(result.table, ["rank", "layer", "head", "score"], args.quiet)
    n_used = int(prompts["used"].sum())
    reasons = left_out["why"].value_counts(sort=False)
    print(f"scored {n_used} of {len(prompts)} prompts (the ones the clean model refuses); left out "
          f"{len(left_out)}" + (": " + ", ".join(f"{why} ({n})" for why, n in reasons.items()) if len(left_out) else ""))
    print(f"wrote {result.out}/refusal.csv, refusal_prompts.csv")
    return 0


def _add_rank_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("generalized ships")
    p.add_argument("--rank", type=int, default=1, metavar="R",
                   help="number of singular directions compared (sum of R principal angles); the paper does "
                        "not state R, the reference implementation uses 1 (default 1)")
    p.add_argument("--center", action="store_true", help="subtract the mean hidden state before the SVD")


def _add_mode_args(p: argparse.ArgumentParser) -> None:
    from .cmd_screen import add_mode_args
    add_mode_args(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("ships", help="Ships: per-prompt KL between clean and head-ablated next-token distributions",
                              description="For every prompt and head, KL(p_clean || p_ablated) at the last prompt "
                                          "position. Writes ships.csv/.parquet and ships_summary.csv.")
    _add_common(p)
    p.add_argument("--smoothed", action="store_true",
                   help="reproduce the reference implementation's KL (float32 probabilities + 1e-12) instead of the "
                        "exact log-domain KL")
    p.add_argument("--with-gships", action="store_true",
                   help="also write generalized_ships.csv from the same forward passes (half the cost of two runs)")
    _add_rank_args(p)
    _add_mode_args(p)
    p.set_defaults(func=cmd_ships)

    p = subparsers.add_parser("gships", help="Generalized Ships: dataset-level head ranking by principal angles",
                              description="Rank heads by the principal angles between the top-R singular subspaces "
                                          "of the last-position hidden states, clean vs ablated. Writes "
                                          "generalized_ships.csv.")
    _add_common(p)
    _add_rank_args(p)
    _add_mode_args(p)
    p.set_defaults(func=cmd_gships)

    p = subparsers.add_parser("sahara", help="Sahara: greedy search for the most important head group",
                              description="Grow a head group greedily: at each step add the head whose joint "
                                          "ablation with the group gives the largest Generalized Ships. Writes "
                                          "sahara.csv and sahara.json.")
    _add_common(p)
    _add_rank_args(p)
    p.add_argument("--group-size", type=int, default=3, metavar="S", help="number of heads in the group (default 3)")
    p.add_argument("--candidates", default="all", metavar="all|topK",
                   help="heads tried at each step: all, or the K best by single-head Generalized Ships (e.g. top20)")
    p.add_argument("--gships-from", default=None, metavar="RUN_DIR",
                   help="take the topK candidates from this gships run instead of computing them")
    p.set_defaults(func=cmd_sahara)

    from ..config import REFUSAL_JUDGE_TOKENS, REFUSAL_TOKENS
    p = subparsers.add_parser("refusal", help="refusal score: how much ablating a head lowers the model's own refusal",
                              description="For every prompt the clean model refuses (by --judge, on its greedy "
                                          "answer), score each head by the drop of the teacher-forced "
                                          "log-probability of the answer's first --tokens tokens under the "
                                          "ablation (mean over refused prompts). Writes refusal.csv "
                                          "(layer, head, method, score, rank, n_refused, n_used) and "
                                          "refusal_prompts.csv (which prompts were refused and used).")
    _add_common(p)
    p.add_argument("--judge", default="keywords", metavar="SPEC",
                   help="judge that decides which clean answers are refusals (default keywords)")
    p.add_argument("--tokens", type=int, default=REFUSAL_TOKENS, metavar="K",
                   help="refusal tokens scored (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=REFUSAL_JUDGE_TOKENS, metavar="N",
                   help="tokens of the clean answer the judge reads (default %(default)s)")
    p.set_defaults(func=cmd_refusal)
