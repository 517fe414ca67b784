"""minitron_megatron: Minitron pruning and distillation for Megatron-Core GPT models.

Pipeline: ``import-hf`` → ``importance`` → ``prune`` → (``search``) → ``distill`` → ``export-hf``.
Every stage is a library function and a thin CLI subcommand; see the README.
"""

__version__ = "0.1.0"
