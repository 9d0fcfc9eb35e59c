#!/bin/bash
# LANG-JEPA pretraining on N nodes x G GPUs under SLURM, preemption-safe (checkpoint + requeue).
#
#   sbatch slurm/pretrain.sh [--dry-run] [key.sub=value ...]
#   CONFIG=large SHARDS=/data/shards/fineweb RUN_DIR=/runs/large sbatch --nodes 8 slurm/pretrain.sh
#   SLURM_JOB_NODELIST=... bash slurm/pretrain.sh --dry-run     # print the launch commands, exit
#
# How it launches (and why): one SLURM task per node, each running the DeepSpeed launcher
# (`deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID ...`), which starts G local ranks.
# The hostfile is built from `scontrol show hostnames "$SLURM_JOB_NODELIST"` (`host slots=G`
# lines; without scontrol, slurm/hostlist.py expands the list the same way); MASTER_ADDR is the first host and MASTER_PORT is derived from the job id. We chose the
# launcher over one srun task per GPU because it is the command users already type for one node
# (`deepspeed train.py ...`), it sets LOCAL_RANK/--local_rank and the accelerator's environment the
# way DeepSpeed expects, and `--no_ssh` needs neither pdsh nor passwordless ssh between nodes. A
# single-node job runs the launcher directly in the batch shell (no srun step needed).
#
# Preemption and time limits: `--signal=B:USR1@300` makes SLURM send SIGUSR1 to this batch shell
# 300 s before the time limit. The shell forwards it (via srun on multi-node jobs) to the training
# processes only (the launcher's workers, never their DataLoader workers); the trainer agrees on a
# stop step across ranks, writes a checkpoint and exits with 75 (EX_TEMPFAIL). Exit code 75 makes
# this script run `scontrol requeue $SLURM_JOB_ID`; the requeued job (same id, same RUN_DIR)
# resumes from `checkpoints/latest` (train.resume=auto, the default). SIGTERM (preemption with
# GraceTime, scancel) reaches every process from SLURM itself; the trainer treats it like SIGUSR1.
# Any other non-zero exit fails the job as usual.
#
# Settings (environment variables; everything is quoted and passed as arrays, never eval'ed):
#   CONFIG       preset (tiny small base large xl) or a YAML file            [base]
#   DS_CONFIG    DeepSpeed JSON (engine settings only)                       [ds_configs/zero2.json]
#   RUN_DIR      run directory; keep it fixed across requeues to resume      [runs/$SLURM_JOB_NAME]
#   SHARDS       shard directory (data.shards); unset: the config's          []
#   EXTRA        more key.sub=value overrides, whitespace-separated (values with spaces: pass them
#                as script arguments instead)                                []
#   NODES        number of nodes          [SLURM_JOB_NUM_NODES / SLURM_NNODES]
#   GPUS         GPUs (ranks) per node    [SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE / nvidia-smi]
#   MASTER_PORT  rendezvous port          [20000 + SLURM_JOB_ID % 20000]
#   MAX_REQUEUES stop requeueing after this many restarts (SLURM_RESTART_COUNT)   [50]
#   PYTHON       interpreter              [.venv/bin/python if present, else python3]
#   DEEPSPEED    DeepSpeed launcher       [deepspeed beside PYTHON, else on PATH]
#   TRAIN_SCRIPT entry point the launcher runs   [train.py]   (tests point it at a stand-in)
#   LANG_JEPA_ROOT repository root        [SLURM_SUBMIT_DIR, else this script's parent directory]
#   OMP_NUM_THREADS per rank              [CPUs on the node / GPUS, at least 1]
# Script arguments: `--dry-run` prints the hostfile and the exact launch commands for the given
# SLURM_* variables and exits; every other argument is passed to train.py as an override.
#
#SBATCH --job-name=lang-jepa
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

EX_TEMPFAIL=75

die() { echo "pretrain.sh: $*" >&2; exit 1; }

# ----- node task: runs on every node (via srun, or directly on a single node) -----

