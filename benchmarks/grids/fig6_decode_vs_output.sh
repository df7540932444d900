#!/bin/sh
# Fig 6: decode time against output length at a 10K-token input, batch 1.
# Usage: fig6_decode_vs_output.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin full --plugin h2o --plugin infinigen \
    --prompt-len 10240 --batch-size 1 --output-len 128,256,512,1024 --repeats 3 "$@"
