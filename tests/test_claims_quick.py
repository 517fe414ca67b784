"""``benchmarks/claims.py --quick`` and ``benchmarks/claims_c1.py --quick``: the claims studies'
whole path on a tiny slice of the real teacher and corpus (CI smoke test): every run trained with
every seed it needs, every loss on both window kinds, every table, verdict and plot written,
every number finite."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TWO_STUDIES = pytest.mark.timeout(900)  # the claims study and the C1 study, one after the other

ROOT = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"\*\*C\d[^*]*: (held|did not hold|inconclusive \([^)]*\))\*\*")


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def check_report(report: str, stdout: str) -> None:
    assert report.strip() in stdout  # the tables are printed too
    assert "missing)" not in report
    for token in re.findall(r"\b(?:nan|inf)\b", report, flags=re.IGNORECASE):
        pytest.fail(f"non-finite number {token!r} in the report")
    assert "as sampled" in report and "document start" in report


@TWO_STUDIES
def test_claims_quick(smollm2_ckpt, wiki_dataset, tmp_path):
    from benchmarks.claims import RUNS, SCRATCH, WINDOW_KINDS
    from benchmarks.claims_report import PLOTS, mean_loss

    out = tmp_path / "claims"
    proc = run_module("benchmarks.claims", "--quick", "--teacher", str(smollm2_ckpt),
                      "--data-path", wiki_dataset, "--output-dir", str(out))

    results = json.loads((out / "results.json").read_text())
    seeds = results["config"]["seeds"]
    assert len(seeds) >= 3
    expected = {f"{r.name}@{s}" for r in RUNS for s in seeds if r.seeded or s == seeds[0]}
    assert sorted(results["runs"]) == sorted(expected)  # shared runs trained once per seed
    sizes = {"as_sampled": results["config"]["eval_samples"],
             "doc_start": results["config"]["doc_start_samples"]}
    for name, run in results["runs"].items():
        assert set(run["held_out"]) == set(WINDOW_KINDS), name
        losses = [h["ce_loss"] for h in run["history"] if "ce_loss" in h]
        for kind in WINDOW_KINDS:
            assert len(run["held_out"][kind]) == sizes[kind], name
            losses += [mean_loss(run["held_out"][kind])] + [p[kind] for p in run["curve"]]
        assert all(math.isfinite(x) and x > 0 for x in losses), (name, losses)
    # the seeds change the training data: the same run ends elsewhere with each seed
    finals = {mean_loss(results["runs"][f"width-ce@{s}"]["held_out"]["as_sampled"])
              for s in seeds}
    assert len(finals) == len(seeds), finals
    for kind in WINDOW_KINDS:
        zero = {k: mean_loss(v[kind]) for k, v in results["zero_shot"].items()}
        # a random init predicts nearly uniformly over the 49152 tokens; the teacher far better
        assert abs(zero[SCRATCH] - math.log(49152)) < 0.5, zero
        assert zero["teacher"] < min(v for k, v in zero.items() if k != "teacher"), zero

    report = (out / "claims.md").read_text()
    check_report(report, proc.stdout)
    assert len(VERDICT.findall(report)) >= 5, report  # C1, C2, C3, C5, C7
    for claim in ("C1", "C3"):  # a paired difference per seed
        section = report.split(f"## {claim}")[1].split("\n## ")[0]
        assert all(f"\n| {s} | " in section for s in seeds), claim
    # C1 and C3 show the width KD run's mean over seeds; C7 its first seed's loss
    kd = [mean_loss(results["runs"][f"width-kd@{s}"]["held_out"]["doc_start"]) for s in seeds]
    for claim, number in (("C1", statistics.mean(kd)), ("C3", statistics.mean(kd)),
                          ("C7", kd[0])):
        section = report.split(f"## {claim}")[1].split("\n## ")[0]
        assert f"{number:.3f}" in section, claim
    for png in PLOTS.values():
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"]({png})" in report

    # the data-scarce C1 study on the same students: every seed, KD and CE, curves per kind
    proc = run_module("benchmarks.claims_c1", "--quick", "--study-dir", str(out))
    c1 = json.loads((out / "c1_scarce.json").read_text())
    assert sorted(c1["runs"]) == sorted(f"{o}@{s}" for o in ("width-kd", "width-ce")
                                        for s in seeds)
    steps = c1["config"]["c1"]["epochs"] * c1["config"]["c1"]["train_samples"] // 2
    for name, run in c1["runs"].items():
        assert run["curve"][-1]["iteration"] == steps, name
        assert len([h for h in run["history"] if "ce_loss" in h]) == steps, name
        for kind in WINDOW_KINDS:
            assert math.isfinite(mean_loss(run["held_out"][kind])), name
    report = (out / "c1_scarce.md").read_text()
    check_report(report, proc.stdout)
    assert len(VERDICT.findall(report)) == 1, report
    assert all(f"\n| {s} | " in report for s in seeds)
    assert (out / "c1_scarce.png").read_bytes()[:4] == b"\x89PNG"


def test_fixed_epochs_same_set_every_seed():
    """The data-scarce study's training set: the same ``size`` samples for every seed, every
    epoch a permutation of them, the orders different across seeds and epochs."""
    from benchmarks.claims_c1 import FixedEpochs

    base = list(range(100))
    a, b = FixedEpochs(base, 8, 3, seed=1), FixedEpochs(base, 8, 3, seed=2)
    assert len(a) == 24
    for run in (a, b):
        epochs = [[run[i] for i in range(e * 8, (e + 1) * 8)] for e in range(3)]
        assert all(sorted(e) == list(range(8)) for e in epochs)
        assert epochs[0] != epochs[1]
    assert [a[i] for i in range(24)] != [b[i] for i in range(24)]
    with pytest.raises(ValueError, match="fewer"):
        FixedEpochs(base[:4], 8, 1, seed=1)
