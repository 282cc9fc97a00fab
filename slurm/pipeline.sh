#!/bin/bash
# Submit teacher -> precompute -> distill, each starting only if the previous one succeeded:
#   slurm/pipeline.sh TEACHER_CONFIG PRECOMPUTE_CONFIG DISTILL_CONFIG [sbatch options...]
# e.g. slurm/pipeline.sh configs/teacher_llama7b.yaml configs/precompute_7b.yaml configs/distill.yaml --nodes=8
# Prints the three job ids. Requeued jobs keep their ids, so the chain survives requeues.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${1:?teacher config}; PRECOMPUTE=${2:?precompute config}; DISTILL=${3:?distill config}
shift 3
teacher=$(sbatch --parsable "$@" slurm/teacher.sh "$TEACHER")
precompute=$(sbatch --parsable --dependency=afterok:"$teacher" "$@" slurm/precompute.sh "$PRECOMPUTE")
distill=$(sbatch --parsable --dependency=afterok:"$precompute" "$@" slurm/distill.sh "$DISTILL")
echo "teacher $teacher precompute $precompute distill $distill"
