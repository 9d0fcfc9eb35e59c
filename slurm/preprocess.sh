#!/usr/bin/env bash
# LANG-JEPA offline preprocessing as a SLURM job array.
#
#   FILE_LIST=files.txt OUTPUT=/data/shards/fineweb sbatch slurm/preprocess.sh
#   FILE_LIST=files.txt OUTPUT=/data/shards/fineweb sbatch --array=0-31 slurm/preprocess.sh
#   FILE_LIST=files.txt OUTPUT=... bash slurm/preprocess.sh --dry-run   # print the commands
#   FILE_LIST=files.txt OUTPUT=... bash slurm/preprocess.sh --merge     # run only the merge
#
# Each array task takes a contiguous block of the input files (balanced by size on disk) and builds
# a complete shard directory OUTPUT/parts/task-NNNN (python -m preprocessing.build_shards
# --task-index/--task-count). The task that finishes last merges all parts into OUTPUT
# (python -m preprocessing.merge_manifests: shards renumbered in task order, hard-linked, one
# manifest): the same documents, sentences and tokens as one build over all the files. Exact
# duplicates are detected within a task only. A failed task can be re-submitted alone
# (sbatch --array=N ...): its build resumes, and the merge runs once every part is complete.
#
# Environment (arguments after the options are passed on to build_shards):
#   FILE_LIST   required: a file with one input path (file, directory or glob) per line
#   OUTPUT      required: final shard directory (parts go to OUTPUT/parts/)
#   TOKENIZER   HF fast tokenizer name or path (default: build_shards' offline default)
#   WORKERS     worker processes per task (default: SLURM_CPUS_PER_TASK, else nproc)
#   PYTHON      interpreter (default: .venv/bin/python of the submit directory)
#   SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT   set by SLURM (0-based --array=0-N)
#
#SBATCH --job-name=lang-jepa-preprocess
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

DRY_RUN=0
MERGE_ONLY=0
PASSTHROUGH=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --merge) MERGE_ONLY=1 ;;
    *) PASSTHROUGH+=("$arg") ;;
  esac
done

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${FILE_LIST:?set FILE_LIST to a file listing the input paths, one per line}"
: "${OUTPUT:?set OUTPUT to the final shard directory}"
PYTHON="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}"
TASK_COUNT="${SLURM_ARRAY_TASK_COUNT:-1}"
PARTS="$OUTPUT/parts"
export TOKENIZERS_PARALLELISM=false

part_dir() { printf '%s/task-%04d' "$PARTS" "$1"; }

build_cmd() {  # the build_shards command line of task $1
  local task=$1
  local cmd=("$PYTHON" -m preprocessing.build_shards --file-list "$FILE_LIST"
    --task-index "$task" --task-count "$TASK_COUNT" --output "$(part_dir "$task")"
    --key-prefix "$(printf 't%04d-' "$task")" --workers "$WORKERS" --quiet)
  [[ -n "${TOKENIZER:-}" ]] && cmd+=(--tokenizer "$TOKENIZER")
  printf '%q ' "${cmd[@]}" "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"
}

merge_cmd() {
  local cmd=("$PYTHON" -m preprocessing.merge_manifests --output "$OUTPUT" --overwrite)
  for ((t = 0; t < TASK_COUNT; t++)); do cmd+=("$(part_dir "$t")"); done
  printf '%q ' "${cmd[@]}"
}

run() {  # print or run one command line
  if [[ $DRY_RUN == 1 ]]; then echo "$1"; else eval "$1"; fi
}

if [[ $MERGE_ONLY == 1 ]]; then
  run "$(merge_cmd)"
  exit 0
fi

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  if [[ $DRY_RUN == 1 ]]; then  # show every task's command, then the merge
    for ((t = 0; t < TASK_COUNT; t++)); do run "$(build_cmd "$t")"; done
    run "$(merge_cmd)"
    exit 0
  fi
  echo "preprocess.sh: not inside a SLURM array task; submit with sbatch, or set" \
    "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (or use --dry-run / --merge)" >&2
  exit 2
fi

TASK="$SLURM_ARRAY_TASK_ID"
mkdir -p "$PARTS"
if [[ -f "$(part_dir "$TASK")/manifest.json" ]]; then
  echo "task $TASK: $(part_dir "$TASK") is complete already" >&2
else
  run "$(build_cmd "$TASK")"
fi
[[ $DRY_RUN == 1 ]] && { run "$(merge_cmd)"; exit 0; }

# The last task to finish merges: every part has its manifest, and mkdir is atomic.
done_parts=0
for ((t = 0; t < TASK_COUNT; t++)); do
  [[ -f "$(part_dir "$t")/manifest.json" ]] && done_parts=$((done_parts + 1))
done
if ((done_parts == TASK_COUNT)) && mkdir "$PARTS/.merge-lock" 2>/dev/null; then
  echo "task $TASK: all $TASK_COUNT parts complete; merging into $OUTPUT" >&2
  run "$(merge_cmd)"
else
  echo "task $TASK: $done_parts of $TASK_COUNT parts complete; the last task merges" >&2
fi
