"""minitron_megatron: Minitron pruning and distillation for Megatron-Core GPT models.

Pipeline: ``import-hf`` → ``importance`` → ``prune`` → (``search``) → ``distill`` → ``export-hf``.
Every stage is a library function and a thin CLI subcommand; see the README.

The one-call Python API (``minitron_megatron.api``), imported on first use so that
``import minitron_megatron`` stays light::

    from minitron_megatron import estimate_importance, prune, distill, search, evaluate
    from minitron_megatron import teacher_cache   # the teacher's top-k, once, for distill/search
"""

import sys
import types

__version__ = "0.1.0"

_API = ("estimate_importance", "prune", "distill", "search", "evaluate", "teacher_cache")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from minitron_megatron import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """``search``, ``distill`` and ``evaluate`` are both API functions and submodules. Importing
    a submodule makes it an attribute of its package, which would hide the function; here the
    attribute is not set, so ``minitron_megatron.search`` stays the function while
    ``import minitron_megatron.search.config`` and ``from minitron_megatron.search import ...``
    work as usual (through ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
