#!/usr/bin/env bash
# Llama-3.1-8B → Llama-3.1-Minitron-4B-Width on 8-GPU nodes, with the paper's settings
# (arXiv 2408.11796: teacher correction, 1024 calibration samples, batch=L2 / seq=mean,
# logit-only forward KL at tau=1, LR 1e-4 → 1e-5 cosine with 40 warm-up steps, global batch 1152
# × 8192 tokens for ~94B tokens).  Change the paths below; run on the first node of the job (or
# set NNODES/NODE_RANK/MASTER_ADDR on every node: see launch/torchrun.sh; SLURM: launch/slurm/).
set -euo pipefail

HF_MODEL=${HF_MODEL:-/models/Llama-3.1-8B}            # HF directory (config.json + safetensors)
CORPUS=${CORPUS:-/data/distill_corpus.jsonl}         # the distillation corpus, {"text": ...} per line
WORK=${WORK:-/workspace/llama31-minitron}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=8                                               # 8 KV heads: TP=8 keeps whole query groups
RUN=(bash "$(dirname "$0")/../launch/torchrun.sh")

minitron import-hf --hf-path "$HF_MODEL" --save "$WORK/teacher" --params-dtype bf16
minitron preprocess --input "$CORPUS" --tokenizer "$WORK/teacher" --output-prefix "$WORK/data/corpus"
DATA=(--data-path "$WORK/data/corpus" --split "99,1,0")

# 1. Teacher correction: fine-tune the teacher on the distillation data first (~100B tokens).
"${RUN[@]}" finetune --model "$WORK/teacher" --save "$WORK/teacher_corrected" "${DATA[@]}" \
  --train-iters 10000 --micro-batch-size 1 --global-batch-size 1152 --seq-length 8192 \
  --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 40 --lr-decay-style cosine --clip-grad 1.0 \
  --eval-interval 500 --eval-iters 32 --save-interval 500 --log-interval 10 \
  --tensor-model-parallel-size $TP --sequence-parallel --params-dtype bf16

# 2. Importance: 1024 calibration samples, batch=L2 / seq=mean (paper Table 11).
"${RUN[@]}" importance --load "$WORK/teacher_corrected" "${DATA[@]}" --seq-length 8192 \
  --calib-samples 1024 --micro-batch-size 1 --batch-agg l2 --seq-agg mean \
  --depth-metrics bi,block:16 --save-scores "$WORK/scores.safetensors" \
  --tensor-model-parallel-size $TP --params-dtype bf16

# 3. Width pruning to the 4B shape: hidden 4096 → 3072, MLP 14336 → 9216, heads/layers kept.
#    (Depth variant: --target-num-layers 16 --depth-method block instead.)
#    Not in the paper, and the default: step 2 also wrote $WORK/scores.stats (fp32 Gram
#    matrices of the linear_proj/linear_fc2 inputs and of the unit-RMS norm inputs of
#    linear_qkv/linear_fc1: 32.7 GB on disk, 4.1 GB per rank at TP=8), and this step finds them
#    and refits linear_fc2, linear_qkv and linear_fc1 by least squares; pruned heads would be
#    folded into their groups (benchmarks/RESULTS_pruning.md). The paper's exact method:
#    `--no-save-stats` in step 2, `--no-reconstruct --no-position0-fold` here.
"${RUN[@]}" prune --load "$WORK/teacher_corrected" --scores "$WORK/scores.safetensors" \
  --save "$WORK/student_pruned" --target-hidden-size 3072 --target-ffn-hidden-size 9216 \
  --tensor-model-parallel-size $TP --params-dtype bf16

# 4. Distillation: logit-only forward KL, tau = 1, ~94B tokens (9960 × 1152 × 8192).
"${RUN[@]}" distill --teacher "$WORK/teacher_corrected" --student "$WORK/student_pruned" \
  "${DATA[@]}" --save "$WORK/student_distilled" --train-iters 9960 --micro-batch-size 1 \
  --global-batch-size 1152 --seq-length 8192 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 40 \
  --lr-decay-style cosine --clip-grad 1.0 --kd-temperature 1.0 --kd-ce-weight 0 \
  --eval-interval 500 --eval-iters 32 --save-interval 250 --log-interval 10 \
  --tensor-model-parallel-size $TP --sequence-parallel --params-dtype bf16

minitron export-hf --load "$WORK/student_distilled" --save "$WORK/hf_student" --params-dtype bf16
