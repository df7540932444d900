"""Nothing lost, nothing misreported: checks before the model loads, no trace replaced without
--force, exports that never touch their input, OS errors in one line."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.cli import main
from kvprof.trace import partial_path, read_trace
from kvprof.trace.validate import validate_trace

TINY = ["trace", "--plugin", "full", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "16",
        "--output-len", "2"]


def run_cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("args, needle", [
    (["-o", "{dir}/exists.arrow"], "a trace is already there; pass --force"),
    (["-o", "{dir}"], "is a folder"),
    (["-o", "{dir}/afile/t.arrow"], "afile is a file, not a folder"),
    (["--dtype", "float13"], "--dtype 'float13'"),
    pytest.param(["--device", "cuda"], "no CUDA device here",
                 marks=pytest.mark.skipif(cuda_present(), reason="this machine has a GPU")),
    (["--workload", "passkey", "--prompt-len", "20"], "prompt_len=20 is too short"),
    (["--prompt-len", "9000"], "more than tiny-llama's context of 8192"),
    (["--num-prompts", "0"], "num_prompts=0 must be positive"),
])
def test_mistakes_found_before_the_model_loads(tmp_path, capsys, args, needle):
    (tmp_path / "exists.arrow").write_bytes(b"a trace")
    (tmp_path / "afile").write_bytes(b"")
    args = [arg.format(dir=tmp_path) for arg in args]
    output = [] if "-o" in args else ["-o", tmp_path / "t.arrow"]
    status, _, err = run_cli(capsys, *TINY, *output, *args)
    line = one_line(err)
    assert status == 2 and needle in line and "failed" not in line and "events so far" not in line, line
    assert (tmp_path / "exists.arrow").read_bytes() == b"a trace"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "exists.arrow"]


def test_force_replaces_a_trace_once_the_run_finishes(tmp_path, capsys):
    path = tmp_path / "t.arrow"
    path.write_bytes(b"the previous trace")
    status, out, _ = run_cli(capsys, *TINY, "-o", path, "--force")
    assert status == 0 and f"trace: {path}" in out
    assert validate_trace(path) == ([], []) and not partial_path(path).exists()


def test_no_trace_sink_loaded_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVPROF_PLUGINS", "transformers,models,analyses")
    status, _, err = run_cli(capsys, *TINY, "-o", tmp_path / "t.arrow")
    line = one_line(err)
    assert status == 2 and "the 'sinks' plugin, which writes traces, is not loaded" in line, line
    assert "KVPROF_PLUGINS='transformers,models,analyses' leaves it out" in line


def test_export_never_writes_over_its_input(tmp_path, capsys):
    path = tmp_path / "t.arrow"
    assert run_cli(capsys, *TINY, "-o", path)[0] == 0
    original = path.read_bytes()
    status, _, err = run_cli(capsys, "export", path, "-o", path)
    assert status == 2 and "is the trace itself" in one_line(err)
    assert path.read_bytes() == original
    parquet = tmp_path / "t.parquet"
    assert run_cli(capsys, "export", path, "--format", "parquet")[0] == 0
    exported = parquet.read_bytes()
    status, _, err = run_cli(capsys, "export", parquet, "--format", "parquet")  # default output = input
    assert status == 2 and "is the trace itself" in one_line(err)
    assert parquet.read_bytes() == exported


def test_analyze_reads_its_parquet_export(tmp_path, capsys):
    import json

    path = tmp_path / "t.arrow"
    assert run_cli(capsys, *TINY, "-o", path)[0] == 0
    assert run_cli(capsys, "export", path, "--format", "parquet")[0] == 0
    status, arrow_out, _ = run_cli(capsys, "analyze", path, "--json", "--only", "summary")
    status_parquet, parquet_out, err = run_cli(capsys, "analyze", tmp_path / "t.parquet", "--json", "--only", "summary")
    assert status == status_parquet == 0, err
    from_arrow, from_parquet = json.loads(arrow_out)["results"], json.loads(parquet_out)["results"]
    assert from_parquet == from_arrow and from_arrow["summary"]["requests"]["finished"] == 1


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_is_one_line_and_keeps_the_partial_trace(tmp_path):
    """The trace outgrows the file size limit (as on a full disk): exit 1, the OS's reason in one
    line, and the events that reached the disk readable under the name the line gives."""
    path = tmp_path / "t.arrow"
    command = [sys.executable, "-m", "kvprof.cli", *TINY[:-4], "--prompt-len", "64", "--output-len", "400",
               "--flush-s", "0", "-o", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(40_000))
    line = one_line(result.stderr)
    assert result.returncode == 1, result.stderr
    assert "writing the trace failed" in line and "File too large" in line
    assert f"the events written so far are in {partial_path(path)}" in line
    trace = read_trace(partial_path(path))
    assert trace.truncated and len(trace.of_kind("decode_step")) > 0
    assert not path.exists()
