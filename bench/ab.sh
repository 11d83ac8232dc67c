#!/usr/bin/env bash
# Same-session A/B of kernel versions: every version is built and benchmarked in one device call,
# rounds alternating (base, new, base, new, ...), because run-to-run spread between machines and
# sessions (1-4% on the decode step) is as large as most kernel changes.
#
# Here (a git checkout):   bench/ab.sh prepare base=HEAD new=WORKTREE [x=<commit>] [p=HEAD@probe=4] ...
#   writes each version's files into ab/<name>/ (WORKTREE: the working tree as it is, uncommitted
#   changes and untracked files that git does not ignore included). ab/ is untracked, so the device call carries it; delete it afterwards.
#   <ref>@probe=<bits>: that version built with the wgmma GEMM's timing probes (csrc/qs_probe.cuh:
#   1 no copies, 2 no widening, 4 no epilogue, 8 no barrier, 16 no reds, 32 no drain, 64 reds only,
#   128 A from shared memory (64-token tiles), 256 one wgmma wait a stage, 512 the drain does not
#   zero what it read, 1024 the drain writes no y, 2048 plain stores where the reds were;
#   wrong results, timing only), e.g. "main=HEAD noepi=HEAD@probe=4 nodrain=HEAD@probe=32".
# On the device:           bench/ab.sh run
#   builds every ab/<name> in parallel (its own extension dir), runs the GPU tests on $TESTV (if
#   set) and compute-sanitizer memcheck on it, then $ROUNDS rounds of bench/kernels.py --backends
#   ours at $MS for every version, then bench/decode.py at $DECODE_BATCH (if set). Prints one line
#   per version and round; logs and result files go to $OUT/ab.tgz.
# Knobs: RUNS (what the rounds time, default every version; an entry may add settings, e.g.
#   RUNS="base new new:QUANTSERVE_TRITON_PDL=0"), BACKENDS (bench/kernels.py --backends, default ours;
#   e.g. ours,ours_asym), MS (1,4,16,32,64,128,256; none: no kernel
#   benchmark), KERNEL_ARGS (more bench/kernels.py arguments, e.g. "--model llama-2-70b --layers 8"),
#   ROUNDS (2), TESTV (a version, or a run with settings: "new:QUANTSERVE_X=0"), TESTS (the test
#   paths, default tests/kernels tests/quant tests/engine), TEST_TIMEOUT (240 s), SANITIZE (0: no memcheck
#   after the tests), DECODE_BATCH (unset: no decode runs; e.g. "1 16 64"; each line shows the wall-clock
#   tok/s and step and the step's GPU time, "gpu": compare versions on that one),
#   DECODE_ARGS (more bench/decode.py arguments, e.g. "--desc-act"), PYSITE (where the carried
#   .whl wheels are installed, /tmp/site). Carry .whl and .cache/test/smollm2-tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
  rm -rf ab && mkdir -p ab
  for spec in "$@"; do
    local name=${spec%%=*} ref=${spec#*=} probe=""
    case $ref in *@probe=*) probe=${ref##*@probe=}; ref=${ref%@probe=*} ;; esac
    mkdir -p "ab/$name"
    if [ "$ref" = WORKTREE ]; then
      git ls-files -z --cached --others --exclude-standard -- . ':!ab' | xargs -0 -I{} cp --parents {} "ab/$name/"
    else
      git archive "$ref" | tar -x -C "ab/$name"
    fi
    if [ -n "$probe" ]; then
      sed -i "s/^#define QS_PROBE 0$/#define QS_PROBE $probe/" "ab/$name/csrc/qs_probe.cuh"
      grep -q "^#define QS_PROBE $probe$" "ab/$name/csrc/qs_probe.cuh" || { echo "no probe hook in $ref" >&2; exit 1; }
    fi
    echo "ab/$name <- $ref${probe:+ (probe $probe)}"
  done
}

# A run is a version, optionally with environment settings: "new" or "new:QUANTSERVE_X=0,QUANTSERVE_Y=1"
# (the same build, another setting: no second build).
run_env() { case $1 in *:*) echo "${1#*:}" | tr ',' ' ' ;; *) echo "AB_RUN=1" ;; esac; }
run_label() { echo "$1" | tr ':=,' '---'; }

