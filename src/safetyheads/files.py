"""The one place that names the files in a run folder (without extension: tables are written as
NAME.csv + NAME.parquet by `runs.RunDir.write_table`)."""

from __future__ import annotations

MANIFEST = "manifest.json"
SHIPS = "ships"                        # prompt_id, layer, head, method, score
SHIPS_SUMMARY = "ships_summary"        # layer, head, method, mean, median, top10_count
GSHIPS = "generalized_ships"           # layer, head, method, score, rank
SAHARA = "sahara"                      # step, layer, head, score (+ sahara.json: the group)
SAHARA_CANDIDATES = "sahara_candidates"
SCREEN = "screen"                      # layer, head, method, score, rank (gradient estimates)
REFUSAL = "refusal"                    # layer, head, method, score, rank, n_refused, n_used
REFUSAL_PER_PROMPT = "refusal_per_prompt"
REFUSAL_PROMPTS = "refusal_prompts"    # prompt_id, refused, used, why, response
ASR = "asr"
HELPFULNESS = "helpfulness"
FOUND_VS_RANDOM = "found_vs_random"    # dataset, judge, method, ranking, k, ..., asr_found, asr_random, p_value
GENERATIONS = "generations.jsonl"
RESPONSES = "responses.jsonl"          # evaluate's generation cache (keyed by everything that determines a text)
JUDGE_AGREEMENT = "judge_agreement"    # dataset, judge_a, judge_b, n, 2x2 counts, agreement, kappa

#: Tables a head ranking can be read from (evaluate --from, the report), most specific first.
RANKINGS = (GSHIPS, REFUSAL, SHIPS_SUMMARY, SAHARA, SCREEN)


def csv(name: str) -> str:
    """`name.csv`."""
    return f"{name}.csv"
