#!/usr/bin/env bash
# One device call: build the CUDA extension, run the GPU kernel tests, the kernel benchmark and a
# compute-sanitizer memcheck pass. Logs and results go to $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONPATH=. PYTHONUNBUFFERED=1 QUANTSERVE_EXT_DIR=${QUANTSERVE_EXT_DIR:-/tmp/quantserve-ext}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$(date +%s)
python3 -c "
import time, torch; t=time.time()
from quant.backends import cuda
m = cuda.extension(); print('built quantserve_cuda in %.0f s' % (time.time()-t), torch.__version__)
" 2>&1 | tail -20 | tee "$OUT/build.log"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/kernels -k "not every_cu_file" \
  2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-260} python3 bench/kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
left=$(( ${TOTAL:-560} - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  timeout "$left" compute-sanitizer --tool memcheck --print-limit 20 python3 -m tests.kernels.sanitize_cuda \
    > "$OUT/sanitize.log" 2>&1
  echo "sanitizer rc=$? (124 = ran out of time)"; grep -E "ERROR SUMMARY|sanitize cases|WRONG" "$OUT/sanitize.log" | head
fi
