"""What the integrity checks cost: SHA-256 of checkpoint files (``checksums.sha256``, written at
save and verified at load) and the token-id scan of a dataset (before any work), per GB, with
the extrapolation to an 8B-parameter bf16 checkpoint (16 GB) that ``docs/errors.md`` quotes.

Hashes a real checkpoint written by ``save_checkpoint`` (a random GPT of ``--params`` fp32
parameters; its files are in the page cache as they are right after a save) with the very
function the manifest uses, and scans a uint16/int32 token file with ``check_token_ids``'s
vectorised max. Prints one JSON line; nothing is asserted.

    python benchmarks/checksum_cost.py [--params 64e6] [--tokens 500e6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

CKPT_8B_GB = 16.0  # 8e9 parameters × 2 bytes (bf16), model only


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hash_rate(params: float, work: Path) -> dict:
    from minitron_megatron.checkpoint import iteration_dir, save_checkpoint
    from minitron_megatron.checkpoint_manifest import MANIFEST_FILE, sha256_of, write_manifest
    from minitron_megatron.config import ModelConfig, ParallelConfig
    from minitron_megatron.model.build import build_model
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    hidden = 512
    layers = max(1, int(params / (12 * hidden * hidden)))
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                      num_attention_heads=8, vocab_size=32000)
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        model = build_model(cfg, ps)
        start = time.perf_counter()
        save_checkpoint(work / "ckpt", model=model, model_config=cfg)
        save_s = time.perf_counter() - start
        directory = iteration_dir(work / "ckpt", 0)
        files = [p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
        size = sum(p.stat().st_size for p in files)
        hash_s = _best_of(3, lambda: [sha256_of(p) for p in files])
        manifest_s = _best_of(3, lambda: write_manifest(directory))
    gb = size / 1e9
    return {"checkpoint_gb": round(gb, 3), "parameters": cfg.num_parameters(),
            "save_s": round(save_s, 2), "manifest_s": round(manifest_s, 3),
            "manifest_share_of_save": round(manifest_s / save_s, 3),
            "sha256_gb_per_s": round(gb / hash_s, 2),
            "sha256_s_per_gb": round(hash_s / gb, 2),
            "8b_bf16_s_1_rank": round(CKPT_8B_GB * hash_s / gb, 1),
            "8b_bf16_s_8_ranks": round(CKPT_8B_GB * hash_s / gb / 8, 1)}


def scan_rate(tokens: float, work: Path) -> dict:
    out = {}
    for dtype in (np.uint16, np.int32):
        path = work / f"tokens_{np.dtype(dtype).name}.bin"
        rng = np.random.default_rng(0)
        with path.open("wb") as handle:
            left = int(tokens)
            while left:
                n = min(left, 1 << 24)
                handle.write(rng.integers(0, 32000, n, dtype=dtype).tobytes())
                left -= n
        data = np.memmap(path, dtype=dtype, mode="r")
        chunk = 1 << 26

        def scan(data=data, chunk=chunk):
            for i in range(0, len(data), chunk):
                part = data[i:i + chunk]
                part.max()
                part.min()

        seconds = _best_of(3, scan)
        gb = path.stat().st_size / 1e9
        out[f"scan_{np.dtype(dtype).name}_gb_per_s"] = round(gb / seconds, 2)
        out[f"scan_{np.dtype(dtype).name}_s_per_1e9_tokens"] = round(seconds * 1e9 / tokens, 2)
        path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=64e6)
    parser.add_argument("--tokens", type=float, default=250e6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"cpu_load_1min": round(os.getloadavg()[0], 1),
                  **hash_rate(args.params, Path(tmp)), **scan_rate(args.tokens, Path(tmp))}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
