"""CLI options generated from the config dataclasses: every option of every subcommand has help,
no default or choice is declared twice, and the generator maps field types to options."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import minitron_megatron
from minitron_megatron.cli import build_parser, common, distill, evaluate, importance, prune
from minitron_megatron.cli import search as search_cli
from minitron_megatron.cli import teacher_cache as teacher_cache_cli
from minitron_megatron.cli.options import ConfigOptions, field_docs

PACKAGE = Path(minitron_megatron.__file__).resolve().parent  # the source tree or site-packages
DEPRECATED = {"--kd-alpha", "--dtype", "--override-opt_param-scheduler",
              "--use-checkpoint-opt_param-scheduler"}
"""Old spellings still accepted, hidden from --help."""


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    commands = subparsers()
    assert {"import-hf", "import-megatron", "export-hf", "preprocess", "importance", "prune",
            "search", "distill", "finetune", "evaluate", "demo"} <= set(commands)
    hidden = set()
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings:
                continue
            if action.help == argparse.SUPPRESS:
                hidden.update(action.option_strings)
                continue
            assert action.help and action.help.strip(), (name, action.option_strings)
    assert hidden == DEPRECATED


CONFIG_OPTIONS = [common.PARALLEL, common.DATA, common.KD, common.SCHEDULE, distill.TRAIN,
                  search_cli.SEARCH, prune.TARGETS, importance.IMPORTANCE,
                  importance.CALIBRATION, evaluate.EVAL, prune.RECONSTRUCT,
                  teacher_cache_cli.CACHE]


@pytest.mark.parametrize("options", CONFIG_OPTIONS, ids=lambda o: o.cls.__name__)
def test_defaults_and_choices_are_the_dataclass_fields(options):
    """Each generated option's default and choices are read off the config class itself."""
    commands = subparsers()
    hints = typing.get_type_hints(options.cls)
    for f in options.fields():
        flag = options.flag(f.name)
        found = [a for p in commands.values() for a in p._actions if options.dest(f.name) ==
                 a.dest and a.help != argparse.SUPPRESS]
        assert found, flag
        for action in found:
            if f.default is dataclasses.MISSING:
                assert action.required, flag
            elif f.name not in options.convert:
                assert action.default == f.default, (flag, action.default, f.default)
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                assert tuple(action.choices) == typing.get_args(tp), flag
            else:
                assert action.choices is None, flag


def _literal_tuples(tree: ast.AST) -> tuple[set, set]:
    """(choice tuples declared in ``Literal[...]``, every other tuple/list of strings)."""
    declared, others = set(), set()
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal":
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            declared.add(frozenset(e.value for e in elts))
            skip.add(id(node.slice))
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List) and id(node) not in skip and len(node.elts) > 1 \
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                        for e in node.elts):
            others.add(frozenset(e.value for e in node.elts))
    return declared, others


def test_no_choice_or_seed_literal_is_declared_twice():
    declared, others, seeds = set(), set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        d, o = _literal_tuples(tree)
        declared |= d
        others |= o
        seeds += [path.name for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value == 1234]
    assert {frozenset({"bi", "loss", "block"}), frozenset({"l2", "mean", "var"}),
            frozenset({"cosine", "linear", "constant"})} <= declared
    assert not declared & others, declared & others
    assert seeds == ["config.py"], seeds


def test_cli_modules_declare_no_config_flag_by_hand():
    """The option names of config fields appear in cli/ only through the generator (--save and
    --load are also the plain paths of commands without such a config)."""
    for options in CONFIG_OPTIONS:
        for f in options.fields():
            flag = options.flag(f.name)
            if flag in ("--save", "--load"):
                continue
            for path in (PACKAGE / "cli").glob("*.py"):
                assert f'add_argument("{flag}"' not in path.read_text(), (flag, path.name)


