#!/usr/bin/env bash
# Installs the Debian packages the tests use, where apt is available and we may use it:
# dataset-fashion-mnist (the real Fashion-MNIST, served as a local mirror) and graphviz (the
# train stage's architecture diagram). Elsewhere the tests that need them skip and say why.
set -u
wanted=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || wanted+=(dataset-fashion-mnist)
command -v dot >/dev/null 2>&1 || wanted+=(graphviz)
[ ${#wanted[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${wanted[*]} (Debian) for the tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${wanted[@]}") \
    >/dev/null 2>&1 || echo "could not install ${wanted[*]}; the tests that need them will skip"
else
  echo "apt-get not usable here: tests needing ${wanted[*]} will skip"
fi
exit 0
