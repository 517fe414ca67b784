"""``benchmarks/claims.py --quick``: the claims study's whole path on a tiny slice of the real
teacher and corpus (CI smoke test): every run trained, every table, verdict and plot written,
every number finite."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"\*\*C\d[^*]*: (held|did not hold|inconclusive \(within the margin\))")


def test_claims_quick(smollm2_ckpt, wiki_dataset, tmp_path):
    from benchmarks.claims import RUNS, SCRATCH
    from benchmarks.claims_report import PLOTS, mean_loss

    out = tmp_path / "claims"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.claims", "--quick", "--teacher", str(smollm2_ckpt),
         "--data-path", wiki_dataset, "--output-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(r.name for r in RUNS)  # shared runs trained once
    n = results["config"]["eval_samples"]
    for name, run in results["runs"].items():
        assert len(run["held_out"]) == n, name
        losses = [mean_loss(run["held_out"])] + [h[k] for h in run["history"]
                                                 for k in ("val_loss", "ce_loss") if k in h]
        assert all(math.isfinite(x) and x > 0 for x in losses), (name, losses)
    zero = {k: mean_loss(v) for k, v in results["zero_shot"].items()}
    # a random init predicts nearly uniformly over the 49152 tokens; the teacher far better
    assert abs(zero[SCRATCH] - math.log(49152)) < 0.5, zero
    assert zero["teacher"] < min(v for k, v in zero.items() if k != "teacher"), zero

    report = (out / "claims.md").read_text()
    assert report.strip() in proc.stdout  # the tables are printed too
    assert "(runs missing)" not in report
    for token in re.findall(r"\b(?:nan|inf)\b", report, flags=re.IGNORECASE):
        pytest.fail(f"non-finite number {token!r} in the report")
    assert len(VERDICT.findall(report)) >= 4, report  # one verdict line per claim at least
    tables = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(tables) >= 4 + len(RUNS)
    # the shared width (l2,mean) + forward-KL run shows one number in C1, C3, C5 and C7
    shared = f"{mean_loss(results['runs']['width-kd']['held_out']):.3f}"
    for claim in ("C1", "C3", "C5", "C7"):
        section = report.split(f"## {claim}")[1].split("\n## ")[0]
        assert shared in section, claim
    for png in PLOTS.values():
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"]({png})" in report
