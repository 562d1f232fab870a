#!/usr/bin/env bash
# SelMix on this machine's CUDA GPUs under DDP, FSDP2, DeepSpeed ZeRO-3 and bf16: a short run of a small ViT with
# each, then a check that the first gain matrix agrees across them and the step-time ratios against Trainer.
#
#   bash benchmarks/gpu_check.sh              # from the repository root; about 8 minutes with the installs
#   PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check.sh    # the Python whose CUDA torch to reuse
#
# Installs into .venv-gpu (seeing the system's packages, so a CUDA torch already there is reused): this library,
# and deepspeed when it is absent. Exits 1 when a gain matrix disagrees, 2 when there is no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi; this check needs CUDA GPUs" >&2; exit 2; }
GPUS=$(nvidia-smi -L | wc -l)
VENV=${VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q -e .
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: this torch has no CUDA; install a CUDA build of torch first')"
"$PY" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "$PY" -m pip install -q deepspeed
OUT=$(mktemp -d)
echo "gpu_check: $GPUS GPU(s), results in $OUT"

leg() {  # leg NAME ACCELERATE_CONFIG PRECISION [gpu_check.py flags]: the recipes' accelerate configs, as shipped
  local name=$1 config=$2 precision=$3
  shift 3
  "$VENV/bin/accelerate" launch --config_file "recipes/configs/accelerate/$config.yaml" --num_processes "$GPUS" \
    --mixed_precision "$precision" benchmarks/gpu_check.py --name "$name" --out "$OUT/$name.json" "$@"
}
leg ddp ddp no
leg fsdp2 fsdp2 no
leg zero3 deepspeed_zero3 no
leg bf16 ddp bf16 --bf16
"$PY" benchmarks/gpu_check.py --compare "$OUT/ddp.json" "$OUT/fsdp2.json" "$OUT/zero3.json" "$OUT/bf16.json"
