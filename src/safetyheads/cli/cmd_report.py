"""`safetyheads figure | report | summary`: argument parsing only; each calls one API function
(`plots.paper_figure`, `report.build_report`, `results.summarize_runs`)."""

from __future__ import annotations

import argparse
import sys

# Kept literal (not imported from plots) so building the parser does not import pandas/matplotlib.
FORMATS = ("png", "svg", "pdf")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_figure(args) -> int:
    from ..plots import paper_figure
    result = paper_figure(
        args.runs, args.out, top=args.top, color_method=args.method_color, formats=_csv(args.formats),
        datasets=_csv(args.datasets) if args.datasets else None,
    )
    _print_notes(result.notes)
    for path in result.paths:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from ..report import build_report
    result = build_report(args.runs, args.out, top=args.top, examples=args.examples, title=args.title)
    _print_notes(result.notes)
    print(f"wrote {result.path}")
    return 0


def cmd_summary(args) -> int:
    import pandas as pd

    from ..results import summarize_runs
    result = summarize_runs(args.runs, top=args.top, agreement=args.agreement)
    if args.csv:
        print(result.rankings.to_csv(index=False), end="")
        for extra in (result.asr, result.agreement):
            if len(extra):
                print()
                print(extra.to_csv(index=False), end="")
        return 0
    with pd.option_context("display.width", 250, "display.max_colwidth", 80):
        rankings = result.rankings
        models = sorted(set(rankings["model"]) - {""})
        if len(models) == 1:
            print(f"model: {models[0]}")
            rankings = rankings.drop(columns=["model"])
        print(rankings.fillna("").to_string(index=False))
        if len(result.asr):
            print("\nattack success rate:")
            print(result.asr.fillna("").to_string(index=False))
        if len(result.agreement):
            print(f"\nagreement between rankings (Spearman over the heads both scored; heads in both top {args.top}):")
            shown = result.agreement.drop(columns=["model"] if len(models) == 1 else [])
            print(shown.to_string(index=False, float_format="{:.3f}".format))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "figure", help="the paper's figure (Generalized Ships heatmaps, top heads marked) from run folders",
        description="Draw one panel per dataset from Generalized Ships run folders (grouped by the dataset "
                    "and method in their manifests): colour = Generalized Ships, purple circles = top heads of "
                    "Undifferentiated Attention, light-blue crosses = top heads of Scaling Contribution.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="gships run folders (or a folder holding them)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file; its suffix is replaced per format")
    p.add_argument("--top", type=int, default=10, metavar="K", help="heads marked per method (default 10)")
    p.add_argument("--method-color", default="undifferentiated", metavar="METHOD",
                   help="whose Generalized Ships colour the cells (default undifferentiated)")
    p.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"comma-separated, from {','.join(FORMATS)} (default: all; PNG at 300 dpi)")
    p.add_argument("--datasets", default=None, metavar="LIST",
                   help="panels to draw, in order (default: every dataset in the runs, paper datasets first)")
    p.set_defaults(func=cmd_figure)

    p = subparsers.add_parser(
        "report", help="one self-contained HTML report (interactive heatmaps, rankings, ASR, examples)",
        description="Write a single HTML file that opens offline (plotly inlined) from scores and evaluation "
                    "run folders; sections whose files are missing are skipped with a note.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="scores and/or evaluation run folders")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    p.add_argument("--top", type=int, default=10, metavar="K", help="rows in the ranking tables (default 10)")
    p.add_argument("--examples", type=int, default=5, metavar="N",
                   help="example generations per dataset, before/after (default 5)")
    p.add_argument("--title", default=None, help="page title (default: safetyheads report: MODEL)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "summary", help="one table of run folders: top heads, status, compute time (and ASR)",
        description="List what each run folder holds: its top heads for every ranking in it (Generalized Ships, "
                    "Ships by top-10 count, the Sahara group, screen estimates), whether it finished (unfinished "
                    "runs show the chunks saved so far), and its compute time summed over resumed sessions; "
                    "evaluation runs add their attack success rates.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or folders holding them)")
    p.add_argument("--top", type=int, default=10, metavar="K", help="heads listed per ranking (default 10)")
    p.add_argument("--csv", action="store_true",
                   help="CSV instead of aligned text (the ASR and agreement tables follow, each after a blank line)")
    p.add_argument("--agreement", action="store_true",
                   help="also compare every pair of exact rankings of one model (datasets, ablations, Ships vs "
                        "Generalized Ships): Spearman and top-K overlap")
    p.set_defaults(func=cmd_summary)
