#!/bin/sh
# APEX and PALM on the embedded digits benchmark, head-only on the digits CNN's cached
# penultimate features (the offline demo: 44 s on a busy 2-core CPU). Run after
#   oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr
# select-k runs on the trained digits CNN's penultimate features here: the paper uses
# DINOv2 features, but offline there are no pretrained DINOv2 weights and a random
# DINOv2's features mean nothing. The heads are then run as backbones by extract
# (rerunning the CNN on the images), and PAOS / PALM's Mahalanobis score their 128-d
# embedding: a head-only model's penultimate layer is the frozen CNN's, unchanged.
#
# The report's FPR@95 is ID positive, as in the paper (sec. 4.1: "the FPR of OOD samples when the
# TPR of ID samples is 95%").
#
# Usage: recipes/apex-digits.sh [STORE]   (OODCLI="python -m oodcli" to use a venv's python)
# Environment: MODEL (digits_cnn: the backbone in STORE whose penultimate features the heads read),
# EPOCHS (100), PALM_K (6), ALPHA (0.5, PAOS), OODCLI (oodcli).
set -eu
OODCLI=${OODCLI:-oodcli}
MODEL=${MODEL:-digits_cnn}
EPOCHS=${EPOCHS:-100}
PALM_K=${PALM_K:-6}
ALPHA=${ALPHA:-0.5}
STORE=${1:-stores/digits.zarr}
MODELS=$(dirname "$STORE")/$(basename "$STORE" .zarr)

$OODCLI select-k --store "$STORE" --model "$MODEL" --layer penultimate
$OODCLI train apex --head-only --store "$STORE" --backbone "$MODEL" --out "$MODELS-apex.safetensors" --epochs "$EPOCHS"
$OODCLI train palm --head-only --store "$STORE" --backbone "$MODEL" --out "$MODELS-palm.safetensors" --epochs "$EPOCHS" \
  --k "$PALM_K"
for m in apex palm; do
  $OODCLI extract --model $m --weights "$MODELS-$m.safetensors" --benchmark digits --store "$STORE" --overwrite
done
$OODCLI score palm --store "$STORE" --backbone palm -p palm.layer=embedding
$OODCLI score apex --store "$STORE" --backbone apex -p apex.layer=embedding -p "apex.alpha=$ALPHA"
$OODCLI analyze collisions --store "$STORE"
$OODCLI report --store "$STORE" --methods palm,apex --fpr id
$OODCLI report --store "$STORE" --methods palm,apex --fpr id --format json > "$MODELS-apex.json"
