"""``minitron preprocess`` on bad input as a user runs it: skipped records are counted and named,
nothing kept is an error, invalid JSON / non-UTF-8 input names the file and line, and a failed
run leaves no temporary file behind."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from minitron_megatron.cli import main


def _preprocess(source, tokenizer, prefix):
    return main(["preprocess", "--input", str(source), "--tokenizer", str(tokenizer.path),
                 "--output-prefix", str(prefix)])


def _fail(source, tokenizer, prefix, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _preprocess(source, tokenizer, prefix)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron preprocess: error: "), err
    return err[0]


def test_skipped_records_are_counted_and_explained(tiny_tokenizer, tmp_path, capsys, caplog):
    source = tmp_path / "mixed.jsonl"
    source.write_text('{"text": "ka lo mi"}\n{"body": "su ta"}\n{"text": 123}\n')
    with caplog.at_level(logging.WARNING):
        _preprocess(source, tiny_tokenizer, tmp_path / "out")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["documents"] == 1
    assert result["skipped"] == {"no text key": 1, "text not a string": 1}
    warning = [r.getMessage() for r in caplog.records  # not torch's first-import notices
               if r.levelno == logging.WARNING and r.name.startswith("minitron_megatron")]
    assert len(warning) == 1
    assert "skipped 2 of 3 records" in warning[0]
    assert "1 without any of the keys ['text', 'extract', 'content'] (first at line 2)" \
        in warning[0]
    assert "1 whose text is not a string (first at line 3)" in warning[0]


def test_nothing_kept_is_an_error(tiny_tokenizer, tmp_path, capsys):
    source = tmp_path / "none.jsonl"
    source.write_text('{"body": "su ta"}\n{"text": 123}\n')
    err = _fail(source, tiny_tokenizer, tmp_path / "out", capsys)
    assert "holds no documents: 2 records skipped" in err and "--json-keys" in err
    assert not list(tmp_path.glob("out*"))


def _open_files_under(directory):
    """Paths under ``directory`` that this process still holds open (Linux: /proc/self/fd)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, already closed
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


def test_invalid_json_names_file_and_line_and_leaves_nothing(tiny_tokenizer, tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "ka lo mi ne"})] * 1500 + ['{"text": "su ta']
    source.write_text("\n".join(lines) + "\n")  # fails after a first batch was written
    err = _fail(source, tiny_tokenizer, tmp_path / "out", capsys)
    assert f"{source} line 1501 is not valid JSON" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    if Path("/proc/self/fd").is_dir():  # the removed temporary .bin is not held open either
        assert _open_files_under(tmp_path) == []
    (tmp_path / "bad.json").write_text('{"a": "x",\n "b": }')
    err = _fail(tmp_path / "bad.json", tiny_tokenizer, tmp_path / "out", capsys)
    assert f"{tmp_path / 'bad.json'} is not valid JSON" in err and "line 2" in err


def test_binary_input_names_the_file(tiny_tokenizer, tmp_path, capsys):
    source = tmp_path / "blob.jsonl"
    source.write_bytes(b'{"text": "ok"}\n' + bytes(range(128, 256)) + b"\n")
    err = _fail(source, tiny_tokenizer, tmp_path / "out", capsys)
    assert f"{source} line 2 is not UTF-8 text" in err
    (tmp_path / "blob.txt").write_bytes(b"fine\n\x89PNG\r\n")
    assert "line 2 is not UTF-8" in _fail(tmp_path / "blob.txt", tiny_tokenizer,
                                          tmp_path / "out", capsys)
    assert not list(tmp_path.glob("out*"))


def test_output_prefix_under_a_file(tiny_tokenizer, tiny_corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = _fail(tiny_corpus, tiny_tokenizer, tmp_path / "afile" / "sub" / "out", capsys)
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err
    assert "--output-prefix" in err
