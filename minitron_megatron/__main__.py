"""``python -m minitron_megatron ...`` (also ``torchrun ... -m minitron_megatron ...``)."""

from minitron_megatron.cli import main

if __name__ == "__main__":
    main()