workers_of() {
	# The training processes: children of the launcher's children (deepspeed -> launch.py -> ranks).
	local child
	for child in $(pgrep -P "$1" || true); do
		pgrep -P "$child" || true
	done
}

forward_signal() {
	# FORWARD_TO=workers: the launcher's ranks (a node task); =child: the child itself (srun).
	local sig=$1 pid targets
	if [[ ${FORWARD_TO:-workers} == child ]]; then targets=$LAUNCHER_PID; else targets=$(workers_of "$LAUNCHER_PID"); fi
	echo "pretrain.sh: SIG$sig on $(hostname): forwarding to ${targets//$'\n'/ }" >&2
	for pid in $targets; do
		kill -s "$sig" "$pid" 2>/dev/null || true
	done
}

run_node() {
	# "$@": the launcher command. Runs it in the background, forwards SIGUSR1 to the ranks, and
	# returns the launcher's exit status.
	local rc interrupted
	# The launcher starts with SIGTERM ignored: SLURM sends SIGTERM to every process of a
	# preempted step, and the DeepSpeed runner would die at once, ending this node's task while
	# its ranks are still writing the checkpoint. (launch.py sets its own handler: it passes
	# SIGTERM on to the ranks, waits for them and exits 1; the trainer's requeue record tells the
	# batch script that exit 75 was meant.)
	trap '' TERM
	"$@" &
	LAUNCHER_PID=$!
	trap 'interrupted=1; forward_signal USR1' USR1
	trap 'interrupted=1' TERM # SLURM signals every process itself; keep waiting for the exit code
	while true; do
		interrupted=0
		rc=0
		wait "$LAUNCHER_PID" || rc=$?
		[[ $interrupted == 1 ]] || break
	done
	trap - USR1 TERM
	return "$rc"
}

if [[ ${1:-} == --node-task ]]; then
	# srun re-enters this script on each node: --node-task -- LAUNCHER ARGS (node rank inserted).
	shift 2
	launcher=("$1" --node_rank "${SLURM_NODEID:?SLURM_NODEID not set}")
	shift
	rc=0
	run_node "${launcher[@]}" "$@" || rc=$?
	exit "$rc"
fi

# ----- batch script -----

DRY_RUN=0
OVERRIDES=()
for arg in "$@"; do
	if [[ $arg == --dry-run ]]; then DRY_RUN=1; else OVERRIDES+=("$arg"); fi
done

ROOT=${LANG_JEPA_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT" || die "cannot cd to $ROOT"
[[ -f train.py ]] || die "$ROOT is not the LANG-JEPA repository (no train.py); set LANG_JEPA_ROOT"

: "${SLURM_JOB_ID:?not inside a SLURM job (SLURM_JOB_ID unset); use sbatch, or set SLURM_* for --dry-run}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}"
CONFIG=${CONFIG:-base}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-lang-jepa}}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-train.py}
MAX_REQUEUES=${MAX_REQUEUES:-50}
if [[ -z ${PYTHON:-} ]]; then
	if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z ${DEEPSPEED:-} ]]; then
	DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
	[[ -x $DEEPSPEED ]] || DEEPSPEED=deepspeed
fi

if command -v scontrol >/dev/null 2>&1; then
	mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else # no SLURM here (a --dry-run on a laptop): the same expansion, from the standard library
	mapfile -t HOSTS < <("$PYTHON" "$ROOT/slurm/hostlist.py" "$SLURM_JOB_NODELIST")
