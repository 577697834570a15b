#!/usr/bin/env bash
# The speed questions still open, one GPU call per part (run from the repository root on the GPU machine, with
# .whl/ carried for the Liger arms; each part fits the 600 s a call may run):
#
#   CGGR_GIT_REV=<rev> PART=graphs   bash benchmarks/gpu_speed_matrix.sh   # the CUDA-graph test, then 350M at 16x1024
#   CGGR_GIT_REV=<rev> PART=shapes   bash benchmarks/gpu_speed_matrix.sh   # 350M accumulated (8), 350M and 125M at 32x2048
#   CGGR_GIT_REV=<rev> PART=families bash benchmarks/gpu_speed_matrix.sh   # compile and liger+cggr for the newer families
#
# graphs: does CGGR_CUDA_GRAPHS=1 replay exactly (tests/test_cuda.py) and take the host out of the 350M step
#   (cggr+graphs, liger+graphs beside compile, liger and plain cggr, with per-phase host and device times)?
# shapes: is the routed step slower under accumulation than alone (the single step is part graphs', on the same
#   machine only if both parts run on one warm machine: compare ratios, not milliseconds), and does a larger
#   micro-batch (more GPU work per launch) bring the routed step to its FLOP ceiling at 350M and 125M?
# families: torch.compile for Qwen 3, Gemma 3 and Phi-3 at 350M, and Liger's patches then cggr for each.
#
# Results: $OUT/<part>/speed-*.json and logs; the summary tables are printed last.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
PART=${PART:-graphs}
DIR="$OUT/$PART"
mkdir -p "$DIR"
# shellcheck source=benchmarks/gpu_wheels.sh
source "$(dirname "$0")/gpu_wheels.sh"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

speed() {  # speed SECONDS LOG ARGS...: one benchmarks.speed run into $DIR, stopped after SECONDS; its results echoed
  local limit=$1 log=$2; shift 2
  TRITON_INTERPRET=0 timeout "$limit" python3 -m benchmarks.speed --steps 12 --warmup 6 --out "$DIR" "$@" \
    > "$DIR/$log" 2>&1
  echo "exit $?"; grep "^== " "$DIR/$log"
}

case "$PART" in
  graphs)
    echo "== CUDA-graph tests (log: $DIR/test_graphs.log)"
    TRITON_INTERPRET=0 timeout 170 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfs -s -k graphs \
      > "$DIR/test_graphs.log" 2>&1
    echo "exit $?"; grep -E "replays|passed|failed" "$DIR/test_graphs.log" | tail -n 8
    speed 400 speed-350M.log --models 350M --arms compile,cggr,cggr+graphs,liger,liger+graphs --arm-timeout 110
    ;;
  shapes)
    speed 250 speed-350M-accum8.log --models 350M --accum 8 --loop --arms compile,cggr,cggr+graphs --arm-timeout 110
    speed 330 speed-32x2048.log --models 350M,125M --shape 32x2048 --arms compile,cggr,cggr+graphs --arm-timeout 100
    ;;
  families)
    speed 560 speed-families.log --models qwen3-350M,gemma3-350M,phi3-350M --arms compile,liger+cggr,cggr+graphs \
      --arm-timeout 120
    ;;
  *)
    echo "PART must be graphs, shapes or families, got '$PART'" >&2; exit 2 ;;
esac

echo "== summary ($SECONDS s)"
python3 - "$DIR" <<'PY'
import glob, json, os, sys
sys.path.insert(0, os.getcwd())  # the repository root: benchmarks is a package (run by path it would shadow others)
from benchmarks import report
for path in sorted(glob.glob(os.path.join(sys.argv[1], "speed-*.json"))):
    records = json.load(open(path))
    print(path)
    print(report.speed_summary(records))
    for r in records:
        if r.get("cuda_graphs"):
            print(r["model"], r["arm"], "stage: replays, captures, compiled calls, buffer MiB, broken",
                  {k.rsplit(".", 1)[-1]: (v["replays"], v["captures"], v["compiled_calls"],
                                          round(v.get("buffer_bytes", 0) / 2**20), v["broken"])
                   for k, v in r["cuda_graphs"].items()})
PY
