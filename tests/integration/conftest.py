"""Real built-in models, loaded once per test session from the dequantized cache (`make test` pre-fetches
them with `safetyheads fetch`). Every test in tests/integration is marked `integration`.

Fixtures: `smollm2` (SmolLM2-135M-Instruct) and `qwen` (Qwen2.5-Coder-0.5B-Instruct), both float32 on CPU,
as `safetyheads.models.LoadedModel`. Treat them as read-only: they are shared by every test in the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from safetyheads.models import load_model


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def qwen():
    return load_model("qwen2.5-coder-0.5b-instruct", device="cpu", dtype="float32")
