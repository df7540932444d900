#!/bin/sh
# Fig 4: decode throughput and memory efficiency (tokens/s per device-KV GB and per total-KV GB)
# against batch size.
# Usage: fig4_throughput_vs_batch.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin vllm --plugin full --plugin offload --plugin h2o --plugin infinigen \
    --prompt-len 2048 --batch-size 1,2,4,8,16,32,64 --output-len 64 --repeats 3 "$@"
