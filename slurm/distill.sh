#!/bin/bash
# Distil a student with Accelerate on 1 or many nodes:
#   sbatch slurm/distill.sh configs/distill_demo.yaml [key=value ...]
# One srun task per node runs `accelerate launch` with that node's --machine_rank (SLURM_NODEID is
# expanded inside the task: in the batch script it would be 0 on every node).
#SBATCH --job-name=recdistill-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
source "${RECDISTILL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
check_inputs trainer/distill.py --resume

OUTPUT_DIR=$(config_value train.output_dir)
export TOTAL_PROCS=$((NUM_NODES * PROCS_PER_NODE))
export MIXED_PRECISION=${MIXED_PRECISION:-no}

run_and_requeue "$OUTPUT_DIR/STOP" \
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'eval "$NODE_SETUP"
        multi=(); [ "$TOTAL_PROCS" -gt 1 ] && multi=(--multi_gpu)
        exec "$BIN/accelerate" launch --num_machines "$NUM_NODES" --machine_rank "$SLURM_NODEID" \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
            --num_processes "$TOTAL_PROCS" "${multi[@]}" --mixed_precision "$MIXED_PRECISION" \
            --dynamo_backend no trainer/distill.py --config "$CONFIG" --resume "$@"' _ "${ARGS[@]}"
