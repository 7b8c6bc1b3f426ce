#!/usr/bin/env bash
# Every GPU check of the fused backends in one call on one H100/H200 (issue 18), from the repository
# root, meant to finish within 7 minutes (each step has its own time limit):
#
#   bash scripts/gpu_check.sh
#
# 1. tests (<= 150 s): the GPU tests of a representative subset of the backend grid, triton in bf16
#    and fp16 and flex in bf16: both modes, masks, GQA, L < S, windows, odd head dims, lengths
#    divisible by 16 and not; the long-sequence, auto and B * H > 65535 tests of test_triton.py;
# 2. benchmark (<= 270 s): benchmarks/gpu.py gates bf16 at S = 16384 against the float32 torch
#    backend, then times triton against flex (and dense cuDNN SDPA at 16k only) at 16k, 64k and
#    128k, forward and forward+backward, both modes, b = 128, writing its JSON after every row;
# 3. decode (<= 60 s): benchmarks/bench_decode.py's step at a 128k context (needs transformers).
#
# Nothing is installed: python3 there must have torch, triton and pytest (pytest-xdist spreads the
# kernels' compilation over the cores); globalattn runs from src/.  Output goes to $OUT when set
# (the device tool's folder), else to benchmarks/results/.  A step that fails or runs out of time
# is reported and the next one runs; the exit status is the first failure's.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code"
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
subset='test_realistic or test_more_batch or test_auto or (test_backends and ((triton and (bf16 or f16)) or (flex and bf16)) and (mask_random or Hkv1 or L100 or w40 or D59 or L1-))'
step gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider $workers tests/test_triton.py tests/test_backends.py -k "$subset"
step gpu-bench 270 python3 benchmarks/gpu.py --seq 16384 65536 131072 --contenders triton flex sdpa-cudnn \
  --dense-max 16384 --passes fwd fwd+bwd --gate-seq 16384 --gate-reference torch --rounds 2 --budget-s 220 --out "$out"
if python3 -c "import transformers" 2>/dev/null; then
  step gpu-decode 60 python3 benchmarks/bench_decode.py --device cuda --contexts 131072 --rounds 2 --out "$out/decode-cuda.json"
else
  echo "== gpu-decode: skipped (transformers is not installed)"
fi
exit $status
