#!/bin/sh
# The H200 runs behind RESULTS.md and the fast-engine issues, in device-call sized parts.
# Each part writes logs and JSON (never traces: the device tool returns at most 8 files) to $OUT.
#
#   part engine     ~2 min: the fast engine against the harness, overhead, offload (engine_gpu.py)
#   part h2o        ~3 min: H2O fast vs eager check, the prefill-mass kernels, b1 and b16 (h2o_gpu.py)
#   part infinigen  ~5 min: InfiniGen, offload (both modes, both engines) at 8K and 32K, b1 and b8
#   part infinigen-8k ~2 min: InfiniGen and full at 8K x 1 with the checks
#   part infinigen-spec ~2 min: speculation's cost to the step, four ways (infinigen_spec.py, 8K x 1)
#   part events     ~20 s: the host's cost per evict event, batches against one by one (event_batch_cost.py)
#   part weights    moves the carried parts of SmolLM2's real weights (.device/weights/) to /tmp
#   part retention  ~5 min: joins the weight parts and runs Figure 8's grid (retention_grid.py, cuda)
#   part sweep-8b-a .. sweep-8b-d, sweep-13b-a, sweep-13b-b   ~4-8 min each: the study's grids
#                   (benchmarks/grids/) by `kvprof sweep`, one part per call (h200_sweeps.py --list
#                   prints each part's grids and estimate); $OUT gets sweeps-<part>.tar.gz (each
#                   folder's index.json and result files) and its log; call a part again while the
#                   machine is warm to resume what its deadline cut off. `sweep-smoke-<part>`: the
#                   same part with the tiny model on the GPU (a minute), to check before the real one.
#
# SmolLM2's weights (269 MB) do not fit one call (64 MiB): `sh benchmarks/h200_session.sh pack` here
# makes .device/weights/part-* (xz, under 56 MiB each) and their checksum; carry one part per call
# and run `weights` in each, back to back (the machine keeps /tmp only while warm), then `retention`.
#
# Usage on the device machine, from the repository root (carry .device/kvcache, the tokenizer-only
# cache made from ~/.cache/kvprof/models/smollm2-135m without model.safetensors):
#   sh benchmarks/h200_session.sh engine h2o        (one call)
#   sh benchmarks/h200_session.sh infinigen         (a second call)
set -u
WEIGHTS=/tmp/kvprof-weights
if [ "${1:-}" = pack ]; then  # here, not on the device machine
    source=${KVPROF_CACHE:-$HOME/.cache/kvprof}/models/smollm2-135m
    mkdir -p .device/weights && rm -f .device/weights/*
    xz -9 -T2 -c "$source/model.safetensors" | split -b 56M - .device/weights/part-
    (cd "$source" && sha256sum model.safetensors) > .device/weights/sha256
    ls -l .device/weights; exit 0
fi
: "${OUT:?set OUT to the folder that comes back}"
export KVPROF_CACHE="${KVPROF_CACHE:-$PWD/.device/kvcache}" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
for part in "$@"; do
    case $part in
        engine)
            python3 benchmarks/engine_gpu.py /tmp/kvprof-engine > "$OUT/engine.log" 2>&1; rc=$?
            cp /tmp/kvprof-engine/engine.json "$OUT/" ;;
        h2o)
            python3 benchmarks/h2o_gpu.py /tmp/kvprof-h2o > "$OUT/h2o.log" 2>&1; rc=$?
            cp /tmp/kvprof-h2o/h2o.json "$OUT/" ;;
        infinigen)
            python3 benchmarks/infinigen_gpu.py /tmp/kvprof-infinigen --eager-offload \
                --configs 8192x1,32768x1,8192x8,32768x8 > "$OUT/infinigen.log" 2>&1; rc=$?
            cp /tmp/kvprof-infinigen/figures.json "$OUT/infinigen.json" ;;
        infinigen-8k)
            python3 benchmarks/infinigen_gpu.py /tmp/kvprof-infinigen-8k --configs 8192x1 --runs full,infinigen \
                > "$OUT/infinigen-8k.log" 2>&1; rc=$?
            cp /tmp/kvprof-infinigen-8k/figures.json "$OUT/infinigen-8k.json" ;;
        infinigen-spec)
            python3 benchmarks/infinigen_spec.py /tmp/kvprof-infinigen-spec > "$OUT/infinigen-spec.log" 2>&1; rc=$?
            cp /tmp/kvprof-infinigen-spec/infinigen-spec.json "$OUT/" ;;
        events)
            python3 benchmarks/event_batch_cost.py > "$OUT/events.log" 2>&1; rc=$? ;;
        weights)
            mkdir -p $WEIGHTS && cp .device/weights/* $WEIGHTS/; rc=$?
            ls -l $WEIGHTS ;;
        retention)
            cache=/tmp/kvprof-retention-cache; model=$cache/models/smollm2-135m
            mkdir -p $model && cp .device/kvcache/models/smollm2-135m/* $model/ &&
                cat $WEIGHTS/part-* | xz -d > $model/model.safetensors &&
                (cd $model && sha256sum -c $WEIGHTS/sha256) || { echo "retention: weights incomplete"; exit 1; }
            for action in run report; do
                KVPROF_CACHE=$cache python3 benchmarks/retention_grid.py $action --device cuda --batch-size 20 \
                    --traces /tmp/kvprof-retention
            done > "$OUT/retention.log" 2>&1; rc=$?
            cp benchmarks/results/h200-retention-grid.* "$OUT/" ;;
        sweep-smoke-*)
            python3 benchmarks/h200_sweeps.py "${part#sweep-smoke-}" --smoke --device cuda \
                --work /tmp/kvprof-sweeps-smoke --out "$OUT/smoke"; rc=$? ;;
        sweep-*)
            python3 benchmarks/h200_sweeps.py "${part#sweep-}" --work /tmp/kvprof-sweeps --out "$OUT"; rc=$? ;;
        *) echo "unknown part: $part" >&2; exit 2 ;;
    esac
    echo "$part: rc=$rc"
done
