#!/usr/bin/env bash
# On the H200 device machine: unpack parts made by stage.sh into one site folder. One part per
# device call (each call carries one); the folder outlives a call only while the machine stays
# warm, so make the calls back to back (README.md).
#
#     benchmarks/vllm_h200/install.sh .vllm-h200/part-1.tar [more parts]   # idempotent
#     benchmarks/vllm_h200/install.sh --check     # all parts there? vLLM, kvprof and the GPU import?
#     benchmarks/vllm_h200/install.sh --parts     # all parts there? (no imports; after a --check call)
#
# VLLM_SITE (default /tmp/vllm-site) is the site folder, KVPROF_CACHE (default /tmp/kvprof-cache)
# gets the embedded checkpoint's tokenizer. Use them with benchmarks/vllm_h200/env.sh.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
DONE="$VLLM_SITE/.kvprof-parts"
mkdir -p "$VLLM_SITE" "$KVPROF_CACHE" "$DONE"

install_part() {
    local part=$1 work
    work=$(mktemp -d)
    tar -xf "$part" -C "$work"
    cp "$work/parts.txt" "$DONE/parts.txt"
    if [ -f "$work/vllm-py.tar.xz" ]; then
        tar -xJf "$work/vllm-py.tar.xz" -C "$VLLM_SITE"
    fi
    if [ -d "$work/lib" ]; then
        (cd "$work/lib" && find . -name '*.xz' -print) | while read -r lib; do
            mkdir -p "$VLLM_SITE/$(dirname "$lib")"
            xz -dc "$work/lib/$lib" > "$VLLM_SITE/${lib%.xz}"
        done
    fi
    if compgen -G "$work/wheels/*.whl" > /dev/null; then
        # --upgrade: pip replaces what an earlier part left under the same top-level name (bin/).
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$VLLM_SITE" "$work"/wheels/*.whl
    fi
    if [ -f "$work/kvprof-cache.tar.gz" ]; then
        tar -xzf "$work/kvprof-cache.tar.gz" -C "$KVPROF_CACHE"
    fi
    rm -rf "$work"
    touch "$DONE/$(basename "$part")"
    echo "install: $(basename "$part") done ($(du -sh "$VLLM_SITE" | cut -f1) in $VLLM_SITE)"
}

# Every staged part unpacked on this machine (no imports: a few milliseconds).
check_parts() {
    if [ ! -f "$DONE/parts.txt" ]; then
        echo "install: nothing installed in $VLLM_SITE (a fresh machine? start again from part 1)"; return 1
    fi
    local missing=()
    while read -r name; do [ -f "$DONE/$name" ] || missing+=("$name"); done < "$DONE/parts.txt"
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install: missing ${missing[*]} (the machine went back between calls, or a call was skipped)"; return 1
    fi
}

check() {
    check_parts
    # kvprof's plugins register through entry points, so kvprof is installed (editable, no deps).
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO"
    python3 - <<'EOF'
import importlib
import torch, vllm
from vllm.platforms import current_platform
print(f"install: vllm {vllm.__version__}, torch {torch.__version__}, platform {current_platform.device_type}, "
      f"{torch.cuda.get_device_name(0)}")
import vllm._C_stable_libtorch  # noqa: F401  the custom ops
from vllm.vllm_flash_attn import flash_attn_interface as fa
print(f"install: FA3 available {fa.FA3_AVAILABLE} ({fa.FA3_UNAVAILABLE_REASON}); FA2 {fa.FA2_AVAILABLE} (not shipped)")
for lazy in ("flashinfer", "xgrammar", "llguidance"):  # vLLM imports these only where it needs them
    try:
        importlib.import_module(lazy)
        print(f"install: {lazy} imports")
    except Exception as exc:  # reported, not fatal: the benchmark does not use them
        print(f"install: {lazy} does not import: {type(exc).__name__}: {exc}")
# What the engine imports on start-up (engine, GPU model runner, sampler with flashinfer, Llama).
import vllm.model_executor.models.llama, vllm.v1.engine.llm_engine, vllm.v1.sample.sampler  # noqa: E401,F401
import vllm.v1.worker.gpu_model_runner  # noqa: F401
print("install: vLLM's engine, GPU model runner, sampler and Llama import")
from kvprof.plugins import load_plugins
from kvprof_vllm.run import observed_engine  # noqa: F401  imports vLLM's scheduler and engine
assert any(name == "vllm" for name, _ in load_plugins().manager.list_name_plugin()), "kvprof's vllm plugin is not registered"
print("install: kvprof's vllm plugin imports")
EOF
}

if [ "${1:-}" = "--check" ]; then
    check
    exit
fi
if [ "${1:-}" = "--parts" ]; then
    check_parts
    exit
fi
[ $# -gt 0 ] || { echo "usage: $0 PART.tar... | --check | --parts" >&2; exit 2; }
for part in "$@"; do install_part "$part"; done
