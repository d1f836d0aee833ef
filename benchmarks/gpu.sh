#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, on a machine with an NVIDIA GPU, JAX with CUDA and
# PyTorch with CUDA (TensorFlow is not needed: Keras runs on the JAX backend):
#
#   bash benchmarks/gpu.sh [--plan full|short] [--wheels DIR] [--smoke] [OUT_DIR] [CIFAR10_TAR_GZ]
#
#   --plan full   (default) every GPU table: ResNet20 v1 in every configuration, the deeper
#                 nets, the train stage's own loop, DenseNet-BC-100's memory at batches 32-256
#                 and, given the archive, bfloat16 against float32 accuracy. About 30 minutes.
#   --plan short  what fits one command of a 15-minute GPU lease (at most about 8 minutes:
#                 each part stops at its own time limit): DenseNet-BC-100's memory at batches
#                 32, 128 and 256 beside four accuracy runs (two seeds each of float32 and
#                 bfloat16, EPOCHS=15 epochs of all of CIFAR-10), then target 2 alone (ResNet20
#                 v1, our defaults against torch.compile with CUDA graphs, 50,000-image epochs).
#   --wheels DIR  install the wheels in DIR (Keras and what it needs beyond the machine's own
#                 packages; benchmarks/gpu_prepare.sh fetches them) into a scratch directory
#                 first, for a machine without network
#   --smoke       the same steps at toy sizes on the CPU: checks the script and its Python
#                 imports on a machine without a GPU (what tests/test_gpu_script.py runs)
#
# Writes OUT_DIR/gpu.log (everything printed) and each part's JSON; ends with one line per part
# (ok, failed, or over its time limit) and exits 1 if any part did not finish. The short plan's
# limits, in seconds: TIMEOUT_MEMORY (200), TIMEOUT_PRECISION (300), TIMEOUT_THROUGHPUT (150).
set -uo pipefail  # not -e: a part that fails or runs out of time is reported and the rest run

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; }
plan=full smoke=0 wheels=
while [ $# -gt 0 ]; do
    case $1 in
        --plan) plan=${2:-}; shift 2 || { echo "error: --plan needs full or short" >&2; exit 2; } ;;
        --wheels) wheels=${2:-}; shift 2 || { echo "error: --wheels needs a directory" >&2; exit 2; } ;;
        --smoke) smoke=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "error: unknown option $1 (see bash benchmarks/gpu.sh --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
case $plan in
    full|short) ;;
    *) echo "error: --plan $plan: use full or short" >&2; exit 2 ;;
esac
out=${1:-benchmarks/out-gpu}
cifar=${2:-}
if [ -n "$cifar" ] && [ ! -f "$cifar" ]; then
    echo "error: $cifar not found: pass CIFAR-10 as an image-folder .tar.gz" \
        "(../shared/datasets/cifar10-jpeg.tar.gz), or leave it out to skip the accuracy runs" >&2
    exit 2
fi
if [ -n "$wheels" ] && ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "error: --wheels $wheels holds no .whl files: run bash benchmarks/gpu_prepare.sh first" >&2
    exit 2
