#!/usr/bin/env bash
# The real-SLURM test: bring up a single-node cluster (cluster.sh), run tests/slurm/study.yaml
# through the SLURM executor plugin with the project's profile, exactly as users type it
# ('snakemake --cores all --profile slurm', from the repository root), cancel the fine-tuning job
# after its first epoch checkpoint (scancel: SLURM kills it; Snakemake resubmits it and it resumes),
# run the same study locally, compare (check.py), and stop the daemons this script started.
#
#   tests/slurm/run_study.sh [WORK_DIR]     (root; the SLURM and MariaDB Debian packages)
#
# Wrap it in 'timeout -k': the plugin waits forever when it cannot read job states.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/saeft-slurm.XXXXXX)}")
# The cluster's state in a folder of its own that the munge and mysql users can reach (the
# work folder may sit below a private one, such as pytest's temporary folders).
STATE=$(mktemp -d /tmp/saeft-slurm-cluster.XXXXXX)
STUDY=$ROOT/tests/slurm/study.yaml
mkdir -p "$WORK"
echo "run_study.sh: working in $WORK"

watcher="" runner=""
cleanup() {
    local status=$?
    trap - EXIT TERM INT
    [[ -n $watcher ]] && kill "$watcher" 2>/dev/null || true
    if [[ -n $runner ]] && kill -0 "$runner" 2>/dev/null; then
        # Snakemake cancels its SLURM jobs on SIGTERM; give it a moment, then stop the cluster anyway.
        kill -TERM "$runner" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$runner" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$runner" 2>/dev/null || true
    fi
    if "$ROOT/tests/slurm/cluster.sh" down "$STATE"; then
        rm -rf "$STATE"
    else
        status=1
    fi
    exit $status
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# Run a command in the background and wait for it, so that a TERM (from 'timeout') reaches the
# trap at once instead of after the command.
run() {
    "$@" &
    runner=$!
    wait "$runner"
    runner=""
}

"$ROOT/tests/slurm/cluster.sh" up "$STATE"
eval "$("$ROOT/tests/slurm/cluster.sh" env "$STATE")"
export SAEFT_SLURM_GPUS=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # a CPU-only cluster
unset MLFLOW_TRACKING_URI CUDA_VISIBLE_DEVICES

# Cancel the finetune job once its first epoch checkpoint exists, and record its job id.
(
    deadline=$((SECONDS + 600))
    until compgen -G "$WORK/slurm/results/slurmtest/finetune/*/*/*/seed0/checkpoint.pt" >/dev/null; do
        ((SECONDS < deadline)) || exit 0
        sleep 0.2
    done
    # The plugin names jobs by run; the rule is in the job's comment (rule_finetune_wildcards_...).
    for job in $(squeue -h -t RUNNING -o %i); do
        if scontrol show job "$job" | grep -q "Comment=rule_finetune_"; then
            scancel "$job" && echo "$job" >"$WORK/cancelled_job"
            echo "run_study.sh: cancelled finetune job $job after its first checkpoint"
            exit 0
        fi
    done
    echo "run_study.sh: saw the finetune checkpoint but no running finetune job to cancel"
) &
watcher=$!

started=$SECONDS
cd "$ROOT"
# Each evaluated run (zero-shot, saeft seed 0) is one evaluate_model job for all its eval splits;
# the profile groups both into one SLURM job (check.py checks it).
run snakemake --cores all --profile slurm --directory "$WORK/slurm" --configfile "$STUDY" \
    --slurm-init-seconds-before-status-checks 2
echo "run_study.sh: SLURM run took $((SECONDS - started))s"
wait "$watcher" || true
watcher=""

started=$SECONDS
run snakemake --cores 2 --directory "$WORK/local" --configfile "$STUDY" --quiet
echo "run_study.sh: local run took $((SECONDS - started))s"

python3 "$ROOT/tests/slurm/check.py" "$WORK"