@dataclass(kw_only=True, frozen=True)
class Toy:
    """A config exercising every mapping."""

    count: int
    """How many (required)."""

    rate: float = 0.5
    """A rate in 100 % units."""

    name: str | None = None
    """An optional name."""

    where: Path = Path("out")
    """A directory."""

    mode: Literal["fast", "slow"] = "slow"
    """Speed."""

    verbose: bool = False
    """Say more."""

    checks: bool = True
    """Check things."""

    layers: tuple[int, ...] | None = None
    """Layer indices."""

    words: tuple[str, ...] = ("a",)
    """Some words."""

    pairs: tuple[tuple[int, int], ...] = ()
    """Pairs."""


def _toy_parser(**kwargs) -> tuple[argparse.ArgumentParser, ConfigOptions]:
    options = ConfigOptions(Toy, convert={"pairs": lambda text: tuple(
        tuple(int(x) for x in p.split(":")) for p in (text or "").split(",") if p)}, **kwargs)
    parser = argparse.ArgumentParser()
    options.add(parser)
    return parser, options


def test_field_docs_are_read_from_the_class_body():
    docs = field_docs(Toy)
    assert docs["count"] == "How many (required)."
    assert docs["checks"] == "Check things."
    assert set(docs) == {f.name for f in dataclasses.fields(Toy)}


def test_generator_maps_types_literals_bools_and_tuples():
    parser, options = _toy_parser()
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    assert by_flag["--count"].required and by_flag["--count"].type is int
    assert by_flag["--rate"].type is float and by_flag["--rate"].default == 0.5
    assert "100 %" in by_flag["--rate"].help % {}  # '%' survives argparse's formatting
    assert by_flag["--mode"].choices == ("fast", "slow")
    assert "--verbose" in by_flag and "--no-checks" in by_flag and "--checks" not in by_flag
    assert by_flag["--verbose"].help == "Say more."

    toy = options.build(parser.parse_args(["--count", "3"]))
    assert toy == Toy(count=3)
    toy = options.build(parser.parse_args(
        ["--count", "2", "--rate", "0.25", "--name", "n", "--where", "w", "--mode", "fast",
         "--verbose", "--no-checks", "--layers", "4,5", "--words", "x,y", "--pairs", "1:2,3:4"]))
    assert toy == Toy(count=2, rate=0.25, name="n", where="w", mode="fast", verbose=True,
                      checks=False, layers=(4, 5), words=("x", "y"), pairs=((1, 2), (3, 4)))
    for bad in (["--mode", "medium"], ["--layers", "4,x"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(["--count", "1", *bad] if bad else bad)


def test_prefix_flags_aliases_and_fixed_fields():
    parser, options = _toy_parser(prefix="toy-", flags={"count": "--num"},
                                  aliases={"rate": "--old-rate"}, skip=("where",))
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--num", "--toy-rate", "--no-toy-checks", "--old-rate"} <= flags
    assert "--toy-where" not in flags
    args = parser.parse_args(["--num", "1", "--old-rate", "0.1"])
    assert options.build(args, where=Path("fixed")) == Toy(count=1, rate=0.1,
                                                            where=Path("fixed"))


def test_a_field_without_docstring_is_refused():
    @dataclass
    class Bare:
        size: int = 1

    with pytest.raises(TypeError, match="no docstring"):
        ConfigOptions(Bare).add(argparse.ArgumentParser())


def test_deprecated_spellings_set_the_same_field():
    parser = build_parser()
    run = ["--save", "r", "--train-iters", "2", "--global-batch-size", "2", "--data-path", "d",
           "--seq-length", "8"]
    args = parser.parse_args(["distill", "--teacher", "t", "--student", "s", *run,
                              "--kd-alpha", "0.25", "--use-checkpoint-opt_param-scheduler"])
    assert common.KD.build(args).ce_weight == 0.25
    assert common.train_config(args, distill.TRAIN).use_checkpoint_opt_param_scheduler
    assert parser.parse_args(["export-hf", "--load", "a", "--save", "b", "--dtype",
                              "bf16"]).params_dtype == "bf16"
    assert parser.parse_args(["export-hf", "--load", "a", "--save", "b"]).params_dtype == "fp32"
