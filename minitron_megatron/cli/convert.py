"""``minitron import-hf`` and ``minitron export-hf``."""

from __future__ import annotations

import argparse
import logging

from minitron_megatron.cli.common import DTYPES, add_params_dtype, run_distributed, single_process

log = logging.getLogger("minitron")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="Llama-family HF directory or .gguf → minitron checkpoint")
    p.add_argument("--hf-path", required=True, help="HF dir (config.json + safetensors) or .gguf")
    p.add_argument("--save", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to store instead of the source's own")
    add_params_dtype(p)
    p.set_defaults(func=run_import)

    p = sub.add_parser("import-megatron",
                       help="adopt a Megatron-LM/NeMo torch_dist checkpoint (tensors linked)")
    p.add_argument("--load", required=True, help="Megatron-LM checkpoint root (--save of MLM)")
    p.add_argument("--save", required=True, help="minitron checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help=".model / tokenizer.json to carry along")
    p.add_argument("--model-config", default=None,
                   help="ModelConfig YAML (default: read from the checkpoint's saved args)")
    p.set_defaults(func=run_adopt)

    p = sub.add_parser("export-hf", help="minitron checkpoint → HF directory (transformers)")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--save", required=True, help="HF directory to write")
    add_params_dtype(p)
    p.add_argument("--dtype", dest="params_dtype", choices=DTYPES, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # deprecated spelling of --params-dtype
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --save directory that already holds files (atomically)")
    p.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> None:
    from minitron_megatron.model.convert import import_model, open_source
    from minitron_megatron.output_paths import check_output_dir

    open_source(args.hf_path)  # validate the source before starting anything
    check_output_dir(args.save, "--save")
    with run_distributed(single_process()) as ps:
        cfg = import_model(args.hf_path, args.save, ps, tokenizer=args.tokenizer,
                           params_dtype=DTYPES[args.params_dtype])
    log.info("imported %s → %s (%d parameters)", args.hf_path, args.save, cfg.num_parameters())


def run_adopt(args: argparse.Namespace) -> None:
    from minitron_megatron.config import ModelConfig
    from minitron_megatron.model.megatron_lm import adopt_megatron_checkpoint

    cfg = ModelConfig.load(args.model_config) if args.model_config else None
    cfg = adopt_megatron_checkpoint(args.load, args.save, tokenizer=args.tokenizer,
                                    model_config=cfg)
    log.info("adopted %s → %s (%d parameters)", args.load, args.save, cfg.num_parameters())


def run_export(args: argparse.Namespace) -> None:
    from minitron_megatron.checkpoint import find_checkpoint
    from minitron_megatron.model.convert import export_model
    from minitron_megatron.output_paths import check_replaceable

    find_checkpoint(args.load)
    check_replaceable(args.save, "--save", overwrite=args.overwrite)
    with run_distributed(single_process()) as ps:
        out = export_model(args.load, args.save, ps, dtype=DTYPES[args.params_dtype],
                           overwrite=args.overwrite)
    log.info("exported %s → %s", args.load, out)
