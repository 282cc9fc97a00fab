#!/bin/bash
# Teacher outputs into shards, on 1 or many nodes:
#   sbatch slurm/precompute.sh configs/precompute_demo.yaml [key=value ...]
# Resumable by construction: a requeued or resubmitted job skips the finished shard groups.
#SBATCH --job-name=recdistill-precompute
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
source "${RECDISTILL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
check_inputs trainer/precompute.py

OUTPUT_DIR=$(config_value output_dir)
write_hostfile "$OUTPUT_DIR"

# On USR1 every data-parallel rank stops after its current shard group and the job is requeued;
# the rerun skips the finished groups (a kill loses at most the groups being written).
run_and_requeue "$OUTPUT_DIR/STOP" deepspeed_per_node trainer/precompute.py --config "$CONFIG" "${ARGS[@]}"
