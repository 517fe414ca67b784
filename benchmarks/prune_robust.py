"""Ablation on SmolLM2-135M: what each part of the robust pruning gives, zero-shot, beside
ModelOpt 0.43.0 — the same target, calibration samples and held-out windows.

One process, TP=1 (ModelOpt's only layout). Target: hidden 576→448, MLP 1536→768, heads 9→6 in 3
groups (68.5M of 134.5M parameters). Calibration: samples ``0..N−1`` of the train split (for the
``calib_doc_starts`` row, half of them replaced by document-start windows). Every row is evaluated
with the loss by window start on the same ``--eval-samples`` held-out windows (and as many
document-start windows). Importance scores and Gram statistics are cached in ``--work-dir``;
``--save-checkpoints`` keeps the paper, robust and ModelOpt students there for distillation::

    python benchmarks/prune_robust.py --load runs/teacher --data-path runs/data/wiki \\
        --work-dir runs/robust --output-dir benchmarks/robust_run --save-checkpoints
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TARGET = {"hidden_size": 448, "ffn_hidden_size": 768, "num_attention_heads": 6}
# row name → (scores, stats or None, PruneTargets extras, reconstruct kinds, ridge or None)
ALL = ("proj", "fc2", "qkv", "fc1")
ROWS = {
    "paper: (l2, mean), plain slicing": ("default", None, dict(position0_fold=False), (), None),
    "paper + head residual": ("default", None, dict(position0_fold=False, head_residual=True),
                              (), None),
    "position-0 fold": ("default", None, {}, (), None),
    "fold + refit fc2": ("default", "default", {}, ("fc2",), None),
    "fold + refit proj (constrained)": ("default", "default", {}, ("proj",), None),
    "fold + refit proj + fc2": ("default", "default", {}, ("proj", "fc2"), None),
    "fold + refit qkv + fc1 (hidden channels)": ("default", "default", {}, ("qkv", "fc1"), None),
    "fold + refit all four (robust default)": ("default", "default", {}, ALL, None),
    "refit all four, no fold (unconstrained proj)": ("default", "default",
                                                     dict(position0_fold=False), ALL, None),
    "peak scores (l2, max) + fold + refit all": ("peak", "default", {}, ALL, None),
    "50% document-start calibration + fold + refit all": ("docmix", "docmix", {}, ALL, None),
    "robust default, ridge 1e-2": ("default", "default", {}, ALL, 1e-2),
}
SCORINGS = {"default": dict(), "peak": dict(seq_agg="max"), "docmix": dict(calib_doc_starts=0.5)}
SAVE = {"paper": "paper: (l2, mean), plain slicing",
        "robust": "fold + refit all four (robust default)"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default="runs/teacher")
    p.add_argument("--data-path", default="runs/data/wiki")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--work-dir", default="runs/robust")
    p.add_argument("--output-dir", default="benchmarks/robust_run")
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--save-checkpoints", action="store_true")
    p.add_argument("--reuse", action="store_true",
                   help="keep the rows already in OUTPUT/ablation.json (same settings)")
    args = p.parse_args(argv)

    from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.data.loaders import DataConfig, build_datasets, micro_batches
    from minitron_megatron.data.tokenizer import Tokenizer
    from minitron_megatron.data.windows import DocumentStartWindows
    from minitron_megatron.evaluate import WindowStarts, evaluate_model, first_token_ids
    from minitron_megatron.importance import ImportanceConfig, Scores, estimate_importance
    from minitron_megatron.model.build import build_model
    from minitron_megatron.pruning import PruneTargets, apply_plan, make_plan
    from minitron_megatron.pruning.reconstruct import ReconstructConfig, Reconstructor
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    work, out_dir = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = find_checkpoint(args.load)
    cfg, seq, mb = info.model_config, 256, 4
    firsts = first_token_ids(Tokenizer.load(info.tokenizer_dir))
    result = {"target": TARGET, "parameters": cfg.replace(**TARGET).num_parameters(),
              "teacher_parameters": cfg.num_parameters(), "calib_samples": args.calib_samples,
              "eval_samples": args.eval_samples, "ridge": args.ridge, "rows": {}}
    previous = out_dir / "ablation.json"
    if args.reuse and previous.is_file():
        old = json.loads(previous.read_text())
        same = all(old.get(k) == result[k] for k in ("calib_samples", "eval_samples", "ridge"))
        result["rows"] = old["rows"] if same else {}
    started = time.perf_counter()
    with distributed(LaunchEnv(), ParallelConfig()) as ps:
        data = DataConfig(data_path=args.data_path, seq_length=seq)
        datasets = build_datasets(data, eod_id=firsts["eos"], vocab_size=cfg.vocab_size,
                                  num_samples={"train": args.calib_samples,
                                               "valid": args.eval_samples})
        starts = WindowStarts(first_tokens=firsts,
                              doc_starts=DocumentStartWindows(datasets["valid"], seq))

        def loaded():
            model = build_model(cfg, ps, init_weights=False, spec="local")
            load_checkpoint(info, model=model)
            return model

        def record(name, model, **extra):
            t0 = time.perf_counter()
            r = evaluate_model(model, ps, datasets["valid"], num_samples=args.eval_samples,
                               micro_batch_size=mb, seq_length=seq, window_starts=starts)
            row = {"loss": r.loss, **r.window_starts, **extra,
                   "eval_seconds": time.perf_counter() - t0}
            result["rows"][name] = row
            print(json.dumps({name: row}), flush=True)
            (out_dir / "ablation.json").write_text(json.dumps(result, indent=1))

        teacher = loaded()
        if "teacher" not in result["rows"]:
            record("teacher", teacher)
        scores, stats = {}, {}
        for name, settings in SCORINGS.items():
            path, sdir = work / f"scores-{name}.safetensors", work / f"stats-{name}"
            meta = sdir / "stats.json"
            stale = name != "peak" and (not meta.is_file() or "qkv" not in json.loads(
                meta.read_text())["kinds"])
            if not path.is_file() or stale:
                t0 = time.perf_counter()
                s = estimate_importance(
                    teacher, ps, datasets["train"], model_config=cfg,
                    num_samples=args.calib_samples, micro_batch_size=mb, seq_length=seq,
                    config=ImportanceConfig(depth_metrics=(), **settings),
                    stats_dir=None if name == "peak" else sdir)
                s.save(path)
                result[f"importance_seconds_{name}"] = time.perf_counter() - t0
            scores[name] = Scores.load(path)
            if name != "peak":
                stats[name] = str(sdir)

        for row, (scoring, stat, extras, kinds, ridge) in ROWS.items():
            keep = args.save_checkpoints and row in SAVE.values()
            if row in result["rows"] and not keep:
                continue
            plan = make_plan(scores[scoring], PruneTargets(**TARGET, **extras))
            refit = Reconstructor(ReconstructConfig(stats=stats[stat], ridge=ridge or args.ridge,
                                                    kinds=kinds)) if kinds else None
            pruned, target = apply_plan(teacher, plan, ps, reconstruct=refit)
            if row not in result["rows"]:
                record(row, pruned)
            for key, wanted in SAVE.items():
                if args.save_checkpoints and wanted == row:
                    save_checkpoint(work / f"ckpt-{key}", model=pruned, model_config=target,
                                    tokenizer_dir=info.tokenizer_dir)
            del pruned

        if not args.no_modelopt and ("ModelOpt 0.43.0 mcore_minitron" not in result["rows"]
                                     or args.save_checkpoints):
            from benchmarks.modelopt_baseline import modelopt_prune

            calibration = list(micro_batches(datasets["train"], range(args.calib_samples), mb))
            model, seconds = modelopt_prune(loaded(), cfg, ps, TARGET, calibration,
                                            seq_length=seq, micro_batch_size=mb)
            if "ModelOpt 0.43.0 mcore_minitron" not in result["rows"]:
                record("ModelOpt 0.43.0 mcore_minitron", model, prune_seconds=seconds["wall"])
            if args.save_checkpoints:  # into our format, to distill it exactly as ours
                target = cfg.replace(**TARGET)
                ours = build_model(target, ps, init_weights=False, spec="local")
                ours.load_state_dict(model.state_dict(), strict=False)
                check = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
                mine = {k: v for k, v in ours.state_dict().items() if "_extra_state" not in k}
                assert sorted(mine) == sorted(check), set(mine) ^ set(check)
                for k, v in mine.items():
                    assert v.shape == check[k].shape and v.equal(check[k]), k
                save_checkpoint(work / "ckpt-modelopt", model=ours, model_config=target,
                                tokenizer_dir=info.tokenizer_dir)
    result["total_seconds"] = time.perf_counter() - started
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=1))
    print(table(result), flush=True)
    return result


def table(result: dict) -> str:
    teacher = result["rows"]["teacher"]["as_sampled"]
    lines = ["| method | as sampled | `,` first | `.` first | EOS first | spread | doc start "
             "| excess over teacher |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['as_sampled']:.3f} | {r['comma_first']:.3f} | "
                     f"{r['period_first']:.3f} | {r['eos_first']:.3f} | {r['spread']:.3f} | "
                     f"{r['doc_start']:.3f} | {r['as_sampled'] - teacher:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
