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
                       (baseline / ablated), heads, method, epsilon, judge, n, asr, n_unparsed.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .generation import check_decoding, generate_responses, resolve_seed
from .judges import DEFAULT_JUDGE, Judge, KeywordJudge, attack_success_rate, get_judge

Head = tuple[int, int]
BASELINE = "baseline"
ABLATED = "ablated"
HARMLESS = "harmless"
SCORES_FILE = "generalized_ships.csv"


def heads_to_str(heads: Sequence[Head]) -> str:
    return ",".join(f"{layer}-{head}" for layer, head in heads)


@dataclass(frozen=True)
class Ablation:
    """One ablated condition: these heads, this method, this epsilon."""

    heads: tuple[Head, ...]
    method: str
    epsilon: float = 1e-5
    source: str = "--ablate"  # where the heads came from, e.g. "gships top-3 of RUN"

    @property
    def heads_str(self) -> str:
        return heads_to_str(self.heads)

    @property
    def key(self) -> str:
        return f"{self.method}:{self.epsilon!r}:{self.heads_str}"


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


# ---------------------------------------------------------------------------------------------
# Choosing heads


def heads_from_scores(run_dir: str | Path, top: int, method: str) -> list[Head]:
    """The `top` highest-ranked heads of `method` in a scores run's `generalized_ships.csv`."""
    path = Path(run_dir)
    csv = path if path.suffix == ".csv" else path / SCORES_FILE
    if not csv.is_file():
        raise UsageError(f"{run_dir} has no {SCORES_FILE}: run `safetyheads gships ... --out {run_dir}` first")
    table = pd.read_csv(csv)
    missing = {"layer", "head", "rank"} - set(table.columns)
    if missing:
        raise UsageError(f"{csv} lacks the column(s) {', '.join(sorted(missing))}")
    if "method" in table.columns:
        methods = sorted(table["method"].dropna().unique())
        if method not in methods:
            raise UsageError(f"{csv} has no scores for method {method!r} (it has: {', '.join(methods) or 'none'})")
        table = table[table["method"] == method]
    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    if len(table) < top:
        raise UsageError(f"--top {top} but {csv} ranks only {len(table)} heads for {method}")
    table = table.sort_values("rank", kind="stable").head(top)
    return [(int(layer), int(head)) for layer, head in zip(table["layer"], table["head"])]


def build_ablations(*, n_layers: int | None, n_heads: int | None, ablate: Sequence[str] = (), from_runs: Sequence[str | Path] = (),
                    top: Sequence[int] = (), methods: Sequence[str] = ("undifferentiated",),
                    epsilon: float = 1e-5) -> list[Ablation]:
    """Ablated conditions = (each `--ablate` head list, each `--top K` of the scores runs) x each method.

    With `--from`, the heads for method m are the top K of m's Generalized Ships ranking (the first
    run folder that has scores for m). With `n_layers=None` the options and the score files are
    checked without a model (head lists from `ablate` are then skipped): a fast check before loading."""
    from .ablation import METHODS, parse_heads

    top = [top] if isinstance(top, int) else list(top)
    ablate = [ablate] if isinstance(ablate, str) else list(ablate)
    methods = [methods] if isinstance(methods, str) else list(methods)
    from_runs = [from_runs] if isinstance(from_runs, (str, Path)) else list(from_runs)
    if ablate and from_runs:
        raise UsageError("give either --ablate or --from/--top, not both")
    if from_runs and not top:
        raise UsageError("--from needs --top K (how many of the best-ranked heads to ablate)")
    if top and not from_runs:
        raise UsageError("--top needs --from RUN_DIR (a gships run folder)")
    if not (0 < epsilon < 1):
        raise UsageError(f"--epsilon must be in (0, 1) (got {epsilon})")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    out: list[Ablation] = []
    for m in methods:
        for spec in ablate if n_layers is not None else ():
            out.append(Ablation(tuple(parse_heads(spec, n_layers, n_heads)), m, epsilon))
        for k in top:
            heads, errors = None, []
            for run in from_runs:
                try:
                    heads = heads_from_scores(run, k, m)
                    src = f"gships top-{k} of {run}"
                    break
                except UsageError as exc:
                    errors.append(str(exc))
            if heads is None:
                raise UsageError(errors[0] if len(errors) == 1 else "; ".join(errors))
            for layer, head in heads if n_layers is not None else ():
                if not (0 <= layer < n_layers and 0 <= head < n_heads):
                    raise UsageError(f"head {layer}-{head} from {src} is outside this model ({n_layers}x{n_heads})")
            out.append(Ablation(tuple(heads), m, epsilon, source=src))
    # the same heads/method twice (e.g. --top 1,1) is evaluated once
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
                        batch_size: int = 16) -> torch.Tensor:
    """Next-token log-probabilities at the last prompt position, float32. [P, V]"""
    from .prompts import encode, format_prompts

    texts = format_prompts(tokenizer, list(prompts), fmt, system_prompt=system_prompt)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[start:start + batch_size], device=device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       position_ids=enc.position_ids, use_cache=False, logits_to_keep=1).logits  # [B, 1, V]
        chunks.append(torch.log_softmax(logits[:, -1].float(), dim=-1).cpu())  # left padded: -1 is the last token
    return torch.cat(chunks)


