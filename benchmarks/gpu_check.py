"""One-shot GPU check (≤ 8 minutes on one GPU): the path users run, end to end, with figures.

Imports SmolLM2-135M (or a random model of its shape when its GGUF is not installed), then on
one rank: builds it with the TransformerEngine layer spec in bf16 and compares its logits with
the local spec's and with ``transformers`` (fp32); scores importance on the TE model and compares
the scores and the prune plan with the local spec's; prunes the TE model, saves it and loads the
pruned checkpoint at the TE and local specs; distills it for ``--steps`` steps (bf16, Megatron's
distributed optimizer, teacher and student forward together) and prints tokens/s and MFU.

Without CUDA it runs what it can and says what it skipped: the TE spec is then Megatron-Core's own
TE spec built from stand-in modules (``minitron_megatron.testing.te_standin``), so the script's
every step is exercised by CI (``tests/test_gpu_check.py``); TE's kernels, NCCL and MFU are not.

    python benchmarks/gpu_check.py [--model smollm2|random-smollm2|random-tiny] [--steps 20]

Exit status 1 when a comparison fails its tolerance; the figures are in WORK/gpu_check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from minitron_megatron.config import ParallelConfig
from minitron_megatron.data.loaders import DataConfig, build_datasets
from minitron_megatron.distill.config import KDConfig, TrainConfig
from minitron_megatron.distill.training import Trainer
from minitron_megatron.evaluate import eod_id_of, evaluate_model
from minitron_megatron.importance import estimate_importance
from minitron_megatron.model import build
from minitron_megatron.model.forward import full_logits
from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
from minitron_megatron.runtime.distributed import LaunchEnv, distributed
from minitron_megatron.testing.te_standin import simulated_transformer_engine

SHAPES = {  # layers, hidden, heads, query groups, ffn, vocab
    "random-smollm2": (30, 576, 9, 3, 1536, 49152),
    "random-tiny": (2, 64, 4, 2, 128, 512),
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0,
                    "L40S": 362.0, "B200": 2250.0}
BF16 = torch.bfloat16


class Report:
    """Checks in order, each ``ok`` / ``FAIL`` / ``skipped`` / ``simulated``, with figures."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, status: str, detail: str, **figures) -> None:
        self.rows.append({"check": name, "status": status, "detail": detail, **figures})
        print(f"[{status:>9}] {name}: {detail}", flush=True)

    def compare(self, name: str, passed: bool, detail: str, simulated: bool, **figures) -> None:
        status = "FAIL" if not passed else "simulated" if simulated else "ok"
        self.add(name, status, detail, **figures)


