"""safetyheads: find the attention heads an LLM's safety behaviour depends on, ablate them, show it.

Public API (each CLI command calls one of these). Names are imported lazily (PEP 562), so that
`import safetyheads` and `safetyheads --help` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import DownloadError, SafetyHeadsError, UnsupportedModelError, UsageError  # noqa: F401

# public name -> module that defines it. `evaluate` itself is not re-exported: it would shadow the
# module `safetyheads.evaluate`.
_EXPORTS: dict[str, str] = {
    "Study": "results",
    "load_study": "results",
    "summarize_runs": "results",
    "head_rankings": "results",
    "ranking_agreement": "results",
    "compare_runs": "reproduce",
    "rerun": "reproduce",
    "paper_figure": "plots",
    "build_report": "report",
    "BUILTIN_MODELS": "models",
    "DEFAULT_MODEL": "models",
    "LoadedModel": "models",
    "load_model": "models",
    "DATASETS": "data",
    "PromptSet": "data",
    "load_prompts": "data",
    "FORMATS": "prompts",
    "Encoded": "prompts",
    "encode": "prompts",
    "format_prompts": "prompts",
    "DataConfig": "config",
    "ModelConfig": "config",
    "PromptConfig": "config",
    "RunConfig": "config",
    "RunDir": "runs",
    "METHODS": "ablation",
    "SUPPORTED_ARCHITECTURES": "ablation",
    "HeadAblator": "ablation",
    "ablated": "ablation",
    "check_supported": "ablation",
    "num_layers_heads": "ablation",
    "parse_heads": "ablation",
    "parse_layers": "ablation",
    "surgery": "ablation",
    "CleanCache": "engine",
    "SweepResult": "engine",
    "prepare": "engine",
    "sweep": "engine",
    "generalized_ships": "scores",
    "kl_from_logprobs": "scores",
    "principal_angles": "scores",
    "GShipsResult": "analyses",
    "SaharaResult": "analyses",
    "ShipsResult": "analyses",
    "run_gships": "analyses",
    "run_sahara": "analyses",
    "run_ships": "analyses",
    "RefusalResult": "refusal",
    "run_refusal": "refusal",
    "METHOD_REGISTRY": "methods",
    "JUDGES": "judges",
    "Judge": "judges",
    "KeywordJudge": "judges",
    "ModelJudge": "judges",
    "Verdict": "judges",
    "attack_success_rate": "judges",
    "get_judge": "judges",
    "register_judge": "judges",
    "Generations": "generation",
    "generate_responses": "generation",
    "generate_texts": "generation",
    "Ablation": "evaluate",
    "EvalResult": "evaluate",
    "build_ablations": "evaluate",
    "heads_from_scores": "evaluate",
    "random_heads": "evaluate",
    "wilson_interval": "stats",
    "mcnemar_exact": "stats",
    "dose_response": "plots",
    "dose_response_table": "results",
}

__all__ = ["__version__", "DownloadError", "SafetyHeadsError", "UnsupportedModelError", "UsageError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safetyheads' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