fi
((${#HOSTS[@]} > 0)) || die "node list '$SLURM_JOB_NODELIST' expanded to no host"
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#HOSTS[@]}}}}
((NODES <= ${#HOSTS[@]})) || die "NODES=$NODES but the allocation has ${#HOSTS[@]} hosts"
HOSTS=("${HOSTS[@]:0:NODES}")
if [[ -z ${GPUS:-} ]]; then
	GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
	GPUS=${GPUS##*:} # "a100:4" -> 4
	if [[ -z $GPUS ]] && command -v nvidia-smi >/dev/null; then GPUS=$(nvidia-smi -L | wc -l); fi
fi
[[ ${GPUS:-} =~ ^[1-9][0-9]*$ ]] || die "GPUS per node unknown or invalid ('${GPUS:-}'): set GPUS"
MASTER_ADDR=${HOSTS[0]}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / GPUS > 0 ? CPUS / GPUS : 1))}
export MASTER_ADDR MASTER_PORT

EXTRA_ARGS=()
[[ -n ${EXTRA:-} ]] && read -r -a EXTRA_ARGS <<<"$EXTRA"
TRAIN_ARGS=("$TRAIN_SCRIPT" --deepspeed_config "$DS_CONFIG" --config "$CONFIG" "train.run_dir=$RUN_DIR")
[[ -n ${SHARDS:-} ]] && TRAIN_ARGS+=("data.shards=$SHARDS")
TRAIN_ARGS+=("${EXTRA_ARGS[@]}" "${OVERRIDES[@]}")

HOSTFILE=$RUN_DIR/slurm/hostfile-$SLURM_JOB_ID
LAUNCH=("$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --master_addr "$MASTER_ADDR"
	--master_port "$MASTER_PORT")
SRUN=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=0
	bash "$ROOT/slurm/pretrain.sh" --node-task -- "${LAUNCH[@]}" "${TRAIN_ARGS[@]}")

write_hostfile() {
	local host
	for host in "${HOSTS[@]}"; do printf '%s slots=%s\n' "$host" "$GPUS"; done
}

print_cmd() { printf '%q ' "$@" | sed 's/ $//'; echo; }

if ((DRY_RUN)); then
	echo "# hostfile $HOSTFILE"
	write_hostfile
	echo "# env MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS NODES=$NODES GPUS=$GPUS"
	if ((NODES > 1)); then
		echo "# batch step"
		print_cmd "${SRUN[@]}"
	fi
	for ((rank = 0; rank < NODES; rank++)); do
		echo "# node $rank (${HOSTS[rank]})"
		print_cmd "$DEEPSPEED" --node_rank "$rank" "${LAUNCH[@]:1}" "${TRAIN_ARGS[@]}"
	done
	exit 0
fi

mkdir -p "$RUN_DIR/slurm"
write_hostfile >"$HOSTFILE"
# Written by the trainer when it exits 75 (checkpoint after a stop signal; ranks lost, `latest`
# is the last good checkpoint): the exit status that reaches this script may say otherwise (a
# launcher that got SIGTERM exits 1, a dead node's task reports its signal).
REQUEUE_RECORD=$RUN_DIR/slurm/requeue-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.json
rm -f "$REQUEUE_RECORD"
echo "pretrain.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NODES x $GPUS: ${HOSTS[*]}" \
	"master $MASTER_ADDR:$MASTER_PORT run $RUN_DIR" >&2

rc=0
if ((NODES > 1)); then
	FORWARD_TO=child run_node "${SRUN[@]}" || rc=$? # srun passes SIGUSR1 to the node tasks
else
	export SLURM_NODEID=0
	run_node "$DEEPSPEED" --node_rank 0 "${LAUNCH[@]:1}" "${TRAIN_ARGS[@]}" || rc=$?
fi

if ((rc != 0 && rc != EX_TEMPFAIL)) && [[ -f $REQUEUE_RECORD ]]; then
	echo "pretrain.sh: the job step exited with $rc, but the trainer stopped for a requeue:" \
		"$(cat "$REQUEUE_RECORD")" >&2
	rc=$EX_TEMPFAIL
fi
if ((rc == EX_TEMPFAIL)); then
	if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
		die "checkpointed and stopped, but restart ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES=$MAX_REQUEUES: not requeueing"
	fi
	echo "pretrain.sh: training checkpointed and stopped (exit $rc): requeueing job $SLURM_JOB_ID" >&2
	scontrol requeue "$SLURM_JOB_ID"
	exit 0
fi
echo "pretrain.sh: training exited with $rc" >&2
exit "$rc"
