#!/usr/bin/env bash
# APEX and PALM on CIFAR-100 with a ResNet-34 trained from scratch (paper 000: Tables 1, 2, 4), CLI only.
#
#   recipes/apex-cifar100.sh
#
# A GPU job: two 500-epoch ResNet-34 trainings. The images and benchmark_imglist/ of OpenOOD v1.5
# must be under $OODCLI_DATA_ROOT (default ./data), and DINOv2-B weights reachable by transformers
# (the Hugging Face hub, or DINOV2=/path/to/a/save_pretrained/folder). The OOD sets are OpenOOD
# v1.5's (near: CIFAR-10, TinyImageNet; far: MNIST, SVHN, Textures, Places365); the paper's LSUN
# and iSUN can be added to the store with 'oodcli extract --data ... --split ood/far/lsun'.
# The report's FPR@95 is ID positive (the share of OOD kept at 95% ID recall: "the FPR of OOD
# samples when the TPR of ID samples is 95%", sec. 4.1).
# Environment (defaults = the paper's):
#   MODEL cifar_resnet34   EPOCHS 500   BATCH 512   LR 0.5      (the APM / PALM trainings)
#   DINO_MODEL dinov2-base with DINOV2 (its weights: a hub id or a local folder)   K_RANGE 1..10 (select-k)
#   PALM_K 6 (PALM's prototypes per class)   ALPHA 0.5 (PAOS calibration strength)
#   STORES (stores), DEVICE (cuda), WORKERS (8), OODCLI (oodcli)
set -euo pipefail
STORES=${STORES:-stores}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-8}
MODEL=${MODEL:-cifar_resnet34}
EPOCHS=${EPOCHS:-500}
BATCH=${BATCH:-512}
LR=${LR:-0.5}
PALM_K=${PALM_K:-6}
ALPHA=${ALPHA:-0.5}
K_RANGE=${K_RANGE:-1..10}
OODCLI=${OODCLI:-oodcli}
DINO_MODEL=${DINO_MODEL:-dinov2-base}
DINOV2=${DINOV2:-facebook/dinov2-base}
DINO_STORE="$STORES/apex-cifar100-dinov2.zarr"
STORE="$STORES/apex-cifar100.zarr"
mkdir -p "$STORES"

# 1. K_c* per class (eq. 1): DINOv2-B CLS features of the 50k train images, GMM + BIC per class
$OODCLI extract --model "$DINO_MODEL" --weights "$DINOV2" --benchmark cifar100 --split train --layers cls \
  --store "$DINO_STORE" --device "$DEVICE" --workers "$WORKERS"
$OODCLI select-k --store "$DINO_STORE" --model "$DINO_MODEL" --layer cls --k-range "$K_RANGE"

# 2. APM (K_c* from step 1) and PALM (K = 6), ResNet-34 + MLP head onto the 128-d sphere, end to end:
#    500 epochs, SGD momentum 0.9, lr 0.5 cosine, batch 512 (PALM's defaults, the trainers' defaults)
$OODCLI train apex --benchmark cifar100 --model "$MODEL" --k-from "$DINO_STORE" --epochs "$EPOCHS" \
  --batch-size "$BATCH" --lr "$LR" --device "$DEVICE" --workers "$WORKERS" --out "$STORES/cifar100-apex.safetensors"
$OODCLI train palm --benchmark cifar100 --model "$MODEL" --k "$PALM_K" --epochs "$EPOCHS" \
  --batch-size "$BATCH" --lr "$LR" --device "$DEVICE" --workers "$WORKERS" --out "$STORES/cifar100-palm.safetensors"

# 3. both trained networks as backbones over every split: penultimate features, the 128-d
#    embedding, and their prototypes with qualities (backbones/<apex|palm>/prototypes)
for m in apex palm; do
  $OODCLI extract --model $m --weights "$STORES/cifar100-$m.safetensors" --benchmark cifar100 \
    --store "$STORE" --device "$DEVICE" --workers "$WORKERS"
done

# 4. Table 1: inter-class prototype collisions (Q_S < 1e-2)
$OODCLI analyze collisions --store "$STORE"
$OODCLI analyze collisions --store "$STORE" --json > "$STORES/apex-cifar100-collisions.json"

# 5. Table 4's PAOS ablations on the APM model (each re-scores 'apex'; its report is kept), then
#    Table 2: PALM (Mahalanobis) and APEX (PAOS, alpha 0.5) on the penultimate features
for ablation in "apm alpha=0" "no-qc cohesion=false" "no-qs separation=false"; do
  set -- $ablation
  $OODCLI score apex --store "$STORE" --backbone apex -p "apex.$2"
  $OODCLI report --store "$STORE" --methods apex --fpr id --format json > "$STORES/apex-cifar100-$1.json"
done
$OODCLI score palm --store "$STORE" --backbone palm
$OODCLI score apex --store "$STORE" --backbone apex -p "apex.alpha=$ALPHA"
$OODCLI report --store "$STORE" --methods palm,apex --fpr id
$OODCLI report --store "$STORE" --methods palm,apex --fpr id --format json > "$STORES/apex-cifar100.json"
