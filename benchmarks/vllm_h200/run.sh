#!/usr/bin/env bash
# On the H200 device machine, after install.sh has unpacked every part: kvprof's vLLM benchmark
# (benchmarks/vllm_gpu.py: random-weight Llama-3.1-8B, 8K prompts, batch 1 and 16, 32 new tokens,
# kvprof's TTFT against vLLM's, overhead on/off), figures and log into $OUT (or the first argument).
#
#     benchmarks/vllm_h200/run.sh                          # TRITON_ATTN, as seen to work
#     ATTENTION_BACKEND=FLASH_ATTN benchmarks/vllm_h200/run.sh --repeats 3   # vLLM's Hopper default (FA3)
#
# Extra arguments go to vllm_gpu.py. Each of the two engines (plain, kvprof) takes 40 % of the GPU.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
OUT_DIR=${OUT:-${1:?give an output folder or set OUT}}
[ -n "${OUT:-}" ] || shift
mkdir -p "$OUT_DIR"
BACKEND=${ATTENTION_BACKEND:-TRITON_ATTN}
LOG="$OUT_DIR/vllm-h200-$(echo "$BACKEND" | tr 'A-Z_' 'a-z-').log"

"$HERE/install.sh" --check 2>&1 | tee "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
# INFO, so the log shows the attention backend vLLM chose and its compile and graph-capture times.
VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO} python3 "$REPO/benchmarks/vllm_gpu.py" "$OUT_DIR" \
    --opt "attention_backend=$BACKEND" --opt gpu_memory_utilization=0.4 "$@" 2>&1 | tee -a "$LOG"
