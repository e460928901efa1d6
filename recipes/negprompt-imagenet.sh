#!/usr/bin/env bash
# NegPrompt (paper 002) on ImageNet-1K with CLIP ViT-B/16, with the CLI alone: Table 2 (MOS OOD sets)
# and Table 3 (the hard splits), closed and open vocabulary, three seeds averaged.
#
#   recipes/negprompt-imagenet.sh [BENCHMARK ...]      (default: imagenet-mos imagenet-p1 imagenet-p2 imagenet-p3 imagenet-split4)
#
# Per benchmark: one pass of the CLIP image encoder over every test set whole and, per seed, over
# that seed's 16-shot train subset in a store of its own (image_embeds only: the image encoder is
# frozen in CoOp and NegPrompt), then per seed CoOp 16-shot for 100 epochs, NegPrompt 10 epochs on
# top of it (two stages, p = 2, beta 0.1, gamma 0.05), and the same trained on the first 10% of
# the ID classes only (open vocabulary); MCM beside them. Disk: 16,000 train images x 512 float16
# = 16 MB per seed; the ImageNet-1K test sets (50,000 val images and the four MOS OOD sets) 88 MB.
# The ImageNet folders (imagenet/train, imagenet/val, imagenet-mos/...) must be under
# $OODCLI_DATA_ROOT (default ./data); see 'oodcli extract --list-benchmarks'.
# The CLIP is the OpenCLIP ViT-B/16 the paper names (LAION-2B, open_clip tag laion2b_s34b_b88k,
# downloaded once; WEIGHTS=/path/to/checkpoint for a local copy). The report's FPR@95 is ID
# positive: the threshold keeps 95% of ID ("FPR95 ... the rate of falsely identified OOD instances
# when the true negative rate is maintained at 95%", sec. 4.1, as in MCM and CoOp/LoCoOp, whose
# rows the tables compare against).
# Environment (defaults = the paper's):
#   MODEL clip-vit-b-16   WEIGHTS laion2b_s34b_b88k   SEEDS "1 2 3"   SHOTS 16
#   COOP_EPOCHS 100 (stage one)   EPOCHS 10 (stage two)   NEG_PROMPTS 2 (p)   BETA 0.1   GAMMA 0.05
#   NIS_SOFTMAX all (L_NIS over every positive and negative logit, the authors' OE branch; negatives: eq. 4 literal)
#   OPEN_FRACTION 0.1 (open vocabulary: the share of ID classes trained on)
#   STORES (stores), DEVICE (auto), WORKERS (0), OODCLI (oodcli)
set -euo pipefail
MODEL=${MODEL:-clip-vit-b-16}
WEIGHTS=${WEIGHTS:-laion2b_s34b_b88k}
SEEDS=${SEEDS:-"1 2 3"}
SHOTS=${SHOTS:-16}
COOP_EPOCHS=${COOP_EPOCHS:-100}
EPOCHS=${EPOCHS:-10}
NEG_PROMPTS=${NEG_PROMPTS:-2}
BETA=${BETA:-0.1}
GAMMA=${GAMMA:-0.05}
NIS_SOFTMAX=${NIS_SOFTMAX:-all}
OPEN_FRACTION=${OPEN_FRACTION:-0.1}
WORKERS=${WORKERS:-0}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-auto}
OODCLI=${OODCLI:-oodcli}
BENCHMARKS=("$@")
[ ${#BENCHMARKS[@]} -gt 0 ] || BENCHMARKS=(imagenet-mos imagenet-p1 imagenet-p2 imagenet-p3 imagenet-split4)
mkdir -p "$STORES"
for bench in "${BENCHMARKS[@]}"; do
  store="$STORES/negprompt-$bench.zarr"
  echo "== $bench -> $store" >&2
  # 1. the frozen image encoder over the test sets (resumes if interrupted)
  $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --benchmark "$bench" --layers image_embeds --store "$store" \
    --split test --split 'ood/*' --device "$DEVICE" --workers "$WORKERS"
  $OODCLI score mcm --store "$store"
  for seed in $SEEDS; do
    shots="$STORES/negprompt-$bench-train-s$seed.zarr"
    coop="$STORES/negprompt-$bench-coop-s$seed.safetensors"
    neg="$STORES/negprompt-$bench-s$seed.safetensors"
    # and over this seed's few shots per class (the seed draws the shots)
    $OODCLI extract --model "$MODEL" --weights "$WEIGHTS" --benchmark "$bench" --layers image_embeds --store "$shots" \
      --split train --shots "$SHOTS" --seed "$seed" --device "$DEVICE" --workers "$WORKERS"
    # 2. stage one: CoOp's positive prompts, 16 shots per class
    $OODCLI train coop --store "$shots" --shots "$SHOTS" --epochs "$COOP_EPOCHS" --seed "$seed" --out "$coop"
    # 3. stage two: negative prompts against the frozen positive ones, same shots
    $OODCLI train negprompt --store "$shots" --positive "$coop" --neg-prompts "$NEG_PROMPTS" --epochs "$EPOCHS" \
      --beta "$BETA" --gamma "$GAMMA" --nis-softmax "$NIS_SOFTMAX" --out "$neg"
    # 4. open vocabulary: both stages on the first 10% of the ID classes, scored on all of them
    $OODCLI train coop --store "$shots" --shots "$SHOTS" --epochs "$COOP_EPOCHS" --seed "$seed" \
      --train-class-fraction "$OPEN_FRACTION" --out "${coop%.safetensors}-10pct.safetensors"
    $OODCLI train negprompt --store "$shots" --positive "${coop%.safetensors}-10pct.safetensors" \
      --neg-prompts "$NEG_PROMPTS" --epochs "$EPOCHS" --beta "$BETA" --gamma "$GAMMA" --nis-softmax "$NIS_SOFTMAX" \
      --out "${neg%.safetensors}-10pct.safetensors"
    $OODCLI score coop --as "coop@s$seed" --store "$store" -p coop.prompts="$coop"
    $OODCLI score negprompt --as "negprompt@s$seed" --store "$store" -p negprompt.prompts="$neg"
    $OODCLI score coop --as "coop-10pct@s$seed" --store "$store" -p coop.prompts="${coop%.safetensors}-10pct.safetensors"
    $OODCLI score negprompt --as "negprompt-10pct@s$seed" --store "$store" -p negprompt.prompts="${neg%.safetensors}-10pct.safetensors"
  done
  # 5. one row per method, averaged over the seeds
  $OODCLI report --store "$store" --average-runs --fpr id
  $OODCLI report --store "$store" --average-runs --fpr id --format json > "$STORES/negprompt-$bench.json"
done
