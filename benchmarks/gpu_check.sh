#!/usr/bin/env bash
# One prepared GPU check for LANG-JEPA: run it on a machine with one GPU (< 8 minutes).
#
#   bash benchmarks/gpu_check.sh              # one GPU: checks + measurements, JSON under $OUT
#   bash benchmarks/gpu_check.sh --dry-run    # print the steps and commands, run nothing
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same Python entry points on CPU, tiny preset
#
# Steps (each with a time limit; a failed step is reported and the others still run):
#   wheels      carried wheels in .whl/ are installed into /tmp/site (PYTHONPATH), if present
#   (library)   lang_jepa as installed, else this checkout on PYTHONPATH (a bare GPU machine)
#   env         GPU, torch/CUDA/DeepSpeed versions, op compatibility; FusedAdam and CPUAdam are
#               built in the background while the next steps run
#   paths       fast paths: flash SDPA with no mask, the backend used with a padding mask and in a
#               real train step, bf16 engine, FusedAdam as engine.basic_optimizer, host syncs/step
#   base        `base` (seq 512, bf16, ZeRO-2): MFU, HFU, tokens/s, peak and activation memory
#   large_ac    `large` with activation checkpointing (MFU counts no recompute; HFU does)
#   large       `large` without it (activation memory ratio = large / large_ac)
#   xl_offload  `xl` (~1.3B) with ds_configs/zero3_offload.json for a few steps: fits on one GPU?
#   base_ac     `base` with activation checkpointing (if time is left)
#   pack_vs     `base` packed against unpacked batches, interleaved: tokens/s ratio (if time is left)
#   summary     one table against issue 6's targets; $OUT/summary.json
# Batches are synthetic (random tokens, demo-like sentence lengths) through the real masking and
# collate, so the machine needs no corpus. GPU_CHECK_BUDGET_S (default 460) bounds the total.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option $1 (--dry-run | --cpu-smoke)" >&2; exit 2 ;;
esac

if [ "$MODE" = dry ]; then
  OUT_DIR=${OUT:-/tmp/gpu_check.XXXXXX}
else
  OUT_DIR=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
  mkdir -p "$OUT_DIR"
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
START=$SECONDS
STATUS=()
BENCH=benchmarks/train_bench.py

if [ "$MODE" = cpu ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  BASE=tiny LARGE=tiny XL=tiny XL_DS=ds_configs/zero3.json  # no CPUAdam build on the smoke path
  RUN=(--steps 2 --warmup 1 --no-plain --batches 2)
  XL_RUN=(--steps 1 --warmup 1 --no-plain --batches 2)
  SMOKE_SKIP="large_ac large base_ac"  # same entry point as base (tests cover the flag)
else
  PY=${PYTHON:-python3}
  BASE=base LARGE=large XL=xl XL_DS=ds_configs/zero3_offload.json
  RUN=(--steps 12 --warmup 3 --batches 6)
  XL_RUN=(--steps 3 --warmup 1 --batches 2)
  SMOKE_SKIP=""
fi
export TOKENIZERS_PARALLELISM=false

# step NAME LIMIT_S COMMAND...: run with a time limit inside the budget, log to $OUT_DIR/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$MODE" = dry ]; then
    printf '[%s] (limit %ss) %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [ "$MODE" = cpu ] && [[ " $SMOKE_SKIP " == *" $name "* ]]; then
    echo "== [$name] skipped in --cpu-smoke (the same entry point as another step)"
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 25)); then
    echo "== [$name] skipped: time budget spent"
    STATUS+=("$name:skipped")
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== [$name] (limit ${limit}s) $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && grep -q '^train_bench' "$OUT_DIR/$name.log"; then
    sed -n '/^train_bench/,$p' "$OUT_DIR/$name.log"
  else
    tail -n 30 "$OUT_DIR/$name.log"
  fi
  [ $rc -eq 124 ] && echo "   [$name] timed out after ${limit}s"
  STATUS+=("$name:rc=$rc:$((SECONDS - t0))s")
}

