#!/bin/sh
# Fig 2: InfiniGen's decode step broken into speculation, transfer stall, gather, attention and the
# rest, and its device/host memory, against prompt length and batch size (`kvprof analyze` draws the
# breakdown from each trace's phase events; run at --detail layer for per-layer phases).
# Usage: fig2_infinigen_breakdown.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model llama-3.1-8b --weights random --workload synthetic \
    --plugin infinigen --prompt-len 2048,4096,8192,16384,32768 --batch-size 1,4,8 --output-len 32 \
    --repeats 3 "$@"
