"""C1 where the paper argues it: the width-pruned student of the claims study retrained by KD
and by CE with little data, with held-out curves (arXiv 2407.14679, Table 14).

Two regimes (``--regime``), each ≤ 60 min on 2 idle cores with its defaults:

* ``scarce`` — a fixed training set (``--train-samples``, the first samples of the train split
  in the base seed's order: the same set for every seed) trained for ``--epochs`` passes, each in
  its own seeded order. Where the held-out curve turns up, the run overfits the small set.
* ``single-pass`` — ``--train-iters`` steps over the train split, no sample seen twice.

Both use the claims study's student, schedule (LR, warmup, cosine to LR/10, batch, sequence
length), held-out windows (as sampled and document start) and margin, so their numbers sit beside
its 32-step ones. Run after ``benchmarks/claims.py`` on its output directory::

    python -m benchmarks.claims_c1 --study-dir runs/claims --regime scarce
    python -m benchmarks.claims_c1 --study-dir runs/claims --regime single-pass --seeds 1234

Writes ``c1_<regime>.json``, ``c1_<regime>.md`` and ``c1_<regime>.png`` in the study directory;
a re-run with the same settings skips the runs already done.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.claims import Study
from benchmarks.claims_config import RUN, WINDOW_KINDS, C1Config, StudyConfig
from benchmarks.claims_report import (
    KIND_TITLE,
    better,
    combine,
    fmt_delta,
    mean_loss,
    mean_std,
    word,
)

OBJECTIVES = ("width-kd", "width-ce")


class FixedEpochs(Sequence):
    """``epochs`` passes over ``base[0..size-1]``, pass ``e`` in the order seeded by
    ``(seed, e)``: a small fixed training set, cycled."""

    def __init__(self, base, size: int, epochs: int, seed: int):
        if len(base) < size:
            raise ValueError(f"the train split gives {len(base)} samples, fewer than {size}.")
        self.base = base
        self.order = np.concatenate([np.random.RandomState([seed, e]).permutation(size)
                                     for e in range(epochs)])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.base[int(self.order[i])]


class C1Study(Study):
    """The claims study's students and held-out sets, with this study's own results file."""

    def __init__(self, study: StudyConfig, cfg: C1Config, ps):
        super().__init__(study, ps)  # loads the claims study's results: students, zero-shot
        if not self.results["runs"] and not self.results["zero_shot"]:
            raise SystemExit(f"{cfg.study_dir} holds no finished claims study: run "
                             f"`python -m benchmarks.claims --output-dir {cfg.study_dir}` first.")
        self.c1, self.curve_samples = cfg, cfg.curve_samples
        main = self.results
        self.path = self.dir / f"c1_{cfg.regime}.json"
        self.results = {"config": {**study.to_dict(), "c1": cfg.to_dict()},
                        "zero_shot": main["zero_shot"], "students": main["students"],
                        "runs": {}, "timings": {}, "machine": main["machine"]}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config") == self.results["config"]:
                self.results = old
                print(f"[c1] resuming: {len(old['runs'])} runs already done", flush=True)

    @property
    def steps(self) -> int:
        c, gbs = self.c1, self.cfg.global_batch_size
        return c.epochs * c.train_samples // gbs if c.regime == "scarce" else c.train_iters

    def train_set_of(self, seed: int):
        c = self.c1
        if c.regime == "single-pass":
            return self.train_set(seed, self.steps * self.cfg.global_batch_size)
        base = self.train_set(self.cfg.seed, c.train_samples)
        return FixedEpochs(base, c.train_samples, c.epochs, seed)

    def run_one(self, name: str, seed: int) -> None:
        run = RUN[name]
        key = run.key(seed)
        if key in self.results["runs"]:
            return
        save = self.dir / "runs" / f"c1-{self.c1.regime}-{key.replace('@', '-')}"
        warmup = min(self.cfg.warmup_iters, self.steps - 1)
        with self.timed(f"train {key}"):
            trainer = self.trainer(run, seed, self.train_set_of(seed), save, self.steps, warmup)
            history, curve = self.train_with_curve(
                trainer, max(1, self.steps // self.c1.curve_points), run.student)
        with self.timed(f"held-out {key}"):
            sums = self.held_out(trainer.student)
        del trainer
        gc.collect()
        shutil.rmtree(save, ignore_errors=True)
        self.record_run(run, seed, held_out=sums, history=history, curve=curve)

    def run(self) -> dict:
        started = time.perf_counter()
        self.prepare_assets()
        self.build_students()  # nothing to do: the claims study built them
        for seed in self.c1.seeds:
            for name in OBJECTIVES:
                self.run_one(name, seed)
        self.results["wall_s"] = round(self.results.get("wall_s", 0.0)
                                       + time.perf_counter() - started, 1)
        self.save()
        return self.results


# ---------------------------------------------------------------------- report
def report(results: dict, out: Path) -> str:
    """Markdown of a C1 study (tables, verdicts, curve plot) from its results."""
    cfg, c1, runs = results["config"], results["config"]["c1"], results["runs"]
    seeds = [s for s in c1["seeds"] if all(f"{n}@{s}" in runs for n in OBJECTIVES)]
    gbs, seq = cfg["global_batch_size"], cfg["seq_length"]
    if c1["regime"] == "scarce":
        steps = c1["epochs"] * c1["train_samples"] // gbs
        setting = (f"a fixed set of {c1['train_samples']} samples ({c1['train_samples'] * seq:,} "
                   f"tokens) for {c1['epochs']} epochs = {steps} steps")
    else:
        steps = c1["train_iters"]
        setting = f"one pass of {steps} steps = {steps * gbs * seq:,} tokens, no sample repeated"
    lines = [f"# C1, {c1['regime']} regime: pruned + KD vs pruned + CE", "",
             f"Width-pruned student of the claims study, {setting}, {gbs} × {seq}-token samples "
             f"per step, the study's schedule (LR {cfg['lr']:g}, warmup "
             f"{min(cfg['warmup_iters'], steps - 1)}, cosine to {cfg['lr'] / 10:g}). Seeds: "
             f"{', '.join(map(str, seeds))}. Held-out: the study's windows (as sampled "
             f"{cfg['eval_samples']}, document start {cfg['doc_start_samples']}); curves on the "
             f"first {c1['curve_samples']} of each.", ""]
    head = "| seed | " + " | ".join(f"KD, {KIND_TITLE[k]} | CE, {KIND_TITLE[k]} | KD − CE"
                                     for k in WINDOW_KINDS) + " |"
    lines += [head, "|---:|" + "---:|" * (3 * len(WINDOW_KINDS))]
    verdicts: dict[str, list[str]] = {k: [] for k in WINDOW_KINDS}
    for s in seeds:
        kd, ce = runs[f"width-kd@{s}"]["held_out"], runs[f"width-ce@{s}"]["held_out"]
        cells = []
        for k in WINDOW_KINDS:
            cells.append(f"{mean_loss(kd[k]):.3f} | {mean_loss(ce[k]):.3f} | "
                         f"{fmt_delta(kd[k], ce[k])}")
            verdicts[k].append(better(kd[k], ce[k]))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if len(seeds) > 1:
        cells = [f"{mean_std([mean_loss(runs[f'width-kd@{s}']['held_out'][k]) for s in seeds])} | "
                 f"{mean_std([mean_loss(runs[f'width-ce@{s}']['held_out'][k]) for s in seeds])} | "
                 for k in WINDOW_KINDS]
        lines.append("| mean ± std | " + " | ".join(cells) + " |")
    overall = {k: combine(v) for k, v in verdicts.items() if v}
    lines += ["", f"**C1 ({c1['regime']}: KD beats CE, every seed): "
                  f"{word(combine(list(overall.values())))}** ("
              + "; ".join(f"{KIND_TITLE[k]}: {word(v)}" for k, v in overall.items()) + ").", ""]
    lines += curve_table(runs, seeds, steps)
    name = plot(runs, seeds, out / f"c1_{c1['regime']}.png", results["zero_shot"],
                c1["curve_samples"])
    lines += ["", f"![C1 {c1['regime']}]({name})", "", "| stage | wall (s) | load avg |",
              "|---|---:|---:|"]
    lines += [f"| {k} | {v['wall_s']} | {v['load1']} |" for k, v in results["timings"].items()]
    lines += ["", f"Total wall time {results.get('wall_s', 0) / 60:.1f} min.", ""]
    return "\n".join(lines)


def curve_table(runs: dict, seeds: list[int], steps: int) -> list[str]:
    """Held-out curve (as sampled and document start, mean over seeds) and where each
    objective's curve bottoms out."""
    iters = [p["iteration"] for p in runs[f"width-kd@{seeds[0]}"]["curve"]]
    lines = ["| step | " + " | ".join(f"{o.removeprefix('width-').upper()}, {KIND_TITLE[k]}"
                                       for k in WINDOW_KINDS for o in OBJECTIVES) + " |",
             "|---:|" + "---:|" * (2 * len(WINDOW_KINDS))]
    means = {}
    for k in WINDOW_KINDS:
        for o in OBJECTIVES:
            means[k, o] = [float(np.mean([runs[f"{o}@{s}"]["curve"][i][k] for s in seeds]))
                           for i in range(len(iters))]
    for i, it in enumerate(iters):
        lines.append(f"| {it} | " + " | ".join(f"{means[k, o][i]:.3f}" for k in WINDOW_KINDS
                                                for o in OBJECTIVES) + " |")
    lines.append("")
    for k in WINDOW_KINDS:
        for o in OBJECTIVES:
            best = int(np.argmin(means[k, o]))
            rise = means[k, o][-1] - means[k, o][best]
            lines.append(f"* {o.removeprefix('width-').upper()}, {KIND_TITLE[k]}: lowest "
                         f"{means[k, o][best]:.3f} at step {iters[best]} of {steps}"
                         + (f", {rise:+.3f} by the end" if best < len(iters) - 1 else
                            " (still falling at the end)"))
    return lines


