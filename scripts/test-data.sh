#!/usr/bin/env bash
# Installs the real Fashion-MNIST (Debian package dataset-fashion-mnist) that the tests use as a
# local mirror, where apt is available and we may use it. Elsewhere the tests that need it skip
# and say why.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing dataset-fashion-mnist (Debian) for the real-data tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null 2>&1 || echo "could not install dataset-fashion-mnist; its tests will skip"
else
  echo "apt-get not usable here: the Fashion-MNIST tests will skip (install dataset-fashion-mnist)"
fi
exit 0
