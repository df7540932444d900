from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_checkpoint_dir() -> Path:
    """The embedded SmolLM2 checkpoint, converted from its GGUF once (~20 s) and cached in $KVPROF_CACHE."""
    from kvprof.models import embedded_checkpoint

    return embedded_checkpoint()
