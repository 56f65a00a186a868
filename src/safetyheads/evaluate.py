"""Evaluation: does ablating the found heads break safety, and what does it cost in helpfulness?

`evaluate` generates answers to harmful prompts with the unablated model (baseline) and with each
requested head ablation, judges them (see `judges.py`), and writes into a run folder:

- `responses.jsonl`  - the generation cache, appended chunk by chunk; every row carries a key made
                       of everything that determines the text (model, format, decoding, dataset
                       prompt, ablation). A rerun in the same folder (`--resume`) reuses every row
                       whose key matches, so an interrupted run continues and a new ablation reuses
                       the cached baseline.
- `generations.jsonl`- one row per (dataset, prompt, condition): prompt, response, ablation and the
                       verdict of every judge (`{"keywords": {"jailbroken": .., "refused": ..}}`).
- `asr.csv`          - dataset, category ('all' or the JailbreakBench category), condition
                       (baseline / ablated), heads, method, epsilon, judge, n, asr, n_unparsed,
                       the 95% Wilson interval and the paired McNemar test against the baseline
                       (`stats.py`), and where the heads came from (ranking, k, draw, source).
- `judge_agreement.csv` - with two or more judges: per dataset and pair, Cohen's kappa.
- `found_vs_random.csv` - each ranking's top K vs the random draws of the same method and K,
                       paired per prompt (sign-flip permutation p-value).
- `dose_response.png/.svg` - with rankings or random draws: ASR vs heads ablated (`plots.dose_response`).
- `helpfulness.csv` / `.json` - on the built-in harmless set: over-refusal rate (keyword judges)
                       per condition, and mean KL(p_clean || p_ablated) and top-1 agreement of the
                       next-token distribution at the last prompt position (long format:
                       condition, heads, method, epsilon, metric, judge, n, value); optional
                       lm-eval results in the json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import files
from .heads import heads_text
from .errors import UsageError
from .generation import DEFAULT_MAX_ROWS, check_decoding, generate_conditions, resolve_seed
from .judges import DEFAULT_JUDGE, Judge, KeywordJudge, attack_success_rate, get_judge
from .results import LAYER_MATCHED, RANDOM, is_random_ranking

Head = tuple[int, int]
BASELINE = "baseline"
ABLATED = "ablated"
HARMLESS = "harmless"


@dataclass
class EvalResult:
    """What `evaluate` returns (the same tables it writes)."""

    run_dir: Path | None
    asr: pd.DataFrame
    helpfulness: pd.DataFrame | None
    generations: pd.DataFrame
    ablations: list[Ablation]
    lm_eval: dict | None = None
    seed: int | None = None
    judge_agreement: pd.DataFrame | None = None  # pairwise Cohen's kappa when several judges ran
    found_vs_random: pd.DataFrame | None = None  # found heads vs the random draws of the same K (found_vs_random)


# ---------------------------------------------------------------------------------------------
# Choosing heads


heads_to_str = heads_text  # the head syntax: heads.py


# The ranking files `--from` reads, in the order a folder is searched: the exact maps before a
# screen's estimate, Generalized Ships first (what `--from RUN` always meant).
RANKING_FILES = tuple(files.csv(name) for name in files.RANKINGS)
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class Ablation:
    """One ablated condition: these heads, this method, this epsilon, and where the heads came from.

    `ranking` names the head list's origin so conditions can be grouped (a dose-response line per
    ranking, a band over random draws): a ranking file's label (`RUN/generalized_ships`),
    `random`, `random-layer-matched RUN/FILE`, or `ablate` for `--ablate`. `k` is the number of
    heads, `draw` the 1-based draw of a random control."""

    heads: tuple[Head, ...]
    method: str
    epsilon: float = 1e-5
    source: str = "--ablate"  # e.g. "top-3 of runs/x/generalized_ships.csv", "random K=3 draw 2 seed 0"
    ranking: str = "ablate"
    k: int | None = None
    draw: int | None = None

    def __post_init__(self) -> None:
        if self.k is None:
            object.__setattr__(self, "k", len(self.heads))

    @property
    def heads_str(self) -> str:
        return heads_to_str(self.heads)

    @property
    def key(self) -> str:
        """What determines the generated text (the cache key): not where the heads came from."""
        return f"{self.method}:{self.epsilon!r}:{self.heads_str}"

    def describe(self) -> dict:
        """The manifest entry: enough to see (and, with the seed, redraw) every condition's heads."""
        return {"heads": self.heads_str, "method": self.method, "epsilon": self.epsilon, "source": self.source,
                "ranking": self.ranking, "k": self.k, "draw": self.draw}


def ranking_file(run: str | Path) -> Path:
    """The ranking file `--from` means: the file itself, or the first of RANKING_FILES in a folder."""
    path = Path(run)
    if path.suffix == ".csv":
        if not path.is_file():
            raise UsageError(f"no such ranking file: {path}")
        return path
    for name in RANKING_FILES:
        if (path / name).is_file():
            return path / name
    hint = f"run `safetyheads gships ... --out {run}` first"
    raise UsageError(f"{run} has no {', '.join(RANKING_FILES[:-1])} or {RANKING_FILES[-1]}: {hint}")


def ranking_label(csv: Path) -> str:
    """How a ranking is named in asr.csv and the plots: `FOLDER/FILE-STEM`."""
    return f"{csv.parent.name}/{csv.stem}"