def plot(runs: dict, seeds: list[int], path: Path, zero: dict, n: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WINDOW_KINDS) + 1, figsize=(15, 4))
    for o, color in zip(OBJECTIVES, ("C0", "C1")):
        for s in seeds:
            run, first = runs[f"{o}@{s}"], s == seeds[0]
            label = o.removeprefix("width-").upper() if first else None
            for ax, k in zip(axes, WINDOW_KINDS):
                ax.plot([p["iteration"] for p in run["curve"]], [p[k] for p in run["curve"]],
                        color=color, marker="o", alpha=1.0 if first else 0.45, label=label)
            train = [(h["iteration"], h["ce_loss"]) for h in run["history"] if "ce_loss" in h]
            axes[-1].plot(*zip(*train), color=color, alpha=1.0 if first else 0.45, label=label)
    for ax, k in zip(axes, WINDOW_KINDS):
        ax.axhline(mean_loss(zero["teacher"][k][:n]), color="gray", linestyle="--",
                   label="teacher")
        ax.set_title(f"held-out, {KIND_TITLE[k]} (first {n})")
    axes[-1].set_title("CE on the training batch")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


def write_report(results: dict, out: Path) -> str:
    text = report(results, Path(out))
    (Path(out) / f"c1_{results['config']['c1']['regime']}.md").write_text(text)
    return text


