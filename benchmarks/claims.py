"""The papers' central claims, reproduced at small scale: SmolLM2-135M → about half its size,
on the Wikipedia corpus, on CPU (arXiv 2407.14679).

Every retraining run uses the same token budget (``train_iters × global_batch_size ×
seq_length`` tokens), the same schedule, and is measured on the same two held-out sets: the first
``eval_samples`` samples of the validation split as the dataset cut them (``as_sampled``, mostly
mid-document) and ``doc_start_samples`` windows that start at a document's first token
(``doc_start``). The runs that decide C1 and C3 are trained once per seed (``seeds``: the
training-data order; the held-out sets and students stay the same); a claim gets a verdict only
where every seed agrees beyond the margin (``benchmarks/claims_report.py``):

* **C1 + C2** (Table 14): the width-pruned student retrained by KD vs by cross entropy only vs
  the same architecture from random init trained by cross entropy. Expected: KD < CE < scratch.
* **C3** (Table 13, Fig. 6): width-pruned (65.3M) vs depth-pruned (11 layers, 67.3M) students,
  zero-shot and after KD. Paper: depth can look better zero-shot, width wins after retraining.
* **C5** (Table 11): importance aggregation (batch, sequence) ∈ {(l2, mean), (mean, mean),
  (l2, l2), (var, var)}: zero-shot loss of the width-pruned student.
* **C7** (Tables 15–16): logit loss forward KL vs reverse KL vs KL + CE (first seed).

Runs shared between claims: width (l2, mean) + forward KL is the C1 KD run, the C3 width run and
the C7 forward-KL run; width (l2, mean) is the student of every C1 and C7 run. The width students
are pruned the library's default way (position-0 fold, layers refit from the calibration
pass's Gram statistics). The data-scarce C1 regime (a small fixed training set, many epochs) is
``benchmarks/claims_c1.py``, run after this study on its students.

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
    WINDOW_KINDS,
    Run,
    StudyConfig,
    width_student,
)
from benchmarks.claims_report import mean_loss, write_report
from minitron_megatron.distill.training import Trainer

__all__ = ["AGGREGATIONS", "DEFAULT_WIDTH", "DEPTH", "DEPTH_LAYERS", "KL_CE_WEIGHT", "RUNS",
           "SCRATCH", "WIDTH", "WINDOW_KINDS", "Run", "StudyConfig", "Study", "StudyTrainer",
           "width_student"]


def sample_losses(model, ps, dataset, *, num_samples: int, micro_batch_size: int,
                  seq_length: int) -> torch.Tensor:
    """``[N, 2]``: summed next-token CE and token count of each held-out sample 0..N−1."""
    from minitron_megatron.data.loaders import micro_batches
    from minitron_megatron.model.forward import pipeline_forward

    if ps.world_size != 1:
        raise ValueError("the claims study runs on one rank.")

    def per_sample(batch, loss):  # loss [b, s] → [real b, 2]
        if loss.dim() == 3:  # a distilled student's last stage hands out its logits [s, b, V]
            logits = loss.transpose(0, 1).float()  # [b, s, V]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].to(logits.device).flatten(),
                reduction="none").view(logits.shape[:2])  # [b, s]
        mask = batch["loss_mask"].to(torch.float64)  # [b, s]
        sums = torch.stack([(loss.detach().cpu().double() * mask).sum(1), mask.sum(1)], dim=1)
        return sums[batch["sample_mask"] > 0]

    out = pipeline_forward(model, ps, micro_batches(dataset, range(num_samples), micro_batch_size),
                           seq_length=seq_length, micro_batch_size=micro_batch_size,
                           on_output=per_sample, with_labels=True)
    return torch.cat(out)


class StudyTrainer(Trainer):
    """The library's ``Trainer`` on a training set the study chose (a seed's data order, or a
    fixed set's epochs); its held-out evaluation is the study's own (``Study.curve_point``)."""

    def __init__(self, *, train_set, **kw):
        self._train_set = train_set
        super().__init__(**kw)

    def _datasets(self):
        return {"train": self._train_set}


class Study:
    """The stages, in order; each result lands in ``results.json`` as soon as it is known."""

    def __init__(self, cfg: StudyConfig, ps):
        self.cfg, self.ps = cfg, ps
        self.curve_samples = cfg.curve_samples
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

    def held_out(self, model, limit: int | None = None) -> dict[str, list]:
        """Per-sample ``[loss sum, tokens]`` of ``model`` on each held-out window kind (the first
        ``limit`` windows of each, default all)."""
        c, out = self.cfg, {}
        for kind, dataset, n in (("as_sampled", self.valid, c.eval_samples),
                                 ("doc_start", self.doc_starts, c.doc_start_samples)):
            out[kind] = sample_losses(model, self.ps, dataset, num_samples=min(n, limit or n),
                                      micro_batch_size=c.micro_batch_size,
                                      seq_length=c.seq_length).tolist()
        return out

    def curve_point(self, trainer: Trainer, iteration: int) -> dict:
        """Held-out loss of the student being trained on the first ``curve_samples`` windows of
        each kind (``pipeline_forward`` puts it in eval mode and back)."""
        sums = self.held_out(trainer.student, limit=self.curve_samples)
        return {"iteration": iteration, **{k: mean_loss(v) for k, v in sums.items()}}

    def record_zero_shot(self, name: str, model) -> None:
        sums = self.held_out(model)
        self.results["zero_shot"][name] = sums
        print(f"[claims] held-out loss of {name}: "
              + ", ".join(f"{k} {mean_loss(v):.4f}" for k, v in sums.items()), flush=True)

    def train_set(self, seed: int, samples: int):
        """The train split in the data order of ``seed`` (cycling epochs if needed)."""
        from minitron_megatron.data.loaders import build_datasets

        data = dataclasses.replace(self.data, seed=seed)
        return build_datasets(data, eod_id=self.eod_id, vocab_size=self.vocab_size,
                              num_samples={"train": samples}, repeat=("train",))["train"]

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
        from minitron_megatron.data.windows import DocumentStartWindows
        from minitron_megatron.evaluate import eod_id_of
        from minitron_megatron.importance import ImportanceConfig, estimate_importance
        from minitron_megatron.model.build import build_model
        from minitron_megatron.pruning import PruneTargets, make_plan, prune_checkpoint
        from minitron_megatron.pruning.reconstruct import ReconstructConfig
        from minitron_megatron.runtime.distributed import seed_everything

        c, ps = self.cfg, self.ps
        info = find_checkpoint(self.teacher_path)
        self.teacher_info = info
        self.data = DataConfig(data_path=self.data_path, seq_length=c.seq_length, seed=c.seed)
        self.eod_id, self.vocab_size = eod_id_of(info), info.model_config.vocab_size
        sets = build_datasets(self.data, eod_id=self.eod_id, vocab_size=self.vocab_size,
                              num_samples={"train": max(c.calib_samples, c.depth_calib_samples),
                                           "valid": c.eval_samples})
        self.calibration, self.valid = sets["train"], sets["valid"]
        self.doc_starts = DocumentStartWindows(self.valid, c.seq_length, seed=c.seed)
        if len(self.doc_starts) < c.doc_start_samples:
            raise ValueError(f"the validation split has {len(self.doc_starts)} documents, fewer "
                             f"than --doc-start-samples {c.doc_start_samples}.")
        needed = {r.student for r in RUNS} | {width_student(*a) for a in AGGREGATIONS}
        if all(s in self.results["students"] and self.student_dir(s).is_dir() for s in needed):
            return
        teacher = build_model(info.model_config, ps, init_weights=False)
        load_checkpoint(info, model=teacher)
        run = dict(model_config=info.model_config, micro_batch_size=c.micro_batch_size,
                   seq_length=c.seq_length)
        with self.timed("teacher held-out loss"):
            self.record_zero_shot("teacher", teacher)
        plans, refit = {}, {}
        for batch, seq in AGGREGATIONS:
            name = width_student(batch, seq)
            stats = self.dir / "stats" / self.student_dir(name).name
            shutil.rmtree(stats, ignore_errors=True)
            with self.timed(f"importance ({batch},{seq})"):
                scores = estimate_importance(
                    teacher, ps, sets["train"], num_samples=c.calib_samples, **run,
                    config=ImportanceConfig(batch_agg=batch, seq_agg=seq), stats_dir=stats)
            plans[name] = make_plan(scores, PruneTargets(**WIDTH))
            refit[name] = ReconstructConfig(stats=stats)  # the library's default pruning
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
                prune_checkpoint(info, plan, save, ps, reconstruct=refit.get(name))
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

    def trainer(self, run: Run, seed: int, train_set, save: Path, train_iters: int,
                warmup_iters: int) -> StudyTrainer:
        """The library's trainer for ``run`` on ``train_set`` (the study's schedule)."""
        from minitron_megatron.checkpoint import find_checkpoint
        from minitron_megatron.distill.config import KDConfig, TrainConfig

        c = self.cfg
        kd = {"forward KL": KDConfig(), "reverse KL": KDConfig(reverse=True),
              "KL+CE": KDConfig(ce_weight=KL_CE_WEIGHT), "CE": None}[run.objective]
        shutil.rmtree(save, ignore_errors=True)
        train = TrainConfig(
            save=save, train_iters=train_iters, global_batch_size=c.global_batch_size,
            micro_batch_size=c.micro_batch_size, lr=c.lr, min_lr=c.lr / 10,
            lr_warmup_iters=warmup_iters, lr_decay_style="cosine", clip_grad=1.0,
            eval_interval=0, log_interval=max(1, train_iters // 8))
        return StudyTrainer(train_set=train_set, train=train, kd=kd, data=self.data,
                            student=find_checkpoint(self.student_dir(run.student)),
                            teacher=self.teacher_info if kd is not None else None,
                            ps=self.ps, seed=seed)

    def train_with_curve(self, trainer: Trainer, every: int, student: str) -> tuple[list, list]:
        """Run ``trainer``, evaluating the curve every ``every`` steps; (history, curve)."""
        n = self.curve_samples
        zero = self.results["zero_shot"][student]
        curve = [{"iteration": 0, **{k: mean_loss(v[:n]) for k, v in zero.items()}}]

        def on_step(iteration: int, _metrics) -> None:
            if iteration % every == 0:
                curve.append(self.curve_point(trainer, iteration))

        return trainer.run(on_step=on_step).history, curve

    def train(self, run: Run, seed: int) -> None:
        from minitron_megatron.checkpoint import find_checkpoint, load_checkpoint
        from minitron_megatron.model.build import build_model

        key = run.key(seed)
        if key in self.results["runs"]:
            return
        c = self.cfg
        save = self.dir / "runs" / key.replace("@", "-")
        with self.timed(f"train {key}"):
            trainer = self.trainer(run, seed, self.train_set(seed, c.train_iters
                                                             * c.global_batch_size),
                                   save, c.train_iters, c.warmup_iters)
            history, curve = self.train_with_curve(trainer, c.train_iters // c.curve_points,
                                                   run.student)
            del trainer
            gc.collect()
        with self.timed(f"held-out {key}"):
            info = find_checkpoint(save)
            model = build_model(info.model_config, self.ps, init_weights=False)
            load_checkpoint(info, model=model)
            sums = self.held_out(model)
            del model
        if not c.keep_checkpoints:
            for path in save.glob("iter_*"):
                shutil.rmtree(path)
        self.record_run(run, seed, held_out=sums, history=history, curve=curve)

    def record_run(self, run: Run, seed: int, **result) -> None:
        self.results["runs"][run.key(seed)] = {**dataclasses.asdict(run), "seed": seed, **result}
        self.save()

    def run(self) -> dict:
        started = time.perf_counter()
        self.prepare_assets()
        self.build_students()
        for seed in self.cfg.seeds:  # every run of one seed before the next seed's
            for run in RUNS:
                if run.seeded or seed == self.cfg.seed:
                    self.train(run, seed)
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
                 "calib_samples", "depth_calib_samples", "doc_start_samples"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(fields[name].default),
                       default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training-data seeds of the C1/C3 runs (default: 1234 1235 1236)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given["keep_checkpoints"] = args.keep_checkpoints
    return StudyConfig.quick(**given) if args.quick else StudyConfig(**given)


def main(argv=None) -> None:
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    cfg = parse_args(argv)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with distributed(LaunchEnv(), ParallelConfig(seed=cfg.seed)) as ps:
        results = Study(cfg, ps).run()
    print(write_report(results, cfg.output_dir), flush=True)


if __name__ == "__main__":
    main()
