#!/bin/sh
# The H200 runs behind RESULTS.md and the fast-engine issues, in device-call sized parts.
# Each part writes logs and JSON (never traces: the device tool returns at most 8 files) to $OUT.
#
#   part engine     ~2 min: the fast engine against the harness, overhead, offload (engine_gpu.py)
#   part h2o        ~3 min: H2O fast vs eager check, the prefill-mass kernels, b1 and b16 (h2o_gpu.py)
#   part infinigen  ~5 min: InfiniGen, offload (both modes, both engines) at 8K and 32K, b1 and b8
#
# Usage on the device machine, from the repository root (carry .device/kvcache, the tokenizer-only
# cache made from ~/.cache/kvprof/models/smollm2-135m without model.safetensors):
#   sh benchmarks/h200_session.sh engine h2o        (one call)
#   sh benchmarks/h200_session.sh infinigen         (a second call)
set -u
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
        *) echo "unknown part: $part" >&2; exit 2 ;;
    esac
    echo "$part: rc=$rc"
done
