#!/bin/sh
# Fig 1: time to first token against prompt length, batch 1, for every strategy.
# Usage: fig1_ttft_vs_prompt.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin vllm --plugin full --plugin offload --plugin h2o --plugin infinigen \
    --prompt-len 1024,2048,4096,8192,16384,32768 --batch-size 1 --output-len 32 --repeats 3 "$@"
