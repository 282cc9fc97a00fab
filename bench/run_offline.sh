#!/usr/bin/env bash
# A benchmark scale on a machine with no package index (a GPU node of an air-gapped cluster, a
# lent machine with a time limit): install the wheel folder, run bench/quality.py and
# bench/speed.py, and pack the results and logs into OUT, also when a stage fails.
#
#   python -m recdistill.launcher.wheelhouse --out .whl --have target_freeze.txt   # here, online
#   bash bench/run_offline.sh .whl DATA_ROOT OUT [SCALE] [DEVICE] [QUALITY_ARGS...] # there
#
# WHEELS: the folder recdistill.launcher.wheelhouse filled. DATA_ROOT: holds ml-1m/ml-1m.txt (and
# beauty/Beauty.txt). OUT: gets env.txt (devices and versions), quality.log, speed.log and
# SCALE.tgz (bench/results/*SCALE* and every run's configs, logs and metrics; no weights or
# shards). SCALE: a bench/configs name (default gpu_short). DEVICE: speed.py's torch device
# (default cuda). QUALITY_ARGS: passed to bench/quality.py (default: --students sasrec
# --variants plain both). The python is $PYTHON (default python3), whose torch is the machine's.
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ $# -lt 3 ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; } && exit 0
    exit 2
fi
wheels=${1:?usage: run_offline.sh WHEELS DATA_ROOT OUT [SCALE] [DEVICE] [QUALITY_ARGS...]}
data_root=${2:?DATA_ROOT: the folder holding ml-1m/ml-1m.txt}
out=${3:?OUT: where the logs and the results archive go}
scale=${4:-gpu_short}
name=$(basename "$scale" .yaml)  # a scale may be given as a file
device=${5:-cuda}
shift $(($# < 5 ? $# : 5))
quality_args=("$@")
[ ${#quality_args[@]} -gt 0 ] || quality_args=(--students sasrec --variants plain both)
python=${PYTHON:-python3}
# the paths as given, before moving to the repository root
wheels=$(realpath "$wheels") && data_root=$(realpath "$data_root") && out=$(realpath -m "$out") || exit 1
[ -f "$scale" ] && scale=$(realpath "$scale")
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
export PYTHONUNBUFFERED=1

pack() {  # whatever there is, on success and on failure alike
    local work="runs/bench_$name"
    local files=(bench/results/*"$name"*)
    [ -d "$work" ] && mapfile -t -O ${#files[@]} files < <(find "$work" -type f \
        \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.yaml' -o -name '*.md' \))
    tar czf "$out/$name.tgz" --ignore-failed-read "${files[@]}" 2>/dev/null
    echo "run_offline: packed ${#files[@]} files into $out/$name.tgz"
}
trap pack EXIT

step() {  # name, command...: run it, its output on screen and in OUT/name.log
    local step_name=$1
    shift
    echo "=== $step_name: $*"
    local started=$SECONDS
    "$@" 2>&1 | tee "$out/$step_name.log"
    local code=${PIPESTATUS[0]}
    echo "=== $step_name: exit $code after $((SECONDS - started)) s"
    return "$code"
}

step install "$python" -m pip install --no-index --find-links "$wheels" \
    -r "$wheels/requirements.txt" || exit 1
step install-recdistill "$python" -m pip install --no-index --no-deps --no-build-isolation \
    -e . || exit 1
{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$python" - <<'EOF'
import importlib.metadata as metadata

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "device", (
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
for name in ("transformers", "accelerate", "deepspeed", "datasets", "webdataset", "peft",
             "pyarrow", "numpy", "huggingface_hub", "fsspec"):
    print(name, metadata.version(name))
EOF
} 2>&1 | tee "$out/env.txt"
if [ "$device" = cuda ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # An op DeepSpeed compiles just in time (FusedAdam, for a config without torch_adam) is
    # built for this GPU's architecture only, which is much quicker than for every one.
    TORCH_CUDA_ARCH_LIST=$("$python" -c \
        "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
    export TORCH_CUDA_ARCH_LIST
fi
step quality "$python" bench/quality.py --scale "$scale" --data-root "$data_root" \
    "${quality_args[@]}" || exit 1
step speed "$python" bench/speed.py --scale "$name" --device "$device" || exit 1
