#!/usr/bin/env bash
# GROOD on OpenOOD v1.5 CIFAR-100 (paper 004, Table 2): the CIFAR-10 recipe on the cifar100 benchmark.
#
#   recipes/grood-cifar100.sh CKPT [CKPT ...]   (OpenOOD v1.5 CIFAR-100 ResNet-18 checkpoints)
set -euo pipefail
BENCH=cifar100 exec "$(dirname "$0")/grood-cifar10.sh" "$@"
