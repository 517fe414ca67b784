"""CLI options generated from the config dataclasses, so each option is declared once: its name
(the field's, ``_`` → ``-``, with an optional prefix or an explicit flag), type, default, choices
(a ``Literal`` annotation) and help (the field's docstring: the string literal after the field in
the class body) all come from the config class.

Example::

    KD = ConfigOptions(KDConfig, prefix="kd-", convert={"intermediate_pairs": parse_pairs})
    KD.add(parser.add_argument_group("distillation"))   # --kd-temperature, --kd-ce-weight, ...
    kd = KD.build(parser.parse_args(argv))              # KDConfig(temperature=..., ...)

Mapping: ``int``/``float``/``str``/``Path`` → that type; ``X | None`` → ``X`` (default
``None``); ``bool`` → ``--flag`` (default ``False``) or ``--no-flag`` (default ``True``);
``Literal[...]`` → ``choices``; ``tuple[int, ...]`` / ``tuple[str, ...]`` → a comma-separated
list; anything else → a string turned into the field's value by ``convert``. A field without a
default is a required option.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its docstring, one line (read with ``ast`` from the class's source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _comma_list(item: type, text: str) -> tuple:
    try:
        return tuple(item(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of {item.__name__} values, e.g. "
            f"{'3,4,5' if item is int else 'a,b'}") from None


def _flag_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """The options of one config class on a parser, and the config built back from them."""

    cls: type
    """The config dataclass (keyword-only, a docstring under every field)."""

    prefix: str = ""
    """Prepended to every generated flag name (``"kd-"`` → ``--kd-temperature``)."""

    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field → flag, where the flag is not the prefixed field name (Megatron-LM's name)."""

    only: tuple[str, ...] | None = None
    """Generate options for these fields only (default: all but ``skip``)."""

    skip: tuple[str, ...] = ()
    """Fields the command sets itself (``build``'s keyword arguments)."""

    types: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)
    """Field → argparse ``type`` (parses the text; raises ``ArgumentTypeError``)."""

    convert: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
    """Field → function of the parsed text giving the field's value (may raise ``UserError``)."""

    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field → an older flag still accepted but hidden from ``--help`` (deprecated)."""

    def fields(self) -> list[dataclasses.Field]:
        names = self.only if self.only is not None else [
            f.name for f in dataclasses.fields(self.cls) if f.name not in self.skip]
        by_name = {f.name: f for f in dataclasses.fields(self.cls)}
        return [by_name[n] for n in names]

    def flag(self, name: str) -> str:
        return self.flags.get(name, f"--{self.prefix}{name.replace('_', '-')}")

    def dest(self, name: str) -> str:
        return self.flag(name)[2:].replace("-", "_")

    def add(self, group) -> None:
        """Add one option per field to ``group`` (a parser or an argument group)."""
        hints = typing.get_type_hints(self.cls)
        docs = field_docs(self.cls)
        for f in self.fields():
            self._add(group, f, hints[f.name], docs.get(f.name, ""))

    def _add(self, group, f: dataclasses.Field, annotation: Any, doc: str) -> None:
        if not doc:
            raise TypeError(f"{self.cls.__name__}.{f.name} has no docstring: it is the help of "
                            f"{self.flag(f.name)}")
        flag, dest = self.flag(f.name), self.dest(f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING
                                          else f.default_factory())
        tp = _unwrap_optional(annotation)
        kwargs: dict[str, Any] = {"dest": dest}
        if tp is bool:
            if default:  # on by default: the option turns it off
                flag = self.flags.get(f.name, f"--no-{self.prefix}{f.name.replace('_', '-')}")
                kwargs.update(action="store_false", default=True)
                doc = f"Turn off (on by default): {doc}"
            else:
                kwargs.update(action="store_true", default=False)
        else:
            if f.name in self.types:
                kwargs["type"] = self.types[f.name]
            elif typing.get_origin(tp) is Literal:
                choices = typing.get_args(tp)
                kwargs.update(type=type(choices[0]), choices=choices)
            elif typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) \
                    and typing.get_args(tp)[0] in (int, str):
                kwargs.update(type=functools.partial(_comma_list, typing.get_args(tp)[0]),
                              metavar=("N,..." if typing.get_args(tp)[0] is int else "A,..."))
            elif tp in (int, float, str):
                kwargs["type"] = tp
            elif tp is Path:
                kwargs["type"] = str
            elif f.name not in self.convert:
                raise TypeError(f"{self.cls.__name__}.{f.name}: no option type for {tp!r}; "
                                f"give a `types` or `convert` entry")
            kwargs.update(required=required, default=default)
            if not required and default is not None and default != ():
                doc = f"{doc} (default: {_flag_text(default)})"
        group.add_argument(flag, help=doc.replace("``", "").replace("%", "%%"), **kwargs)
        if f.name in self.aliases:
            group.add_argument(self.aliases[f.name], help=argparse.SUPPRESS,
                               **{k: v for k, v in kwargs.items() if k not in ("required",
                                                                                "default")},
                               default=argparse.SUPPRESS)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The fields' values parsed from ``args`` (``convert`` applied)."""
        out = {}
        for f in self.fields():
            value = getattr(args, self.dest(f.name))
            if f.name in self.convert:
                value = self.convert[f.name](value)
            out[f.name] = value
        return out

    def build(self, args: argparse.Namespace, **fields: Any):
        """The config from the parsed options; ``fields`` set the ones the command decides."""
        return self.cls(**{**self.values(args), **fields})