# --- wheels carried with the working tree (e.g. a deepspeed build with its ops) -------------
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "$MODE" = cpu ]; then
    echo "== [wheels] .whl/ present: not installed in --cpu-smoke mode"
  else
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# The library: installed (`make setup` / pip install -e .) or, on a bare GPU machine with no
# install, this checkout on PYTHONPATH (checked from / so that the current directory does not count)
FIND='import importlib.util as u, sys; sys.exit(not (u.find_spec("lang_jepa") and u.find_spec("preprocessing")))'
if [ "$MODE" != dry ] && ! (cd / && "$PY" -c "$FIND"); then
  echo "== lang_jepa is not installed for $PY: using this checkout ($PWD) on PYTHONPATH"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# --- environment; build the DeepSpeed ops in the background while the checks start ----------
ENV_PY='
import torch, deepspeed
print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0),
          "%.0f GiB" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
print("FusedAdam compatible", FusedAdamBuilder().is_compatible(),
      "| CPUAdam compatible", CPUAdamBuilder().is_compatible())
'
BUILD_PY='
import sys, time
from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
for b in {"fused": [FusedAdamBuilder], "cpu": [CPUAdamBuilder]}[sys.argv[1]]:
    t = time.time(); b().load(); print(b.__name__, "loaded in %.0f s" % (time.time() - t))
'
if [ "$MODE" = gpu ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "$BUILD_PY" fused >"$OUT_DIR/build_fused_adam.log" 2>&1 &
  "$PY" -c "$BUILD_PY" cpu >"$OUT_DIR/build_cpu_adam.log" 2>&1 &
  CPU_ADAM_PID=$!
fi
step env 60 "$PY" -c "$ENV_PY"

# --- the checks and the measurements (most important first) ---------------------------------
step paths 240 "$PY" "$BENCH" --check-paths --preset "$BASE" --synthetic --json "$OUT_DIR/paths.json"
step base 100 "$PY" "$BENCH" --preset "$BASE" --synthetic --no-activation-checkpointing \
  "${RUN[@]}" --json "$OUT_DIR/base.json"
step large_ac 120 "$PY" "$BENCH" --preset "$LARGE" --synthetic --activation-checkpointing \
  "${RUN[@]}" --json "$OUT_DIR/large_ac.json"
step large 120 "$PY" "$BENCH" --preset "$LARGE" --synthetic --no-activation-checkpointing \
  "${RUN[@]}" --json "$OUT_DIR/large.json"
if [ -n "${CPU_ADAM_PID:-}" ]; then
  # the offload step needs DeepSpeedCPUAdam built; wait for it, within the budget
  while kill -0 "$CPU_ADAM_PID" 2>/dev/null && ((SECONDS - START < BUDGET_S - 60)); do sleep 2; done
  cat "$OUT_DIR/build_fused_adam.log" "$OUT_DIR/build_cpu_adam.log" 2>/dev/null | grep loaded
fi
step xl_offload 240 "$PY" "$BENCH" --preset "$XL" --synthetic --ds-config "$XL_DS" \
  "${XL_RUN[@]}" --json "$OUT_DIR/xl_offload.json"
step base_ac 100 "$PY" "$BENCH" --preset "$BASE" --synthetic --activation-checkpointing \
  "${RUN[@]}" --json "$OUT_DIR/base_ac.json"
step pack_vs 100 "$PY" "$BENCH" --preset "$BASE" --synthetic --no-activation-checkpointing \
  --vs data.packing=false "${RUN[@]}" --json "$OUT_DIR/pack_vs.json"

# --- summary ----------------------------------------------------------------------------------
if [ "$MODE" = dry ]; then
  echo "[summary] $PY $BENCH --summarize $OUT_DIR"
  exit 0
fi
echo "== steps: ${STATUS[*]} | total $((SECONDS - START))s | files in $OUT_DIR"
"$PY" "$BENCH" --summarize "$OUT_DIR"
