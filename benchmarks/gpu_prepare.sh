#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what benchmarks/gpu.sh needs on a GPU machine that has JAX,
# PyTorch and CUDA but no network and no TensorFlow: the wheels of Keras and of the packages
# this project imports that such a machine lacks, at requirements.lock's versions, built for
# its Python (3.12 unless PYTHON_VERSION says otherwise), and the CIFAR-10 image-folder archive
# for the accuracy runs:
#
#   bash benchmarks/gpu_prepare.sh [CIFAR10_TAR_GZ]   # default ../shared/datasets/cifar10-jpeg.tar.gz
#
# Then, on the GPU machine, from a copy of this checkout that includes .gpu/:
#
#   bash benchmarks/gpu.sh --plan short --wheels .gpu/wheels OUT_DIR .gpu/cifar10-jpeg.tar.gz
set -euo pipefail
archive=${1:-}
[ -z "$archive" ] || archive=$(realpath -m "$archive")  # as given, before the cd below
cd "$(dirname "$0")/.."
archive=${archive:-../shared/datasets/cifar10-jpeg.tar.gz}
# on the GPU machines this project was measured on, everything else the benchmarks import was
# already installed (numpy, h5py, ml-dtypes, absl-py, rich, pyyaml, pillow, jax, torch, ...)
packages=(keras namex optree pydantic pydantic-core annotated-types typing-inspection)
python_version=${PYTHON_VERSION:-3.12}
py=${PYTHON:-python3}

pins=()
for name in "${packages[@]}"; do
    pin=$(grep -i "^${name}==" requirements.lock || true)
    if [ -z "$pin" ]; then
        echo "error: requirements.lock pins no version of $name; add it there or drop it from" \
            "this script's package list" >&2
        exit 2
    fi
    pins+=("$pin")
done
if [ ! -f "$archive" ]; then
    echo "error: $archive not found: pass CIFAR-10 as an image-folder .tar.gz" \
        "(train/<class>/*.jpg, test/<class>/*.jpg)" >&2
    exit 2
fi

staging=$(mktemp -d .gpu-staging.XXXXXX)
trap 'rm -rf "$staging"' EXIT
platforms=()
for n in 17 27 28 34 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    -d "$staging/wheels" "${pins[@]}"
cp "$archive" "$staging/cifar10-jpeg.tar.gz"
rm -rf .gpu
mv "$staging" .gpu
echo "wrote .gpu/ ($(du -sh .gpu | cut -f1)):"
ls -1 .gpu/wheels
echo
echo "on the GPU machine, in a copy of this checkout that includes .gpu/:"
echo "  bash benchmarks/gpu.sh --plan short --wheels .gpu/wheels OUT_DIR .gpu/cifar10-jpeg.tar.gz"
