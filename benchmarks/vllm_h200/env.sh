# Sourced by install.sh and the run scripts on the H200 machine: where the staged vLLM lives, and how kvprof
# runs it there (offline, in-process).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export VLLM_SITE=${VLLM_SITE:-/tmp/vllm-site}
export KVPROF_CACHE=${KVPROF_CACHE:-/tmp/kvprof-cache}
# vLLM's model-inspection subprocess inherits PYTHONPATH, so it sees the same site folder.
export PYTHONPATH="$VLLM_SITE${PYTHONPATH:+:$PYTHONPATH}"
# No network there: nothing may wait on the hub or on usage reporting.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1

# The start of a run script whose call came after install.sh --check: the parts only, kvprof
# again (its editable install must point at this checkout for its plugins' entry points), and
# the GPU's state, all into the log $1.
prepare_run() {
    "$REPO/benchmarks/vllm_h200/install.sh" --parts 2>&1 | tee "$1"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" 2>&1 | tee -a "$1"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 | tee -a "$1"
}
