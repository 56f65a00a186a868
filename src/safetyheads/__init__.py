"""safetyheads: find the attention heads an LLM's safety behaviour depends on, ablate them, show it.

Public API (each CLI command calls one of these)."""

__version__ = "0.1.0"

from .errors import SafetyHeadsError, UsageError, UnsupportedModelError, DownloadError  # noqa: F401
from .results import Study, load_study  # noqa: F401,E402  (run folders read back for display)
from .plots import paper_figure  # noqa: F401,E402
from .report import build_report  # noqa: F401,E402
from .models import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, load_model  # noqa: F401,E402
from .data import DATASETS, PromptSet, load_prompts  # noqa: F401,E402
from .prompts import FORMATS, Encoded, encode, format_prompts  # noqa: F401,E402
from .config import DataConfig, ModelConfig, PromptConfig, RunConfig  # noqa: F401,E402
from .runs import RunDir  # noqa: F401,E402
from .ablation import METHODS, SUPPORTED_ARCHITECTURES, HeadAblator, ablated, check_supported, num_layers_heads, parse_heads, parse_layers, surgery  # noqa: F401,E402
from .engine import CleanCache, SweepResult, prepare, sweep  # noqa: F401,E402
from .scores import generalized_ships, kl_from_logprobs, principal_angles  # noqa: F401,E402
from .analyses import GShipsResult, SaharaResult, ShipsResult, run_gships, run_sahara, run_ships  # noqa: F401,E402
from .judges import JUDGES, Judge, KeywordJudge, ModelJudge, Verdict, attack_success_rate, get_judge, register_judge  # noqa: F401,E402
from .generation import Generations, generate_responses, generate_texts  # noqa: F401,E402
# `evaluate` itself is not re-exported: it would shadow the module `safetyheads.evaluate`
from .evaluate import Ablation, EvalResult, build_ablations, heads_from_scores  # noqa: F401,E402
