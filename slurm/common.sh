# Sourced by the sbatch scripts: environment, rendezvous and the checkpoint-and-requeue trap.
# Inputs (environment): CONFIG or the first script argument (a job config), further arguments or
# OVERRIDES (config overrides), RECDISTILL_HOME (repository on a shared filesystem; default: the
# submit directory), PYTHON (default: $RECDISTILL_HOME/.venv/bin/python),
# RECDISTILL_PROCS_PER_NODE (default: the GPUs Slurm gave each node).
set -euo pipefail

REPO=${RECDISTILL_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PYTHON")
if [ -z "${CONFIG:-}" ]; then
    CONFIG=${1:?usage: sbatch $0 CONFIG [key=value ...]  (or set CONFIG)}
    shift
fi
read -r -a EXTRA <<< "${OVERRIDES:-}"
ARGS=("$@" "${EXTRA[@]}")

export MASTER_ADDR=${MASTER_ADDR:-$("$PYTHON" -m recdistill.launcher.slurm master-addr)}
export MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -m recdistill.launcher.slurm free-port)}
export PROCS_PER_NODE=${PROCS_PER_NODE:-$("$PYTHON" -m recdistill.launcher.slurm procs-per-node)}
export NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
export PYTHONUNBUFFERED=1
echo "recdistill: job ${SLURM_JOB_ID:-local} on ${NUM_NODES} node(s) x ${PROCS_PER_NODE} processes," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG} ${ARGS[*]:-}"

# Where the job checkpoints; the USR1 trap asks it (through OUTPUT_DIR/STOP) to checkpoint now.
# Inside each node's srun task: Gloo (CPU collectives, also used beside NCCL) binds to the interface
# towards the first node unless GLOO_SOCKET_IFNAME is set; set NCCL_SOCKET_IFNAME yourself if needed.
NODE_SETUP='if [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    iface=$("$PYTHON" -m recdistill.launcher.slurm interface-to "$MASTER_ADDR"); [ -n "$iface" ] && export GLOO_SOCKET_IFNAME=$iface
fi'
export NODE_SETUP PYTHON BIN CONFIG

# deepspeed_per_node SCRIPT [ARGS...]: one srun task per node runs that node's deepspeed launcher
# (no ssh: --node_rank is the task's own SLURM_NODEID), all meeting at the first node.
deepspeed_per_node() {
    SCRIPT=$1
    shift
    export SCRIPT
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'eval "$NODE_SETUP"
        exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "$@"' _ "$@"
}

# write_hostfile DIR: the DeepSpeed hostfile (`host slots=N`) on the shared filesystem, where
# every node's launcher reads it; exports HOSTFILE.
write_hostfile() {
    mkdir -p "$1"
    HOSTFILE="$1/hostfile-${SLURM_JOB_ID:-local}"
    "$PYTHON" -m recdistill.launcher.slurm hostfile > "$HOSTFILE"
    export HOSTFILE
}

config_value() { "$PYTHON" -m recdistill.trainer.config "$CONFIG" "$1" "${ARGS[@]}"; }

# check_inputs SCRIPT [FLAGS...]: the job's own --check on the batch host before any srun, so a
# bad config key, path or vocabulary ends the job with one line, not a launcher traceback per node.
check_inputs() {
    local script=$1
    shift
    "$PYTHON" "$script" --check "$@" --config "$CONFIG" "${ARGS[@]}"
}

# run_and_requeue COMMAND...: runs COMMAND (an srun) in the background; on USR1 (sent by
# `#SBATCH --signal=B:USR1@120` before the time limit) writes the stop file, waits for the job
# to checkpoint and exit, then requeues this job, which resumes from that checkpoint.
run_and_requeue() {
    local stop_file=$1
    shift
    rm -f "$stop_file"
    trap 'echo "recdistill: USR1, asking for a checkpoint"; mkdir -p "$(dirname "$stop_file")"; touch "$stop_file"' USR1
    "$@" &
    local pid=$! code=0
    while true; do
        set +e
        wait "$pid"
        code=$?
        set -e
        kill -0 "$pid" 2>/dev/null || break  # still running: the wait was cut short by the trap
    done
    if [ -f "$stop_file" ]; then
        rm -f "$stop_file"
        echo "recdistill: checkpointed (exit $code); requeueing job ${SLURM_JOB_ID:-}"
        [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$code"
}
