"""The one-call Python API: the README's example runs as written (on the tiny checkpoint and
dataset), ``import minitron_megatron`` stays light, and the exported names are the API's."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold one runnable example"
    return blocks[0]


def test_readme_python_example_runs(gpt_ckpt, tiny_dataset, tmp_path, monkeypatch, capsys):
    from minitron_megatron.checkpoint import find_checkpoint

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "teacher").symlink_to(gpt_ckpt, target_is_directory=True)
    (tmp_path / "data").mkdir()
    for ext in (".bin", ".idx"):
        (tmp_path / "data" / f"corpus{ext}").symlink_to(tiny_dataset + ext)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)

    assert (tmp_path / "scores.safetensors").is_file()
    assert (tmp_path / "ckpt" / "student" / "iter_0000000" / "reconstruct.json").is_file()
    targets = namespace["targets"]
    student = find_checkpoint(tmp_path / "ckpt" / "student").model_config
    assert (student.ffn_hidden_size, student.num_attention_heads, student.num_layers) == (
        targets.ffn_hidden_size, targets.num_attention_heads, targets.num_layers)
    distilled = find_checkpoint(tmp_path / "runs" / "kd")
    assert distilled.iteration == 2 and distilled.model_config == student
    result = namespace["result"]
    assert math.isfinite(result.loss) and result.ppl > 1
    assert "after 2 steps" in capsys.readouterr().out


def test_import_is_light_and_names_are_the_api():
    code = ("import sys, minitron_megatron as m; "
            "assert 'torch' not in sys.modules and 'minitron_megatron.api' not in sys.modules; "
            "import minitron_megatron.search.config, minitron_megatron.evaluate, "
            "minitron_megatron.distill.config; "
            "from minitron_megatron import api, estimate_importance, prune, distill, search, "
            "evaluate; "
            "assert all(callable(f) and f is getattr(api, f.__name__) and f.__doc__ "
            "and 'Example::' in f.__doc__ for f in "
            "(estimate_importance, prune, distill, search, evaluate, m.teacher_cache)); "
            "from minitron_megatron.search import SearchConfig; "
            "assert m.search is search and sorted(m.__all__) == sorted(['__version__', "
            "'estimate_importance', 'prune', 'distill', 'search', 'evaluate', "
            "'teacher_cache'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_kd_objective_without_teacher_is_refused_before_any_work(tiny_dataset, tmp_path):
    import pytest

    from minitron_megatron import distill
    from minitron_megatron.data.loaders import DataConfig
    from minitron_megatron.distill.config import KDConfig, TrainConfig
    from minitron_megatron.errors import UserError

    with pytest.raises(UserError, match="needs a teacher"):
        distill(student=tmp_path / "missing", kd=KDConfig(),
                train=TrainConfig(save=tmp_path / "run", train_iters=1, global_batch_size=1),
                data=DataConfig(data_path=tiny_dataset, seq_length=32))
    assert not (tmp_path / "run").exists()
