#!/usr/bin/env bash
# IIM + S-MCM (paper 001) with CLIP ViT-B/16, with the CLI alone: Table 1's ImageNet-1k rows and the
# ImageNet-500-Easy / ImageNet-500-Hard rows of Tables 1-2, zero-shot baselines beside them.
#
#   recipes/iim-imagenet.sh [BENCHMARK ...]      (default: imagenet-mos imagenet500-easy imagenet500-hard)
#
# Per benchmark: one pass of the CLIP image encoder over the few-shot train subset (the largest
# of SHOTS images per class, seed SEED: the smaller counts nest in it) and over every test set
# whole (image_embeds and the 196 value-path patch tokens per image, float16: patch_values, the
# local features IIM reads), the zero-shot MCM, GL-MCM and R-MCM*, then per few-shot setting
# (SHOTS, default "1 4 16") IIM's local and OOD prototype prompts (L = 16, k = 50, C_n = 300,
# lambda_neg 5, lambda_div 0.5, SGD lr 2.5e-4, batch 32, 50 epochs, T = 1) and its scores: S-MCM,
# S-MCM* (no OOD prompts), R-MCM with the trained prompts, GL-MCM local.
# The ImageNet folders (imagenet/train, imagenet/val, imagenet-mos/...) must be under
# $OODCLI_DATA_ROOT (default ./data). Disk: about 21 GB per ImageNet-1K store (16 shots:
# 16,000 train images x 197 x 512 float16 = 3.2 GB; the 50,000 val images 10.1 GB; the four
# MOS OOD sets 7.2 GB), about 14 GB for the ImageNet-500 ones (sizes uncompressed); the whole train split's patch
# tokens would be 257 GB.
# The report's FPR@95 is ID positive ("the false positive rate of OOD images when the true positive
# rate of in-distribution images is at 95%", sec. 4.1).
# Environment (defaults = the paper's):
#   MODEL clip-vit-b-16   WEIGHTS openai (an open_clip tag or a local checkpoint)
#   SHOTS "1 4 16"   SEED 1   EPOCHS 50   K 50 (top-k patches)   OOD_PROMPTS 300 (C_n)
#   LAMBDA_NEG 5   LAMBDA_DIV 0.5   LR 0.00025   BATCH 32
#   CSC --csc (class-specific local contexts, every official config; --no-csc: one shared context)
#   DENOMINATORS official (the authors' code, which made the published numbers; paper: eq. 8-9 as printed)
#   STORES (stores), DEVICE (auto), WORKERS (0), OODCLI (oodcli)
set -euo pipefail
MODEL=${MODEL:-clip-vit-b-16}
WEIGHTS=${WEIGHTS:-openai}
SHOTS=${SHOTS:-"1 4 16"}
SEED=${SEED:-1}
EPOCHS=${EPOCHS:-50}
K=${K:-50}
OOD_PROMPTS=${OOD_PROMPTS:-300}
LAMBDA_NEG=${LAMBDA_NEG:-5}
LAMBDA_DIV=${LAMBDA_DIV:-0.5}
LR=${LR:-0.00025}
BATCH=${BATCH:-32}
CSC=${CSC:---csc}
DENOMINATORS=${DENOMINATORS:-official}
WORKERS=${WORKERS:-0}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-auto}
OODCLI=${OODCLI:-oodcli}
BENCHMARKS=("$@")
[ ${#BENCHMARKS[@]} -gt 0 ] || BENCHMARKS=(imagenet-mos imagenet500-easy imagenet500-hard)
mkdir -p "$STORES"
for bench in "${BENCHMARKS[@]}"; do
  store="$STORES/iim-$bench.zarr"
  echo "== $bench -> $store" >&2
  # 1. the frozen image encoder (resumes if interrupted): the few-shot train subset, then the test sets whole
  most=$(printf '%s\n' $SHOTS | sort -n | tail -1)
  $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --benchmark "$bench" --layers image_embeds,patch_values \
    --split train --shots "$most" --seed "$SEED" --store "$store" --device "$DEVICE" --workers "$WORKERS"
  $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --benchmark "$bench" --layers image_embeds,patch_values \
    --split test --split 'ood/*' --store "$store" --device "$DEVICE" --workers "$WORKERS"
  # 2. zero-shot rows
  $OODCLI score mcm,gl-mcm,r-mcm --store "$store"
  for shots in $SHOTS; do
    prompts="$STORES/iim-$bench-$shots-shot.safetensors"
    # 3. local prompts + OOD prototype prompts from the mined patches of each few-shot image
    $OODCLI train iim --store "$store" --shots "$shots" --seed "$SEED" --epochs "$EPOCHS" --k "$K" \
      --ood-prompts "$OOD_PROMPTS" --lambda-neg "$LAMBDA_NEG" --lambda-div "$LAMBDA_DIV" --lr "$LR" \
      --batch-size "$BATCH" "$CSC" --denominators "$DENOMINATORS" --out "$prompts"
    # 4. S-MCM (eq. 12-14, alpha 1) and its variants, one row each per shot setting
    for method in s-mcm s-mcm-star r-mcm-trained gl-mcm-local; do
      $OODCLI score "$method" --as "$method-$shots-shot" --store "$store" -p "$method.prompts=$prompts"
    done
  done
  $OODCLI report --store "$store" --fpr id
  $OODCLI report --store "$store" --fpr id --format json > "$STORES/iim-$bench.json"
done
