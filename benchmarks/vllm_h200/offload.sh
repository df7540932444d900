#!/usr/bin/env bash
# On the H200 device machine, after install.sh has unpacked every part (and --check has run):
# vLLM's KV offloading connector under kvprof (benchmarks/vllm_offload.py: random-weight
# Llama-3.1-8B, 8 x 4K prompts, a 10 GiB CPU tier; per round the batch cold, then again from the
# CPU tier after the GPU prefix cache is reset), into $OUT (or the first argument):
# vllm-h200-offload.log, vllm-offload.json and the last round's two kvprof traces.
#
#     benchmarks/vllm_h200/offload.sh                          # one device call of at most 600 s
#     benchmarks/vllm_h200/offload.sh --rounds 5 --offload-gib 16
#
# Extra arguments go to vllm_offload.py. The engine gets a fixed 8 GiB of GPU KV (65,536 tokens at
# 128 KiB; the batch needs 33,280); gpu_memory_utilization only has to pass vLLM's start-up check.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
OUT_DIR=${OUT:-${1:?give an output folder or set OUT}}
[ -n "${OUT:-}" ] || shift
mkdir -p "$OUT_DIR"
BACKEND=${ATTENTION_BACKEND:-TRITON_ATTN}
LOG="$OUT_DIR/vllm-h200-offload.log"

prepare_run "$LOG"
free -g 2>&1 | tee -a "$LOG"
VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO} python3 "$REPO/benchmarks/vllm_offload.py" "$OUT_DIR" \
    --deadline-s "${DEADLINE_S:-480}" --opt "attention_backend=$BACKEND" \
    --opt kv_cache_memory_bytes=8589934592 --opt gpu_memory_utilization=0.5 "$@" 2>&1 | tee -a "$LOG"
