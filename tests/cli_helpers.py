"""Shared assertions of the CLI tests."""

from __future__ import annotations

import pytest

from minitron_megatron.cli import main


def fail_one_line(argv: list[str], capsys) -> str:
    """Run ``minitron ARGV``, expect a user error: exit 2 and one ``minitron CMD: error:`` line
    on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minitron {argv[0]}: error: "), err
    return err[0]