run() {
  local out=${OUT:-/tmp/ab-out} site=${PYSITE:-/tmp/site} t0
  local versions
  versions=$(cd ab && ls -d */ | tr -d /)
  mkdir -p "$out/ab"
  t0=$(date +%s)
  # The device image lacks the server's pure-Python deps (fastapi, gguf, ...): carried wheels.
  if [ -d .whl ] && [ ! -d "$site" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl >/dev/null 2>&1
  fi
  nvidia-smi --query-gpu=name --format=csv,noheader
  # The tests' tokenizer fixture (carried; the device cannot fetch the default model's package).
  for v in $versions; do
    if [ -d .cache/test/smollm2-tokenizer ] && [ ! -d "ab/$v/.cache/test/smollm2-tokenizer" ]; then
      mkdir -p "ab/$v/.cache/test" && cp -r .cache/test/smollm2-tokenizer "ab/$v/.cache/test/"
    fi
  done
  for v in $versions; do
    (cd "ab/$v" && PYTHONPATH=$site:. QUANTSERVE_EXT_DIR=/tmp/ab-ext-$v python3 -c \
      "from quant.backends import cuda; cuda.extension(); print('built $v')" >"$out/ab/build-$v.log" 2>&1) &
  done
  wait
  tail -qn1 "$out"/ab/build-*.log
  echo "builds $(($(date +%s) - t0)) s"
  if [ -n "${TESTV:-}" ]; then
    local tv=${TESTV%%:*} tenv
    tenv=$(run_env "$TESTV")
    # shellcheck disable=SC2086  # tenv and TESTS are word lists
    (cd "ab/$tv" && export PYTHONPATH=$site:. QUANTSERVE_EXT_DIR=/tmp/ab-ext-$tv &&
      env $tenv timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu \
        ${TESTS:-tests/kernels tests/quant tests/engine} -k "not every_cu_file" >"$out/ab/tests.log" 2>&1
      tail -1 "$out/ab/tests.log"; grep -E "^(FAILED|ERROR)" "$out/ab/tests.log" | head -5
      if [ "${SANITIZE:-1}" != 0 ]; then
        env $tenv timeout 150 compute-sanitizer --tool memcheck --print-limit 20 python3 -m tests.kernels.sanitize_cuda \
          >"$out/ab/sanitize.log" 2>&1
        echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY' "$out/ab/sanitize.log" | head -1)"
      fi)
    echo "tests $(($(date +%s) - t0)) s"
  fi
  for round in $(seq "${ROUNDS:-2}"); do
    [ "${MS:-}" = none ] && break
    for run in ${RUNS:-$versions}; do
      local v=${run%%:*} env label
      env=$(run_env "$run"); label=$(run_label "$run")
      # shellcheck disable=SC2086  # env and KERNEL_ARGS are word lists
      (cd "ab/$v" && mkdir -p "$out/ab/$label-$round" && env $env PYTHONPATH=$site:. QUANTSERVE_EXT_DIR=/tmp/ab-ext-$v \
        timeout 150 python3 bench/kernels.py --backends "${BACKENDS:-ours}" --ms "${MS:-1,4,16,32,64,128,256}" --no-extras \
        ${KERNEL_ARGS:-} --out "$out/ab/$label-$round" >"$out/ab/bench-$label-$round.log" 2>&1)
      echo "$run r$round: $(grep -E '^ours[a-z_]* +m=' "$out/ab/bench-$label-$round.log" | sed -E 's/^ours +//; s/ +/ /g; s/ step//' | tr '\n' ';')"
    done
  done
  echo "bench $(($(date +%s) - t0)) s"
  if [ -n "${DECODE_BATCH:-}" ]; then
    for round in $(seq "${ROUNDS:-2}"); do
      for run in ${RUNS:-$versions}; do
        local v=${run%%:*} env label
        env=$(run_env "$run"); label=$(run_label "$run")
        # shellcheck disable=SC2086  # DECODE_BATCH, DECODE_ARGS and env are word lists
        (cd "ab/$v" && env $env PYTHONPATH=$site:. QUANTSERVE_EXT_DIR=/tmp/ab-ext-$v timeout 200 python3 bench/decode.py \
          --batch $DECODE_BATCH --steps 64 --kv-gb 20 --no-fp16 ${DECODE_ARGS:-} --tag "ab-$label-$round" \
          >"$out/ab/decode-$label-$round.log" 2>&1
          cp bench/results/decode-*"ab-$label-$round"*.json "$out/ab/" 2>/dev/null)
        echo "$run r$round: $(grep -E 'tok/s' "$out/ab/decode-$label-$round.log" | sed -E 's/ +/ /g; s/ roofline.*//' | tr '\n' ';')"
      done
    done
  fi
  echo "total $(($(date +%s) - t0)) s"
  (cd "$out" && tar czf ab.tgz ab && rm -rf ab)
}

case ${1:-} in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) echo "usage: bench/ab.sh prepare name=<commit|WORKTREE> ... | bench/ab.sh run" >&2; exit 2 ;;
esac
