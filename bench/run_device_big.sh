#!/usr/bin/env bash
# Device calls for the big-model and serving benchmarks (issue: big models on one GPU; engine).
#   bench/run_device_big.sh tests      build the CUDA extension, run every GPU-marked test
#   bench/run_device_big.sh quantize   bench/quantize.py: GPTQ 4-bit g128 of the Llama-2-7B shape
#   bench/run_device_big.sh decode70   bench/decode.py on the Llama-2-70B shape, batch 1 and 16
#   bench/run_device_big.sh serving    bench/serving.py against live dummy-weight servers (7B, 70B;
#                                      serving7 / serving70 for one of them)
# Several phases may be given in one call. Logs and new result files go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/quantserve-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}:. PYTHONUNBUFFERED=1
export QUANTSERVE_EXT_DIR=${QUANTSERVE_EXT_DIR:-$PWD/.kw-ext}
touch /tmp/.bench-start
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TOK=.cache/test/smollm2-tokenizer

for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    tests)
      python3 -c "import time; t=time.time(); from quant.backends import cuda; cuda.extension(); print('extension ready in %.0f s' % (time.time()-t))" 2>&1 | tail -5
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/quant tests/engine \
        -k "not every_cu_file" 2>&1 | tee "$OUT/gpu-tests.log" | tail -8 ;;
    quantize)
      timeout ${QUANT_TIMEOUT:-420} python3 -m bench.quantize --preset llama-2-7b --num-samples 128 \
        --seq-len 2048 --group-size 128 2>&1 | tr '\r' '\n' | grep -v 'layer/s' | tee "$OUT/quantize.log" | tail -6 ;;
    decode70)
      timeout ${DECODE_TIMEOUT:-300} python3 -m bench.decode --preset llama-2-70b --batch 1 16 \
        --no-fp16 --kv-gb 8 2>&1 | tee "$OUT/decode70.log" | tail -12 ;;
    serving|serving7)
      timeout ${SERVE_TIMEOUT:-260} python3 -m bench.serving --tag llama-2-7b-dummy --duration 15 \
        --concurrency 1 4 16 64 128 --server-args "--model llama-2-7b --load-format dummy \
        --quantize-group-size 128 --tokenizer $TOK --max-model-len 2048" 2>&1 \
        | tee "$OUT/serving7.log" | tail -10
      [ "$phase" = serving7 ] && continue ;&
    serving70)
      timeout ${SERVE70_TIMEOUT:-200} python3 -m bench.serving --tag llama-2-70b-dummy --duration 20 \
        --concurrency 1 64 --server-args "--model llama-2-70b --load-format dummy \
        --quantize-group-size 128 --tokenizer $TOK --max-model-len 2048" 2>&1 \
        | tee "$OUT/serving70.log" | tail -10 ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
find bench/results -type f -newer /tmp/.bench-start -exec cp {} "$OUT/" \;
ls "$OUT"
