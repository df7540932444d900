"""Checks a run can pass before its model loads: each failure is a UsageError (one line, exit 2)
found in seconds, not after minutes of loading or reported as a plugin's crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pluggy

from kvprof.errors import UsageError
from kvprof.models import ModelSpec
from kvprof.plugins import PLUGINS_ENV
from kvprof.workloads import WorkloadSpec, chat_wrapping

DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
TRACE_SINK_PLUGIN = "sinks"   # the entry point of kvprof.sinks, which attaches the trace writer
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_trace_sink(pm: pluggy.PluginManager, trace_path: Path | None) -> None:
    """A trace is asked for and the plugin that writes traces is loaded."""
    if trace_path is not None and pm.get_plugin(TRACE_SINK_PLUGIN) is None:
        chosen = os.environ.get(PLUGINS_ENV)
        reason = f"{PLUGINS_ENV}={chosen!r} leaves it out" if chosen is not None else "it failed to load"
        raise UsageError(f"-o {trace_path}: the {TRACE_SINK_PLUGIN!r} plugin, which writes traces, is not loaded "
                         f"({reason}; see `kvprof plugins`); load it or pass --no-sinks")


def check_output(path: Path, overwrite: bool) -> None:
    """The trace can be written at `path`: not a folder, not an existing trace unless
    `overwrite`, its folder creatable and writable (tried with a probe file)."""
    if path.is_dir():
        raise UsageError(f"-o {path}: is a folder; give a file name, e.g. {path / 'run.arrow'}")
    if path.exists() and not overwrite:
        raise UsageError(f"-o {path}: a trace is already there; pass --force to replace it "
                         "(it is replaced only once the new run finishes)")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"-o {path}: {ancestor} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".kvprof-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot write in {path.parent} ({exc.strerror or exc})") from None


def check_device(device: str) -> None:
    """The torch device exists here."""
    if device == "cpu":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def context_length(config: dict[str, Any] | None) -> tuple[str, int] | None:
    """(config key, positions) of the model's context window, when its config states one."""
    for key in CONTEXT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return key, value
    return None


def check_lengths(workload: WorkloadSpec, model: ModelSpec) -> None:
    """Prompt and output fit the model's context window."""
    window = context_length(model.config)
    params = workload.params
    if window is None:
        return
    key, positions = window
    needed = params.prompt_len + params.output_len
    if needed > positions:
        raise UsageError(f"--prompt-len {params.prompt_len} + --output-len {params.output_len} = {needed} tokens: "
                         f"more than {model.name}'s context of {positions} ({key})")


def check_workload_fits(workload: WorkloadSpec, model: ModelSpec) -> None:
    """The workload can be built with the model's tokenizer (a passkey or facts prompt needs
    room for its fixed text); synthetic prompts need no tokenizer."""
    if workload.name == "synthetic":
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    workload.build(lambda text: tokenizer.encode(text, add_special_tokens=False), chat_wrapping(tokenizer))


def check_run(workload: WorkloadSpec, model: ModelSpec, device: str, dtype: str,
              trace_path: Path | None, overwrite: bool) -> None:
    """All of the above, cheapest first."""
    check_dtype(dtype)
    if trace_path is not None:
        check_output(trace_path, overwrite)
    check_lengths(workload, model)
    check_device(device)
    check_workload_fits(workload, model)
