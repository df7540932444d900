from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_checkpoint_dir() -> Path:
    """The embedded SmolLM2 checkpoint, converted from its GGUF once (~20 s) and cached in $KVPROF_CACHE."""
    from kvprof.models import embedded_checkpoint

    return embedded_checkpoint()


@pytest.fixture(scope="module")
def smollm2(embedded_checkpoint_dir: Path):
    """The real embedded model on the CPU, loaded once per test module (policies may hook it)."""
    from kvprof.models import resolve_model
    from kvprof_transformers.loading import load_model

    return load_model(resolve_model("smollm2-135m"), "cpu")