def parse_args(argv=None) -> tuple[StudyConfig, C1Config, bool]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study-dir", type=Path, default=Path("runs/claims"))
    p.add_argument("--quick", action="store_true", help="tiny slice of the same path (CI)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    fields = {f.name: f for f in dataclasses.fields(C1Config)}
    for name in ("regime", "train_samples", "epochs", "train_iters", "curve_points",
                 "curve_samples"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(fields[name].default),
                       default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.quick:
        given = {**dict(train_samples=4, epochs=2, train_iters=2, curve_points=2,
                        curve_samples=2), **given}
    cfg = C1Config(**given)
    saved = json.loads((cfg.study_dir / "results.json").read_text())["config"]
    study = StudyConfig(output_dir=cfg.study_dir, **{
        k: tuple(v) if k == "seeds" else Path(v) if k == "teacher" and v else v
        for k, v in saved.items()})
    return study, cfg, args.report_only


def main(argv=None) -> None:
    from minitron_megatron.config import ParallelConfig
    from minitron_megatron.runtime.distributed import LaunchEnv, distributed

    study, cfg, report_only = parse_args(argv)
    path = cfg.study_dir / f"c1_{cfg.regime}.json"
    if not report_only:
        with distributed(LaunchEnv(), ParallelConfig(seed=study.seed)) as ps:
            C1Study(study, cfg, ps).run()
    print(write_report(json.loads(path.read_text()), cfg.study_dir), flush=True)


if __name__ == "__main__":
    main()
