#!/usr/bin/env bash
# titans-train under torchrun, on one machine or as one node of many (docs/launch.md).
#
#   launch/torchrun.sh --config configs/experiments/tiny_mac.yaml [key=value ...]
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh --config ...      # run once on every node
#
# Environment (all optional):
#   NPROC_PER_NODE    processes on this node. Default: the GPUs torch sees in $PYTHON
#                     (launch/visible_gpus.py: CUDA_VISIBLE_DEVICES and MIG applied; it stops
#                     with a message if the node has GPUs torch cannot use); without GPUs, the
#                     allocated CPUs under SLURM (SLURM_CPUS_ON_NODE / CPUS_PER_PROC, default 1),
#                     else 1 process. The choice and its reason are printed.
#   NNODES            number of nodes (default 1: torchrun --standalone)
#   MASTER_ADDR       rendezvous host when NNODES > 1 (the first node; required)
#   MASTER_PORT       rendezvous port (default 29500 + SLURM_JOB_ID % 2000, else 29500)
#   RDZV_ID           rendezvous id shared by all nodes (default SLURM_JOB_ID, else "titans")
#   RDZV_BACKEND      c10d (default; ranks are assigned at rendezvous) or static (then NODE_RANK)
#   NODE_RANK         this node's rank, static rendezvous only (default SLURM_NODEID, else 0)
#   MAX_RESTARTS      torchrun --max-restarts: restart the group after a failed rank (default 0);
#                     the restarted group resumes from the newest complete checkpoint
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for workers after a failure before SIGKILL (30)
#   PYTHON            interpreter with titans_train installed (default: python3)
#   TORCHRUN_ARGS     extra torchrun arguments, word-split
#   DRY_RUN           1: print the torchrun command and exit
#
# Signals: SIGUSR1 and SIGTERM sent to this script are forwarded to the training processes,
# which checkpoint at the next step boundary and stop (titans_train/preemption.py). torchrun's
# agent ignores both: it must outlive the save, and it would restart a group that stopped.
#
# Exit status: 0 finished; 85 stopped for a requeue (signal or wall-time guard, checkpoint
# committed); anything else failed.
set -uo pipefail

REQUEUE_EXIT=85
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 2000))}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-titans}}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
MAX_RESTARTS=${MAX_RESTARTS:-0}

if [ -z "${NPROC_PER_NODE:-}" ]; then
    # torch's own count, in the interpreter the ranks use (nvidia-smi -L ignores
    # CUDA_VISIBLE_DEVICES and MIG); exit status 2: GPUs that torch cannot use (message printed).
    gpus=$("$PYTHON" "$root/launch/visible_gpus.py") || exit 1
    if [ "$gpus" -gt 0 ]; then
        NPROC_PER_NODE=$gpus
        why="one per GPU that torch sees"
    elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
        NPROC_PER_NODE=$((SLURM_CPUS_ON_NODE / ${CPUS_PER_PROC:-1}))
        why="no GPU; SLURM_CPUS_ON_NODE=$SLURM_CPUS_ON_NODE / CPUS_PER_PROC=${CPUS_PER_PROC:-1}"
    else
        # A CPU run's process count must divide the global batch: the core count of an
        # arbitrary machine rarely does, so ask for it explicitly.
        NPROC_PER_NODE=1
        why="no GPU and no SLURM allocation: set NPROC_PER_NODE=N for N CPU processes"
    fi
    echo "torchrun.sh: $NPROC_PER_NODE process(es) on $(hostname) ($why)" >&2
fi

args=(--nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS")
if [ "$NNODES" = 1 ]; then
    args+=(--standalone)
else
    : "${MASTER_ADDR:?MASTER_ADDR must name the first node when NNODES > 1}"
    args+=(--nnodes="$NNODES" --rdzv-backend="$RDZV_BACKEND" --rdzv-id="$RDZV_ID")
    args+=(--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT")
    if [ "$RDZV_BACKEND" = static ]; then
        args+=(--node-rank="${NODE_RANK:-${SLURM_NODEID:-0}}")
    fi
fi
if [ -n "${SHUTDOWN_TIMEOUT:-}" ]; then
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

# A worker that stops for a requeue writes the reason here and exits 0, because torchrun would
# restart a group with a non-zero exit and reports every failure as 1 (preemption.py).
exit_file=$(mktemp "${TMPDIR:-/tmp}/titans-exit.XXXXXX")
trap 'rm -f "$exit_file"' EXIT
export TITANS_EXIT_FILE=$exit_file
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A group that can restart gets a fresh store for every restart: with the rendezvous store shared
# (torch's default), a restarted rank can read a dead rank's address (pytorch #135712; seen here
# as gloo's "connectFullMesh failed ... Connection refused" after --max-restarts). Only then: an
# unshared store makes rank 0 bind a port that torchrun picked free and released seconds before,
# and another process took it once (EADDRINUSE, 2026-12-01). A shared store is already bound.
if [ "$MAX_RESTARTS" != 0 ]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
# NCCL: a timed-out collective makes the watchdog abort the waiting ranks; their flight recorders
# dump the last collectives first (`torchfrtrace DIR` names the rank that never joined; docs/devices.md).
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-${TMPDIR:-/tmp}/titans-nccl-$RDZV_ID/rank_}
mkdir -p "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")"
# torchrun's agent handles these only (its --signals-to-handle; PET_* is how torchrun reads any
# option from the environment, and older torchruns ignore it); USR1 and TERM stay ignored.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

if [ "${DRY_RUN:-0}" = 1 ]; then
    share=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:+TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE }
    echo "$share$PYTHON -m torch.distributed.run ${args[*]} ${extra[*]} -m titans_train.cli $*"
    exit 0
fi

agent=""
forward() {
    echo "torchrun.sh: SIG$1, forwarding it to the training processes" >&2
    if [ -n "$agent" ]; then
        pkill "-$1" -P "$agent" || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Ignored dispositions survive exec: the agent ignores USR1/TERM, and so do its workers until
# the trainer installs its own handlers, early in start-up.
(
    trap '' USR1 TERM
    exec "$PYTHON" -m torch.distributed.run "${args[@]}" "${extra[@]}" -m titans_train.cli "$@"
) &
agent=$!
while :; do
    wait "$agent"
    rc=$?
    kill -0 "$agent" 2>/dev/null || break # still running: a forwarded signal interrupted wait
done
if [ "$rc" -gt 128 ]; then # maybe that interruption, not the agent's status: ask once more
    wait "$agent" 2>/dev/null
    again=$?
    [ "$again" -ne 127 ] && rc=$again
fi

if grep -q '^requeue' "$exit_file"; then
    echo "torchrun.sh: $(cat "$exit_file")" >&2
    exit "$REQUEUE_EXIT"
fi
exit "$rc"
