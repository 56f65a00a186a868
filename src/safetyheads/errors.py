"""Errors a user can cause. The CLI prints them as one line (`error: ...`) and exits non-zero."""


class SafetyHeadsError(Exception):
    """Base class: a clear, user-facing problem (bad input, missing file, unsupported model)."""


class UsageError(SafetyHeadsError):
    """Bad option values: a head outside the model, epsilon out of range, an empty dataset."""


class UnsupportedModelError(SafetyHeadsError):
    """The ablation engine does not know how to handle this architecture."""


class DownloadError(SafetyHeadsError):
    """A file could not be fetched (offline, no cached copy) or failed its hash check."""
