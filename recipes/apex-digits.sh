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
# Usage: recipes/apex-digits.sh [STORE]   (OODCLI="python -m oodcli" to use a venv's python)
set -eu
OODCLI=${OODCLI:-oodcli}
STORE=${1:-stores/digits.zarr}
MODELS=$(dirname "$STORE")/$(basename "$STORE" .zarr)

$OODCLI select-k --store "$STORE" --model digits_cnn --layer penultimate
for m in apex palm; do
  $OODCLI train $m --head-only --store "$STORE" --backbone digits_cnn --out "$MODELS-$m.safetensors" --epochs 100
  $OODCLI extract --model $m --weights "$MODELS-$m.safetensors" --benchmark digits --store "$STORE" --overwrite
  $OODCLI score $m --store "$STORE" --backbone $m -p $m.layer=embedding
done
$OODCLI analyze collisions --store "$STORE"
