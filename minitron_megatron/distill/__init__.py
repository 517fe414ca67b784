"""Knowledge distillation of a student GPT from a frozen teacher (paper §3), on Megatron-Core.

* ``kd_loss``       vocab-parallel KL (forward/reverse, temperature, top-k) + CE, memory-flat
* ``intermediate``  cosine loss of paired hidden states through a learned projection
* ``model``         teacher + student on the same ranks; activations bundled through the pipeline
* ``objective``     the per-micro-batch loss (sums + token count) with the loss balancer
* ``schedule``      one global batch through Megatron's forward-backward schedule
* ``training``      the loop: DDP, optimizer, LR schedule, eval, checkpoints, resume
* ``checkpointing`` training checkpoints (student + optimizer + scheduler + RNG + data position)
* ``progress``      console line, metrics.jsonl, wandb
* ``preflight``     input checks that fail before any work
"""
