#!/usr/bin/env bash
# Nemotron-4-15B → Minitron-8B on 8-GPU nodes, with the paper's settings (arXiv 2407.14679:
# prune embedding 6144 → 4096 and MLP 24576 → 16384, keep 48 heads and 32 layers; 1024
# calibration samples, batch=L2 / seq=mean; logit-only forward KL at tau = 1; LR 1e-4 → 1e-5
# cosine, 40 warm-up steps, global batch 1152; Nemotron-4's 4096-token context; ~94B tokens).
# The teacher is a Megatron-LM / NeMo torch_dist checkpoint (its args give the architecture:
# LayerNorm1p, squared ReLU, half RoPE); change the paths below.
set -euo pipefail

MEGATRON_CKPT=${MEGATRON_CKPT:-/models/nemotron4-15b}   # Megatron-LM --save directory (torch_dist)
TOKENIZER=${TOKENIZER:-/models/nemotron4-15b/tokenizer.model}
CORPUS=${CORPUS:-/data/distill_corpus.jsonl}
WORK=${WORK:-/workspace/minitron-8b}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=8                                                  # 8 KV heads, 48 query heads
RUN=(bash "$(dirname "$0")/../launch/torchrun.sh")

minitron import-megatron --load "$MEGATRON_CKPT" --save "$WORK/teacher" --tokenizer "$TOKENIZER"
minitron preprocess --input "$CORPUS" --tokenizer "$WORK/teacher" --output-prefix "$WORK/data/corpus"
DATA=(--data-path "$WORK/data/corpus" --split "99,1,0")

"${RUN[@]}" importance --load "$WORK/teacher" "${DATA[@]}" --seq-length 4096 \
  --calib-samples 1024 --micro-batch-size 1 --batch-agg l2 --seq-agg mean --depth-metrics bi \
  --save-scores "$WORK/scores.safetensors" --tensor-model-parallel-size $TP --params-dtype bf16

"${RUN[@]}" prune --load "$WORK/teacher" --scores "$WORK/scores.safetensors" \
  --save "$WORK/student_pruned" --target-hidden-size 4096 --target-ffn-hidden-size 16384 \
  --tensor-model-parallel-size $TP --params-dtype bf16

# ~94B tokens: 19920 × 1152 × 4096.
"${RUN[@]}" distill --teacher "$WORK/teacher" --student "$WORK/student_pruned" "${DATA[@]}" \
  --save "$WORK/student_distilled" --train-iters 19920 --micro-batch-size 1 \
  --global-batch-size 1152 --seq-length 4096 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 40 \
  --lr-decay-style cosine --clip-grad 1.0 --kd-temperature 1.0 --kd-ce-weight 0 \
  --eval-interval 500 --eval-iters 32 --save-interval 250 --log-interval 10 \
  --tensor-model-parallel-size $TP --sequence-parallel --params-dtype bf16