def _synthetic_corpus(path: Path, documents: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "an", "el", "or", "ux"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    with path.open("w") as out:
        for _ in range(documents):
            text = " ".join(" ".join(rng.choices(words, weights, k=rng.randint(4, 12))) + "."
                            for _ in range(rng.randint(3, 8)))
            out.write(json.dumps({"text": text}) + "\n")
    return path


def _random_model(directory: Path, shape: tuple, corpus: Path) -> Path:
    """A random Llama of ``shape`` in a Hugging Face directory, with a BPE trained on ``corpus``."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from minitron_megatron.data.tokenizer import Tokenizer

    layers, hidden, heads, groups, ffn, vocab = shape
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=groups, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                                   initializer_range=0.08)  # peaked logits, not uniform ones
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=min(vocab, 400), special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    Tokenizer.from_file(directory / "tokenizer.json", "huggingface").save(directory)
    return directory


def _sources(model: str, work: Path) -> tuple[Path, Path, str]:
    """(model source, corpus, what they are); the installed assets unless a random model is
    asked for or SmolLM2 is not installed."""
    from minitron_megatron.data.assets import smollm2_gguf, wikipedia_corpus

    if model == "smollm2":
        try:
            return smollm2_gguf(), wikipedia_corpus(), "SmolLM2-135M-Instruct (GGUF), Wikipedia"
        except FileNotFoundError as err:
            print(f"note: {err} Using a random model of SmolLM2's shape.", flush=True)
            model = "random-smollm2"
    corpus = _synthetic_corpus(work / "corpus.jsonl")
    hf_dir = _random_model(work / model, SHAPES[model], corpus)
    return hf_dir, corpus, f"{model} (random weights), synthetic text"


def _hf_logits(source: Path, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    import transformers

    kwargs = ({"gguf_file": source.name} if source.suffix == ".gguf" else {})
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent if source.suffix == ".gguf" else source, dtype=torch.float32, **kwargs)
    model.to(device).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def _agreement(ref: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    """Mean per-token KL(ref ‖ ours) and top-1 agreement over the real vocabulary."""
    ours = ours[..., :ref.shape[-1]].float()
    ref_logp, logp = ref.log_softmax(-1), ours.log_softmax(-1)  # [b, s, V]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()  # mean over [b, s]
    top1 = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": top1}


def _flops_per_token(cfg, seq: int, *, passes: int) -> float:
    """Matmul FLOPs per token of ``passes`` forward-equivalents (training = 3): 2·N for the
    weights plus 4·L·s·(heads·d) for attention scores and values (Megatron's count)."""
    attention = 4 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.kv_channels
    return passes * (2 * cfg.num_parameters() + attention)


def _targets(cfg) -> PruneTargets:
    per_group = max(1, cfg.heads_per_group * 2 // 3)
    hidden = max(64, cfg.hidden_size * 3 // 4 // 64 * 64)
    return PruneTargets(ffn_hidden_size=cfg.ffn_hidden_size // 2, hidden_size=hidden,
                        num_attention_heads=per_group * cfg.num_query_groups)


def run_checks(args: argparse.Namespace) -> Report:
    from minitron_megatron.data.preprocess import preprocess
    from minitron_megatron.data.tokenizer import Tokenizer
    from minitron_megatron.model.convert import import_model

    work, report = Path(args.work_dir), Report()
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    te_real = build.te_available()
    simulated = not te_real
    te_env = contextlib.nullcontext if te_real else simulated_transformer_engine
    report.add("machine", "ok" if on_gpu else "skipped",
               torch.cuda.get_device_name() if on_gpu else "no CUDA: GPU kernels, NCCL and MFU "
               "are not measured here")
    report.add("TE spec", "ok" if te_real else "simulated",
               "TransformerEngine layer spec" if te_real else "TE not usable here: Megatron-Core's"
               " TE spec is built from stand-in modules (checks marked simulated)")
    source, corpus, what = _sources(args.model, work)

    with distributed(LaunchEnv(), ParallelConfig(seed=1234)) as ps:
        import torch.distributed as dist

        report.add("process group", "ok", f"{dist.get_backend()} on {ps.device}")
        start = time.perf_counter()
        import_model(source, work / "teacher", ps)
        info = find_checkpoint(work / "teacher")
        cfg = info.model_config
        preprocess(corpus, Tokenizer.load(info.tokenizer_dir), work / "data" / "corpus")
        report.add("import", "ok", f"{what}: {cfg.num_parameters():,} parameters, "
                   f"{time.perf_counter() - start:.1f} s")

        data = DataConfig(data_path=str(work / "data" / "corpus"), seq_length=args.seq_length)
        sets = build_datasets(data, eod_id=eod_id_of(info), vocab_size=cfg.vocab_size,
                              num_samples={"train": args.calib_samples,
                                           "valid": args.eval_samples})
        tokens = torch.stack([torch.as_tensor(sets["valid"][i]["tokens"]) for i in range(4)])

        local = build.build_model(cfg, ps, params_dtype=BF16, init_weights=False, spec="local")
        load_checkpoint(info, model=local)
        with te_env():
            te = build.build_model(cfg, ps, params_dtype=BF16, init_weights=False, spec="te")
        load_checkpoint(info, model=te)  # a checkpoint written with the local spec
        ref = _hf_logits(source, tokens, ps.device)
        logits = {name: full_logits(model, ps, tokens) for name, model in
                  (("local", local), ("te", te))}
        for name in ("local", "te"):
            f = _agreement(ref, logits[name])
            report.compare(f"logits {name} bf16 vs transformers fp32",
                           f["kl"] < args.kl_tolerance and f["top1"] > 0.9,
                           f"KL {f['kl']:.2e}, top-1 agreement {f['top1']:.3f}",
                           simulated and name == "te", **f)
        f = _agreement(logits["local"].float(), logits["te"])
        report.compare("logits TE vs local spec", f["kl"] < args.kl_tolerance and f["top1"] > 0.95,
                       f"KL {f['kl']:.2e}, top-1 agreement {f['top1']:.3f}", simulated, **f)

        calib = dict(num_samples=args.calib_samples, micro_batch_size=args.micro_batch_size,
                     seq_length=args.seq_length)
        scores = {name: estimate_importance(model, ps, sets["train"], model_config=cfg, **calib)
                  for name, model in (("local", local), ("te", te))}
        plans = {name: make_plan(s, _targets(cfg)) for name, s in scores.items()}
        diffs = {axis: ((getattr(scores["te"], axis) - getattr(scores["local"], axis)).abs()
                        / getattr(scores["local"], axis).abs().clamp(min=1e-6)).median().item()
                 for axis in ("ffn", "heads", "hidden")}
        same = [a == b for a, b in zip(plans["te"].layers, plans["local"].layers, strict=True)]
        kept = sum(same) / len(same) if plans["te"].hidden == plans["local"].hidden else 0.0
        report.compare("importance TE vs local spec", kept >= 0.9,
                       f"median relative score difference {diffs}, layers with identical kept "
                       f"units {kept:.2f}", simulated, median_rel_diff=diffs, same_plan=kept)

        start = time.perf_counter()
        with te_env():
            pruned, pcfg = apply_plan(te, plans["te"], ps)
        save_checkpoint(work / "pruned", model=pruned, model_config=pcfg,
                        tokenizer_dir=info.tokenizer_dir)
        del pruned, local, te
        losses = {}
        for spec in ("te", "local"):
            with te_env() if spec == "te" else contextlib.nullcontext():
                model = build.build_model(pcfg, ps, params_dtype=BF16, init_weights=False,
                                          spec=spec)
            load_checkpoint(find_checkpoint(work / "pruned"), model=model)
            losses[spec] = evaluate_model(model, ps, sets["valid"], num_samples=args.eval_samples,
                                          micro_batch_size=args.micro_batch_size,
                                          seq_length=args.seq_length).loss
        report.compare("prune, save, load at TE and local spec",
                       abs(losses["te"] - losses["local"]) < 0.05 and math.isfinite(losses["te"]),
                       f"{cfg.num_parameters():,} → {pcfg.num_parameters():,} parameters; "
                       f"held-out loss TE {losses['te']:.4f}, local {losses['local']:.4f}; "
                       f"{time.perf_counter() - start:.1f} s", simulated, losses=losses)

        with te_env():
            trainer = Trainer(
                train=TrainConfig(save=work / "kd", train_iters=args.steps,
                                  global_batch_size=args.global_batch_size,
                                  micro_batch_size=args.micro_batch_size, lr=3e-4, min_lr=3e-5,
                                  lr_warmup_iters=2, use_distributed_optimizer=True),
                kd=KDConfig(), data=data, student=find_checkpoint(work / "pruned"),
                teacher=info, ps=ps, params_dtype=BF16)
            steps = [r for r in trainer.run().history if "loss" in r]
        timed = steps[min(2, len(steps) - 1):]  # after warm-up (kernel selection, allocator)
        tok_s = len(timed) / sum(1.0 / r["tokens_per_s"] for r in timed)
        flops = (_flops_per_token(pcfg, args.seq_length, passes=3)
                 + _flops_per_token(cfg, args.seq_length, passes=1))
        # one step's loss is one batch's: a trend needs a few steps (on a random tiny model the
        # KD loss starts near 0.05 and batch noise can outweigh 4 steps of progress)
        quarter = max(len(steps) // 4, 1)
        falls = (sum(r["loss"] for r in steps[-quarter:])
                 < sum(r["loss"] for r in steps[:quarter])) if len(steps) >= 8 else True
        report.compare("distill bf16 + distributed optimizer",
                       falls and all(math.isfinite(r["loss"]) for r in steps),
                       f"{len(steps)} steps, loss {steps[0]['loss']:.3f} → {steps[-1]['loss']:.3f}"
                       f", {tok_s:,.0f} tokens/s, {tok_s * flops / 1e12:.2f} TFLOP/s achieved",
                       simulated, tokens_per_s=tok_s, tflops=tok_s * flops / 1e12)
        name = torch.cuda.get_device_name() if on_gpu else ""
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name),
                                        None)
        if peak:
            report.add("MFU", "ok", f"{tok_s * flops / 1e12 / peak:.1%} of {peak} TFLOP/s bf16",
                       mfu=tok_s * flops / 1e12 / peak)
        else:
            report.add("MFU", "skipped", "no GPU peak known here (pass --peak-tflops)")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", *SHAPES], default="smollm2")
    p.add_argument("--work-dir", default="runs/gpu_check")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kl-tolerance", type=float, default=2e-2,
                   help="mean per-token KL (nats) allowed between bf16 logits and the reference")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 dense peak")
    args = p.parse_args(argv)
    start = time.perf_counter()
    report = run_checks(args)
    report.add("total", "ok", f"{time.perf_counter() - start:.0f} s")
    out = Path(args.work_dir) / "gpu_check.json"
    out.write_text(json.dumps(report.rows, indent=2, default=str))
    print(json.dumps({"failed": [r["check"] for r in report.rows if r["status"] == "FAIL"],
                      "report": str(out)}))
    return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
