"""`safetyheads evaluate`: argument parsing only; calls `safetyheads.evaluate.evaluate`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import common

DEFAULT_MAX_ROWS = 128  # generation.DEFAULT_MAX_ROWS (not imported: --help stays torch-free)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K1,K2 (integers), got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_evaluate(args) -> int:
    from ..errors import UsageError

    if args.greedy and (args.top_k is not None or args.temperature is not None):
        raise UsageError("--greedy cannot be combined with --top-k/--temperature (they choose sampling)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            result = _run(args)
        finally:
            for w in caught:  # e.g. "sampling without --seed: using seed N": one line, not a warning dump
                print(f"warning: {w.message}", file=sys.stderr)
    _report(result)
    return 0


def _run(args):
    from ..evaluate import evaluate

    sampling = args.top_k is not None or args.temperature is not None
    return evaluate(
        common.model_config_from_args(args), args.dataset or ["jailbreakbench"],
        ablate=args.ablate or (), from_runs=args.from_runs or (), top=[k for ks in (args.top or []) for k in ks],
        methods=[m for ms in args.method for m in ms] if args.method else ["undifferentiated"],
        random=[k for ks in (args.random or []) for k in ks], repeats=args.repeats,
        random_seed=args.seed if args.seed is not None else 0, layer_matched=args.random_layer_matched,
        epsilon=args.epsilon, fmt=args.format, system_prompt=args.system_prompt,
        chat_template_kwargs=common.template_kwargs_from_arg(args.chat_template_kwargs),
        max_new_tokens=args.max_new_tokens, greedy=not sampling, top_k=args.top_k,
        temperature=args.temperature if args.temperature is not None else 1.0, seed=args.seed,
        judges=args.judge or ["keywords"], judge_options={"batch_size": args.judge_batch_size,
                                                       "max_new_tokens": args.judge_max_new_tokens},
        column=args.column, limit=args.limit, sample=args.sample,
        data_seed=args.seed if args.seed is not None else 0, data_dir=args.data_dir,
        helpfulness=not args.no_helpfulness, harmless_limit=args.harmless_limit,
        lm_eval_tasks=args.lm_eval_tasks or (), lm_eval_limit=args.lm_eval_limit, batch_size=args.batch_size,
        max_rows=args.max_rows, reuse=args.reuse or (), out=args.out, resume=args.resume, force=args.force, quiet=args.quiet,
    )


def asr_lines(asr) -> str:
    """The dataset-level ASR table as printed: each ASR with its 95% Wilson interval, and for ablated
    conditions the prompts newly jailbroken / newly refused vs the baseline and the McNemar p."""
    overall = asr[asr["category"] == "all"].copy()
    cols = [c for c in ("dataset", "ranking", "k", "draw", "method", "heads", "judge", "n", "asr") if c in overall]
    if {"asr_low", "asr_high"} <= set(overall.columns):
        overall["95% CI"] = [f"[{lo:.2f}, {hi:.2f}]" if lo == lo else "" for lo, hi in
                             zip(overall["asr_low"], overall["asr_high"])]
        cols.append("95% CI")
    if {"newly_jailbroken", "newly_refused", "mcnemar_p"} <= set(overall.columns):
        ablated = overall["condition"] != "baseline"
        overall["+jb/+ref"] = [f"{b}/{c}" if a else "" for a, b, c in
                               zip(ablated, overall["newly_jailbroken"], overall["newly_refused"])]
        overall["McNemar p"] = [f"{p:.3g}" if a else "" for a, p in zip(ablated, overall["mcnemar_p"])]
        cols += ["+jb/+ref", "McNemar p"]
    table = overall[cols].astype(object).where(overall[cols].notna(), "")
    return table.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def _report(result) -> None:
    print(asr_lines(result.asr))
    print("+jb/+ref: prompts newly jailbroken / newly refused vs the baseline; McNemar p: paired exact test")
    if result.helpfulness is not None:
        h = result.helpfulness
        over_cols = [c for c in ("condition", "ranking", "k", "draw", "method", "heads", "judge", "n", "value") if c in h]
        over = h[h["metric"] == "over_refusal_rate"][over_cols]
        over = over.astype(object).where(over.notna(), "")
        # one row per condition (the baseline has no method/heads: shown as "-", not dropped as NaN
        # keys, and no cross-product of every method with every head list)
        keys = [c for c in ("condition", "ranking", "k", "draw", "method", "heads") if c in h.columns]
        rows = h[h["metric"] != "over_refusal_rate"].copy()
        rows[keys] = rows[keys].astype(object).fillna("-").replace("", "-")
        order = list(dict.fromkeys(map(tuple, rows[keys].to_numpy())))
        shift = rows.pivot_table(index=keys, columns="metric", values="value", sort=False)
        shift = shift.reindex(order).reset_index()
        shift.columns.name = None
        print("\nharmless set, over-refusal rate:")
        print(over.rename(columns={"value": "over_refusal"}).to_string(index=False))
        print("\nharmless set, next-token distribution vs the unablated model:")
        print(shift.to_string(index=False))
    if result.seed is not None:
        print(f"sampling seed: {result.seed}")
    if getattr(result, "judge_agreement", None) is not None:
        agree = result.judge_agreement
        print("\njudge agreement (jailbroken verdicts, rows both judges parsed):")
        print(agree.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    versus = getattr(result, "found_vs_random", None)
    if versus is not None and len(versus):
        print("\nfound heads vs random heads of the same K (same prompts; p: paired sign-flip permutation test):")
        print(versus.drop(columns=["heads"]).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    files = "generations.jsonl, asr.csv" + (", helpfulness.csv/.json" if result.helpfulness is not None else "")
    if getattr(result, "judge_agreement", None) is not None:
        files += ", judge_agreement.csv"
    if versus is not None and len(versus):
        files += ", found_vs_random.csv"
    if result.run_dir is not None and (Path(result.run_dir) / "dose_response.png").is_file():
        files += ", dose_response.png/.svg"
    print(f"wrote {result.run_dir}/: {files}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="ASR with heads ablated vs the unablated model, and the cost in helpfulness",
        description="Generate answers to harmful prompts with the unablated model and with the given heads ablated "
                    "(the ablation active for the whole generation), judge them, and write generations.jsonl, "
                    "asr.csv (per dataset, per JailbreakBench category) and helpfulness.csv/.json "
                    "(over-refusal, KL and top-1 agreement on the built-in harmless set).")
    common.add_model_args(p)

    g = p.add_argument_group("prompts")
    g.add_argument("--dataset", action="append", metavar="NAME|PATH",
                   help="jailbreakbench, maliciousinstruct, advbench or a .csv/.jsonl/.txt file; repeat for several "
                        "(default jailbreakbench)")
    g.add_argument("--column", default=None, metavar="NAME", help="prompt column of a .csv/.jsonl file")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts of each set")
    g.add_argument("--sample", type=int, default=None, metavar="N", help="use N prompts drawn at random (see --seed)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder searched first for the registered datasets' files (also SAFETYHEADS_DATA_DIR)")
    common.add_prompt_args(p)

    g = p.add_argument_group("ablation (each head list x each method is one ablated condition)")
    g.add_argument("--ablate", action="append", metavar="HEADS", help="heads LAYER-HEAD, e.g. 2-26,3-8; repeatable")
    g.add_argument("--from", dest="from_runs", action="append", metavar="RUN_DIR|FILE",
                   help="a ranking: a run folder (its generalized_ships.csv, else refusal.csv, ships_summary.csv, "
                        "sahara.csv, screen.csv) or one of those files; repeatable: every ranking is used for each "
                        "method it has scores for (one dose-response line each)")
    g.add_argument("--top", action="append", type=_int_list, metavar="K[,K2]",
                   help="ablate the K best-ranked heads of each --from ranking (per method); e.g. 1,2,4,8,16")
    g.add_argument("--random", action="append", type=_int_list, metavar="K[,K2]",
                   help="random-head controls: K heads drawn uniformly from all heads, --repeats draws per K, "
                        "seeded by --seed (default 0); the heads are recorded in the manifest")
    g.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="independent random draws per K of --random (default 3)")
    g.add_argument("--random-layer-matched", action="store_true",
                   help="also draw, per --from ranking and K of --random, K heads from the layers of its top K "
                        "(as many per layer; the found heads excluded)")
    g.add_argument("--method", action="append", type=_str_list, metavar="M[,M2]",
                   help="undifferentiated (default), scaling, uniform or mean; e.g. undifferentiated,scaling")
    g.add_argument("--epsilon", type=float, default=1e-5, help="ablation factor in (0, 1) (default 1e-5)")

    g = p.add_argument_group("decoding (greedy unless --top-k or --temperature is given)")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens generated per answer (default 128)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    g.add_argument("--temperature", type=float, default=None, metavar="T", help="sampling temperature (default 1)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sampling seed (also the seed of --sample and --random); sampling without one warns and "
                        "records the seed used")
    g.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts per generation batch (default 16)")
    g.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, metavar="R",
                   help="rows (conditions x prompts) per batched generate call: each batch of prompts is answered "
                        f"under max(1, R // B) conditions at once (default {DEFAULT_MAX_ROWS})")

    g = p.add_argument_group("judges and helpfulness")
    g.add_argument("--judge", action="append", metavar="SPEC",
                   help="keywords (default; paper Table 4), keywords:jailbreakbench, keywords:gcg, "
                        "keywords:FILE.txt, model:MODEL (Llama Guard style), harmbench:MODEL (HarmBench classifier "
                        "prompt), strongreject:MODEL (StrongREJECT rubric); repeatable; with several, their pairwise "
                        "Cohen's kappa goes to judge_agreement.csv")
    g.add_argument("--judge-batch-size", type=int, default=8, metavar="B", help="batch size of model judges")
    g.add_argument("--judge-max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens a model judge generates (default: model 16, harmbench 4, strongreject 512)")
    g.add_argument("--no-helpfulness", action="store_true", help="skip the harmless-set checks")
    g.add_argument("--harmless-limit", type=int, default=None, metavar="N", help="use only N harmless prompts")
    g.add_argument("--lm-eval-tasks", type=_str_list, default=None, metavar="T1,T2",
                   help="also run these lm-eval tasks on the live model (needs `pip install lm-eval`; skipped otherwise)")
    g.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="examples per lm-eval task")
    g.add_argument("--reuse", action="append", metavar="RUN_DIR",
                   help="earlier evaluate run folder whose matching generations (e.g. the baseline) are reused")

    common.add_run_args(p, out_required=True)
    p.set_defaults(func=cmd_evaluate)
