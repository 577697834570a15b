#!/usr/bin/env bash
# The whole GPU run of the speed benchmark, one command (run from the repository root on the GPU machine,
# with the wheels of .whl/ carried along: liger-kernel, see the Speed section of docs/results.md):
#
#   CGGR_GIT_REV=<rev> bash benchmarks/gpu_run.sh
#
# The wheel is fetched once on a machine with the package index (.whl/ is git-ignored; Liger needs only torch
# and triton, which the GPU machine has):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform any -d .whl liger-kernel==0.8.5
#
# 1. installs the carried wheels into /tmp/site (no index, no dependencies: the machine has torch and triton);
# 2. runs tests/test_cuda.py with compiled Triton (TRITON_INTERPRET=0);
# 3. runs benchmarks/speed.py at 350M (16x1024) and 1B (8x2048), one process per arm, 12 timed steps after 6
#    untimed ones, most important arms first: the dense baselines and cggr on both models, then the other
#    routed arms; every arm with its per-phase times, both models' arms profiled (kernel tables and device time
#    by kind of kernel). The JSON is rewritten after every arm, so a stop at the time limit keeps what was measured.
#    Run it with nothing else on the host: at 350M and below the routed step is bound by the host;
# 4. with ROWS_AB=1, after the budget: the CGGR_ROW_KERNELS A/B (tests, benchmarks/rows.py, and the routed arms
#    timed again with CGGR_ROW_KERNELS=inductor, the pieces Inductor compiles, into $OUT/rows-inductor);
# 5. prints a short table last;
# 6. with PACK=1, packs $OUT into $OUT/gpu-results.tgz (for runners that return few files).
#
# Results go to $OUT (default ./gpu-out). The run stops itself after $BUDGET_S seconds (default 480 s; the CUDA tests get at
# most 120 s of it). Estimated from the step times in docs/results.md (350M ~150 ms, 1B ~250 ms), ~10 s to start each
# arm's process, and 30-60 s of compilation in each compiled arm: the first tier takes about 250 s.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"

# shellcheck source=benchmarks/gpu_wheels.sh
source "$(dirname "$0")/gpu_wheels.sh"
python3 - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())
for d in ("transformers", "triton", "liger-kernel"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, "not installed")
PY

echo "== CUDA tests (log: \$OUT/test_cuda.log)"
TRITON_INTERPRET=0 timeout ${TESTS_S:-150} python3 -m pytest tests/test_cuda.py tests/test_compact.py tests/test_gate.py \
  tests/test_loss.py -q -p no:cacheprovider -rfs -k "cuda or gpu or realistic or triton or CUDA" > "$OUT/test_cuda.log" 2>&1
echo "exit $?"; tail -n 12 "$OUT/test_cuda.log"

LEFT=$((BUDGET_S - SECONDS))
echo "== speed benchmark, ${LEFT} s left (log: \$OUT/speed.log)"
if [ "$LEFT" -gt 30 ]; then
  # Tiers: every model runs a tier before any model runs the next. timeout signals the whole process
  # group, so the arm running at the limit stops with the benchmark.
  TRITON_INTERPRET=0 timeout "$LEFT" python3 -m benchmarks.speed --models 350M,1B \
    --arms "eager,compile,liger,cggr,cggr+graphs,cggr+lce,skip/full,light/liger+cggr,liger+graphs,compile+cggr" \
    --steps 12 --warmup 6 --arm-timeout 150 --profile 350M,1B --out "$OUT" > "$OUT/speed.log" 2>&1
  echo "exit $?"; grep "^== " "$OUT/speed.log"
fi

if [ "${ROWS_AB:-0}" = 1 ]; then
  # CGGR_ROW_KERNELS A/B (ROWS_AB=1; outside $BUDGET_S, about 4 minutes): the row kernels' micro-benchmark, then
  # the routed arms again with CGGR_ROW_KERNELS=inductor on the same machine, into their own folder (speed.py
  # replaces a record of the same model and arm in a file; each record says which row kernels it ran).
  echo "== row kernels: micro-benchmark and the routed step with CGGR_ROW_KERNELS=inductor"
  TRITON_INTERPRET=0 timeout 150 python3 -m pytest tests/test_row_kernels.py tests/test_cuda.py -q -p no:cacheprovider \
    -k "row or kernel" > "$OUT/test_rows.log" 2>&1
  echo "exit $?"; tail -n 3 "$OUT/test_rows.log"
  TRITON_INTERPRET=0 timeout 120 python3 -m benchmarks.rows --out "$OUT" > "$OUT/rows.log" 2>&1
  echo "exit $?"; tail -n 14 "$OUT/rows.log"
  mkdir -p "$OUT/rows-inductor"
  CGGR_ROW_KERNELS=inductor TRITON_INTERPRET=0 timeout 300 python3 -m benchmarks.speed --models 350M,1B \
    --arms "cggr,liger+cggr,full" --steps 12 --warmup 6 --arm-timeout 150 --out "$OUT/rows-inductor" > "$OUT/rows-inductor.log" 2>&1
  echo "exit $?"; grep "^== " "$OUT/rows-inductor.log"
fi

echo "== summary ($SECONDS s)"
python3 - "$OUT" <<'PY'
import glob, json, os, sys
sys.path.insert(0, os.getcwd())  # the repository root: benchmarks is a package (run by path it would shadow others)
from benchmarks import report
for path in sorted(glob.glob(os.path.join(sys.argv[1], "speed-*.json")) + glob.glob(os.path.join(sys.argv[1], "rows-inductor", "speed-*.json"))):
    records = json.load(open(path))
    print(path)
    print(report.speed_summary(records))
    print(report.speed_headline(records))
PY

if [ "${PACK:-0}" = 1 ]; then
  # PACK=1: everything under $OUT in one archive, the files themselves removed (a remote runner that returns
  # only a few files, such as this project's lent GPU machines, at most 8, then returns all of it).
  PACKED=$(mktemp) && tar czf "$PACKED" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$PACKED" "$OUT/gpu-results.tgz"
  echo "packed into $OUT/gpu-results.tgz"
fi
