#!/bin/bash
# Submit teacher -> precompute -> distill, each starting only if the previous one succeeded:
#   slurm/pipeline.sh [--paths slurm/paths.env] [--teacher-nodes 8] [--precompute-nodes 8]
#                     [--distill-nodes 1] [--dry-run] [sbatch options...]
# Paths come from one file (slurm/paths.env: data, base model, runs folder) and reach every job
# as overrides; the configs are TEACHER_CONFIG, PRECOMPUTE_CONFIG, DISTILL_CONFIG (default the
# 7B ones in configs/). The teacher's inputs are checked before anything is submitted; each job
# checks its own again when it starts. --dry-run prints the sbatch command lines instead.
# Prints the three job ids. Requeued jobs keep their ids, so the chain survives requeues.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=slurm/paths.env TEACHER_NODES=8 PRECOMPUTE_NODES=8 DISTILL_NODES=1 DRY_RUN=0
SBATCH_OPTIONS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --paths) PATHS=$2; shift 2 ;;
        --teacher-nodes) TEACHER_NODES=$2; shift 2 ;;
        --precompute-nodes) PRECOMPUTE_NODES=$2; shift 2 ;;
        --distill-nodes) DISTILL_NODES=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) SBATCH_OPTIONS+=("$1"); shift ;;
    esac
done
[ -f "$PATHS" ] || { echo "error: $PATHS: no such paths file" >&2; exit 2; }
# shellcheck source=paths.env
source "$PATHS"
TEACHER_CONFIG=${TEACHER_CONFIG:-configs/teacher_llama7b.yaml}
PRECOMPUTE_CONFIG=${PRECOMPUTE_CONFIG:-configs/precompute_llama7b.yaml}
DISTILL_CONFIG=${DISTILL_CONFIG:-configs/distill_sasrec.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
TEACHER_DIR=$RECDISTILL_RUNS/teacher7b SHARDS_DIR=$RECDISTILL_RUNS/teacher7b-shards
STUDENT_DIR=$RECDISTILL_RUNS/sasrec-distilled

teacher_args=("$TEACHER_CONFIG" "data.dir=$RECDISTILL_DATA" "model.backbone_path=$RECDISTILL_BASE_MODEL"
              "train.output_dir=$TEACHER_DIR")
precompute_args=("$PRECOMPUTE_CONFIG" "teacher=$TEACHER_DIR/final" "data.dir=$RECDISTILL_DATA"
                 "output_dir=$SHARDS_DIR")
distill_args=("$DISTILL_CONFIG" "data.dir=$RECDISTILL_DATA" "shards.dir=$SHARDS_DIR"
              "train.output_dir=$STUDENT_DIR")

if [ "$DRY_RUN" = 1 ]; then
    printf 'sbatch --nodes=%s' "$TEACHER_NODES"; printf ' %q' "${SBATCH_OPTIONS[@]}" slurm/teacher.sh "${teacher_args[@]}"; echo
    printf 'sbatch --nodes=%s' "$PRECOMPUTE_NODES"; printf ' %q' "${SBATCH_OPTIONS[@]}" slurm/precompute.sh "${precompute_args[@]}"; echo
    printf 'sbatch --nodes=%s' "$DISTILL_NODES"; printf ' %q' "${SBATCH_OPTIONS[@]}" slurm/distill.sh "${distill_args[@]}"; echo
    exit 0
fi
"$PYTHON" trainer/teacher.py --check --resume --config "${teacher_args[@]}" >/dev/null
teacher=$(sbatch --parsable --nodes="$TEACHER_NODES" "${SBATCH_OPTIONS[@]}" slurm/teacher.sh "${teacher_args[@]}")
precompute=$(sbatch --parsable --nodes="$PRECOMPUTE_NODES" --dependency=afterok:"$teacher" \
    "${SBATCH_OPTIONS[@]}" slurm/precompute.sh "${precompute_args[@]}")
distill=$(sbatch --parsable --nodes="$DISTILL_NODES" --dependency=afterok:"$precompute" \
    "${SBATCH_OPTIONS[@]}" slurm/distill.sh "${distill_args[@]}")
echo "teacher $teacher precompute $precompute distill $distill"
