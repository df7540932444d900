#!/usr/bin/env bash
# Prepares vLLM 0.26.0 for the H200 device machine, which reaches no package index: downloads the
# vLLM wheel and the pinned wheels (requirements.txt), keeps the parts of vLLM that a dense model
# needs (shared/reference/vllm-h200.md), and packs everything into parts under 60 MiB, one per
# device call (a call carries at most 64 MiB). Run here, on an x86-64 machine with pip and the
# package index, from anywhere:
#
#     benchmarks/vllm_h200/stage.sh            # -> .vllm-h200/part-N.tar (+ parts.txt), in the repo root
#
# Idempotent: the vLLM wheel (304 MB) is downloaded once into .vllm-h200/download/; everything else
# is rebuilt. .vllm-h200/ is ignored by git. Environment: PYTHON (default python3) runs pip and the
# packer; KVPROF_PYTHON (default: the repo's .venv, else python3) finds the embedded SmolLM2
# checkpoint whose tokenizer the random-weight alias borrows; VLLM_H200_DIR moves the output.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DEST=${VLLM_H200_DIR:-$REPO/.vllm-h200}
PYTHON=${PYTHON:-python3}
if [ -z "${KVPROF_PYTHON:-}" ]; then
    KVPROF_PYTHON=python3
    for venv in "$REPO/.venv" "$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../.venv"; do
        if [ -x "$venv/bin/python" ]; then KVPROF_PYTHON=$venv/bin/python; break; fi
    done
fi
VLLM_VERSION=0.26.0
# A device call carries the working tree (about 2 MiB) and one part: at most 64 MiB together.
PART_MIB=${PART_MIB:-60}

# The wheels the machine can use: CPython 3.12 on x86-64 Linux (see the device README).
download() {
    local into=$1; shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$into" "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

mkdir -p "$DEST/download"
echo "stage: vllm==$VLLM_VERSION"
download "$DEST/download" "vllm==$VLLM_VERSION"
WHEEL=$(ls "$DEST"/download/vllm-"$VLLM_VERSION"-*.whl)

BUILD="$DEST/build"
rm -rf "$BUILD" "$DEST"/part-*.tar "$DEST/parts.txt"
mkdir -p "$BUILD/items/wheels" "$BUILD/items/lib" "$BUILD/vllm-site" "$BUILD/kvprof-cache"
echo "stage: the pinned wheels ($(grep -c '==' "$HERE/requirements.txt"))"
download "$BUILD/items/wheels" -r "$HERE/requirements.txt"

# From the vLLM wheel: every Python file (the header trees under third_party/ are not needed), the
# small data files vLLM reads (chat templates, kernel configs), its metadata, and the compiled
# libraries a dense model on Hopper loads. Left out: the FA2 library (305 MB), _moe_C, flashmla,
# deep_gemm, qutlass, the Rust tool parser and vllm-rs (serving).
echo "stage: vLLM's Python files and libraries"
"$PYTHON" - "$WHEEL" "$BUILD" <<'EOF'
import lzma, shutil, sys, zipfile
from pathlib import Path

wheel, build = sys.argv[1], Path(sys.argv[2])
LIBRARIES = {"vllm/_C_stable_libtorch.abi3.so",           # vLLM's custom ops
             "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",  # imported by the Llama model file
             "vllm/cumem_allocator.abi3.so", "vllm/spinloop.abi3.so", "vllm/fs_io_C.abi3.so"}  # small

def kept(name: str) -> bool:
    if name.startswith("vllm/third_party/"):
        return name.endswith(".py")
    return name.endswith((".py", ".json", ".jinja", ".typed", ".sh")) or ".dist-info/" in name

with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        if info.is_dir():
            continue
        if info.filename in LIBRARIES:
            target = build / "items" / "lib" / (info.filename + ".xz")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, lzma.open(target, "wb", preset=9) as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        elif kept(info.filename):
            archive.extract(info, build / "vllm-site")
EOF
tar -C "$BUILD/vllm-site" -cJf "$BUILD/items/vllm-py.tar.xz" .

# The random-weight alias borrows the embedded SmolLM2 checkpoint's tokenizer (kvprof.models); the
# machine gets that folder without its weights, as $KVPROF_CACHE/models/smollm2-135m.
echo "stage: the embedded checkpoint's tokenizer"
EMBEDDED=$(cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$KVPROF_PYTHON" -c \
    "from kvprof.models import embedded_checkpoint; print(embedded_checkpoint())")
mkdir -p "$BUILD/kvprof-cache/models/smollm2-135m"
find "$EMBEDDED" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$BUILD/kvprof-cache/models/smollm2-135m/" \;
tar -C "$BUILD/kvprof-cache" -czf "$BUILD/items/kvprof-cache.tar.gz" .

# Pack into as few parts as first-fit (largest first) needs, then spread the files over that many
# parts evenly (largest first, each into the emptiest part), so every part leaves the tree the same
# room. Tar adds 512 bytes a member and rounds the archive to 10 KiB. Every part lists all parts, so
# install.sh can say which are missing.
echo "stage: packing into parts under $PART_MIB MiB"
"$PYTHON" - "$BUILD/items" "$DEST" "$PART_MIB" <<'EOF'
import hashlib, sys, tarfile
from pathlib import Path

items, dest, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) << 20
files = sorted((p for p in items.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)
room = limit - 64 * 1024


def first_fit() -> list[list[Path]]:
    parts, sizes = [], []
    for path in files:
        need = path.stat().st_size + 1024
        if need > room:
            sys.exit(f"{path.name} alone is {need >> 20} MiB, over the {limit >> 20} MiB part limit")
        index = next((i for i, size in enumerate(sizes) if size + need <= room), None)
        if index is None:
            parts.append([])
            sizes.append(0)
            index = len(parts) - 1
        parts[index].append(path)
        sizes[index] += need
    return parts


def even(count: int) -> tuple[list[list[Path]], list[int]]:
    parts, sizes = [[] for _ in range(count)], [0] * count
    for path in files:
        index = sizes.index(min(sizes))
        parts[index].append(path)
        sizes[index] += path.stat().st_size + 1024
    return parts, sizes


parts = first_fit()
spread, sizes = even(len(parts))
if max(sizes) <= room:
    parts = spread
names = [f"part-{index + 1}.tar" for index in range(len(parts))]
listing = dest / "parts.txt"
listing.write_text("".join(f"{name}\n" for name in names))
for name, members in zip(names, parts):
    with tarfile.open(dest / name, "w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(listing, arcname="parts.txt")
        for path in members:
            archive.add(path, arcname=str(path.relative_to(items)))
    data = (dest / name).read_bytes()
    print(f"{name}: {len(data) / 2**20:.1f} MiB sha256 {hashlib.sha256(data).hexdigest()[:16]}: "
          + ", ".join(str(p.relative_to(items)) for p in members[:6]) + (f" and {len(members) - 6} more" if len(members) > 6 else ""))
EOF
rm -rf "$BUILD"
echo "stage: done; device calls: benchmarks/vllm_h200/README.md"
