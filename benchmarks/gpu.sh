#!/usr/bin/env bash
# The engine at full scale on one GPU: the gpt4roi-7b preset on random weights, fp16 then bf16, 5/20/50
# regions per image. Prints regions/s engine vs naive, identical token ids, KV cache vs the copied
# prefix, decode tokens/s against the HBM-bandwidth bound and peak GPU memory; writes one JSON per dtype
# under ${OUT:-benchmarks/results}. Needs only torch, torchvision, transformers, numpy and pillow (runs
# from a source checkout, no install). Sized to finish within about 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu.sh                # all of it
#   IMAGES=4 REGIONS="5" bash benchmarks/gpu.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
images="${IMAGES:-16}"
regions="${REGIONS:-5 20 50}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for dtype in float16 bfloat16; do
    echo "== gpt4roi-7b, $dtype =="
    # naive: the first image, its first 8 prompts (one prompt costs the same whatever the others are);
    # 2 timed repeats after the warm-up keep the whole script inside its time box
    python -m benchmarks.engine --preset gpt4roi-7b --device cuda --dtype "$dtype" --images "$images" \
        --regions $regions --naive-images 1 --naive-prompts 8 --repeats 2 --tokens 32 --kv-gib 40 \
        --json "$out/engine-gpt4roi-7b-$dtype.json"
done
