"""`safetyheads screen`: argument parsing only; calls `safetyheads.screen.run_screen`."""

from __future__ import annotations

from ..config import SCREEN_PROBES, SCREEN_RANDOM_PROBES, SUBSPACE_PROBES
from . import common
from .cmd_scores import _add_ablation_args, _add_rank_args, _inputs, _print_top, add_chunk_args


def cmd_screen(args) -> int:
    from ..screen import run_screen
    result = run_screen(*_inputs(args), out=args.out, method=args.method, epsilon=args.epsilon, target=args.target,
                        mode=args.mode, top_k=args.top_k, probes=args.probes,
                        random_probes=args.random_probes,
                        subspace_probes=args.subspace_probes, rank=args.rank, center=args.center,
                        layers=args.layers, heads=args.heads, batch_size=args.batch_size,
                        chunk_rows=args.chunk_rows, resume=args.resume,
                        force=args.force, quiet=args.quiet)
    if result.exact is not None:
        _print_top(result.exact, ["rank", "layer", "head", "score"], args.quiet)
    else:
        _print_top(result.table, ["rank", "layer", "head", "score"], args.quiet)
    print(f"note: {result.note}")
    exact = {"ships": ", ships.csv, ships_summary.csv", "gships": ", generalized_ships.csv"}[args.target]
    print(f"wrote {result.out}/screen.csv" + (exact if result.exact is not None else ""))
    return 0


MODES = ("exact", "screen", "auto")


def add_mode_args(parser) -> None:
    """`--mode exact|screen|auto` (+ --top-k, --probes) for `ships` / `gships`."""
    g = parser.add_argument_group("fast screening")
    g.add_argument("--mode", default="exact", metavar="|".join(MODES),
                   help="exact: one forward pass per head (default); screen: gradient estimates only (screen.csv); "
                        "auto: screen, then exact scores for the top K heads")
    _add_screen_knobs(g)


def _add_screen_knobs(g) -> None:
    """The screen's cost/accuracy knobs, shared by `screen` and `ships/gships --mode`."""
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="heads scored exactly in auto mode (default 40)")
    g.add_argument("--probes", type=int, default=SCREEN_PROBES, metavar="N",
                   help="ships: top Fisher eigen-directions backpropagated, one backward pass each (default "
                        "%(default)s; '--probes 1 --random-probes 2' is 1.5-2x faster, as accurate with 20 prompts, "
                        "noisier with 8)")
    g.add_argument("--random-probes", type=int, default=SCREEN_RANDOM_PROBES, metavar="N",
                   help="ships: Gaussian probes of the rest of the Fisher spectrum (unbiased, seeded), one backward "
                        "pass each (default %(default)s)")
    g.add_argument("--subspace-probes", type=int, default=SUBSPACE_PROBES, metavar="N",
                   help="gships: extra backward passes for the rotation's second term (half exact singular "
                        "directions, half random-sign probes of the rest; all exact when the prompts allow; "
                        "default %(default)s)")


def screen_instead(args, target: str) -> int | None:
    """For `ships`/`gships --mode screen|auto`: run the screen and return the exit code; None for exact."""
    from ..errors import UsageError
    mode = getattr(args, "mode", "exact")
    if mode == "exact":
        return None
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    args.target = target
    args.batch_size = getattr(args, "batch_size", 8)
    return cmd_screen(args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "screen", help="fast gradient estimate of every head's Ships / Generalized Ships (optionally verified exactly)",
        description="Estimate every head's score from one forward and a few backward passes (attribution "
                    "patching with a second-order KL for Ships and a first-order subspace rotation for "
                    "Generalized Ships). Writes screen.csv (layer, head, method, score, rank). --mode auto "
                    "then computes exact scores for the top K heads.")
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_prompt_args(p)
    _add_ablation_args(p)
    common.add_run_args(p)
    add_chunk_args(p)
    _add_rank_args(p)
    g = p.add_argument_group("screen")
    g.add_argument("--target", default="gships", metavar="ships|gships",
                   help="score to estimate: ships (mean KL over prompts) or gships (default gships)")
    g.add_argument("--mode", default="screen", metavar="screen|auto",
                   help="screen: estimates only; auto: then exact scores for the top K (default screen)")
    _add_screen_knobs(g)
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per forward/backward (default 8)")
    p.set_defaults(func=cmd_screen)
