#!/bin/bash
# Fine-tune the teacher with DeepSpeed on 1 or many nodes:
#   sbatch slurm/teacher.sh configs/teacher_llama7b.yaml [key=value ...]
#   sbatch --nodes=8 slurm/teacher.sh configs/teacher_llama7b.yaml
# One srun task per node runs the deepspeed launcher for that node (no ssh), all meeting at the
# first node. Always --resume: a requeued or resubmitted job continues from its last checkpoint.
#SBATCH --job-name=recdistill-teacher
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
source "${RECDISTILL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
check_inputs trainer/teacher.py --resume

OUTPUT_DIR=$(config_value train.output_dir)
write_hostfile "$OUTPUT_DIR"

run_and_requeue "$OUTPUT_DIR/STOP" deepspeed_per_node trainer/teacher.py --config "$CONFIG" --resume "${ARGS[@]}"
