"""examples/: every recipe is valid bash, and every minitron command it would run parses with the
CLI as it stands (the recipes run with recording stand-ins for ``python``/``minitron``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minitron_megatron.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.sh"))

RECORDER = """#!{python}
import json, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["-c"]:  # helper one-liners (asset paths) run for real
    sys.exit(subprocess.call([{python!r}, *args]))
if "minitron_megatron" in args:  # python -m [torch.distributed.run ... -m] minitron_megatron
    args = args[args.index("minitron_megatron") + 1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
"""


def test_examples_pass_bash_n_and_shellcheck():
    assert {p.name for p in EXAMPLES} >= {"smollm2_cpu.sh", "llama31_8b_to_4b.sh",
                                          "nemotron4_15b_to_8b.sh"}
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    for script in EXAMPLES:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    proc = subprocess.run([shellcheck, "-x", *map(str, EXAMPLES)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_every_command_of_an_example_parses(script, tmp_path):
    log = tmp_path / "commands.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "minitron"):
        fake = bin_dir / name
        fake.write_text(RECORDER.format(python=sys.executable, log=str(log)))
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "HOME": str(tmp_path), "WORK": str(tmp_path / "work"), "SEARCH": "1"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [c[0] for c in commands]
    assert {"importance", "prune", "distill"} <= set(stages), stages
    assert stages[0] in ("import-hf", "import-megatron"), stages
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"{script.name}: `minitron {' '.join(argv)}` does not parse ({err})")
