"""`safetyheads rerun | compare`: argument parsing only; each calls one API function
(`reproduce.rerun`, `reproduce.compare_runs`). Exit status 1 when the results differ."""

from __future__ import annotations

import argparse


def _report(result) -> int:
    from ..reproduce import format_comparison
    print(format_comparison(result))
    return 0 if result.ok else 1


def cmd_rerun(args) -> int:
    from ..reproduce import rerun
    return _report(rerun(args.run, args.out, rtol=args.rtol, atol=args.atol, force=args.force, quiet=args.quiet))


def cmd_compare(args) -> int:
    from ..reproduce import compare_runs
    return _report(compare_runs(args.a, args.b, rtol=args.rtol, atol=args.atol))


def _tolerances(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="relative tolerance for floats (default 1e-4: float32 rounding when ablations are batched "
                        "differently)")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance for floats (default 1e-6)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rerun", help="reproduce a run from its manifest into a new folder and compare the results",
        description="Replay the command line recorded in RUN_DIR/manifest.json (in the folder it was run from) "
                    "with --out NEW_DIR, then compare every result file cell by cell and list the provenance that "
                    "differs (weights, datasets, versions, commit, machine). Exit status 1 if the results differ.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a finished run folder written by the CLI")
    p.add_argument("--out", required=True, metavar="NEW_DIR", help="where the rerun writes (a new or empty folder)")
    p.add_argument("--force", action="store_true", help="replace NEW_DIR if it holds something")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _tolerances(p)
    p.set_defaults(func=cmd_rerun)

    p = subparsers.add_parser(
        "compare", help="compare the result files of two run folders (e.g. a GPU run with a CPU run)",
        description="Compare every result file (*.csv, *.jsonl) of RUN_A with the same file in RUN_B: floats within "
                    "--rtol/--atol, other columns exactly, rows matched on their key columns. Exit status 1 if they "
                    "differ.",
    )
    p.add_argument("a", metavar="RUN_A")
    p.add_argument("b", metavar="RUN_B")
    _tolerances(p)
    p.set_defaults(func=cmd_compare)