def _file_method(csv: Path) -> str | None:
    """The method of a ranking file without a `method` column (sahara.csv): sahara.json, else the manifest."""
    from . import manifest as manifests

    side = csv.with_suffix(".json")
    if side.is_file():
        try:
            method = json.loads(side.read_text()).get("method")
        except (json.JSONDecodeError, AttributeError):
            method = None
        if method:
            return str(method)
    return manifests.read(csv.parent).method


def ranked_heads(csv: Path, method: str) -> list[Head]:
    """Every head a ranking file ranks for `method`, best first.

    Order: the `rank` column (gships, refusal, screen); Ships summaries by top-10 count, then mean
    KL (`results.ships_order`); a Sahara group in step order; else the score, highest first."""
    from .results import ships_order

    table = pd.read_csv(csv)
    missing = {"layer", "head"} - set(table.columns)
    if missing or not ({"rank", "score", "step", "top10_count"} & set(table.columns)):
        raise UsageError(f"{csv} is not a head ranking (needs layer, head and rank, score or step columns)")
    if "method" in table.columns:
        methods = sorted(table["method"].dropna().astype(str).unique())
        table = table[table["method"] == method]
    else:
        known = _file_method(csv)
        methods = [known] if known else []
        if known is not None and known != method:
            table = table.iloc[:0]
    if table.empty:
        raise UsageError(f"{csv} has no scores for method {method!r} (it has: {', '.join(methods) or 'none'})")
    if "rank" in table.columns:
        table = table.sort_values("rank", kind="stable")
    elif {"top10_count", "mean"} <= set(table.columns):
        table = ships_order(table)
    elif "step" in table.columns:
        table = table.sort_values("step", kind="stable")
    else:
        table = table.sort_values(["score", "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(layer), int(head)) for layer, head in zip(table["layer"], table["head"])]


def heads_from_scores(run_dir: str | Path, top: int, method: str) -> list[Head]:
    """The `top` highest-ranked heads of `method` in a ranking file or run folder (see `ranking_file`)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    csv = ranking_file(run_dir)
    heads = ranked_heads(csv, method)
    if len(heads) < top:
        raise UsageError(f"--top {top} but {csv} ranks only {len(heads)} heads for {method}")
    return heads[:top]


def _draw_seed(seed: int, k: int, draw: int, tag: str = "") -> np.random.Generator:
    """A Generator per (seed, K, draw[, ranking]): adding a K or a draw leaves every other draw as it was."""
    return np.random.default_rng([seed, k, draw, zlib.crc32(tag.encode())])


def random_heads(n_layers: int, n_heads: int, k: int, draw: int, seed: int) -> tuple[Head, ...]:
    """K distinct heads drawn uniformly from all heads, sorted."""
    flat = _draw_seed(seed, k, draw).choice(n_layers * n_heads, size=k, replace=False)
    return tuple(sorted((int(i) // n_heads, int(i) % n_heads) for i in flat))


def layer_matched_heads(found: Sequence[Head], n_heads: int, draw: int, seed: int, tag: str) -> tuple[Head, ...]:
    """As many heads per layer as `found` has there, drawn uniformly from that layer's other heads.

    The control for "is it these heads, or just these layers?": the found heads themselves are
    excluded, so a draw never contains them."""
    rng = _draw_seed(seed, len(found), draw, tag)
    found_set = set(found)
    out: list[Head] = []
    for layer in sorted({layer for layer, _ in found}):
        want = sum(1 for l, _ in found if l == layer)
        pool = [h for h in range(n_heads) if (layer, h) not in found_set]
        if len(pool) < want:
            raise UsageError(f"--random-layer-matched: layer {layer} has only {len(pool)} heads besides the "
                             f"{want} found ones of {tag} (K={len(found)})")
        out += [(layer, int(h)) for h in rng.choice(pool, size=want, replace=False)]
    return tuple(sorted(out))


def _listify(value, kinds) -> list:
    return [value] if isinstance(value, kinds) else list(value)


def build_ablations(*, n_layers: int | None, n_heads: int | None, ablate: Sequence[str] = (),
                    from_runs: Sequence[str | Path] = (), top: Sequence[int] = (),
                    methods: Sequence[str] = ("undifferentiated",), epsilon: float = 1e-5,
                    random: Sequence[int] = (), repeats: int | None = None, random_seed: int = 0,
                    layer_matched: bool = False) -> list[Ablation]:
    """Ablated conditions, for each method: each `--ablate` head list; the top K of each ranking
    (`--from`, each K of `--top`); R random draws of K heads (each K of `--random`, R = `repeats`,
    default 3); with `layer_matched`, R draws matched to the layers of each ranking's top K.

    Every `--from` ranking is used for every method it has scores for (several rankings give one
    dose-response line each); a ranking with scores for none of the methods is an error. Random
    draws do not depend on the method (all methods ablate the same random heads). With
    `n_layers=None` only the options and the files are checked, without a model (a fast check
    before loading); head lists and draws need the model's size and are skipped."""
    from . import methods as method_registry
    from .ablation import parse_heads

    top, random = _listify(top, int), _listify(random, int)
    ablate, methods = _listify(ablate, str), _listify(methods, str)
    from_runs = _listify(from_runs, (str, Path))
    if ablate and from_runs:
        raise UsageError("give either --ablate or --from/--top, not both")
    if from_runs and not top:
        raise UsageError("--from needs --top K (how many of the best-ranked heads to ablate)")
    if top and not from_runs:
        raise UsageError("--top needs --from RUN_DIR (a ranking run folder or file)")
    if any(k < 1 for k in top):
        raise UsageError(f"--top must be at least 1 (got {min(top)})")
    if any(k < 1 for k in random):
        raise UsageError(f"--random K must be at least 1 (got {min(random)})")
    if repeats is not None and not random:
        raise UsageError("--repeats needs --random K (how many heads each random draw ablates)")
    repeats = DEFAULT_REPEATS if repeats is None else repeats
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1 (got {repeats})")
    if layer_matched and not (random and from_runs):
        raise UsageError("--random-layer-matched needs --random K and --from (the ranking whose layers to match)")
    method_registry.check_epsilon(epsilon)
    for m in methods:
        method_registry.get(m)

    files = [ranking_file(run) for run in from_runs]
    labels = [ranking_label(f) for f in files]
    labels = [lab if labels.count(lab) == 1 else f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    rankings: dict[str, list[tuple[str, Path, list[Head]]]] = {m: [] for m in methods}
    for csv, label in zip(files, labels):
        errors = []
        for m in methods:
            try:
                rankings[m].append((label, csv, ranked_heads(csv, m)))
            except UsageError as exc:
                errors.append(str(exc))
        if len(errors) == len(methods):
            raise UsageError(errors[0] if len(errors) == 1 else
                             f"{csv} has no scores for any method asked ({', '.join(methods)})")
    for m in methods:
        if from_runs and not rankings[m]:
            raise UsageError(f"no --from ranking has scores for method {m!r}")
        for label, csv, heads in rankings[m]:
            wanted = max(top + (random if layer_matched else []))
            if len(heads) < wanted:
                raise UsageError(f"K={wanted} but {csv} ranks only {len(heads)} heads for {m}")
    if n_layers is None:
        return []
    n_total = n_layers * n_heads
    if random and max(random) > n_total:
        raise UsageError(f"--random {max(random)} but the model has only {n_total} heads ({n_layers} x {n_heads})")

    out: list[Ablation] = []
    for m in methods:
        for spec in ablate:
            out.append(Ablation(tuple(parse_heads(spec, n_layers, n_heads)), m, epsilon))
        for label, csv, heads in rankings[m]:
            for layer, head in heads[:max(top)]:
                if not (0 <= layer < n_layers and 0 <= head < n_heads):
                    raise UsageError(f"head {layer}-{head} of {csv} is outside this model ({n_layers}x{n_heads})")
            for k in top:
                out.append(Ablation(tuple(heads[:k]), m, epsilon, source=f"top-{k} of {csv}", ranking=label, k=k))
        for k in random:
            for r in range(1, repeats + 1):
                out.append(Ablation(random_heads(n_layers, n_heads, k, r, random_seed), m, epsilon,
                                    source=f"random K={k} draw {r} seed {random_seed}", ranking=RANDOM, k=k, draw=r))
        if layer_matched:
            for label, csv, heads in rankings[m]:
                for k in random:
                    for r in range(1, repeats + 1):
                        drawn = layer_matched_heads(heads[:k], n_heads, r, random_seed, tag=f"{label} {m}")
                        out.append(Ablation(drawn, m, epsilon, ranking=f"{LAYER_MATCHED} {label}", k=k, draw=r,
                                            source=f"random layer-matched to top-{k} of {csv} draw {r} "
                                                   f"seed {random_seed}"))
    # the same condition twice (e.g. --top 1,1) is evaluated once
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# The generation cache


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ResponseCache:
    """`responses.jsonl`: generated texts keyed by everything that determines them."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path is not None and path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill -9: regenerate it
                        continue
                    self.rows[row["key"]] = row

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[row["key"]] = row
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _row_key(gen_key: str, dataset: str, prompt_id, prompt: str, condition_key: str) -> str:
    return _hash([gen_key, dataset, prompt_id, prompt, condition_key])


# ---------------------------------------------------------------------------------------------
# Helpfulness: next-token distribution shift on harmless prompts


@torch.inference_mode()
def last_token_logprobs(model, tokenizer, prompts: Sequence[str], *, fmt: str, system_prompt=None,
                        batch_size: int = 16, chat_template_kwargs: dict | None = None) -> torch.Tensor:
    """Next-token log-probabilities at the last prompt position, float32. [P, V]
    (`chat_template_kwargs`: the chat format's template variables, as in `generate_responses`;
    a model whose outputs change under left padding gets batches of prompts of one length,
    `prompts.pads_safely`)."""
    from .engine import own_last_logits
    from .prompts import encode, format_prompts, pads_safely

    texts = format_prompts(tokenizer, list(prompts), fmt, system_prompt=system_prompt,
                           chat_template_kwargs=chat_template_kwargs)
    everything = encode(tokenizer, texts)  # [P, T] left padded
    out: torch.Tensor | None = None
    # the model itself, as the engine's self-check runs it (logits_to_keep and position ids where taken)
    for rows, last in own_last_logits(model, everything, batch_size, pads_safely(model)):
        lp = torch.log_softmax(last.float(), dim=-1).cpu()  # [n, V]
        if out is None:
            out = lp.new_empty(len(texts), lp.shape[-1])
        out[rows] = lp
    return out


def distribution_shift(clean: torch.Tensor, ablated: torch.Tensor) -> tuple[float, float]:
    """(mean KL(p_clean || p_ablated), top-1 agreement) from log-probs [P, V]."""
    from .scores import kl_from_logprobs
    kl = kl_from_logprobs(clean, ablated).clamp_min(0.0)  # [P]
    agree = (clean.argmax(-1) == ablated.argmax(-1)).double().mean()
    return float(kl.mean()), float(agree)


def run_lm_eval(model, tokenizer, ablations: Sequence[Ablation], tasks: Sequence[str], *, limit=None,
                batch_size: int = 8, quiet: bool = False) -> dict:
    """lm-eval-harness tasks on the live model (no reload), baseline and each ablation. Optional."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        msg = "lm-eval is not installed: skipping --lm-eval-tasks (pip install lm-eval to enable)"
        print(msg, file=sys.stderr)
        return {"skipped": msg}
    from .ablation import ablated

    import contextlib

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = {}
    for cond in [None, *ablations]:
        ctx = contextlib.nullcontext() if cond is None else ablated(model, list(cond.heads), cond.method, cond.epsilon)
        name = BASELINE if cond is None else cond.key
        try:
            with ctx:
                res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
            results[name] = res.get("results", {}) if res else {}
        except Exception as exc:  # missing task data offline, etc.: report, do not lose the run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if not quiet:
                print(f"lm-eval failed for {name}: {results[name]['error']}", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------
# Tables


def _condition_fields(ablation: Ablation | None) -> dict:
    if ablation is None:
        return {"condition": BASELINE, "heads": "", "method": None, "epsilon": None}
    return {"condition": ABLATED, "heads": ablation.heads_str, "method": ablation.method, "epsilon": ablation.epsilon}


# Where a condition's heads came from; kept out of the response cache (two rankings may pick the
# same heads: one generation, two conditions).
TAG_COLUMNS = ["ranking", "k", "draw", "source"]
STAT_COLUMNS = ["asr_low", "asr_high", "newly_jailbroken", "newly_refused", "mcnemar_p"]
ASR_COLUMNS = ["dataset", "category", "condition", "heads", "method", "epsilon", "judge", "n", "asr", "n_unparsed",
               *STAT_COLUMNS, *TAG_COLUMNS]


def _condition_tags(ablation: Ablation | None) -> dict:
    if ablation is None:  # k = 0: no head ablated (the dose-response curve's origin)
        return {"ranking": BASELINE, "k": 0, "draw": None, "source": ""}
    return {"ranking": ablation.ranking, "k": ablation.k, "draw": ablation.draw, "source": ablation.source}


def _paired_counts(base: dict, ablated: dict) -> tuple[int, int]:
    """(newly jailbroken, newly refused) over the prompts both conditions' verdicts could be parsed for."""
    both = [(base[p], v) for p, v in ablated.items() if v is not None and base.get(p) is not None]
    return sum(1 for b, a in both if a and not b), sum(1 for b, a in both if b and not a)


def asr_table(gens: pd.DataFrame, judge_names: Sequence[str]) -> pd.DataFrame:
    """ASR per dataset (category 'all') and, where prompts have categories, per category; each with
    its 95% Wilson interval and, for ablated conditions, the exact McNemar test against the baseline
    on the same prompts (`stats.py`). Unparsed verdicts are left out of the ASR and of the pairs."""
    from .stats import mcnemar_exact, wilson_interval

    tags = [c for c in TAG_COLUMNS if c in gens.columns]
    keys = ["dataset", "condition", "heads", "method", "epsilon", *tags]
    pair_key = next((c for c in ("prompt_id", "prompt") if c in gens.columns), None)
    baseline: dict[tuple, dict] = {}  # (dataset, category, judge) -> {prompt: jailbroken}
    rows = []
    for group_key, group in gens.groupby(keys, dropna=False, sort=False):
        base = dict(zip(keys, group_key))
        parts = [("all", group)]
        cats = group["category"].dropna()
        if len(cats):
            parts += [(c, group[group["category"] == c]) for c in sorted(cats.unique())]
        for cat, part in parts:
            for judge in judge_names:
                verdicts = part[f"_v_{judge}"].tolist()
                asr, n, unparsed = attack_success_rate(verdicts)
                low, high = wilson_interval(sum(bool(v.jailbroken) for v in verdicts), n)
                row = {**base, "category": cat, "judge": judge, "n": n, "asr": asr, "n_unparsed": unparsed,
                       "asr_low": low, "asr_high": high}
                by_prompt = dict(zip(part[pair_key] if pair_key else range(len(part)),
                                     (v.jailbroken for v in verdicts)))
                slot = (base["dataset"], cat, judge)
                if base["condition"] == BASELINE:
                    baseline[slot] = by_prompt
                elif slot in baseline and pair_key:
                    b, c = _paired_counts(baseline[slot], by_prompt)
                    row.update(newly_jailbroken=b, newly_refused=c, mcnemar_p=mcnemar_exact(b, c))
                rows.append(row)
    table = pd.DataFrame(rows, columns=ASR_COLUMNS)
    for col in ("newly_jailbroken", "newly_refused", "k", "draw"):
        table[col] = table[col].astype("Int64")
    return table if tags else table.drop(columns=TAG_COLUMNS)


FOUND_VS_RANDOM_COLUMNS = ["dataset", "judge", "method", "ranking", "k", "heads", "n", "asr_found", "asr_random",
                           "asr_random_min", "asr_random_max", "n_draws", "difference", "p_value"]


def found_vs_random(gens: pd.DataFrame, judge_names: Sequence[str]) -> pd.DataFrame:
    """Do the found heads beat random heads? For every ranking's top K and the random draws of the
    same method and K (`--random K --repeats R`), on the same prompts: the found ASR, the random draws'
    mean (and range), and the paired sign-flip permutation p-value (`stats.paired_permutation_p`) of
    d_p = found verdict − mean random verdict over the prompts with parsed verdicts in both
    (`found_vs_random.csv`). It compares with these R draws: with few draws it says whether the found
    heads beat them, not the whole population of random head sets."""
    from .stats import paired_permutation_p

    if not {"ranking", "k"} <= set(gens.columns):
        return pd.DataFrame(columns=FOUND_VS_RANDOM_COLUMNS)
    pair_key = next((c for c in ("prompt_id", "prompt") if c in gens.columns), None)
    ablated = gens[gens["condition"] == ABLATED]
    rows = []
    for judge in judge_names:
        verdict = ablated[f"_v_{judge}"].map(lambda v: None if v.jailbroken is None else float(bool(v.jailbroken)))
        frame = ablated.assign(_j=verdict, _p=ablated[pair_key] if pair_key else range(len(ablated)))
        for (dataset, method, k), group in frame.groupby(["dataset", "method", "k"], dropna=True, sort=False):
            random = group[group["ranking"] == RANDOM]
            if random.empty:
                continue
            # per prompt: the mean verdict over the draws that could be judged
            rand_by_prompt = random.dropna(subset=["_j"]).groupby("_p")["_j"].mean()
            draw_asr = random.dropna(subset=["_j"]).groupby("draw")["_j"].mean()
            for ranking, found in group[~group["ranking"].map(is_random_ranking)].groupby("ranking", sort=False):
                found_by_prompt = found.dropna(subset=["_j"]).set_index("_p")["_j"]
                common = found_by_prompt.index.intersection(rand_by_prompt.index)
                diffs = (found_by_prompt[common] - rand_by_prompt[common]).to_numpy()
                rows.append({"dataset": dataset, "judge": judge, "method": method, "ranking": ranking, "k": k,
                             "heads": found["heads"].iloc[0], "n": len(common),
                             "asr_found": float(found_by_prompt[common].mean()) if len(common) else float("nan"),
                             "asr_random": float(rand_by_prompt[common].mean()) if len(common) else float("nan"),
                             "asr_random_min": float(draw_asr.min()), "asr_random_max": float(draw_asr.max()),
                             "n_draws": int(random["draw"].nunique()),
                             "difference": float(diffs.mean()) if len(diffs) else float("nan"),
                             "p_value": paired_permutation_p(diffs)})
    table = pd.DataFrame(rows, columns=FOUND_VS_RANDOM_COLUMNS)
    table["k"] = table["k"].astype("Int64")
    return table


AGREEMENT_COLUMNS = ["dataset", "judge_a", "judge_b", "n", "both_jailbroken", "only_a", "only_b", "neither",
                     "agreement", "kappa", "n_unparsed"]


def judge_agreement(gens: pd.DataFrame, judge_names: Sequence[str]) -> pd.DataFrame:
    """Pairwise agreement of the judges' jailbroken verdicts (`judge_agreement.csv`).

    Items are the judged generation rows (every dataset prompt under every condition), per dataset
    and, with several datasets, over all of them (`all`). Only rows both judges could parse count
    (`n`; `n_unparsed`: rows where either could not); `agreement` is the share of equal verdicts,
    `kappa` Cohen's κ from the 2×2 table (`stats.cohen_kappa`)."""
    from itertools import combinations

    from .stats import cohen_kappa

    parts = [(d, gens[gens["dataset"] == d]) for d in dict.fromkeys(gens["dataset"])]
    if len(parts) > 1:
        parts.append(("all", gens))
    rows = []
    for dataset, part in parts:
        for a, b in combinations(judge_names, 2):
            va = [v.jailbroken for v in part[f"_v_{a}"]]
            vb = [v.jailbroken for v in part[f"_v_{b}"]]
            pairs = [(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
            both = sum(1 for x, y in pairs if x and y)
            only_a = sum(1 for x, y in pairs if x and not y)
            only_b = sum(1 for x, y in pairs if y and not x)
            neither = len(pairs) - both - only_a - only_b
            rows.append({"dataset": dataset, "judge_a": a, "judge_b": b, "n": len(pairs), "both_jailbroken": both,
                         "only_a": only_a, "only_b": only_b, "neither": neither,
                         "agreement": (both + neither) / len(pairs) if pairs else float("nan"),
                         "kappa": cohen_kappa(both, only_a, only_b, neither), "n_unparsed": len(va) - len(pairs)})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# The API


def evaluate(model, datasets: Sequence[str], *, ablations: Sequence[Ablation] | None = None,
             ablate: Sequence[str] = (), from_runs: Sequence[str | Path] = (), top: Sequence[int] = (),
             methods: Sequence[str] = ("undifferentiated",), epsilon: float = 1e-5,
             fmt: str = "chat", system_prompt: str | None = None, max_new_tokens: int = 128, greedy: bool = True,
             top_k: int | None = None, temperature: float = 1.0, seed: int | None = None,
             judges: Sequence[str] = (DEFAULT_JUDGE,), judge_options: dict | None = None,
             column: str | None = None, limit: int | None = None, sample: int | None = None, data_seed: int = 0,
             data_dir: str | None = None, random: Sequence[int] = (), repeats: int | None = None,
             random_seed: int = 0, layer_matched: bool = False, helpfulness: bool = True,
             harmless_limit: int | None = None,
             lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None, batch_size: int = 16,
             reuse: Sequence[str | Path] = (), out: str | Path | None = None, resume: bool = False,
             force: bool = False, quiet: bool = False, chat_template_kwargs: dict | None = None,
             max_rows: int = DEFAULT_MAX_ROWS,
             device: str = "auto", dtype: str = "float32", revision: str | None = None) -> EvalResult:
    """Baseline vs ablated generations on `datasets`, judged; ASR and helpfulness; written to `out`.

    `model` is a model spec (see `models.load_model`) or an already loaded `LoadedModel`.
    The ablated conditions are `ablations`, or built from `ablate` / `from_runs` + `top` / `random`
    x `repeats` (heads drawn with `random_seed`; `layer_matched`) x `methods` (see
    `build_ablations`). With `out=None` nothing is written (API use, tests). A run with rankings or
    random draws also draws `dose_response.png/.svg` (ASR vs heads ablated, `plots.dose_response`).
    `reuse`: earlier evaluate run folders whose generations are reused where everything that
    determines them matches (model weights, format, decoding, prompt, ablation) - typically the
    baseline, so a new ablation costs only its own generations.
    `chat_template_kwargs`: template variables of the chat format (`--chat-template-kwargs`; used for
    the generations and the helpfulness pass, recorded with the decoding settings).
    Generation: per dataset, the missing prompts in chunks of `batch_size` (longest first), each
    chunk answered under many conditions per batched `generate` call (`generation.generate_conditions`,
    at most `max_rows` rows = conditions x prompts per call, at least one condition)."""
    from .ablation import num_layers_heads
    from .data import load_prompts

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_rows < 1:
        raise UsageError(f"--max-rows must be at least 1 (got {max_rows})")
    from .prompts import check_template_kwargs, template_kwargs

    chat_template_kwargs = check_template_kwargs(chat_template_kwargs)
    if chat_template_kwargs and fmt != "chat":
        raise UsageError(f"--chat-template-kwargs only applies to the chat format, not {fmt!r}")
    if not datasets:
        raise UsageError("give at least one --dataset")
    if len(set(datasets)) != len(datasets):
        raise UsageError("the same --dataset is given twice")
    if HARMLESS in datasets:
        raise UsageError("the harmless set is evaluated by the helpfulness checks (over-refusal in helpfulness.csv); "
                         "pass only harmful datasets to --dataset")
    judge_objs: list[Judge] = [get_judge(spec, **(judge_options or {})) for spec in (judges or [DEFAULT_JUDGE])]
    judge_names = [j.name for j in judge_objs]
    if len(set(judge_names)) != len(judge_names):
        raise UsageError("the same --judge is given twice")
    choice = dict(ablate=ablate, from_runs=from_runs, top=top, methods=methods, epsilon=epsilon, random=random,
                  repeats=repeats, random_seed=random_seed, layer_matched=layer_matched)
    if ablations is None:  # check --from/--top and the score files first: fail fast, before any loading
        build_ablations(n_layers=None, n_heads=None, **choice)
    # validate the datasets before spending time on loading the model
    prompt_sets = [load_prompts(d, column=column, limit=limit, sample=sample, seed=data_seed, data_dir=data_dir)
                   for d in datasets]
    harmless = None
    if helpfulness:
        harmless = load_prompts(HARMLESS, limit=harmless_limit, data_dir=data_dir)
    seed = resolve_seed(greedy, seed)

    loaded = _load(model, device=device, dtype=dtype, revision=revision)
    lm, tok = loaded.model, loaded.tokenizer
    n_layers, n_heads = num_layers_heads(lm)
    if ablations is None:
        ablations = build_ablations(n_layers=n_layers, n_heads=n_heads, **choice)
    ablations = list(ablations)

    decoding = {"format": fmt, "system_prompt": system_prompt, "max_new_tokens": max_new_tokens, "greedy": greedy,
                "top_k": None if greedy else top_k, "temperature": None if greedy else temperature, "seed": seed}
    # the template variables used (the non-thinking default included), only when there are any: the
    # cache keys of runs without any stay what they were
    variables = template_kwargs(tok, chat_template_kwargs) if fmt == "chat" else {}
    if variables:
        decoding["chat_template_kwargs"] = variables
    model_id = {"spec": loaded.spec, "revision": loaded.revision, "weights_sha256": loaded.weights_sha256}
    gen_key = _hash([model_id, decoding])
    config = {
        "model": loaded.spec, "datasets": list(datasets), "column": column, "limit": limit, "sample": sample,
        "data_seed": data_seed, **decoding, "judges": [j.describe() for j in judge_objs],
        "random_seed": random_seed, "ablations": [a.describe() for a in ablations],
        "helpfulness": helpfulness, "harmless_limit": harmless_limit, "lm_eval_tasks": list(lm_eval_tasks),
        "batch_size": batch_size, "max_rows": max_rows,
    }
    run = _open_run(out, config=config, loaded=loaded, prompt_sets=prompt_sets + ([harmless] if harmless else []),
                    resume=resume, force=force)
    run_path = Path(run.path) if run is not None else None
    cache = ResponseCache(run_path / files.RESPONSES if run_path else None)
    reusable: dict[str, dict] = {}
    for folder in reuse:
        f = Path(folder) / files.RESPONSES
        if not f.is_file():
            raise UsageError(f"--reuse {folder}: no responses.jsonl there (not an evaluate run folder)")
        reusable.update(ResponseCache(f).rows)
    n_reused = 0

    # 1. generate, reusing cached rows. Per dataset, the prompts some conditions still miss are
    #    answered in chunks of `batch_size` prompts, many conditions per batched generate call
    #    (rows = condition x prompt, at most `max_rows`); every call's rows go to the cache at once, so
    #    a run stopped early loses at most one call.
    all_sets = prompt_sets + ([harmless] if harmless is not None else [])
    conditions: list[Ablation | None] = [None, *ablations]
    wanted: list[tuple[str, dict]] = []  # (cache key, the condition's tags and index)
    missing: dict[int, dict[str, tuple[Ablation | None, list[str], list[int]]]] = {}  # set -> {cache key: ...}
    for i, cond in enumerate(conditions):
        for s_i, ps in enumerate(all_sets):
            ckey = BASELINE if cond is None else cond.key
            keys = [_row_key(gen_key, ps.name, pid, p, ckey) for pid, p in zip(ps.ids, ps.prompts)]
            wanted += [(k, {**_condition_tags(cond), "_cond": i}) for k in keys]
            copied = [reusable[k] for k in keys if k not in cache.rows and k in reusable]
            if copied:  # copy into this run's cache: the run folder stays self-contained
                cache.add(copied)
                n_reused += len(copied)
            todo = [j for j, k in enumerate(keys) if k not in cache.rows]
            if todo:  # two rankings that pick the same heads share one generation (same cache key)
                missing.setdefault(s_i, {}).setdefault(ckey, (cond, keys, todo))
    gen_options = dict(fmt=fmt, system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs,
                       max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, temperature=temperature, seed=seed)
    for s_i, by_key in missing.items():
        ps = all_sets[s_i]
        groups: dict[tuple[int, ...], list] = {}  # conditions missing the same prompts are batched together
        for cond, keys, todo in by_key.values():
            groups.setdefault(tuple(todo), []).append((cond, keys))
        for todo, conds in groups.items():
            _generate_into_cache(cache, lm, tok, ps, list(todo), conds, label=f"{ps.name}: {len(conds)} condition(s)",
                                 batch_size=batch_size, max_rows=max_rows, quiet=quiet, **gen_options)

    gens = pd.DataFrame([{**cache.rows[k], **tags} for k, tags in wanted])
    gens[["k", "draw"]] = gens[["k", "draw"]].astype("Int64")  # whole numbers in the JSON lines, not 1.0

    # 2. judge the harmful-set generations with every judge; each distinct (prompt, response) once
    #    (random controls often answer as the baseline does)
    harmful = gens[gens["dataset"] != HARMLESS].reset_index(drop=True) if harmless is not None else gens
    pairs = list(zip(harmful["prompt"], harmful["response"]))
    unique = list(dict.fromkeys(pairs))
    for judge in judge_objs:
        verdicts = judge.judge([p for p, _ in unique], [r for _, r in unique], progress=not quiet)
        by_pair = dict(zip(unique, verdicts))
        harmful[f"_v_{judge.name}"] = [by_pair[p] for p in pairs]
    asr = asr_table(harmful, judge_names)
    agreement = judge_agreement(harmful, judge_names) if len(judge_names) > 1 else None
    versus = found_vs_random(harmful, judge_names)

    # 3. helpfulness on the harmless set
    help_df, lm_eval_res = None, None
    if harmless is not None:
        help_df = _helpfulness(lm, tok, gens[gens["dataset"] == HARMLESS], harmless, ablations, judge_objs,
                               fmt=fmt, system_prompt=system_prompt, batch_size=batch_size,
                               chat_template_kwargs=chat_template_kwargs)
    if lm_eval_tasks:
        lm_eval_res = run_lm_eval(lm, tok, ablations, lm_eval_tasks, limit=lm_eval_limit, quiet=quiet)

    # 4. write
    out_gens = harmful.copy()
    out_gens["verdicts"] = [
        {j: out_gens.at[i, f"_v_{j}"].to_dict() for j in judge_names} for i in range(len(out_gens))]
    out_gens = out_gens.drop(columns=[f"_v_{j}" for j in judge_names] + ["key", "_cond"])
    if run is not None:
        lines = [_json_line(r) for r in out_gens.to_dict("records")]
        if harmless is not None:  # harmless responses too, judged by the keyword judges (over-refusal)
            lines += _harmless_lines(gens[gens["dataset"] == HARMLESS], judge_objs)
        run.write_text(files.GENERATIONS, "\n".join(lines) + "\n")
        outputs = [files.GENERATIONS, files.csv(files.ASR)]
        run.write_table(files.ASR, asr, formats=("csv",))
        if agreement is not None:
            run.write_table(files.JUDGE_AGREEMENT, agreement, formats=("csv",))
            outputs.append(files.csv(files.JUDGE_AGREEMENT))
        if len(versus):
            run.write_table(files.FOUND_VS_RANDOM, versus, formats=("csv",))
            outputs.append(files.csv(files.FOUND_VS_RANDOM))
        if set(asr["ranking"]) - {BASELINE, "ablate"}:  # rankings or random draws: a dose-response
            from .plots import dose_response

            outputs += [p.name for p in dose_response([run_path], run_path / "dose_response").paths]
        if help_df is not None:
            run.write_table(files.HELPFULNESS, help_df, formats=("csv",))
            outputs.append(files.csv(files.HELPFULNESS))
        if help_df is not None or lm_eval_res is not None:
            run.write_json(files.HELPFULNESS, {"metrics": help_df.to_dict("records") if help_df is not None else [],
                                           "lm_eval": lm_eval_res})
            outputs.append("helpfulness.json")
        overall = asr[asr["category"] == "all"]
        run.finish(outputs=outputs, seed=seed, reused_rows=n_reused,
                   asr=[{k: r[k] for k in ("dataset", "condition", "heads", "method", "judge", "n", "asr", "asr_low",
                                           "asr_high", "mcnemar_p", "ranking", "k", "draw")}
                        for r in overall.to_dict("records")])
    return EvalResult(run_dir=run_path, asr=asr, helpfulness=help_df, generations=out_gens, ablations=ablations,
                      lm_eval=lm_eval_res, seed=seed, judge_agreement=agreement, found_vs_random=versus)


def _json_line(record: dict) -> str:
    """One JSON line; pandas' NaN for missing values (e.g. the baseline's epsilon) becomes null."""
    clean = {k: (None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v) for k, v in record.items()}
    return json.dumps(clean, ensure_ascii=False, default=_json_default, allow_nan=False)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def _load(model, **kwargs):
    """A model spec or ModelConfig -> LoadedModel (an already loaded one is used as is)."""
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        return model
    if hasattr(model, "load"):  # config.ModelConfig
        return model.load()
    from .models import load_model

    return load_model(model, **kwargs)


def _generate_into_cache(cache: ResponseCache, lm, tok, ps, todo: list[int], conds: list[tuple], *, label: str,
                         batch_size: int, max_rows: int, quiet: bool, **decoding) -> None:
    """Generate the prompts `todo` of one dataset under every condition of `conds` ((Ablation or None,
    the dataset's cache keys for it)), appending each generate call's rows to the cache.

    Longest prompts first, chunks of `batch_size` prompts (little padding); each chunk is answered
    under max(1, max_rows // chunk) conditions per `generate_conditions` call."""
    todo = sorted(todo, key=lambda i: -len(ps.prompts[i]))
    chunk = max(1, batch_size)
    bar = tqdm(total=len(todo) * len(conds), desc=label, disable=quiet, unit="answer")
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        per_call = max(1, max_rows // len(idx))
        for c_start in range(0, len(conds), per_call):
            part = conds[c_start:c_start + per_call]
            gens = generate_conditions(lm, tok, [ps.prompts[i] for i in idx], [cond for cond, _ in part],
                                       max_rows=max_rows, progress=False, **decoding)
            rows = []
            for (cond, keys), gen in zip(part, gens):
                fields = _condition_fields(cond)
                for j, i in enumerate(idx):
                    rows.append({"key": keys[i], "dataset": ps.name, "prompt_id": ps.ids[i],
                                 "category": ps.categories[i] if ps.categories else None, "prompt": ps.prompts[i],
                                 "response": gen.responses[j], **fields, "n_tokens": len(gen.token_ids[j]),
                                 "finished": gen.finished[j]})
            cache.add(rows)
            bar.update(len(idx) * len(part))
    bar.close()


def _helpfulness(lm, tok, harmless_gens: pd.DataFrame, harmless, ablations, judge_objs, *, fmt, system_prompt,
                 batch_size, chat_template_kwargs=None) -> pd.DataFrame:
    """Long table: over-refusal per condition and keyword judge; KL and top-1 agreement per ablation."""
    from .ablation import ablated

    keyword_judges = [j for j in judge_objs if isinstance(j, KeywordJudge)] or [get_judge(DEFAULT_JUDGE)]
    rows = []
    for i, cond in enumerate([None, *ablations]):
        fields = {**_condition_fields(cond), **_condition_tags(cond)}
        part = harmless_gens[harmless_gens["_cond"] == i]
        for judge in keyword_judges:
            refused = [judge.is_refusal(r) for r in part["response"]]
            rows.append({**fields, "metric": "over_refusal_rate", "judge": judge.name, "n": len(refused),
                         "value": sum(refused) / len(refused) if refused else float("nan")})
    clean = last_token_logprobs(lm, tok, harmless.prompts, fmt=fmt, system_prompt=system_prompt,
                                batch_size=batch_size, chat_template_kwargs=chat_template_kwargs)  # [P, V]
    base = {**_condition_fields(None), **_condition_tags(None)}
    rows.append({**base, "metric": "mean_kl", "judge": None, "n": len(clean), "value": 0.0})
    rows.append({**base, "metric": "top1_agreement", "judge": None, "n": len(clean), "value": 1.0})
    shifts: dict[str, tuple[float, float]] = {}  # per cache key: two rankings picking the same heads run once
    for cond in ablations:
        if cond.key not in shifts:
            with ablated(lm, list(cond.heads), cond.method, cond.epsilon):
                abl = last_token_logprobs(lm, tok, harmless.prompts, fmt=fmt, system_prompt=system_prompt,
                                          batch_size=batch_size, chat_template_kwargs=chat_template_kwargs)
            shifts[cond.key] = distribution_shift(clean, abl)
        kl, agree = shifts[cond.key]
        fields = {**_condition_fields(cond), **_condition_tags(cond)}
        rows.append({**fields, "metric": "mean_kl", "judge": None, "n": len(clean), "value": kl})
        rows.append({**fields, "metric": "top1_agreement", "judge": None, "n": len(clean), "value": agree})
    cols = ["condition", "heads", "method", "epsilon", "metric", "judge", "n", "value", *TAG_COLUMNS]
    table = pd.DataFrame(rows, columns=cols)
    table[["k", "draw"]] = table[["k", "draw"]].astype("Int64")
    return table


def _harmless_lines(harmless_gens: pd.DataFrame, judge_objs) -> list[str]:
    keyword_judges = [j for j in judge_objs if isinstance(j, KeywordJudge)] or [get_judge(DEFAULT_JUDGE)]
    lines = []
    for rec in harmless_gens.drop(columns=["key", "_cond"]).to_dict("records"):
        rec["verdicts"] = {j.name: {"refused": j.is_refusal(rec["response"])} for j in keyword_judges}
        lines.append(_json_line(rec))
    return lines


def _open_run(out, *, config, loaded, prompt_sets, resume, force):
    """The run folder (manifest with the full config), or None when nothing is to be written."""
    if out is None:
        return None
    from .runs import RunDir

    return RunDir.open(out, config, command="evaluate", model=loaded, datasets=prompt_sets,
                       resume=resume, force=force)
