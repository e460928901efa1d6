#!/usr/bin/env bash
# GROOD on OpenOOD v1.5 CIFAR-10 (paper 004, Table 2 and the ablations of Table 4), with the CLI alone.
#
#   recipes/grood-cifar10.sh CKPT [CKPT ...]
#
# CKPT: OpenOOD v1.5's CIFAR-10 ResNet-18 checkpoints (e.g. s0/best.ckpt s1/best.ckpt s2/best.ckpt:
# the paper averages three training seeds). Each gets its own store and report.
# The images and benchmark_imglist/ of OpenOOD v1.5 must be under $OODCLI_DATA_ROOT (default ./data).
# Environment: BENCH (cifar10; recipes/grood-cifar100.sh sets cifar100), STORES (default stores),
# DEVICE (default auto), OODCLI (default oodcli).
set -euo pipefail
BENCH=${BENCH:-cifar10}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-auto}
OODCLI=${OODCLI:-oodcli}
if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKPOINT [CHECKPOINT ...]  (OpenOOD v1.5 $BENCH ResNet-18 state_dicts)" >&2
  exit 2
fi
METHODS=grood,grood-distance,grood-gradnorm,grood-classgrad,knn,msp,energy
mkdir -p "$STORES"
i=0
for ckpt in "$@"; do
  store="$STORES/grood-$BENCH-$i.zarr"
  echo "== $ckpt -> $store" >&2
  # 1. one backbone pass over every split: logits and penultimate features
  $OODCLI extract --model cifar_resnet18 --weights "$ckpt" --benchmark "$BENCH" --store "$store" --device "$DEVICE"
  # 2. class prototypes, the mixup OOD prototype (eq. 9, lambda 0.5; proximity filter at the median)
  #    and the gradients of every split (eq. 5); re-reads the train images for the early feature maps
  $OODCLI synthesize grood --store "$store" --device "$DEVICE"
  # 3. faiss IVF index over the 50k train gradients
  $OODCLI index --store "$store" --source grads/grood/train
  # 4. GROOD (eq. 6), its ablations and baselines; then the near/far AUROC table
  $OODCLI score "$METHODS" --store "$store"
  $OODCLI report --store "$store" --methods "$METHODS"
  $OODCLI report --store "$store" --methods "$METHODS" --format json > "$STORES/grood-$BENCH-$i.json"
  i=$((i + 1))
done
echo "reports: $STORES/grood-$BENCH-*.json (one per checkpoint; the paper averages them)" >&2
