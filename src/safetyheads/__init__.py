"""safetyheads: find the attention heads an LLM's safety behaviour depends on, ablate them, show it.

Public API (each CLI command calls one of these)."""

__version__ = "0.1.0"

from .errors import SafetyHeadsError, UsageError, UnsupportedModelError, DownloadError  # noqa: F401
