#!/usr/bin/env bash
# The check a lent H100/H200 runs once, under 10 minutes: every step under `timeout`, logged to OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR              # on the GPU node (cuda:0)
#   benchmarks/gpu_check.sh --cpu-smoke OUT_DIR  # the same steps on the CPU with the tiny model (the test suite)
#
# Steps (each OUT_DIR/<step>.log, its exit status and seconds in OUT_DIR/<step>.rc):
#   model             VGGT-1B's config with random weights (OUT_DIR/model) and a 24-step episode root (OUT_DIR/data)
#   serve             `serve --device cuda:0 --preset newjanusvln`, one on-demand causal 9-frame request,
#                     /status (memory, OOM splits, images/s) into serve.json, then SIGTERM: it must exit 0
#   precompute        `precompute --device cuda:0 --preset newjanusvln --verify --skip_existing` on the episode root
#   precompute-rerun  the same again: every entry is skipped, none computed
#   throughput        benchmarks/gpu_throughput.py at batches 1/8/32 within a budget (--compile with a C compiler)
# then summary.json (MFU, images/s, peak memory, each step's status); the exit status is 0 only if all passed.
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
if [[ $# -ne 1 ]]; then echo "usage: $0 [--cpu-smoke] OUT_DIR" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if (( SMOKE )); then
  DEVICE=cpu; SPEC="--preset newjanusvln --size 56"; SETUP=(--tiny)
  T_MODEL=60; T_SERVE=90; T_PRE=90; T_BENCH=90
  BENCH=(--device cpu --tiny --sizes 56 --batches 1,8 --clip-batches 1 --iters 1 --warmup 0 --min-frames 1
         --loop-images 2 --budget-s 30)
else
  DEVICE=cuda:0; SPEC="--preset newjanusvln"; SETUP=(--device cuda:0)
  # The limits add up to under 10 minutes (about 6 expected); no row of the benchmark starts after 110 s.
  T_MODEL=75; T_SERVE=120; T_PRE=90; T_BENCH=210
  BENCH=(--device cuda:0 --random-weights --batches 1,8,32 --clip-batches 1,4 --iters 5 --budget-s 110)
  # Triton builds its launcher with a C compiler: time --compile only where one is.
  if command -v cc >/dev/null || command -v gcc >/dev/null; then BENCH+=(--compile); fi
fi

FAILED=0
# step NAME SECONDS CMD...: run CMD under `timeout` (SIGTERM, then SIGKILL 10 s later), output in NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}" >"$OUT/$name.rc"
  echo "   $name: exit $rc after $((SECONDS - start))s (log: $OUT/$name.log)"
  (( rc == 0 )) || FAILED=1
  return $rc
}

# The service and precompute steps are functions run by `timeout bash -c`: they see these.
export OUT DEVICE PY SPEC

# serve_check: the service in the background, probed, then stopped with SIGTERM (it must exit 0 on its own).
serve_check() {
  local port
  port=$("$PY" -c "from service.demo import free_port; print(free_port())")
  "$PY" -m vggt_cache.service.cli serve --model "$OUT/model" --device "$DEVICE" $SPEC --allowed-root "$OUT/data" \
    --port "$port" --state-dir "$OUT/state-serve" &
  local pid=$! rc
  "$PY" benchmarks/gpu_check.py probe "$OUT" "http://127.0.0.1:$port"
  rc=$?
  kill -TERM "$pid"
  wait "$pid" || rc=$?
  return $rc
}

# precompute_run NAME: the episode root through the in-process engine, its manifest kept as NAME.manifest.json.
precompute_run() {
  "$PY" -m vggt_cache.service.cli precompute --data_root "$OUT/data" --vggt_model_path "$OUT/model" --device "$DEVICE" \
    $SPEC --verify --skip_existing --state-dir "$OUT/state-precompute" || return $?
  cp "$OUT/data/vggt_cache_manifest.json" "$OUT/$1.manifest.json"
}

export -f serve_check precompute_run

echo "gpu_check: $( ((SMOKE)) && echo "CPU smoke, tiny model" || echo "VGGT-1B random weights on $DEVICE" ); out: $OUT"
(( SMOKE )) || nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
step model "$T_MODEL" "$PY" benchmarks/gpu_check.py setup "$OUT" "${SETUP[@]}"
step serve "$T_SERVE" bash -c serve_check
step precompute "$T_PRE" bash -c 'precompute_run precompute'
step precompute-rerun "$T_PRE" bash -c 'precompute_run precompute-rerun'
step throughput "$T_BENCH" "$PY" benchmarks/gpu_throughput.py "${BENCH[@]}" --out "$OUT/throughput.json"
"$PY" benchmarks/gpu_check.py summary "$OUT" | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
(( FAILED == 0 && rc == 0 ))
