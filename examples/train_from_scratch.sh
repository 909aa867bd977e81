#!/usr/bin/env bash
# Train a small FastVLM from scratch on synthetic data through stages 1 and 2 on a CPU,
# then score exact-match answers on the held-out split and ask it one question.
#   bash examples/train_from_scratch.sh [OUT] [SEED]     (about 30 minutes on 2 CPU cores)
# SEED (default 0, or $FASTVLM_SEED) sets the random initial weights and the order of the
# batches; the data and its held-out split are the same for every seed.
set -euo pipefail
OUT=${1:-runs/from_scratch}
SEED=${2:-${FASTVLM_SEED:-0}}
FIXTURES=${FASTVLM_FIXTURES:-../shared/fixtures}
mkdir -p "$OUT"
# every training image asked all its scene answers (one shape: its colour and its kind), so the two
# skills a small model learns last each get twice the answers for the same encoder work (README, "Training")
fastvlm data synth --out "$OUT/data" --num 6000 --size 256 --test-fraction 0.05 --seed 0 --all-questions
# the tiny fixture's tower and tokenizer; a 4-layer, 128-wide Qwen2; random weights
fastvlm init "$OUT/init" --like "$FIXTURES/apple_fastvlm_tiny" --hidden-size 128 --layers 4 --heads 4 \
    --kv-heads 2 --intermediate-size 512 --seed "$SEED" --overwrite
fastvlm train --stage 1 --model "$OUT/init" --data "$OUT/data/train.jsonl" --output-dir "$OUT/stage1" \
    --global-batch-size 32 --micro-batch-size 32 --num-workers 1 --seed "$SEED" --overwrite
fastvlm train --stage 2 --model "$OUT/stage1/model" --data "$OUT/data/train.jsonl" --output-dir "$OUT/stage2" \
    --global-batch-size 32 --micro-batch-size 32 --lr 1e-3 --epochs 5 --num-workers 1 --seed "$SEED" --overwrite
fastvlm data score --model "$OUT/stage2/model" "$OUT/data/test.jsonl" --json "$OUT/scores.json"
first=$(head -1 "$OUT/data/test.jsonl")
image=$(python -c "import json,sys; r=json.loads(sys.argv[1]); print(r['image'])" "$first")
question=$(python -c "import json,sys; r=json.loads(sys.argv[1]); print(r['conversations'][0]['value'].split(chr(10))[-1])" "$first")
answer=$(python -c "import json,sys; r=json.loads(sys.argv[1]); print(r['conversations'][1]['value'])" "$first")
echo "Q: $question (expected: $answer)"
fastvlm predict --model "$OUT/stage2/model" --image "$OUT/data/$image" --prompt "$question"
