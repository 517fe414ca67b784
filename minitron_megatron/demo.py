"""``minitron demo``: the end-to-end run on the real SmolLM2-135M teacher and Wikipedia text.

Stages (each the real CLI, launched as a user would: ``python -m minitron_megatron`` for
single-process stages, ``torchrun`` for parallel ones; timed):

1. import the SmolLM2-135M GGUF; 2. tokenize the Wikipedia corpus (fixed 98/2 document split);
3. teacher's held-out loss at TP=3; 4. importance on 3 ranks (TP=3: SmolLM2's 3 query groups),
gathering the reconstruction statistics in the same pass; 5. prune to about half the parameters
(TP=3; position-0 fold, least-squares refit of ``linear_proj`` / ``linear_fc2``); 6. pruned
zero-shot loss; 7. distillation on 2 data-parallel ranks (teacher and student forward together,
logit forward KL); 8. distilled loss. Every loss also by window start (``evaluate
--window-starts``). Then tables (losses, loss by window start, parameters, wall time per stage),
``report.md`` and ``val_loss.png`` in the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minitron_megatron.data import assets
from minitron_megatron.errors import UserError
from minitron_megatron.output_paths import check_output_dir

# About half of SmolLM2-135M (134.5M → 68.5M, 50.9 %), every size divisible by TP=3.
PRUNE_TARGET = {"hidden_size": 448, "ffn_hidden_size": 768, "num_attention_heads": 6}


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """What the demo runs; ``quick`` shrinks every budget for CI."""

    output_dir: Path
    """Everything the demo writes goes here (checkpoints, data, report, plot)."""

    quick: bool = False
    """A tiny slice of the same path (CI smoke test)."""

    nproc: int = 3
    """Ranks of the parallel stages (TP = nproc: it must divide SmolLM2's 3 query groups)."""

    seq_length: int = 256
    """Tokens per sample."""

    eval_samples: int = 48
    """Validation samples every loss is measured on."""

    calib_samples: int = 64
    """Calibration samples of the importance stage."""

    distill_nproc: int = 2
    """Data-parallel ranks of the distillation (on 2 cores, two single-threaded ranks are the
    fastest layout; three TP ranks would oversubscribe them)."""

    distill_iters: int = 80
    """Distillation steps (the demo's main budget: ≈ 9.5 minutes on 2 cores)."""

    global_batch_size: int = 4
    """Samples per distillation step (micro-batches of 2 on each data-parallel rank)."""

    window_starts: bool = True
    """Also measure every loss by window start (four more forward passes per evaluation)."""

    reconstruct: bool = True
    """Refit the readers of pruned units (``linear_proj``, ``linear_fc2``, ``linear_qkv``,
    ``linear_fc1``) by least squares after pruning (``importance --save-stats`` + ``prune
    --reconstruct``, the CLI's default); ``False`` slices them as the paper does."""

    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs the stages."""

    def __post_init__(self) -> None:
        if self.quick:
            for name, value in (("seq_length", 64), ("eval_samples", 6), ("calib_samples", 6),
                                ("distill_iters", 4)):
                object.__setattr__(self, name, value)
        check_output_dir(self.output_dir, "--output-dir")
        if 3 % self.nproc:
            raise UserError(f"--nproc {self.nproc} must divide SmolLM2's 3 query groups "
                            f"(use 1 or 3).")
        if self.distill_nproc <= 0 or self.global_batch_size % (2 * self.distill_nproc):
            raise UserError(f"the global batch {self.global_batch_size} must be a multiple of "
                            f"2 × the {self.distill_nproc} distillation ranks.")
        for name in ("seq_length", "eval_samples", "calib_samples", "distill_iters",
                     "global_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"demo {name} must be positive.")


@dataclass
class StageResult:
    name: str
    seconds: float
    layout: str = "1 process"
    output: dict = field(default_factory=dict)


class Demo:
    """Runs the stages in order, recording wall time and each stage's JSON output."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.results: list[StageResult] = []
        self.dir = Path(cfg.output_dir)

    def _run(self, name: str, args: list[str], nproc: int = 1, layout: str = "") -> dict:
        if nproc > 1:
            cmd = [self.cfg.python, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "minitron_megatron", *args]
        else:
            cmd = [self.cfg.python, "-m", "minitron_megatron", *args]
        print(f"[demo] {name}: {' '.join(cmd[2:])}", flush=True)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        start = time.perf_counter()
        stdout: list[str] = []
        with tempfile.TemporaryFile("w+") as stderr:
            # the stage's own progress (distillation steps, validations) shows as it happens
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  env=env) as proc:
                for line in proc.stdout:
                    stdout.append(line)
                    if not line.startswith("{"):
                        print(f"    {line}", end="", flush=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                stderr.seek(0)
                sys.stderr.write(stderr.read()[-4000:])
                raise RuntimeError(f"demo stage {name!r} failed (exit {proc.returncode})")
        lines = [ln for ln in stdout if ln.startswith("{")]
        output = json.loads(lines[-1]) if lines else {}
        self.results.append(StageResult(name, seconds, output=output,
                                        layout=layout if nproc > 1 else "1 process"))
        return output

    def _evaluate(self, name: str, ckpt: Path) -> dict:
        cfg = self.cfg
        return self._run(name, [
            "evaluate", "--load", str(ckpt), "--data-path", str(self.data),
            "--seq-length", str(cfg.seq_length), "--eval-samples", str(cfg.eval_samples),
            "--micro-batch-size", "2", "--tensor-model-parallel-size", str(cfg.nproc),
            *(["--window-starts"] if cfg.window_starts else []),
        ], nproc=cfg.nproc, layout=f"TP={cfg.nproc}")

    def run(self) -> list[StageResult]:
        cfg, d = self.cfg, self.dir
        gguf, corpus = assets.smollm2_gguf(), assets.wikipedia_corpus()
        d.mkdir(parents=True, exist_ok=True)
        teacher, student, distilled = d / "teacher", d / "pruned", d / "distilled"
        self.data = d / "data" / "wiki"
        tp = ["--tensor-model-parallel-size", str(cfg.nproc)]
        self._run("import teacher", ["import-hf", "--hf-path", str(gguf), "--save", str(teacher)])
        self._run("preprocess", ["preprocess", "--input", str(corpus), "--tokenizer",
                                 str(teacher), "--output-prefix", str(self.data)])
        self._evaluate("teacher loss", teacher)
        self._run("importance", [
            "importance", "--load", str(teacher), "--data-path", str(self.data),
            "--seq-length", str(cfg.seq_length), "--calib-samples", str(cfg.calib_samples),
            "--micro-batch-size", "2", "--save-scores", str(d / "scores.safetensors"), *tp,
            *(["--save-stats", str(d / "stats")] if cfg.reconstruct else ["--no-save-stats"]),
        ], nproc=cfg.nproc, layout=f"TP={cfg.nproc}")
        targets = [f"--target-{k.replace('_', '-')}" for k in PRUNE_TARGET]
        self._run("prune", [
            "prune", "--load", str(teacher), "--scores", str(d / "scores.safetensors"),
            "--save", str(student), "--overwrite",  # the demo owns its output directory
            *(x for flag, v in zip(targets, PRUNE_TARGET.values()) for x in (flag, str(v))), *tp,
            *(["--reconstruct", str(d / "stats")] if cfg.reconstruct else ["--no-reconstruct"]),
        ], nproc=cfg.nproc, layout=f"TP={cfg.nproc}")
        self._evaluate("pruned zero-shot loss", student)
        self._run("distill", [
            "distill", "--teacher", str(teacher), "--student", str(student),
            "--data-path", str(self.data), "--save", str(distilled),
            "--seq-length", str(cfg.seq_length), "--micro-batch-size", "2",
            "--global-batch-size", str(cfg.global_batch_size),
            "--train-iters", str(cfg.distill_iters), "--lr", "6e-4", "--min-lr", "6e-5",
            "--lr-warmup-iters", str(max(1, cfg.distill_iters // 20)),
            "--lr-decay-style", "cosine", "--clip-grad", "1.0",
            "--eval-interval", str(max(1, cfg.distill_iters // 8)), "--eval-iters", "3",
            "--save-interval", str(cfg.distill_iters), "--log-interval", "10",
        ], nproc=cfg.distill_nproc, layout=f"DP={cfg.distill_nproc}")
        self._evaluate("distilled loss", distilled)
        self.write_report()
        return self.results

    # ------------------------------------------------------------------ report
    def summary(self) -> dict[str, float]:
        by_name = {r.name: r.output for r in self.results}
        prune = by_name.get("prune", {})
        return {
            "teacher_loss": by_name.get("teacher loss", {}).get("loss"),
            "pruned_loss": by_name.get("pruned zero-shot loss", {}).get("loss"),
            "distilled_loss": by_name.get("distilled loss", {}).get("loss"),
            "teacher_parameters": prune.get("source_parameters"),
            "student_parameters": prune.get("parameters"),
            "total_seconds": sum(r.seconds for r in self.results),
        }

    def table(self) -> str:
        rows = ["| stage | ranks | wall time (s) | result |", "|---|---|---:|---|"]
        for r in self.results:
            shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r.output.items() if not isinstance(v, dict))
            rows.append(f"| {r.name} | {r.layout} | {r.seconds:.1f} | {shown} |")
        s = self.summary()
        rows.append(f"| **total** | | {s['total_seconds']:.1f} | |")
        return "\n".join(rows)

    def window_start_table(self) -> str:
        """Loss by window start of every evaluated model (empty without ``--window-starts``)."""
        rows = [(name, r.output["window_starts"]) for name, r in (
            ("teacher", self._result("teacher loss")),
            ("pruned (zero-shot)", self._result("pruned zero-shot loss")),
            ("pruned + distilled", self._result("distilled loss")))
            if r is not None and "window_starts" in r.output]
        if not rows:
            return ""
        keys = ("as_sampled", "comma_first", "period_first", "eos_first", "spread", "doc_start")
        lines = ["| model | as sampled | `,` first | `.` first | EOS first | spread | "
                 "document start |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | " + " | ".join(f"{w[k]:.4f}" for k in keys) + " |"
                  for name, w in rows]
        return "\n".join(lines)

    def _result(self, name: str) -> StageResult | None:
        return next((r for r in self.results if r.name == name), None)

    def curve(self) -> list[tuple[int, float]]:
        """Validation loss of the student during distillation (iteration, loss)."""
        path = self.dir / "distilled" / "metrics.jsonl"
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]

    def write_report(self) -> None:
        s = self.summary()
        lines = ["# minitron demo: SmolLM2-135M → half size, on CPU ranks", ""]
        if s["teacher_parameters"]:
            lines += [
                "| model | parameters | held-out loss |", "|---|---:|---:|",
                f"| teacher | {s['teacher_parameters']:,} | {s['teacher_loss']:.4f} |",
                f"| pruned (zero-shot) | {s['student_parameters']:,} | {s['pruned_loss']:.4f} |",
                f"| pruned + distilled | {s['student_parameters']:,} | "
                f"{s['distilled_loss']:.4f} |", "",
            ]
        by_start = self.window_start_table()
        if by_start:
            lines += ["## Loss by window start (positions 1..S−1)", "", by_start, ""]
        lines += ["## Stages", "", self.table(), ""]
        lines += ["## Environment (what else decides the last bits: README, Reproducibility)", "",
                  "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in environment().items()] + [""]
        curve = self.curve()
        if curve:
            lines += ["## Student validation loss during distillation", "",
                      "| iteration | val loss |", "|---:|---:|"]
            lines += [f"| {it} | {loss:.4f} |" for it, loss in curve]
            lines += ["", "![validation loss](val_loss.png)", ""]
            self._plot(curve)
        text = "\n".join(lines)
        (self.dir / "report.md").write_text(text)
        print(text, flush=True)

    def _plot(self, curve: list[tuple[int, float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.summary()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label="student (KD)")
        if s["teacher_loss"] is not None:
            ax.axhline(s["teacher_loss"], color="gray", linestyle="--", label="teacher")
        ax.set_xlabel("distillation iteration")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Pruned SmolLM2 recovering by distillation")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "val_loss.png", dpi=120)
        plt.close(fig)


def environment() -> dict[str, str]:
    """Library builds and CPU kernels of this run. Same inputs and seed give bit-identical
    results only where these match: ATen picks its vector kernels by CPU (AVX512 vs AVX2 changes
    the last bits of every reduction, which 80 training steps amplify to ~0.05 nats)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    out = {"cpu": cpu, "torch cpu kernels": torch.backends.cpu.get_cpu_capability(),
           "python": platform.python_version()}
    for package in ("torch", "megatron-core", "numpy", "tokenizers", "gguf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
