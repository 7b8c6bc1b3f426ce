#!/usr/bin/env bash
# The GPU checks of the fused backends (issue #4), on one H100/H200, from the repository root:
#
#   bash scripts/gpu_check.sh tests   # the CUDA variants of the backend tests: triton, flex, torch, reference
#   bash scripts/gpu_check.sh bench   # benchmarks/gpu.py (about 5 minutes); JSON and log to $OUT
#
# Nothing is installed: python3 there must have torch, triton and pytest (pytest-xdist spreads the
# kernels' compilation over the cores); globalattn runs from src/.  Output goes to $OUT when set
# (the device tool's folder), else to benchmarks/results/.
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
case "${1:-}" in
  tests)
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    set -o pipefail
    python3 -m pytest -q -m gpu -p no:cacheprovider $workers \
      tests/test_triton.py tests/test_flex.py tests/test_backends.py 2>&1 | tee "$out/gpu-tests.log"
    ;;
  bench)
    set -o pipefail
    python3 benchmarks/gpu.py --out "$out" 2>&1 | tee "$out/gpu-bench.log"
    ;;
  *)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
