#!/bin/sh
# Fig 8: retention accuracy of early-context facts against the KV budget (real weights: the embedded
# SmolLM2-135M), facts placed at the start of the context. InfiniGen's budget is its fetch cap; H2O's
# is heavy + recent (recent fixed at 5 %, so the heavy axis gives totals of 10 to 100 %).
# Usage: fig8_retention_vs_budget.sh OUT_DIR [kvprof sweep arguments that override these]
set -eu
out=$1; shift
exec kvprof sweep -o "$out" --model smollm2-135m --workload passkey --depth 0.05 \
    --plugin full --plugin h2o --plugin infinigen \
    --opt-grid budget=0.1,0.2,0.4,0.6,0.8,1.0 --opt-grid heavy_ratio=0.05,0.15,0.35,0.55,0.75,0.95 \
    --opt recent_ratio=0.05 --prompt-len 1024,2048 --batch-size 1 --output-len 12 "$@"
