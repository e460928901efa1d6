#!/usr/bin/env bash
# GROOD on OpenOOD v1.5 CIFAR-10 (paper 004, Table 2 and the ablations of Table 4), with the CLI alone.
#
#   recipes/grood-cifar10.sh CKPT [CKPT ...]
#
# CKPT: OpenOOD v1.5's CIFAR-10 ResNet-18 checkpoints (e.g. s0/best.ckpt s1/best.ckpt s2/best.ckpt:
# the paper averages three training seeds). Each gets its own store and report.
# The images and benchmark_imglist/ of OpenOOD v1.5 must be under $OODCLI_DATA_ROOT (default ./data).
# The report's FPR@95 is OpenOOD v1.5's (OOD positive: the share of ID flagged at the first threshold
# that catches 95% of OOD), the protocol GROOD's tables follow; JSON carries both conventions.
# Environment (defaults = the paper's):
#   BENCH         cifar10 (recipes/grood-cifar100.sh sets cifar100)
#   MODEL         cifar_resnet18 (the network the checkpoints are for; see 'oodcli extract --list-models')
#   OOD_PROTOTYPE mixup (eq. 9; or noise, val, mean)   LAMBDA 0.5 (eq. 9)   QUANTILE 0.5 (proximity filter)
#   METHODS       GROOD, its ablations and the baselines scored and reported
#   STORES (stores), DEVICE (auto), WORKERS (0), OODCLI (oodcli)
set -euo pipefail
BENCH=${BENCH:-cifar10}
MODEL=${MODEL:-cifar_resnet18}
OOD_PROTOTYPE=${OOD_PROTOTYPE:-mixup}
LAMBDA=${LAMBDA:-0.5}
QUANTILE=${QUANTILE:-0.5}
METHODS=${METHODS:-grood,grood-distance,grood-gradnorm,grood-classgrad,knn,msp,energy}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-0}
OODCLI=${OODCLI:-oodcli}
if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKPOINT [CHECKPOINT ...]  (OpenOOD v1.5 $BENCH $MODEL state_dicts)" >&2
  exit 2
fi
mkdir -p "$STORES"
i=0
for ckpt in "$@"; do
  store="$STORES/grood-$BENCH-$i.zarr"
  echo "== $ckpt -> $store" >&2
  # 1. one backbone pass over every split: logits and penultimate features
  $OODCLI extract --model "$MODEL" --weights "$ckpt" --benchmark "$BENCH" --store "$store" --device "$DEVICE" \
    --workers "$WORKERS"
  # 2. class prototypes, the mixup OOD prototype (eq. 9, lambda 0.5; proximity filter at the median)
  #    and the gradients of every split (eq. 5); re-reads the train images for the early feature maps
  $OODCLI synthesize grood --store "$store" --ood-prototype "$OOD_PROTOTYPE" --lambda "$LAMBDA" --quantile "$QUANTILE" \
    --device "$DEVICE" --workers "$WORKERS"
  # 3. faiss IVF index over the 50k train gradients (exact below 20k rows)
  $OODCLI index --store "$store" --source grads/grood/train
  # 4. GROOD (eq. 6), its ablations and baselines; then the near/far AUROC table
  $OODCLI score "$METHODS" --store "$store"
  $OODCLI report --store "$store" --methods "$METHODS" --fpr openood
  $OODCLI report --store "$store" --methods "$METHODS" --fpr openood --format json > "$STORES/grood-$BENCH-$i.json"
  i=$((i + 1))
done
echo "reports: $STORES/grood-$BENCH-*.json (one per checkpoint; the paper averages them)" >&2
