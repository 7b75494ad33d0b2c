#!/usr/bin/env bash
# The GPU lease, prepared (issue 23): one run, two device calls of at most 9 minutes each,
# ordered by value; every stage appends JSON lines to OUT/results.jsonl and text to
# OUT/log.txt as it goes, so a time-out keeps what finished.  The stages live in
# python/gpu_lease.py (registry, launch capture, pre-compile pool, estimate); this script is
# the entry point on both machines:
#
#   bash python/gpu_check.sh --dry-run [--plan-out FILE]   # CPU: every stage, launch
#        configuration and distinct compilation; last line
#        "compilations: N, estimated device seconds: S"; exit 1 if over the limits
#   bash python/gpu_check.sh --call 1 [--out DIR] [--budget S]   # device call 1 (440 s)
#   bash python/gpu_check.sh --call 2 [--out DIR] [--budget S]   # device call 2 (310 s)
#   bash python/gpu_check.sh --call all --reduced --out DIR      # CPU, reduced sizes
#
# Device tool: run `bash python/gpu_check.sh --dry-run --plan-out python/gpu_lease_plan.json`
# here first (the stored launch list saves the capture there), then call 1 with
# timeout_s=500 and call 2 right after it with timeout_s=370 and --budget at most the
# device time left (status: budget_left_s) minus 60 s (the machine stays warm 30 s: the
# CUDA extension built in call 1's background is reused).  OUT defaults to $OUT (the device tool's folder)
# or benchmarks/results/gpu-lease; tool logs, plan and tables go to build/gpu-lease and are
# packed into OUT/artifacts-call<N>.tgz at the end.  docs/benchmarks.md says how to read it.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
usage() { echo "gpu_check.sh: error: $1 (usage: --dry-run [--plan-out FILE] | --call 1|2|all [--out DIR] [--budget S] [--reduced])" >&2; exit 2; }

DRY=0; CALL=""; OUT_DIR="${OUT:-benchmarks/results/gpu-lease}"; BUDGET=""; REDUCED=""
PLAN_OUT=""; WORK="build/gpu-lease"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan-out) [ $# -ge 2 ] || usage "--plan-out needs a file"; PLAN_OUT="$2"; shift ;;
    --call) [ $# -ge 2 ] || usage "--call needs 1, 2 or all"; CALL="$2"; shift ;;
    --out) [ $# -ge 2 ] || usage "--out needs a directory"; OUT_DIR="$2"; shift ;;
    --work) [ $# -ge 2 ] || usage "--work needs a directory"; WORK="$2"; shift ;;
    --budget) [ $# -ge 2 ] || usage "--budget needs seconds"; BUDGET="$2"; shift ;;
    --reduced) REDUCED="--reduced" ;;
    tests|bench|all) usage "the old parts (tests/bench/all) are gone: use --call 1 and --call 2" ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ $DRY -eq 1 ]; then
  [ -z "$CALL" ] || usage "--dry-run lists both calls: no --call"
  exec "$PY" python/gpu_lease.py dry-run ${PLAN_OUT:+--plan-out "$PLAN_OUT"}
fi
case "$CALL" in 1|2|all) ;; "") usage "--call or --dry-run is required" ;; *) usage "--call must be 1, 2 or all, got '$CALL'" ;; esac
case "$BUDGET" in "") BUDGET=$(case "$CALL" in 1) echo 440;; 2) echo 310;; *) echo 750;; esac) ;;
  *[!0-9]*) usage "--budget must be whole seconds, got '$BUDGET'" ;; esac
mkdir -p "$OUT_DIR" "$WORK" || usage "cannot create $OUT_DIR or $WORK"

echo "gpu_check: call $CALL, budget ${BUDGET}s, out $OUT_DIR, work $WORK ($(date -u +%FT%TZ))"
PLAN=python/gpu_lease_plan.json
# the runner stops its stages inside the budget; the timeout is the backstop
timeout --kill-after=10 $((BUDGET + 20)) "$PY" python/gpu_lease.py run --call "$CALL" \
  --out "$OUT_DIR" --work "$WORK" --budget "$BUDGET" --plan "$PLAN" $REDUCED
STATUS=$?
tar czf "$OUT_DIR/artifacts-call$CALL.tgz" -C "$WORK" --exclude='*.so' . 2>/dev/null || true
echo; echo "=== summary (call $CALL, exit status $STATUS; every record in $OUT_DIR/results.jsonl)"
"$PY" python/gpu_lease.py summary --out "$OUT_DIR" || true
exit $STATUS
