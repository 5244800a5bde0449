#!/usr/bin/env bash
# The GPU benchmarks in one run (sized to finish within 8 minutes on one H200):
#   1. bench/finetune_step.py: ViT-B/16 at 224 px, bf16 autocast, batch 128: step time and peak
#      memory of ft, saeft (teacher cache), saeft (live teacher), feat_mse (cache) and flyp, and
#      the paired intervals of saeft's step-time ratios to ft;
#   2. bench/sae_train.py at d 512, 16384 latents (x32), k 32, batch 4096: saeft's samples/s and
#      FVU against the dense reference and sparsify (where installed);
#   3. bench/cache.py: ViT-B/16 images/s through cache_activations (JPEG decoding with 8 loader
#      workers as the paper configs, HDF5 writes) against the pure encoder forward.
#
#   bench/gpu.sh            # on a CUDA machine (the first GPU; CUDA_VISIBLE_DEVICES picks another)
#   bench/gpu.sh --tiny     # the same code at minimal sizes on the CPU (what the tests run)
#
# SAEFT_BENCH_TINY=1 is the same as --tiny; PYTHON names the interpreter (default: python).
set -euo pipefail

tiny=${SAEFT_BENCH_TINY:-0}
for arg in "$@"; do
    case "$arg" in
        --tiny) tiny=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument '$arg' (use --tiny or --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # random weights only: nothing is downloaded

if [ "$tiny" = 1 ]; then
    device=cpu
    finetune=(--model saeft-tiny-vit --batch 4 --steps 1 --warmup 1 --block 1 --min-blocks 2 --max-blocks 2)
    # One process per row, most of it torch's import: feat_mse (cache) is saeft (cache)'s code path.
    rows=(ft "saeft (cache)" "saeft (live)" flyp)
    sae=(--sizes tiny --threads 1)
    cache=(--model saeft-tiny-vit --images 16 --batch 8 --image-px 64x48 --repeats 1)
else
    device=cuda
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "bench/gpu.sh: torch sees no CUDA device (bench/gpu.sh --tiny runs the same code on the CPU)" >&2
        exit 1
    fi
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
    # Blocks of 5 rounds, 3 to 8 of them: on a dedicated GPU the noise is small, the budget is not.
    finetune=(--model ViT-B-16 --image-size 224 --batch 128 --steps 10 --warmup 3 --block 5 --min-blocks 3 --max-blocks 8)
    rows=(ft "saeft (cache)" "saeft (live)" "feat_mse (cache)" flyp)
    sae=(--sizes large --steps 40)
    cache=(--model ViT-B-16 --images 2048 --batch 256 --workers 8 --repeats 5)
fi

started=$(date +%s)
section() {
    echo
    echo "## $1 ($(( $(date +%s) - started )) s since the start)"
    echo
}

section "finetune_step: step time and peak memory relative to ft"
"$PY" bench/finetune_step.py --device "$device" --dtype bf16 "${finetune[@]}" --only "${rows[@]}"

section "sae_train: samples/s and FVU against the peers"
"$PY" bench/sae_train.py --device "$device" --archs saeft --peers dense sparsify sparsify-saeft-init "${sae[@]}"

section "cache: images/s through cache_activations against the encoder forward"
"$PY" bench/cache.py --device "$device" "${cache[@]}"

echo
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s"
