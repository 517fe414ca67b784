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

# Keep the image's own torch (CUDA build): constrain pip to the installed version. The `gpu` extra
# is satisfied by the image's TransformerEngine; apex also comes from the image (never install the
# unrelated PyPI package called "apex").
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-pin.txt \
 && pip install --no-cache-dir -c /tmp/torch-pin.txt -e ".[gpu,wandb,plot]" \
 && python -c "import transformer_engine, minitron_megatron; print('minitron ok')"

ENTRYPOINT []
CMD ["minitron", "--help"]
