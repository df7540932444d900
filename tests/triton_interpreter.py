"""Runs a test's script under Triton's interpreter, on the CPU: the GPU kernels' tests.

The interpreter is switched on by TRITON_INTERPRET before Triton is imported, so each script runs
in a fresh interpreter process of its own; the test asserts on what it printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_interpreted(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`python -c script args...` with TRITON_INTERPRET=1 (the test is skipped without Triton)."""
    pytest.importorskip("triton")
    return subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=timeout)
