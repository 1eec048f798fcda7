#!/usr/bin/env bash
# Submit titans-train to SLURM through launch/slurm.sbatch; prints the job id and its log file.
#
#   launch/submit.sh [sbatch options --] --config configs/experiments/X.yaml [key=value ...]
#   launch/submit.sh --nodes=4 --gpus-per-node=8 --time=2-00:00:00 -- --config X.yaml
#
# Paths in the config are relative to the directory you submit from (the job starts there).
# Environment: LOG_DIR (default runs/slurm-logs; one file per job, requeued attempts append);
# CPUS_PER_TASK: the CPUs of each node's one task, which runs all of the node's ranks and their
# data workers: "exclusive" (default: whole nodes, --exclusive), a number (--cpus-per-task=N), or
# "none" (the cluster's default, often 1 CPU). An explicit --exclusive, --cpus-per-task, -c or
# --cpus-per-gpu among the sbatch options wins. DRY_RUN=1 prints the sbatch command instead.
# Plus every variable launch/torchrun.sh reads: sbatch passes the environment to the job.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    sbatch_args+=("$1")
    shift
done
if [ $# -eq 0 ]; then # no "--": every argument is for the trainer
    set -- "${sbatch_args[@]}"
    sbatch_args=()
else
    shift
fi

cpu_request() { # the sbatch option for the task's CPUs, unless the options already have one
    local arg
    for arg in "${sbatch_args[@]}"; do
        case $arg in --exclusive* | --cpus-per-task* | --cpus-per-gpu* | -c*) return ;; esac
    done
    case ${CPUS_PER_TASK:-exclusive} in
        exclusive) echo --exclusive ;;
        none) ;;
        *[!0-9]* | "" | 0)
            echo "submit.sh: CPUS_PER_TASK='$CPUS_PER_TASK': use exclusive, none or a number" >&2
            return 1
            ;;
        *) echo "--cpus-per-task=$CPUS_PER_TASK" ;;
    esac
}
cpus=$(cpu_request) || exit 2
if [ -n "$cpus" ]; then
    sbatch_args=("$cpus" "${sbatch_args[@]}")
fi

LOG_DIR=${LOG_DIR:-runs/slurm-logs}
if [ "${DRY_RUN:-0}" = 1 ]; then # print the sbatch command instead of submitting
    echo "sbatch --parsable --output=$LOG_DIR/%x-%j.log ${sbatch_args[*]} $root/launch/slurm.sbatch $*"
    exit 0
fi
mkdir -p "$LOG_DIR" # sbatch does not create it, and a job without its log dir fails silently
export TITANS_ROOT=$root
job=$(sbatch --parsable --output="$LOG_DIR/%x-%j.log" "${sbatch_args[@]}" \
    "$root/launch/slurm.sbatch" "$@")
job=${job%%;*}
log=$(scontrol show job "$job" | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
echo "submitted job $job; log: ${log:-$LOG_DIR}"
