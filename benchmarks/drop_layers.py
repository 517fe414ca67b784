"""Make a shallower student by keeping a subset of a checkpoint's transformer layers.

A stand-in for real pruning (the ``prune`` stage) in the distillation benchmarks: the student
keeps the embeddings, final norm and output layer, and the chosen layers in order.

    python benchmarks/drop_layers.py --load /tmp/smol --save /tmp/student --keep every:2
    python benchmarks/drop_layers.py --load /tmp/smol --save /tmp/student --keep 0-13,29
"""

from __future__ import annotations

import argparse
import re

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.model.build import build_model
from minitron_megatron.runtime.distributed import LaunchEnv, distributed

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def kept_layers(spec: str, num_layers: int) -> list[int]:
    """``every:K`` (layers 0, K, 2K, ...), or a list of indices/ranges like ``0-13,29``."""
    if spec.startswith("every:"):
        return list(range(0, num_layers, int(spec.split(":")[1])))
    layers = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers += list(range(int(lo), int(hi or lo) + 1))
    if sorted(set(layers)) != layers or layers[-1] >= num_layers:
        raise ValueError(f"--keep {spec!r}: need increasing layer indices below {num_layers}")
    return layers


def drop_layers(load: str, save: str, keep: str) -> list[int]:
    info = find_checkpoint(load)
    layers = kept_layers(keep, info.model_config.num_layers)
    student_cfg = info.model_config.replace(num_layers=len(layers))
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        teacher = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=teacher)
        student = build_model(student_cfg, ps, init_weights=False)
        source = teacher.state_dict()
        state = {}
        for key in student.state_dict():
            match = _LAYER.match(key)
            src = key if match is None else key.replace(
                f"decoder.layers.{match.group(1)}.",
                f"decoder.layers.{layers[int(match.group(1))]}.", 1)
            state[key] = source[src]
        student.load_state_dict(state)
        save_checkpoint(save, model=student, model_config=student_cfg, iteration=0,
                        tokenizer_dir=info.tokenizer_dir)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--keep", default="every:2")
    args = parser.parse_args()
    layers = drop_layers(args.load, args.save, args.keep)
    print(f"kept layers {layers} → {args.save}")


if __name__ == "__main__":
    main()
