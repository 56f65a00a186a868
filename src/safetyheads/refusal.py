"""The refusal score: how much ablating a head removes the model's OWN refusal.

Ships and Generalized Ships are undirected: a head whose ablation garbles the output ranks as high
as one whose ablation removes the refusal. This target is directed. For every prompt the clean
model refuses (by the chosen judge, on its clean greedy answer), the first k tokens of that answer
r_1..r_k are the refusal; a head's score is the drop of their teacher-forced log-probability under
the ablation, averaged over the refused prompts:

    score(h) = mean_p [ log p_clean(r_1..r_k | x_p) − log p_h(r_1..r_k | x_p) ]   (nats, ≥ 0 typically)

A sequence log-probability, not a log-odds: a refusal is a specific continuation, and its total
log-probability is what greedy decoding follows. It runs through the same sweep engine as the
other scores — each refused prompt becomes x_p + r_1..r_{k-1} and the engine reads the last k
positions (`engine.prepare(targets=...)`) — with the same chunked, resumable, sharded run folder
(`pipeline.py`).

Files: refusal.csv (layer, head, method, score, rank, n_refused, n_used), refusal_prompts.csv
(prompt_id, refused, used, why, response: every prompt, refused or not, and whether it was used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import files, pipeline, scores
from .errors import UsageError

from .config import REFUSAL_JUDGE_TOKENS as DEFAULT_JUDGE_TOKENS  # the judge needs more than the k scored tokens
from .config import REFUSAL_TOKENS as DEFAULT_TOKENS
CLEAN_CHUNK = "refusal_clean"  # the clean answers and verdicts, saved once (a resume reuses them)


@dataclass
class RefusalResult:
    out: Path
    table: pd.DataFrame      # layer, head, method, score, rank, n_refused, n_used
    prompts: pd.DataFrame    # prompt_id, refused, used, why, response


def _clean_answers(inputs: pipeline.Inputs, judge, max_new_tokens: int, tokens: int, quiet: bool) -> pd.DataFrame:
    """Greedy clean answers to every prompt, `judge`'s verdict and whether the prompt is used."""
    from .generation import generate_texts

    lm, tok = inputs.loaded.model, inputs.loaded.tokenizer
    gen = generate_texts(lm, tok, inputs.texts, max_new_tokens=max_new_tokens, greedy=True, progress=not quiet,
                         desc="clean answers")
    verdicts = judge.judge(list(inputs.prompt_set.prompts), gen.responses, progress=not quiet)
    rows = []
    for pid, ids, text, v in zip(inputs.prompt_set.ids, gen.token_ids, gen.responses, verdicts):
        refused = v.jailbroken is False  # unparsed (None) is not a refusal
        why = ("" if refused and len(ids) >= tokens else
               "not refused" if v.jailbroken else "judge output unparsed" if v.jailbroken is None else
               f"answer shorter than {tokens} tokens")
        rows.append({"prompt_id": int(pid), "refused": bool(refused), "used": not why, "why": why,
                     "response": text, "token_ids": " ".join(map(str, ids))})
    return pd.DataFrame(rows)


def _teacher_forced(inputs: pipeline.Inputs, answers: pd.DataFrame, tokens: int):
    """Encoded prompts + first k-1 answer tokens (left padded) and the k target tokens [P_used, k]."""
    from .prompts import encode, pad_token_ids

    used = answers.index[answers["used"]].tolist()
    enc = encode(inputs.loaded.tokenizer, [inputs.texts[i] for i in used])
    seqs, targets = [], []
    for row, i in enumerate(used):
        prompt = enc.input_ids[row][enc.attention_mask[row].bool()].tolist()
        answer = [int(t) for t in answers.loc[i, "token_ids"].split()][:tokens]
        seqs.append(prompt + answer[:-1])
        targets.append(answer)
    encoded = pad_token_ids(seqs, inputs.loaded.tokenizer.pad_token_id or 0,
                            device=getattr(inputs.loaded.model, "device", None))
    return encoded, torch.tensor(targets, dtype=torch.long)


