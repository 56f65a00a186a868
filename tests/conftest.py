"""Shared test set-up: tests read the paper's datasets from ../shared/datasets, through the same
SAFETYHEADS_DATA_DIR lookup users have (unless the caller already set it)."""

from __future__ import annotations

import os
from pathlib import Path

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
if "SAFETYHEADS_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["SAFETYHEADS_DATA_DIR"] = str(_SHARED)
