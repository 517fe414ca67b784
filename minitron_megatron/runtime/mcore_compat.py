"""The megatron-core releases this project supports, and the one place their differences live.

``SUPPORTED_MCORE`` is the range ``setup.py`` declares and CI tests (0.16.1 on Python 3.11, the
newest 0.19.x on Python 3.12; megatron-core ≥ 0.17 requires Python ≥ 3.12). Where a release
changed something this project calls, the difference is handled here, named after what changed,
and covered by ``tests/test_mcore_compat.py`` on both releases.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

SUPPORTED_MCORE = ">=0.16.1,<0.20"
"""pip specifier of the megatron-core releases this package runs on (tested: 0.16.1, 0.19.x)."""


def mcore_version() -> Version:
    """The installed megatron-core release."""
    return Version(metadata.version("megatron-core"))
