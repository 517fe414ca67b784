# minitron_megatron on an NGC PyTorch image (which already carries CUDA, TransformerEngine and apex).
#
#   docker build -t minitron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data minitron \
#       torchrun --nproc-per-node 8 -m minitron_megatron importance ...
#
# enroot/pyxis: `enroot import dockerd://minitron` then `srun --container-image=./minitron.sqsh ...`
# (launch/slurm/*.sbatch take CONTAINER_IMAGE).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/minitron
COPY setup.py pyproject.toml README.md constraints.txt requirements-data.txt ./
COPY minitron_megatron ./minitron_megatron
COPY launch ./launch
COPY examples ./examples
COPY benchmarks ./benchmarks

# Installed as users install it: a wheel (not editable), with megatron-core from the range CI tests
# (setup.py: >=0.16.1,<0.20; Python 3.12 images get the newest 0.19.x). Keep the image's own torch
# (CUDA build) by constraining pip to the installed version. The `gpu` extra is satisfied by the
# image's TransformerEngine; apex also comes from the image (never install the unrelated PyPI
# package called "apex").
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-pin.txt \
 && pip wheel --no-deps --no-build-isolation -w /tmp/wheels . \
 && pip install --no-cache-dir -c /tmp/torch-pin.txt "$(ls /tmp/wheels/*.whl)[gpu,wandb,plot]" \
 && rm -rf /tmp/wheels build \
 && cd / && python -c "import transformer_engine, minitron_megatron as m; \
from minitron_megatron.runtime.mcore_compat import mcore_version; \
print('minitron ok:', m.__file__, 'megatron-core', mcore_version())"

# On a GPU of the container: python benchmarks/gpu_check.py  (TE spec, bf16 parity, tokens/s, MFU)

ENTRYPOINT []
CMD ["minitron", "--help"]
