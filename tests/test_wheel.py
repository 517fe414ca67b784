"""The package as users install it: the wheel and the sdist built from this tree hold every module
of the source tree, and the wheel, installed (not editable) into a new virtual environment, runs
real commands from another directory.

The new environment borrows the test environment's third-party packages (torch, megatron-core,
...) through a path file, which adds their folder without running its own path files, so the
editable install of this project stays out of it. ``make test312`` goes further: a fresh Python
3.12 environment where pip resolves every dependency of the wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "minitron_megatron").rglob("*.py")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(ROOT)], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                    f"b.build_sdist({str(out)!r})"], check=True, capture_output=True, cwd=ROOT)
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_wheel_and_sdist_hold_every_module(built):
    modules = _source_modules()
    assert "minitron_megatron/data/loaders.py" in modules  # the folders a plain build dropped
    assert "minitron_megatron/testing/multiprocess.py" in modules
    wheel = set(zipfile.ZipFile(built["wheel"]).namelist())
    assert modules <= wheel, sorted(modules - wheel)
    with tarfile.open(built["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert modules <= names, sorted(modules - names)


def test_installed_wheel_runs_commands_from_another_directory(built, tmp_path, hf_llama_tied,
                                                              tiny_corpus):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(built["wheel"])], check=True, capture_output=True)

    where = tmp_path / "elsewhere"
    where.mkdir()

    def run(*args: str) -> str:
        proc = subprocess.run([str(env_dir / "bin" / "minitron"), *args], cwd=where,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    located = subprocess.run([str(python), "-c", "import minitron_megatron as m; "
                              "print(m.__file__)"], cwd=where, capture_output=True, text=True,
                             check=True).stdout
    assert located.startswith(str(site)), located  # the installed copy, not the source tree
    run("import-hf", "--hf-path", str(hf_llama_tied), "--save", "ckpt")
    run("preprocess", "--input", str(tiny_corpus), "--tokenizer", "ckpt",
        "--output-prefix", "data/corpus")
    out = run("evaluate", "--load", "ckpt", "--data-path", "data/corpus", "--seq-length", "32",
              "--eval-samples", "4")
    assert '"loss"' in out