def run_refusal(model: Any = None, data: Any = "jailbreakbench", prompt: Any = "chat", *,
                out: str | Path, method: str = "undifferentiated", epsilon: float = 1e-5,
                layers: str | None = None, heads: str | None = None, judge: str = "keywords",
                tokens: int = DEFAULT_TOKENS, max_new_tokens: int = DEFAULT_JUDGE_TOKENS,
                chunk_rows: int = pipeline.CHUNK_ROWS, resume: bool = False, force: bool = False,
                quiet: bool = False) -> RefusalResult:
    """Score every selected head by how much its ablation lowers the log-probability of the clean
    model's own refusal (module docstring). Writes refusal.csv and refusal_prompts.csv into `out`;
    prompts the clean model does not refuse are reported there and left out; no refused prompt at
    all is a one-line UsageError."""
    from .engine import prepare, sweep
    from .generation import check_decoding

    if tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {tokens}")
    check_decoding(max_new_tokens, True, None, 1.0)
    if max_new_tokens < tokens:
        raise UsageError(f"--max-new-tokens ({max_new_tokens}) must be at least --tokens ({tokens})")
    inputs = pipeline.resolve("refusal", model, data, prompt, method=method, epsilon=epsilon, layers=layers,
                              heads=heads, extra={"judge": judge, "tokens": int(tokens),
                                                  "max_new_tokens": int(max_new_tokens), "chunking": "layers",
                                                  "chunk_rows": int(chunk_rows)})
    from .judges import get_judge
    judge_obj = get_judge(judge)  # a bad judge spec fails before the run folder is made
    run = pipeline.open_run(out, inputs, resume=resume, force=force)
    # [scale-out] rank 0 (the only one in one process) answers and judges once, saved as a chunk so
    # that a resumed run scores the same prompts; every rank then reads the same answers
    if run.path is not None and CLEAN_CHUNK not in run.chunk_keys(CLEAN_CHUNK):
        run.write_chunk(CLEAN_CHUNK, _clean_answers(inputs, judge_obj, max_new_tokens, tokens, quiet))
    run.sync()
    answers = run.read_chunks(CLEAN_CHUNK)
    answers = answers.reset_index(drop=True)
    n_refused, n_used = int(answers["refused"].sum()), int(answers["used"].sum())
    if n_used == 0:
        raise UsageError(f"the clean model refused none of the {len(answers)} prompts by judge {judge!r} "
                         f"(with at least {tokens} answer tokens): there is no refusal to score")
    encoded, targets = _teacher_forced(inputs, answers, tokens)
    used_ids = [int(p) for p in answers.loc[answers["used"], "prompt_id"]]
    cache = prepare(inputs.loaded.model, encoded, targets=targets)
    clean = cache.clean_target_logprobs.sum(-1)                           # [P_used] float64
    chunks = pipeline.plan_chunks(inputs.heads, n_used, chunk_rows)
    with pipeline.WorkBar(f"refusal {method}", quiet, inputs.n_layers, n_used) as bar:
        for chunk, key in pipeline.pending_chunks(run, inputs, bar, "refusal_L", chunks):
            res = sweep(cache, [[h] for h in chunk], method, epsilon, want=("target_logprobs",), progress=False,
                        on_work=bar.advance)
            drop = (clean[None, :] - res.target_logprobs.sum(-1)).numpy()  # [C, P_used]
            run.write_chunk(key, scores.ships_table(drop, chunk, used_ids, method))  # per (prompt, head)
            bar.heads(len(chunk))
    run.sync(cache)                                                        # [scale-out]
    per_prompt = run.read_chunks("refusal_L").sort_values(["prompt_id", "layer", "head"], kind="stable")
    mean = per_prompt.groupby(["layer", "head", "method"], as_index=False, sort=True)["score"].mean()
    table = scores.rank_by_score(mean).assign(n_refused=n_refused, n_used=n_used)
    prompts_table = answers[["prompt_id", "refused", "used", "why", "response"]]
    run.write_table(files.REFUSAL, table)
    run.write_table(files.REFUSAL_PER_PROMPT, per_prompt[scores.SHIPS_COLUMNS].reset_index(drop=True))
    run.write_table(files.REFUSAL_PROMPTS, prompts_table)
    run.finish({"top_heads": pipeline.head_list(table.head(10)), "n_prompts": len(answers),
                "n_refused": n_refused, "n_used": n_used})
    return RefusalResult(Path(out), table, prompts_table)
