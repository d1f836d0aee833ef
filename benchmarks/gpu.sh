#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one command, on a machine with an NVIDIA GPU,
# JAX with CUDA and PyTorch with CUDA:
#
#   bash benchmarks/gpu.sh [OUT_DIR] [CIFAR10_IMAGEFOLDER_TAR_GZ]
#
# Keras runs on the JAX backend (TensorFlow is not needed). Writes OUT_DIR/throughput-*.json,
# train_stage.json, memory.json and, when the CIFAR-10 archive is given, precision.json, and
# echoes everything.
set -euo pipefail
out=${1:-benchmarks/out-gpu}
cifar=${2:-}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# ResNet20 v1: every configuration, full CIFAR-10-sized epochs (50,000 images)
$py benchmarks/throughput.py --device gpu --nets resnet20_v1 --images 50000 --epochs 2 \
    --json "$out/throughput-resnet20_v1.json"
# the deeper nets: our default against the reference's fastest configurations
for net in resnet56_v1 resnet110_v2 densenet_bc_100_k12; do
    $py benchmarks/throughput.py --device gpu --nets "$net" --images 25600 --epochs 1 \
        --keras-configs params --torch-configs bf16+channels_last,bf16+channels_last+compile \
        --json "$out/throughput-$net.json"
done
# the train stage's own loop (callbacks, validation) against the bare fit
$py benchmarks/train_stage.py --device gpu --images 50000 --val 10000 --epochs 2 \
    --json "$out/train_stage.json"
$py benchmarks/memory.py --device gpu --batches 32,64,128,256 --json "$out/memory.json"
if [ -n "$cifar" ]; then
    $py benchmarks/precision_accuracy.py --source "$cifar" --epochs "${EPOCHS:-15}" \
        --seeds 1,2 --precisions float32,mixed_bfloat16 --json "$out/precision.json"
fi