def distribution_shift(clean: torch.Tensor, ablated: torch.Tensor) -> tuple[float, float]:
    """(mean KL(p_clean || p_ablated), top-1 agreement) from log-probs [P, V]."""
    c, a = clean.double(), ablated.double()  # [P, V]
    p = c.exp()
    # 0 * log(0 / q) = 0: tokens the clean model gives probability 0 contribute nothing (not nan)
    kl = torch.where(p > 0, p * (c - a), torch.zeros_like(p)).sum(-1).clamp_min(0.0)  # [P]
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


def asr_table(gens: pd.DataFrame, judge_names: Sequence[str]) -> pd.DataFrame:
    """ASR per dataset (category 'all') and, where prompts have categories, per category."""
    rows = []
    keys = ["dataset", "condition", "heads", "method", "epsilon"]
    for group_key, group in gens.groupby(keys, dropna=False, sort=False):
        base = dict(zip(keys, group_key))
        parts = [("all", group)]
        cats = group["category"].dropna()
        if len(cats):
            parts += [(c, group[group["category"] == c]) for c in sorted(cats.unique())]
        for cat, part in parts:
            for judge in judge_names:
                asr, n, unparsed = attack_success_rate(part[f"_v_{judge}"].tolist())
                rows.append({**base, "category": cat, "judge": judge, "n": n, "asr": asr, "n_unparsed": unparsed})
    cols = ["dataset", "category", "condition", "heads", "method", "epsilon", "judge", "n", "asr", "n_unparsed"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------
# The API


def evaluate(model, datasets: Sequence[str], *, ablations: Sequence[Ablation] | None = None,
             ablate: Sequence[str] = (), from_runs: Sequence[str | Path] = (), top: Sequence[int] = (),
             methods: Sequence[str] = ("undifferentiated",), epsilon: float = 1e-5,
             fmt: str = "chat", system_prompt: str | None = None, max_new_tokens: int = 128, greedy: bool = True,
             top_k: int | None = None, temperature: float = 1.0, seed: int | None = None,
             judges: Sequence[str] = (DEFAULT_JUDGE,), judge_options: dict | None = None,
             column: str | None = None, limit: int | None = None, sample: int | None = None, data_seed: int = 0,
             data_dir: str | None = None, helpfulness: bool = True, harmless_limit: int | None = None,
             lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None, batch_size: int = 16,
             reuse: Sequence[str | Path] = (), out: str | Path | None = None, resume: bool = False,
             force: bool = False, quiet: bool = False,
             device: str = "auto", dtype: str = "float32", revision: str | None = None) -> EvalResult:
    """Baseline vs ablated generations on `datasets`, judged; ASR and helpfulness; written to `out`.

    `model` is a model spec (see `models.load_model`) or an already loaded `LoadedModel`.
    The ablated conditions are `ablations`, or built from `ablate` / `from_runs` + `top` x `methods`
    (see `build_ablations`). With `out=None` nothing is written (API use, tests).
    `reuse`: earlier evaluate run folders whose generations are reused where everything that
    determines them matches (model weights, format, decoding, prompt, ablation) - typically the
    baseline, so a new ablation costs only its own generations."""
    from .ablation import num_layers_heads
    from .data import load_prompts

    check_decoding(max_new_tokens, greedy, top_k, temperature)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
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
    if ablations is None:  # check --from/--top and the score files first: fail fast, before any loading
        build_ablations(n_layers=None, n_heads=None, ablate=ablate, from_runs=from_runs, top=top, methods=methods,
                        epsilon=epsilon)
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
        ablations = build_ablations(n_layers=n_layers, n_heads=n_heads, ablate=ablate, from_runs=from_runs, top=top,
                                    methods=methods, epsilon=epsilon)
    ablations = list(ablations)

    decoding = {"format": fmt, "system_prompt": system_prompt, "max_new_tokens": max_new_tokens, "greedy": greedy,
                "top_k": None if greedy else top_k, "temperature": None if greedy else temperature, "seed": seed}
    model_id = {"spec": loaded.spec, "revision": loaded.revision, "weights_sha256": loaded.weights_sha256}
    gen_key = _hash([model_id, decoding])
    config = {
        "model": loaded.spec, "datasets": list(datasets), "column": column, "limit": limit, "sample": sample,
        "data_seed": data_seed, **decoding, "judges": [j.describe() for j in judge_objs],
        "ablations": [{"heads": a.heads_str, "method": a.method, "epsilon": a.epsilon, "source": a.source}
                      for a in ablations],
        "helpfulness": helpfulness, "harmless_limit": harmless_limit, "lm_eval_tasks": list(lm_eval_tasks),
        "batch_size": batch_size,
    }
    run = _open_run(out, config=config, loaded=loaded, prompt_sets=prompt_sets + ([harmless] if harmless else []),
                    resume=resume, force=force)
    run_path = Path(run.path) if run is not None else None
    cache = ResponseCache(run_path / "responses.jsonl" if run_path else None)
    reusable: dict[str, dict] = {}
    for folder in reuse:
        f = Path(folder) / "responses.jsonl"
        if not f.is_file():
            raise UsageError(f"--reuse {folder}: no responses.jsonl there (not an evaluate run folder)")
        reusable.update(ResponseCache(f).rows)
    n_reused = 0

    # 1. generate, reusing cached rows; condition by condition (baseline first), so a run stopped
    #    early holds whole conditions
    all_sets = prompt_sets + ([harmless] if harmless is not None else [])
    conditions: list[Ablation | None] = [None, *ablations]
    wanted: list[str] = []
    for cond in conditions:
        for ps in all_sets:
            ckey = BASELINE if cond is None else cond.key
            keys = [_row_key(gen_key, ps.name, pid, p, ckey) for pid, p in zip(ps.ids, ps.prompts)]
            wanted += keys
            copied = [reusable[k] for k in keys if k not in cache.rows and k in reusable]
            if copied:  # copy into this run's cache: the run folder stays self-contained
                cache.add(copied)
                n_reused += len(copied)
            todo = [i for i, k in enumerate(keys) if k not in cache.rows]
            if not todo:
                continue
            label = f"{ps.name} {BASELINE if cond is None else cond.method + ' ' + cond.heads_str}"
            _generate_into_cache(cache, lm, tok, ps, todo, keys, cond, label=label, fmt=fmt,
                                 system_prompt=system_prompt, max_new_tokens=max_new_tokens, greedy=greedy,
                                 top_k=top_k, temperature=temperature, seed=seed, batch_size=batch_size, quiet=quiet)

    gens = pd.DataFrame([cache.rows[k] for k in wanted])

    # 2. judge the harmful-set generations with every judge
    harmful = gens[gens["dataset"] != HARMLESS].reset_index(drop=True) if harmless is not None else gens
    for judge in judge_objs:
        verdicts = judge.judge(harmful["prompt"].tolist(), harmful["response"].tolist(), progress=not quiet)
        harmful[f"_v_{judge.name}"] = verdicts
    asr = asr_table(harmful, judge_names)

    # 3. helpfulness on the harmless set
    help_df, lm_eval_res = None, None
    if harmless is not None:
        help_df = _helpfulness(lm, tok, gens[gens["dataset"] == HARMLESS], harmless, ablations, judge_objs,
                               fmt=fmt, system_prompt=system_prompt, batch_size=batch_size)
    if lm_eval_tasks:
        lm_eval_res = run_lm_eval(lm, tok, ablations, lm_eval_tasks, limit=lm_eval_limit, quiet=quiet)

    # 4. write
    out_gens = harmful.copy()
    out_gens["verdicts"] = [
        {j: out_gens.at[i, f"_v_{j}"].to_dict() for j in judge_names} for i in range(len(out_gens))]
    out_gens = out_gens.drop(columns=[f"_v_{j}" for j in judge_names] + ["key"])
    if run is not None:
        lines = [_json_line(r) for r in out_gens.to_dict("records")]
        if harmless is not None:  # harmless responses too, judged by the keyword judges (over-refusal)
            lines += _harmless_lines(gens[gens["dataset"] == HARMLESS], judge_objs)
        run.write_text("generations.jsonl", "\n".join(lines) + "\n")
        outputs = ["generations.jsonl", "asr.csv"]
        run.write_table("asr", asr, formats=("csv",))
        if help_df is not None:
            run.write_table("helpfulness", help_df, formats=("csv",))
            outputs.append("helpfulness.csv")
        if help_df is not None or lm_eval_res is not None:
            run.write_json("helpfulness", {"metrics": help_df.to_dict("records") if help_df is not None else [],
                                           "lm_eval": lm_eval_res})
            outputs.append("helpfulness.json")
        overall = asr[asr["category"] == "all"]
        run.finish(outputs=outputs, seed=seed, reused_rows=n_reused,
                   asr=[{k: r[k] for k in ("dataset", "condition", "heads", "method", "judge", "n", "asr")}
                        for r in overall.to_dict("records")])
    return EvalResult(run_dir=run_path, asr=asr, helpfulness=help_df, generations=out_gens, ablations=ablations,
                      lm_eval=lm_eval_res, seed=seed)


def _json_line(record: dict) -> str:
    """One JSON line; pandas' NaN for missing values (e.g. the baseline's epsilon) becomes null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
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


def _generate_into_cache(cache: ResponseCache, lm, tok, ps, todo: list[int], keys: list[str], cond, *, label: str,
                         batch_size: int, quiet: bool, **decoding) -> None:
    """Generate the missing prompts of one (dataset, condition) in chunks, appending each to the cache."""
    # Longest prompts first and chunks of a few batches: little padding, and a killed run loses
    # at most one chunk.
    todo = sorted(todo, key=lambda i: -len(ps.prompts[i]))
    chunk = max(1, batch_size)
    fields = _condition_fields(cond)
    bar = tqdm(total=len(todo), desc=label, disable=quiet, unit="prompt")
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        gen = generate_responses(lm, tok, [ps.prompts[i] for i in idx],
                                 heads=cond.heads if cond is not None else (),
                                 method=cond.method if cond is not None else "undifferentiated",
                                 epsilon=cond.epsilon if cond is not None else 1e-5,
                                 batch_size=batch_size, progress=False, **decoding)
        rows = []
        for j, i in enumerate(idx):
            rows.append({"key": keys[i], "dataset": ps.name, "prompt_id": ps.ids[i],
                         "category": ps.categories[i] if ps.categories else None, "prompt": ps.prompts[i],
                         "response": gen.responses[j], **fields, "n_tokens": len(gen.token_ids[j]),
                         "finished": gen.finished[j]})
        cache.add(rows)
        bar.update(len(idx))
    bar.close()


def _helpfulness(lm, tok, harmless_gens: pd.DataFrame, harmless, ablations, judge_objs, *, fmt, system_prompt,
                 batch_size) -> pd.DataFrame:
    """Long table: over-refusal per condition and keyword judge; KL and top-1 agreement per ablation."""
    from .ablation import ablated

    keyword_judges = [j for j in judge_objs if isinstance(j, KeywordJudge)] or [get_judge(DEFAULT_JUDGE)]
    rows = []
    for cond in [None, *ablations]:
        fields = _condition_fields(cond)
        part = harmless_gens[(harmless_gens["condition"] == fields["condition"])
                             & (harmless_gens["heads"] == fields["heads"])
                             & (harmless_gens["method"].fillna("") == (fields["method"] or ""))]
        for judge in keyword_judges:
            refused = [judge.is_refusal(r) for r in part["response"]]
            rows.append({**fields, "metric": "over_refusal_rate", "judge": judge.name, "n": len(refused),
                         "value": sum(refused) / len(refused) if refused else float("nan")})
    clean = last_token_logprobs(lm, tok, harmless.prompts, fmt=fmt, system_prompt=system_prompt,
                                batch_size=batch_size)  # [P, V]
    rows.append({**_condition_fields(None), "metric": "mean_kl", "judge": None, "n": len(clean), "value": 0.0})
    rows.append({**_condition_fields(None), "metric": "top1_agreement", "judge": None, "n": len(clean), "value": 1.0})
    for cond in ablations:
        with ablated(lm, list(cond.heads), cond.method, cond.epsilon):
            abl = last_token_logprobs(lm, tok, harmless.prompts, fmt=fmt, system_prompt=system_prompt,
                                      batch_size=batch_size)
        kl, agree = distribution_shift(clean, abl)
        fields = _condition_fields(cond)
        rows.append({**fields, "metric": "mean_kl", "judge": None, "n": len(clean), "value": kl})
        rows.append({**fields, "metric": "top1_agreement", "judge": None, "n": len(clean), "value": agree})
    cols = ["condition", "heads", "method", "epsilon", "metric", "judge", "n", "value"]
    return pd.DataFrame(rows, columns=cols)


def _harmless_lines(harmless_gens: pd.DataFrame, judge_objs) -> list[str]:
    keyword_judges = [j for j in judge_objs if isinstance(j, KeywordJudge)] or [get_judge(DEFAULT_JUDGE)]
    lines = []
    for rec in harmless_gens.drop(columns=["key"]).to_dict("records"):
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
