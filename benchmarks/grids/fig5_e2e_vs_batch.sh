#!/bin/sh
# Fig 5: end-to-end latency (arrival to last token) against batch size.
# Usage: fig5_e2e_vs_batch.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin vllm --plugin full --plugin h2o --plugin infinigen \
    --prompt-len 2048 --batch-size 1,2,4,8,16,32,64 --output-len 128 --repeats 3 "$@"
