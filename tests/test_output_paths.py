"""Output paths as a user gives them: a path under a regular file is refused before any work,
``export-hf`` never mixes its files with a directory's old contents (``--overwrite`` replaces it
whole, atomically), and a failed export leaves the old directory as it was."""

from __future__ import annotations

import pytest

from minitron_megatron.cli import main
from minitron_megatron.model import convert
from tests.cli_helpers import fail_one_line


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the output path was checked")


def _commands(ckpt, data, out):
    train = ["--data-path", data, "--seq-length", "32", "--train-iters", "2",
             "--global-batch-size", "2", "--save", str(out)]
    return {
        "import-hf": (["import-hf", "--hf-path", "{hf}", "--save", str(out)],
                      "minitron_megatron.cli.convert.run_distributed"),
        "export-hf": (["export-hf", "--load", str(ckpt), "--save", str(out)],
                      "minitron_megatron.cli.convert.run_distributed"),
        "distill": (["distill", "--teacher", str(ckpt), "--student", str(ckpt), *train],
                    "minitron_megatron.api.run_distributed"),
        "finetune": (["finetune", "--model", str(ckpt), *train],
                     "minitron_megatron.api.run_distributed"),
        "evaluate": (["evaluate", "--load", str(ckpt), "--data-path", data, "--seq-length", "32",
                      "--eval-samples", "2", "--output-json", str(out / "r.json")],
                     "minitron_megatron.api.run_distributed"),
    }


@pytest.mark.parametrize("command", ["import-hf", "export-hf", "distill", "finetune", "evaluate"])
def test_output_under_a_regular_file(command, llama_ckpt_untied, hf_llama_untied, tiny_dataset,
                                     tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    argv, edge = _commands(llama_ckpt_untied, tiny_dataset, blocker / "out")[command]
    monkeypatch.setattr(edge, _no_work)
    err = fail_one_line([a.format(hf=hf_llama_untied) for a in argv], capsys)
    assert f"{blocker} is a file, not a directory" in err, err
    assert blocker.read_text() == "not a directory"


def test_export_refuses_a_non_empty_directory_and_overwrite_replaces_it(
        llama_ckpt_untied, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "foreign.txt").write_text("someone else's")
    monkeypatch.setattr("minitron_megatron.cli.convert.run_distributed", _no_work)
    err = fail_one_line(["export-hf", "--load", str(llama_ckpt_untied), "--save", str(out)], capsys)
    assert "already holds files (config.json, foreign.txt); pass --overwrite" in err
    assert (out / "config.json").read_text() == "{}"
    monkeypatch.undo()

    main(["export-hf", "--load", str(llama_ckpt_untied), "--save", str(tmp_path / "fresh")])
    main(["export-hf", "--load", str(llama_ckpt_untied), "--save", str(out), "--overwrite"])
    fresh = sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert sorted(p.name for p in out.iterdir()) == fresh and "foreign.txt" not in fresh
    for name in fresh:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "hf"]  # no staging left


def test_failed_overwrite_keeps_the_old_directory(llama_ckpt_untied, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")

    def crash(directory, *args, **kwargs):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_hf_directory", crash)
    with pytest.raises(OSError, match="disk full"):
        main(["export-hf", "--load", str(llama_ckpt_untied), "--save", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
