"""The papers' central claims, reproduced at small scale: SmolLM2-135M → about half its size,
on the Wikipedia corpus, on CPU (arXiv 2407.14679).

Every retraining run uses the same token budget (``train_iters × global_batch_size ×
seq_length`` tokens, the same samples in the same order), the same schedule, and is measured on
the same held-out set (the first ``eval_samples`` samples of the validation split):

* **C1 + C2** (Table 14): the width-pruned student retrained by KD vs by cross entropy only vs
  the same architecture from random init trained by cross entropy. Expected: KD < CE < scratch.
* **C3** (Table 13, Fig. 6): width-pruned (65.3M) vs depth-pruned (11 layers, 67.3M) students,
  zero-shot and after KD. Paper: depth can look better zero-shot, width wins after retraining.
* **C5** (Table 11): importance aggregation (batch, sequence) ∈ {(l2, mean), (mean, mean),
  (l2, l2), (var, var)}: zero-shot loss of the width-pruned student, and after KD.
* **C7** (Tables 15–16): logit loss forward KL vs reverse KL vs KL + CE.

Runs shared between claims (identical settings, trained once): width (l2, mean) + forward KL is
the C1 KD run, the C3 width run, the C5 (l2, mean) run and the C7 forward-KL run; width
(l2, mean) is the student of every C1 and C7 run.

The stages are the library's: ``estimate_importance``, ``make_plan`` + ``prune_checkpoint``,
``build_model`` + ``save_checkpoint`` (random init), ``Trainer`` (KD, or CE with no teacher),
``pipeline_forward`` (per-sample held-out losses, for paired standard errors), all in one
single-rank process. ``results.json`` is written after every stage; re-running with the same
settings skips the stages already done. ``claims.md`` and the plots are written by
``benchmarks/claims_report.py``.

    python -m benchmarks.claims --teacher /tmp/smol --data-path /tmp/wiki/wiki \\
        --output-dir runs/claims                      # the full study (see RESULTS_claims.md)
    python -m benchmarks.claims --quick --output-dir /tmp/claims-quick   # CI smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.claims_config import (
    AGGREGATIONS,
    DEFAULT_WIDTH,
    DEPTH,
    DEPTH_LAYERS,
    KL_CE_WEIGHT,
    RUNS,
    SCRATCH,
    WIDTH,
    Run,
    StudyConfig,
    width_student,
)

__all__ = ["AGGREGATIONS", "DEFAULT_WIDTH", "DEPTH", "DEPTH_LAYERS", "KL_CE_WEIGHT", "RUNS",
           "SCRATCH", "WIDTH", "Run", "StudyConfig", "Study", "width_student"]


def sample_losses(model, ps, dataset, *, num_samples: int, micro_batch_size: int,
                  seq_length: int) -> torch.Tensor:
    """``[N, 2]``: summed next-token CE and token count of each held-out sample 0..N−1."""
    from minitron_megatron.data.loaders import micro_batches
    from minitron_megatron.model.forward import pipeline_forward

    if ps.world_size != 1:
        raise ValueError("the claims study runs on one rank.")

    def per_sample(batch, loss):  # loss [b, s] → [real b, 2]
        mask = batch["loss_mask"].to(torch.float64)  # [b, s]
        sums = torch.stack([(loss.detach().cpu().double() * mask).sum(1), mask.sum(1)], dim=1)
        return sums[batch["sample_mask"] > 0]

    out = pipeline_forward(model, ps, micro_batches(dataset, range(num_samples), micro_batch_size),
                           seq_length=seq_length, micro_batch_size=micro_batch_size,
                           on_output=per_sample, with_labels=True)
    return torch.cat(out)


class Study:
    """The stages, in order; each result lands in ``results.json`` as soon as it is known."""

    def __init__(self, cfg: StudyConfig, ps):
        self.cfg, self.ps = cfg, ps
        self.dir = cfg.output_dir
        self.path = self.dir / "results.json"
        self.results = {"config": cfg.to_dict(), "zero_shot": {}, "runs": {}, "students": {},
                        "timings": {}, "machine": {"cpus": os.cpu_count(),
                                                   "torch_threads": torch.get_num_threads()}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config") == self.results["config"]:
                self.results = old  # same settings: keep what is done
                print(f"[claims] resuming: {len(old['runs'])} runs already done", flush=True)

    # ------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.path)

    @contextmanager
    def timed(self, key: str):
        wall, cpu = time.perf_counter(), time.process_time()
        print(f"[claims] {key} ...", flush=True)
        yield
        self.results["timings"][key] = {"wall_s": round(time.perf_counter() - wall, 1),
                                        "cpu_s": round(time.process_time() - cpu, 1),
                                        "load1": round(os.getloadavg()[0], 2)}
        print(f"[claims] {key}: {self.results['timings'][key]}", flush=True)
        self.save()

    def student_dir(self, name: str) -> Path:
        return self.dir / "students" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    def held_out(self, model) -> torch.Tensor:
        c = self.cfg
        return sample_losses(model, self.ps, self.valid, num_samples=c.eval_samples,
                             micro_batch_size=c.micro_batch_size, seq_length=c.seq_length)

    def record_zero_shot(self, name: str, model) -> None:
        sums = self.held_out(model)
        self.results["zero_shot"][name] = sums.tolist()
        print(f"[claims] held-out loss of {name}: {float(sums[:, 0].sum() / sums[:, 1].sum()):.4f}",
              flush=True)

    # ------------------------------------------------------------------ stages
    def prepare_assets(self) -> None:
        from minitron_megatron.checkpoint import latest_iteration
        from minitron_megatron.data import assets
        from minitron_megatron.data.preprocess import preprocess
        from minitron_megatron.data.tokenizer import Tokenizer
        from minitron_megatron.model.convert import import_model

        teacher = self.cfg.teacher or self.dir / "teacher"
        if self.cfg.teacher is None and latest_iteration(teacher) is None:
            with self.timed("import teacher"):
                import_model(assets.smollm2_gguf(), teacher, self.ps)
        data = self.cfg.data_path or str(self.dir / "data" / "wiki")
        if self.cfg.data_path is None and not Path(data + ".idx").is_file():
            with self.timed("preprocess"):
                preprocess(assets.wikipedia_corpus(), Tokenizer.load(teacher), data)
        self.teacher_path, self.data_path = teacher, data

    def build_students(self) -> None:
        """Importance passes, pruned checkpoints, the random-init checkpoint, zero-shot losses."""
        from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
        from minitron_megatron.data.loaders import DataConfig, build_datasets
        from minitron_megatron.evaluate import eod_id_of
        from minitron_megatron.importance import ImportanceConfig, estimate_importance
        from minitron_megatron.model.build import build_model
        from minitron_megatron.pruning import PruneTargets, make_plan, prune_checkpoint
        from minitron_megatron.runtime.distributed import seed_everything

        c, ps = self.cfg, self.ps
        info = find_checkpoint(self.teacher_path)
        self.teacher_info = info
        self.data = DataConfig(data_path=self.data_path, seq_length=c.seq_length, seed=c.seed)
        sets = build_datasets(self.data, eod_id=eod_id_of(info),
                              vocab_size=info.model_config.vocab_size,
                              num_samples={"train": max(c.calib_samples, c.depth_calib_samples),
                                           "valid": c.eval_samples})
        self.valid = sets["valid"]
        needed = {r.student for r in RUNS}
        if all(s in self.results["students"] and self.student_dir(s).is_dir() for s in needed):
            return
        teacher = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=teacher)
        run = dict(model_config=info.model_config, micro_batch_size=c.micro_batch_size,
                   seq_length=c.seq_length)
        with self.timed("teacher held-out loss"):
            self.record_zero_shot("teacher", teacher)
        plans = {}
        for batch, seq in AGGREGATIONS:
            with self.timed(f"importance ({batch},{seq})"):
                scores = estimate_importance(
                    teacher, ps, sets["train"], num_samples=c.calib_samples, **run,
                    config=ImportanceConfig(batch_agg=batch, seq_agg=seq))
            plans[width_student(batch, seq)] = make_plan(scores, PruneTargets(**WIDTH))
        with self.timed("importance (depth: loss per skipped layer)"):
            scores = estimate_importance(teacher, ps, sets["train"],
                                         num_samples=c.depth_calib_samples, **run,
                                         config=ImportanceConfig(depth_metrics=("loss",)))
        plans[DEPTH] = make_plan(scores, PruneTargets(num_layers=DEPTH_LAYERS,
                                                      depth_method="loss"))
        del teacher
        gc.collect()
        for name, plan in plans.items():
            with self.timed(f"prune {name}"):
                save = self.student_dir(name)
                shutil.rmtree(save, ignore_errors=True)
                prune_checkpoint(info, plan, save, ps)
            self.results["students"][name] = {
                "parameters": plan.target.num_parameters(), "layers": plan.target.num_layers,
                "dropped_layers": sorted(set(range(plan.source.num_layers))
                                         - {layer.source for layer in plan.layers})}
        with self.timed("random init"):
            target = plans[DEFAULT_WIDTH].target
            seed_everything(c.seed)
            model = build_model(target, ps, init_weights=True)
            save = self.student_dir(SCRATCH)
            shutil.rmtree(save, ignore_errors=True)
            save_checkpoint(save, model=model, model_config=target,
                            tokenizer_dir=info.tokenizer_dir)
            self.results["students"][SCRATCH] = {"parameters": target.num_parameters(),
                                                 "layers": target.num_layers}
            del model
        for name in plans | {SCRATCH: None}:
            with self.timed(f"zero-shot {name}"):
                student = find_checkpoint(self.student_dir(name))
                model = build_model(student.model_config, ps, init_weights=False)
                load_checkpoint(student, model=model)
                self.record_zero_shot(name, model)
                del model
        self.results["students"]["teacher"] = {
            "parameters": info.model_config.num_parameters(),
            "layers": info.model_config.num_layers}
        self.save()

    def train(self, run: Run) -> None:
        from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
        from minitron_megatron.distill.config import KDConfig, TrainConfig
        from minitron_megatron.distill.training import Trainer
        from minitron_megatron.model.build import build_model

        if run.name in self.results["runs"]:
            return
        c = self.cfg
        kd = {"forward KL": KDConfig(), "reverse KL": KDConfig(reverse=True),
              "KL+CE": KDConfig(ce_weight=KL_CE_WEIGHT), "CE": None}[run.objective]
        save = self.dir / "runs" / run.name
        shutil.rmtree(save, ignore_errors=True)
        train = TrainConfig(
            save=save, train_iters=c.train_iters, global_batch_size=c.global_batch_size,
            micro_batch_size=c.micro_batch_size, lr=c.lr, min_lr=c.lr / 10,
            lr_warmup_iters=c.warmup_iters, lr_decay_style="cosine", clip_grad=1.0,
            eval_interval=c.train_iters // c.curve_points,
            eval_iters=c.curve_samples // c.global_batch_size,
            log_interval=max(1, c.train_iters // 8))
        with self.timed(f"train {run.name}"):
            trainer = Trainer(train=train, kd=kd, data=self.data,
                              student=find_checkpoint(self.student_dir(run.student)),
                              teacher=self.teacher_info if kd is not None else None,
                              ps=self.ps, seed=c.seed)
            history = trainer.run().history
            del trainer
            gc.collect()
        with self.timed(f"held-out {run.name}"):
            info = find_checkpoint(save)
            model = build_model(info.model_config, self.ps, init_weights=False)
            load_checkpoint(info, model=model)
            sums = self.held_out(model)
            del model
        if not c.keep_checkpoints:
            for path in save.glob("iter_*"):
                shutil.rmtree(path)
        self.results["runs"][run.name] = {**dataclasses.asdict(run), "held_out": sums.tolist(),
                                          "history": history}
        self.save()

    def run(self) -> dict:
        started = time.perf_counter()
        self.prepare_assets()
        self.build_students()
        for run in RUNS:
            self.train(run)
        # over all invocations (a resumed study adds its own time)
        self.results["wall_s"] = round(self.results.get("wall_s", 0.0)
                                       + time.perf_counter() - started, 1)
        self.save()
        return self.results


def parse_args(argv=None) -> StudyConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, default=Path("runs/claims"))
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher checkpoint (default: import SmolLM2-135M into the output dir)")
    p.add_argument("--data-path", default=None,
                   help="indexed dataset prefix (default: tokenize the Wikipedia corpus)")
    p.add_argument("--quick", action="store_true", help="tiny slice of the same path (CI)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--keep-checkpoints", action="store_true")
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr",
                 "warmup_iters", "eval_samples", "curve_samples", "curve_points",
                 "calib_samples", "depth_calib_samples", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(fields[name].default),
                       default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given["keep_checkpoints"] = args.keep_checkpoints
    return StudyConfig.quick(**given) if args.quick else StudyConfig(**given)


def main(argv=None) -> None:
    from benchmarks.claims_report import write_report
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    cfg = parse_args(argv)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with distributed(LaunchEnv(), ParallelConfig(seed=cfg.seed)) as ps:
        results = Study(cfg, ps).run()
    print(write_report(results, cfg.output_dir), flush=True)


if __name__ == "__main__":
    main()
