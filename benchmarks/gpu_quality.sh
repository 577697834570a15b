#!/usr/bin/env bash
# One GPU call of the quality benchmark (run from the repository root on the GPU machine, with the corpus pack
# and, for liger arms, the Liger-Kernel wheel carried along: .carry/corpus.tar, .whl/):
#
#   OUT=... BUDGET_S=540 bash benchmarks/gpu_quality.sh RUN [RUN ...]
#
# Each RUN is one `cggr bench quality` command line (its arguments, quoted as one word), run in turn against the
# unpacked corpus (`--corpus`), each into its own folder of $OUT/quality; together they stop at $BUDGET_S seconds
# (a run cut there keeps the arms it finished: the JSON is rewritten after every arm). Everything comes back as
# one archive, $OUT/quality.tgz (the device returns few files), and the tables are printed last.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT/quality"
# shellcheck source=benchmarks/gpu_wheels.sh
source "$(dirname "$0")/gpu_wheels.sh"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ ! -f /tmp/corpus/meta.json ]; then
  python3 -m cggr_lab.corpus unpack .carry/corpus.tar /tmp/corpus > "$OUT/quality/unpack.log" 2>&1 || {
    echo "corpus unpack failed"; tail -n 5 "$OUT/quality/unpack.log"; }
fi
i=0
for run in "$@"; do
  i=$((i + 1))
  LEFT=$((BUDGET_S - SECONDS))
  if [ "$LEFT" -lt 30 ]; then echo "== run $i: skipped, ${LEFT} s left"; continue; fi
  echo "== run $i (${LEFT} s left): cggr bench quality $run"
  # shellcheck disable=SC2086
  timeout "$LEFT" python3 -m cggr bench quality --corpus /tmp/corpus --out "$OUT/quality/run$i" $run \
    > "$OUT/quality/run$i.log" 2>&1
  echo "exit $?"
done
tar czf "$OUT/quality.tgz" -C "$OUT" quality
for log in "$OUT"/quality/run*.log; do
  echo "== $log"
  awk '/^\[(pretrain|continued|finetune)\]/{p=1} p' "$log" | head -n 40
  grep -E "FAILED|Error" "$log" | head -n 5 || true  # none found is the good case
done
