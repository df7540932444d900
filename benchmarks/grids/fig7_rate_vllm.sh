#!/bin/sh
# Request rate: vLLM under Poisson arrivals (TTFT and end-to-end latency against the offered rate).
# Usage: fig7_rate_vllm.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin vllm --prompt-len 2048 --batch-size 64 --output-len 128 --rate 0.5,1,2,4,8,16 "$@"
