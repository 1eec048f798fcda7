#!/usr/bin/env bash
# Submit titans-train to SLURM through launch/slurm.sbatch; prints the job id and its log file.
#
#   launch/submit.sh [sbatch options --] --config configs/experiments/X.yaml [key=value ...]
#   launch/submit.sh --nodes=4 --gpus-per-node=8 --time=2-00:00:00 -- --config X.yaml
#
# Paths in the config are relative to the directory you submit from (the job starts there).
# Environment: LOG_DIR (default runs/slurm-logs; one file per job, requeued attempts append),
# plus every variable launch/torchrun.sh reads: sbatch passes the environment to the job.
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

LOG_DIR=${LOG_DIR:-runs/slurm-logs}
mkdir -p "$LOG_DIR" # sbatch does not create it, and a job without its log dir fails silently
export TITANS_ROOT=$root
job=$(sbatch --parsable --output="$LOG_DIR/%x-%j.log" "${sbatch_args[@]}" \
    "$root/launch/slurm.sbatch" "$@")
job=${job%%;*}
log=$(scontrol show job "$job" | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
echo "submitted job $job; log: ${log:-$LOG_DIR}"
