"""benchmarks/study_report.py and h200_sweeps.py on real tiny sweeps: figures from sweep folders
with repeats and an out-of-memory point, and a study part run end to end on the CPU."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from kvprof import cli

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import h200_sweeps  # noqa: E402
import study_report  # noqa: E402
from sweep_runs import with_out_of_memory_strategy  # noqa: E402


def test_the_report_draws_medians_with_spread_and_marks_points_out_of_memory(tmp_path, monkeypatch):
    with_out_of_memory_strategy(monkeypatch)
    folder = tmp_path / "fig1-tiny"
    assert cli.main(["sweep", "-p", "full", "-p", "oom", "--model", "tiny-llama", "--weights", "random",
                     "--prompt-len", "32,48", "--output-len", "3", "--repeats", "2", "-o", str(folder),
                     "--no-plots"]) == 1
    assert study_report.main([str(folder), "-o", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "fig1-ttft-vs-prompt.md").read_text()
    assert "Machine: CPU" in table
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in table.splitlines()
            if line.startswith("| tiny-llama")}
    assert set(rows) == {("tiny-llama", strategy, prompt) for strategy in ("full", "oom") for prompt in ("32", "48")}
    assert "out of memory" in rows[("tiny-llama", "oom", "32")]
    ttfts = [json.loads((folder / f"full-p32-b1-o3-{r}.json").read_text())["summary"]["latency_ms"]["ttft"]["median"]
             for r in (0, 1)]
    assert f"[{min(ttfts):.4g}-{max(ttfts):.4g}] n=2/2" in rows[("tiny-llama", "full", "32")]
    assert (tmp_path / "report" / "fig1-ttft-vs-prompt.png").stat().st_size > 10_000
    assert "| fig1 | tiny-llama | full | 4 |" in (tmp_path / "report" / "profiler-cost.md").read_text()


def test_a_study_part_runs_end_to_end_on_the_cpu(tmp_path):
    """The smoke form of the InfiniGen breakdown part: its grids, overrides and packing; the report
    draws the breakdown from the packed files alone."""
    assert h200_sweeps.main(["8b-d", "--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "sweeps-8b-d.tar.gz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "unpacked", filter="data")
    assert "fig2-8b/index.json" in names and not any(name.endswith(".arrow") for name in names)
    index = json.loads((tmp_path / "unpacked" / "fig2-8b" / "index.json").read_text())
    assert index["status"] == {"done": 8} and index["model"] == "tiny-llama"  # 2 prompts x 2 batches x 2 repeats
    assert all(run["decode_split_ms"]["step"] > 0 for run in index["runs"])
    assert study_report.main([str(tmp_path / "unpacked" / "fig2-8b"), "-o", str(tmp_path / "report")]) == 0
    assert "| tiny-llama | infinigen | 2 | 64 |" in (tmp_path / "report" / "fig2-infinigen-breakdown.md").read_text()


def test_vllm_study_points_join_figs_1_4_and_5_from_its_json(tmp_path):
    """The H200 sweeps and vLLM's study run as committed: vLLM's medians and rounds in the tables,
    its line in the plots, nothing of it in kvprof's own cost. Fig 5 is read from Fig 4's runs
    (fig5=FOLDER); vLLM's study ran 128 new tokens where the sweep ran 64, so each row says which."""
    results = BENCHMARKS / "results"
    with tarfile.open(results / "h200-sweeps-8b-a.tar.gz") as archive:
        archive.extractall(tmp_path / "sweeps", filter="data")
    vllm_json = results / "h200-vllm-study.json"
    parts = json.loads(vllm_json.read_text())["parts"]
    report = tmp_path / "report"
    fig4_runs = tmp_path / "sweeps" / "fig4-8b"
    assert study_report.main([str(tmp_path / "sweeps" / "fig1-8b"), str(fig4_runs), f"fig5={fig4_runs}",
                              "--vllm-study", str(vllm_json), "--vllm-machine", "NVIDIA H200 (its log)",
                              "-o", str(report)]) == 0

    fig1 = (report / "fig1-ttft-vs-prompt.md").read_text()
    assert "NVIDIA H200 (CUDA 13.0" in fig1 and "vLLM 0.26.0 (h200-vllm-study.json): NVIDIA H200 (its log)" in fig1
    assert "Every point: batch_size 1." in fig1
    for row in parts["ttft"]:
        n = row["rounds"]
        assert (f"| llama-3.1-8b | vllm | {row['prompt_len']} | {row['kvprof_ttft_ms_median']:.4g} no spread kept "
                f"n={n}/{n} |") in fig1
    fig4 = (report / "fig4-throughput-vs-batch.md").read_text()
    fig5 = (report / "fig5-e2e-vs-batch.md").read_text()
    assert "Every point: prompt_len 2048." in fig4 and "| model | strategy | output_len | batch_size |" in fig5
    for row in parts["sweep"]:
        n, key = row["rounds"], f"| llama-3.1-8b | vllm | 128 | {row['batch_size']} |"
        assert (f"{key} {row['kvprof_decode_tokens_per_s']:.4g} no spread kept n={n}/{n} | "
                f"{row['kv_device_peak_bytes'] / 2**30:.4g} no spread kept n={n}/{n} | - |") in fig4
        assert f"{key} {row['kvprof_e2e_ms_median']:.4g} no spread kept n={n}/{n} |" in fig5
    index = json.loads((fig4_runs / "index.json").read_text())
    full_b64 = [run["figures"]["e2e_ms_median"] for run in index["runs"]
                if run["strategy"] == "full" and run["params"]["batch_size"] == 64]
    assert (f"| llama-3.1-8b | full | 64 | 64 | {sorted(full_b64)[1]:.4g} [{min(full_b64):.4g}-{max(full_b64):.4g}] "
            "n=3/3 |") in fig5
    assert "vllm" not in (report / "profiler-cost.md").read_text().lower()
    assert (report / "fig4-throughput-vs-batch.png").stat().st_size > 10_000
    assert (report / "fig5-e2e-vs-batch.png").stat().st_size > 10_000


def test_a_folder_named_for_no_figure_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        study_report.main([f"fig9={tmp_path}", "-o", str(tmp_path / "report")])
    assert exit_.value.code == 2 and "fig9=" in capsys.readouterr().err
