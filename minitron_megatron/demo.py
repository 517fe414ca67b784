"""``minitron demo``: the end-to-end run on the real SmolLM2-135M teacher and Wikipedia text.

Each stage is the real CLI launched the way a user launches it (``python -m minitron_megatron`` for
single-process stages, ``torchrun`` for parallel ones), timed, and summarised in a table and a
markdown report in the output directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minitron_megatron.data import assets


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """What the demo runs; ``quick`` shrinks every budget for CI."""

    output_dir: Path
    """Everything the demo writes goes here (checkpoints, data, report)."""

    quick: bool = False
    """A tiny slice of the same path (CI smoke test)."""

    seq_length: int = 256
    """Tokens per sample."""

    eval_samples: int = 64
    """Validation samples every loss is measured on."""

    nproc: int = 3
    """Ranks of the parallel stages (TP=3: SmolLM2's 3 query groups)."""

    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs the stages."""

    def __post_init__(self) -> None:
        if self.quick:
            object.__setattr__(self, "seq_length", 64)
            object.__setattr__(self, "eval_samples", 6)
        if self.eval_samples <= 0 or self.seq_length <= 0:
            raise ValueError("eval samples and seq length must be positive.")


@dataclass
class StageResult:
    name: str
    seconds: float
    output: dict = field(default_factory=dict)


class Demo:
    """Runs the stages in order, recording wall time and each stage's JSON output."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.results: list[StageResult] = []
        self.dir = Path(cfg.output_dir)

    def _run(self, name: str, args: list[str], nproc: int = 1) -> dict:
        if nproc > 1:
            cmd = [self.cfg.python, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "minitron_megatron", *args]
        else:
            cmd = [self.cfg.python, "-m", "minitron_megatron", *args]
        print(f"[demo] {name}: {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise RuntimeError(f"demo stage {name!r} failed (exit {proc.returncode})")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        output = json.loads(lines[-1]) if lines else {}
        self.results.append(StageResult(name, seconds, output))
        return output

    def run(self) -> list[StageResult]:
        cfg, d = self.cfg, self.dir
        gguf, corpus = assets.smollm2_gguf(), assets.wikipedia_corpus()
        d.mkdir(parents=True, exist_ok=True)
        teacher = d / "teacher"
        self._run("import", ["import-hf", "--hf-path", str(gguf), "--save", str(teacher)])
        self._run("preprocess", ["preprocess", "--input", str(corpus), "--tokenizer",
                                 str(teacher), "--output-prefix", str(d / "data" / "wiki")])
        self._run("evaluate teacher (TP=3)", [
            "evaluate", "--load", str(teacher), "--data-path", str(d / "data" / "wiki"),
            "--seq-length", str(cfg.seq_length), "--eval-samples", str(cfg.eval_samples),
            "--micro-batch-size", "2", "--tensor-model-parallel-size", str(cfg.nproc),
        ], nproc=cfg.nproc)
        self.write_report()
        return self.results

    def table(self) -> str:
        rows = ["| stage | wall time (s) | result |", "|---|---:|---|"]
        for r in self.results:
            shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r.output.items())
            rows.append(f"| {r.name} | {r.seconds:.1f} | {shown} |")
        return "\n".join(rows)

    def write_report(self) -> None:
        text = f"# minitron demo\n\n{self.table()}\n"
        (self.dir / "report.md").write_text(text)
        print(text, flush=True)
