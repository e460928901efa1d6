#!/usr/bin/env bash
# NegPrompt (paper 002) on ImageNet-1K with CLIP ViT-B/16, with the CLI alone: Table 2 (MOS OOD sets)
# and Table 3 (the hard splits), closed and open vocabulary, three seeds averaged.
#
#   recipes/negprompt-imagenet.sh [BENCHMARK ...]      (default: imagenet-mos imagenet-p1 imagenet-p2 imagenet-p3 imagenet-split4)
#
# Per benchmark: one pass of the CLIP image encoder over every split (image_embeds only: the
# image encoder is frozen in CoOp and NegPrompt), then per seed CoOp 16-shot for 100 epochs,
# NegPrompt 10 epochs on top of it (two stages, p = 2, beta 0.1, gamma 0.05), and the same
# trained on the first 10% of the ID classes only (open vocabulary); MCM beside them.
# The ImageNet folders (imagenet/train, imagenet/val, imagenet-mos/...) must be under
# $OODCLI_DATA_ROOT (default ./data); see 'oodcli extract --list-benchmarks'.
# Environment: SEEDS (default "1 2 3"), STORES (default stores), DEVICE (default auto), OODCLI (default oodcli).
set -euo pipefail
SEEDS=${SEEDS:-"1 2 3"}
STORES=${STORES:-stores}
DEVICE=${DEVICE:-auto}
OODCLI=${OODCLI:-oodcli}
BENCHMARKS=("$@")
[ ${#BENCHMARKS[@]} -gt 0 ] || BENCHMARKS=(imagenet-mos imagenet-p1 imagenet-p2 imagenet-p3 imagenet-split4)
mkdir -p "$STORES"
for bench in "${BENCHMARKS[@]}"; do
  store="$STORES/negprompt-$bench.zarr"
  echo "== $bench -> $store" >&2
  # 1. the frozen image encoder, once per split (resumes if interrupted)
  $OODCLI extract --model clip-vit-b-16 --benchmark "$bench" --layers image_embeds --store "$store" --device "$DEVICE"
  $OODCLI score mcm --store "$store"
  for seed in $SEEDS; do
    coop="$STORES/negprompt-$bench-coop-s$seed.safetensors"
    neg="$STORES/negprompt-$bench-s$seed.safetensors"
    # 2. stage one: CoOp's positive prompts, 16 shots per class (the seed draws the shots)
    $OODCLI train coop --store "$store" --shots 16 --epochs 100 --seed "$seed" --out "$coop"
    # 3. stage two: negative prompts against the frozen positive ones, same shots
    $OODCLI train negprompt --store "$store" --positive "$coop" --neg-prompts 2 --epochs 10 --out "$neg"
    # 4. open vocabulary: both stages on the first 10% of the ID classes, scored on all of them
    $OODCLI train coop --store "$store" --shots 16 --epochs 100 --seed "$seed" --train-class-fraction 0.1 --out "${coop%.safetensors}-10pct.safetensors"
    $OODCLI train negprompt --store "$store" --positive "${coop%.safetensors}-10pct.safetensors" --out "${neg%.safetensors}-10pct.safetensors"
    $OODCLI score coop --as "coop@s$seed" --store "$store" -p coop.prompts="$coop"
    $OODCLI score negprompt --as "negprompt@s$seed" --store "$store" -p negprompt.prompts="$neg"
    $OODCLI score coop --as "coop-10pct@s$seed" --store "$store" -p coop.prompts="${coop%.safetensors}-10pct.safetensors"
    $OODCLI score negprompt --as "negprompt-10pct@s$seed" --store "$store" -p negprompt.prompts="${neg%.safetensors}-10pct.safetensors"
  done
  # 5. one row per method, averaged over the seeds
  $OODCLI report --store "$store" --average-runs
  $OODCLI report --store "$store" --average-runs --format json > "$STORES/negprompt-$bench.json"
done
