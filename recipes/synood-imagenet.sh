#!/usr/bin/env bash
# SynOOD (paper 003) on ImageNet-1K with CLIP ViT-B/16, with the CLI alone, on a GPU: Table 1
# (MOS OOD sets: iNaturalist, SUN, Places, Textures) and Table 2 (OpenOOD v1.5: SSB-hard and
# NINCO near, iNaturalist, Textures and OpenImage-O far), with the Table 4/5 ablations.
#
#   recipes/synood-imagenet.sh [BENCHMARK ...]        (default: imagenet-mos imagenet)
#
# 1. one pass of the CLIP image encoder over every split of each benchmark (image_embeds and the
#    unnormalised penultimate the authors' projection reads: SynOOD never fine-tunes the encoder
#    itself), NegLabel beside it;
# 2. context labels (eq. 3) of PER_CLASS train images per class (50 = the paper's 50k subset)
#    by LLaVA-1.5-7B (CONTEXT=clip uses CLIP zero-shot over WordNet nouns instead: no MLLM);
# 3. near-boundary OOD images: Stable Diffusion 2 inpainting, mask all ones, strength 0.6,
#    20 steps, 3 inpainting passes (2 updates of the initial noise) by ResNet-50's energy (eq. 7-10, r*rho = 10);
#    made once (the ID train split is the same in both benchmarks) and resumed if interrupted;
# 4. the synthetic images enter each store as a split with role 'synthetic';
# 5. train synood: projection (the authors' residual LayerNorm block; 3 epochs, Adam 1e-3 with
#    cosine decay to 1e-5, batch 128, wd 1e-5; PROJECTION=linear for the identity-start map) and the learnable
#    negative labels (5 epochs, SGD 2e-3), on cached features; score synood and its ablations:
#    FT label off (projection only), projection off (fine-tuned labels only); report.
# The ImageNet folders must be under $OODCLI_DATA_ROOT (default ./data); see
# 'oodcli extract --list-benchmarks'. Model weights come from the Hugging Face hub and
# open_clip on first use (stabilityai/stable-diffusion-2-inpainting, llava-hf/llava-1.5-7b-hf,
# CLIP ViT-B/16 openai, torchvision's ResNet-50).
# FPR@95 per benchmark in the convention of the paper's table for it: imagenet-mos (Table 1, whose
# rows come from MCM and NegLabel) ID positive; imagenet (Table 2, "the methods in the upper
# section are drawn from OpenOOD") OpenOOD v1.5's OOD positive. JSON carries both.
# Environment (defaults = the paper's):
#   MODEL clip-vit-b-16   WEIGHTS openai   PER_CLASS 50   CONTEXT llava (or clip)   LLAVA llava-hf/llava-1.5-7b-hf
#   PIPELINE stabilityai/stable-diffusion-2-inpainting (a hub id or a saved folder)
#   CLASSIFIER resnet50 with CLASSIFIER_WEIGHTS (its default: torchvision's)   STRENGTH 0.6   STEPS 20
#   STEP_SIZE 10 (r*rho)   GUIDANCE 8
#   PROJECTION authors   PROJ_EPOCHS 3   LABEL_EPOCHS 5 (train synood)
#   STORES (stores), DEVICE (cuda), WORKERS (8), OODCLI (oodcli)
set -euo pipefail
MODEL=${MODEL:-clip-vit-b-16}
WEIGHTS=${WEIGHTS:-openai}
PER_CLASS=${PER_CLASS:-50}
CONTEXT=${CONTEXT:-llava}
LLAVA=${LLAVA:-llava-hf/llava-1.5-7b-hf}
PIPELINE=${PIPELINE:-stabilityai/stable-diffusion-2-inpainting}
CLASSIFIER=${CLASSIFIER:-resnet50}
CLASSIFIER_WEIGHTS=${CLASSIFIER_WEIGHTS:-}
STRENGTH=${STRENGTH:-0.6}
STEPS=${STEPS:-20}
STEP_SIZE=${STEP_SIZE:-10}
GUIDANCE=${GUIDANCE:-8}
PROJECTION=${PROJECTION:-authors}
PROJ_EPOCHS=${PROJ_EPOCHS:-3}
LABEL_EPOCHS=${LABEL_EPOCHS:-5}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-8}
OODCLI=${OODCLI:-oodcli}
BENCHMARKS=("$@")
[ ${#BENCHMARKS[@]} -gt 0 ] || BENCHMARKS=(imagenet-mos imagenet)
IMAGES="$STORES/synood-imagenet-images"
mkdir -p "$STORES"

for bench in "${BENCHMARKS[@]}"; do
  store="$STORES/synood-$bench.zarr"
  echo "== $bench -> $store" >&2
  # 1. the frozen image encoder, once per split (resumes if interrupted); NegLabel, the baseline
  $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --benchmark "$bench" --layers image_embeds,penultimate --store "$store" \
    --device "$DEVICE" --workers "$WORKERS"
  $OODCLI score mcm,neglabel --store "$store"
done

first="$STORES/synood-${BENCHMARKS[0]}.zarr"
# 2. context labels of the images to inpaint
$OODCLI synthesize context-labels --store "$first" --split train --source "$CONTEXT" --per-class "$PER_CLASS" \
  --model "$LLAVA" --device "$DEVICE" --out "$STORES/synood-imagenet-context.jsonl"
# 3. energy-guided inpainting (the same command again resumes)
$OODCLI synthesize synood --store "$first" --from-split train --per-class "$PER_CLASS" \
  --context-labels "$STORES/synood-imagenet-context.jsonl" --pipeline "$PIPELINE" --classifier "$CLASSIFIER" \
  ${CLASSIFIER_WEIGHTS:+--classifier-weights "$CLASSIFIER_WEIGHTS"} --strength "$STRENGTH" --steps "$STEPS" \
  --step-size "$STEP_SIZE" --guidance "$GUIDANCE" --device "$DEVICE" --out-dir "$IMAGES"

for bench in "${BENCHMARKS[@]}"; do
  store="$STORES/synood-$bench.zarr"
  model="$STORES/synood-$bench.safetensors"
  # 4. the synthetic images as a split of the store
  $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --data "folder:$IMAGES" --split synthetic/synood \
    --role synthetic --layers image_embeds,penultimate --store "$store" --device "$DEVICE"
  # 5. fine-tuning on cached features, then the score and its ablations
  $OODCLI train synood --store "$store" --projection "$PROJECTION" --proj-epochs "$PROJ_EPOCHS" --label-epochs "$LABEL_EPOCHS" --out "$model"
  $OODCLI score synood --store "$store" -p synood.prompts="$model"
  $OODCLI score synood --as synood-projection-only --store "$store" -p synood.prompts="$model" -p synood.ft_labels=false
  $OODCLI score synood --as synood-labels-only --store "$store" -p synood.prompts="$model" -p synood.projection=false
  fpr=id; [ "$bench" != imagenet ] || fpr=openood
  $OODCLI report --store "$store" --fpr "$fpr"
  $OODCLI report --store "$store" --fpr "$fpr" --format json > "$STORES/synood-$bench.json"
done
