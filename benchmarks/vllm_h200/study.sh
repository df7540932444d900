#!/usr/bin/env bash
# On the H200 device machine, after install.sh has unpacked every part (and --check has run): the
# study's vLLM points in one process (benchmarks/vllm_study.py: TTFT against prompt length 1K-16K,
# decode throughput, memory and latency against batch 1-64 at 2K, Poisson arrivals at 1, 4, 16
# requests/s, kvprof's overhead at batch 32, batch-16 decode alone at 8K), into $OUT (or the first
# argument): vllm-h200-study.log, vllm-study.json and two kvprof traces.
#
#     benchmarks/vllm_h200/study.sh                       # one device call of at most 600 s
#     benchmarks/vllm_h200/study.sh --parts ttft,sweep --set sweep_rounds=3
#
# Extra arguments go to vllm_study.py. Each of the two engines (plain, kvprof) gets a fixed 24 GiB
# of KV cache (196,608 tokens at 128 KiB: batch 64 x 2,176 tokens needs 139,264), so neither
# depends on vLLM's memory profile of a 131,072-token step; gpu_memory_utilization only has to pass
# vLLM's start-up check (that much free memory when each engine starts). The script stops starting
# points after DEADLINE_S seconds (default 500) and writes its JSON after every point.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
OUT_DIR=${OUT:-${1:?give an output folder or set OUT}}
[ -n "${OUT:-}" ] || shift
mkdir -p "$OUT_DIR"
BACKEND=${ATTENTION_BACKEND:-TRITON_ATTN}
LOG="$OUT_DIR/vllm-h200-study.log"

prepare_run "$LOG"
VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO} python3 "$REPO/benchmarks/vllm_study.py" "$OUT_DIR" \
    --deadline-s "${DEADLINE_S:-500}" --opt "attention_backend=$BACKEND" \
    --opt kv_cache_memory_bytes=25769803776 --opt gpu_memory_utilization=0.3 "$@" 2>&1 | tee -a "$LOG"
