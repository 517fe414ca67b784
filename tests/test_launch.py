"""launch/: torchrun (single/multi-node) and SLURM scripts, checked, dry-run and really run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minitron_megatron.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").rglob("*.sh")) + sorted((ROOT / "launch").rglob("*.sbatch"))
SBATCH_ENV = {"TEACHER": "ckpt/teacher", "STUDENT": "ckpt/student", "DATA": "data/wiki",
              "SCORES": "scores.safetensors", "OUT": "out", "TARGET_FFN": "4096",
              "TARGET_PARAMS": "4B"}


def _bash(script, env, *args):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_scripts_pass_bash_n_and_shellcheck():
    assert len(SCRIPTS) >= 7
    for script in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    proc = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("nodelist,master", [("node[07-08,11]", "node07"), ("gpu-a,gpu-b", "gpu-a"),
                                             ("dgx01", "dgx01"), ("h[3,5]", "h3")])
@pytest.mark.parametrize("stage", ["importance", "prune", "distill", "search"])
def test_sbatch_dry_run_maps_slurm_to_torch(stage, nodelist, master):
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
             "SLURM_JOB_NODELIST": nodelist, "DRY_RUN": "1", "REPO": str(ROOT)}
    proc = _bash(ROOT / "launch" / "slurm" / f"{stage}.sbatch", {**SBATCH_ENV, **slurm})
    assert proc.returncode == 0, proc.stderr
    srun_line, task_line = proc.stdout.strip().splitlines()
    assert srun_line.startswith("srun ") and f"task.sh {stage}" in srun_line
    assert task_line.startswith(f"RANK=5 WORLD_SIZE=16 LOCAL_RANK=5 MASTER_ADDR={master} ")
    assert f"-m minitron_megatron {stage} " in task_line


def test_container_flags_for_pyxis():
    env = {**SBATCH_ENV, "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "n1", "DRY_RUN": "1", "REPO": str(ROOT),
           "CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3", "CONTAINER_MOUNTS": "/data:/data"}
    line = _bash(ROOT / "launch/slurm/distill.sbatch", env).stdout.splitlines()[0]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in line
    assert "--container-mounts=/data:/data" in line


@pytest.mark.parametrize("script,env,variable", [
    ("launch/slurm/importance.sbatch", {"DATA": "d", "SCORES": "s"}, "TEACHER"),
    ("launch/slurm/task.sh", {"SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ("launch/torchrun.sh", {"NNODES": "2"}, "MASTER_ADDR"),
])
def test_missing_environment_is_named(script, env, variable):
    proc = _bash(ROOT / script, {"REPO": str(ROOT), **env}, "evaluate")
    assert proc.returncode != 0
    assert variable in proc.stderr


def test_torchrun_multi_node_dry_run():
    env = {"NNODES": "4", "NODE_RANK": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "head",
           "MASTER_PORT": "6001", "DRY_RUN": "1"}
    line = _bash(ROOT / "launch/torchrun.sh", env, "evaluate", "--load", "x").stdout
    for flag in ("--nnodes=4", "--node-rank=2", "--nproc-per-node=8", "--master-addr=head",
                 "--master-port=6001", "-m minitron_megatron evaluate --load x"):
        assert flag in line


@pytest.mark.multiprocess
def test_torchrun_script_runs_a_two_rank_job(llama_ckpt_untied, tiny_dataset, tmp_path):
    """TP=2 on two CPU processes through launch/torchrun.sh gives the single-process loss."""
    args = ["evaluate", "--load", str(llama_ckpt_untied), "--data-path", tiny_dataset,
            "--seq-length", "32", "--eval-samples", "8", "--micro-batch-size", "2"]
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    two = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), *args,
                          "--tensor-model-parallel-size", "2",
                          "--output-json", str(tmp_path / "tp2.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "minitron_megatron", *args], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    tp1 = json.loads(one.stdout.strip().splitlines()[-1])
    assert tp2["tokens"] == tp1["tokens"] == 8 * 32
    assert abs(tp2["loss"] - tp1["loss"]) <= 1e-5