fi
# the paths as given, then work from the repository root
mkdir -p "$out"
out=$(realpath "$out")
[ -z "$cifar" ] || cifar=$(realpath "$cifar")
[ -z "$wheels" ] || wheels=$(realpath "$wheels")
cd "$(dirname "$0")/.."
exec > >(tee "$out/gpu.log") 2>&1
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if [ -n "$wheels" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$scratch/site" "$wheels"/*.whl || { echo "error: installing $wheels failed" >&2; exit 2; }
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
fi

device=gpu
[ "$smoke" = 0 ] || device=cpu
names=() states=()
# Every part runs under coreutils' timeout, in a process group of its own that the time limit
# ends whole (memory.py's worker processes too). Ctrl-C or a TERM to this script stops the
# parts still running the same way, rather than leaving them behind.
running=()
stop_parts() {
    [ ${#running[@]} -eq 0 ] || { kill -TERM "${running[@]}"; wait "${running[@]}"; } 2>/dev/null
}
trap 'echo "interrupted: stopping the parts still running" >&2; stop_parts; exit 130' INT TERM
# part NAME SECONDS COMMAND...: run it alone under a time limit (0: none)
part() {
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    echo "== $name"
    timeout --kill-after=10 "$limit" "$@" &
    running=($!)
    wait "${running[0]}"
    rc=$?
    running=()
    record "$name" "$limit" "$rc" $((SECONDS - began))
}
# background NAME SECONDS COMMAND...: start it beside the others; settle waits for them all
declare -A waiting=() limits=() logs=()
background() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: started beside the others"
    logs[$name]="$scratch/log-${#logs[@]}"
    timeout --kill-after=10 "$limit" "$@" >"${logs[$name]}" 2>&1 &
    waiting[$!]=$name limits[$name]=$limit
    running+=($!)
}
settle() {
    local began=$SECONDS finished rc name
    while [ ${#waiting[@]} -gt 0 ]; do
        wait -n -p finished "${!waiting[@]}"
        rc=$?
        name=${waiting[$finished]}
        unset "waiting[$finished]"
        echo "== $name"
        cat "${logs[$name]}"
        record "$name" "${limits[$name]}" "$rc" $((SECONDS - began))
    done
    running=()
}
record() {
    local state
    case $3 in
        0) state="ok ($4 s)" ;;
        124|137) state="over its ${2} s limit: stopped" ;;
        *) state="failed (exit $3, $4 s)" ;;
    esac
    names+=("$1") states+=("$state")
}

echo "deepnets GPU measurements: plan $plan$([ "$smoke" = 1 ] && echo ', smoke (CPU, toy sizes)'), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
"$py" - "$device" <<'EOF' || exit 3
import sys
try:
    import jax, keras
except ImportError as error:
    sys.exit(f"error: {error}: this Python ({sys.executable}) lacks a package the measurements "
             "need; on a machine without network, fetch the wheels with bash "
             "benchmarks/gpu_prepare.sh and pass --wheels .gpu/wheels (or set PYTHON)")
found = jax.devices()
print(f"python {sys.version.split()[0]}, keras {keras.__version__} ({keras.backend.backend()}), "
      f"jax {jax.__version__}: {found}")
if sys.argv[1] == "gpu" and found[0].platform != "gpu":
    sys.exit("error: JAX sees no GPU, so nothing here would measure one; install JAX with "
             "CUDA (pip install 'jax[cuda13]') or use --smoke to check the script on a CPU")
EOF

if [ "$smoke" = 1 ]; then
    images=256 deep_images=256 epochs=1 stage_images=256 stage_val=128
    memory_net=resnet20_v1 batches_full=2,4 batches_short=2,4 steps=1 precision_epochs=1
    subset=(--train-images 64 --test-images 32)
    # torch.compile with CUDA graphs needs a GPU, and compiling costs minutes
    fastest=bf16+channels_last deeper=bf16+channels_last
else
    images=50000 deep_images=25600 epochs=2 stage_images=50000 stage_val=10000
    memory_net=densenet_bc_100_k12 batches_full=32,64,128,256 batches_short=32,128,256 steps=3
    precision_epochs=${EPOCHS:-15}
    subset=()
    fastest=bf16+channels_last+compile-cudagraphs deeper=bf16+channels_last,bf16+channels_last+compile
fi

if [ "$plan" = full ]; then
    # ResNet20 v1: every configuration
    part "throughput resnet20_v1" 0 "$py" benchmarks/throughput.py --device "$device" \
        --nets resnet20_v1 --images "$images" --epochs "$epochs" --json "$out/throughput-resnet20_v1.json"
    # the deeper nets: our default against the reference's fastest configurations
    for net in resnet56_v1 resnet110_v2 densenet_bc_100_k12; do
        part "throughput $net" 0 "$py" benchmarks/throughput.py --device "$device" --nets "$net" \
            --images "$deep_images" --epochs 1 --keras-configs params \
            --torch-configs "$deeper" \
            --json "$out/throughput-$net.json"
    done
    # the train stage's own loop (callbacks, validation) against the bare fit
    part "train stage" 0 "$py" benchmarks/train_stage.py --device "$device" --images "$stage_images" \
        --val "$stage_val" --epochs "$epochs" --json "$out/train_stage.json"
    part "memory" 0 "$py" benchmarks/memory.py --device "$device" --net "$memory_net" \
        --batches "$batches_full" --steps "$steps" --json "$out/memory.json"
    if [ -n "$cifar" ]; then
        part "precision" 0 "$py" benchmarks/precision_accuracy.py --source "$cifar" \
            --epochs "$precision_epochs" --seeds 1,2 --precisions float32,mixed_bfloat16 \
            "${subset[@]}" --json "$out/precision.json"
    fi
else
    # memory and accuracy side by side (neither is a timing), then the timing alone
    background "memory" "${TIMEOUT_MEMORY:-200}" "$py" benchmarks/memory.py --device "$device" \
        --net "$memory_net" --batches "$batches_short" --steps "$steps" --json "$out/memory.json"
    if [ -n "$cifar" ]; then
        for precision in float32 mixed_bfloat16; do
            for seed in 1 2; do
                background "precision $precision seed $seed" "${TIMEOUT_PRECISION:-300}" \
                    "$py" benchmarks/precision_accuracy.py --source "$cifar" \
                    --epochs "$precision_epochs" --seeds "$seed" --precisions "$precision" \
                    "${subset[@]}" --progress --json "$scratch/precision-$precision-$seed.json"
            done
        done
    fi
    settle
    if compgen -G "$scratch/precision-*.json" >/dev/null; then
        part "precision (merged)" 60 "$py" benchmarks/precision_accuracy.py \
            --merge "$scratch"/precision-*.json --json "$out/precision.json"
    fi
    part "throughput resnet20_v1" "${TIMEOUT_THROUGHPUT:-150}" "$py" benchmarks/throughput.py \
        --device "$device" --nets resnet20_v1 --images "$images" --epochs "$epochs" \
        --keras-configs params --torch-configs "$fastest" \
        --json "$out/throughput-resnet20_v1.json"
fi

echo "== summary (plan $plan, ${SECONDS} s)"
status=0
for i in "${!names[@]}"; do
    echo "  ${names[$i]}: ${states[$i]}"
    case ${states[$i]} in ok*) ;; *) status=1 ;; esac
done
exit $status
