#!/usr/bin/env bash
# Every GPU check in one command: the thin wrapper around gpu_check.py,
# whose docstring says what it runs, records and costs.
#
#   bash benchmarks/gpu_check.sh [--output gpu_check.json] [--only pretrain,squad]
#       on the GPU machine, from any directory (--output is relative to it); without a GPU:
#       one line, nothing written, exit 0
#   bash benchmarks/gpu_check.sh --fetch-deps
#       here, where PyPI is reachable: fills .gpu_check_deps/ (~0.1 MB; git-ignored) with what
#       a bare torch + transformers GPU image lacks, for the copy of the repository that goes
#       to the GPU machine:
#         wheels/  crc32c for that machine's Python (GPU_PYTHON_VERSION, default 3.12): every
#                  TFRecord read or write (the CUDA tests and the NCCL test write shards)
#       (The default bert-base-uncased vocab ships in src/bertforge/assets: nothing to fetch.)
# Serving through Triton also needs `pip install 'bertforge[serve]'` (PyTriton's wheel alone is
# 55 MB, with numpy<2); without it the serve check measures the in-process serving engine.
#
# bertforge runs from src/ (PYTHONPATH), so nothing is installed into the GPU machine's Python
# (no `pip install -e .`); the fetched wheels go to /tmp/gpu_check_site.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python || command -v python3)}
deps=$root/.gpu_check_deps

if [[ "${1:-}" == "--fetch-deps" ]]; then
    rm -rf "$deps"
    mkdir -p "$deps/wheels"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d "$deps/wheels" crc32c
    echo "gpu_check: wrote $deps/ ($(du -sh "$deps" | cut -f1)); carry it with the repository"
    exit 0
fi

if [[ -d "$deps" ]] && command -v nvidia-smi >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
        --target /tmp/gpu_check_site "$deps"/wheels/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
