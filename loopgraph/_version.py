"""The package version, in a module of its own so that any module can read it without
importing the package's ``__init__`` (which imports the passes: an import circle); and the
installed versions of the packages a result depends on, for manifests and reports."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterable

__version__ = "0.1.0"


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each of ``packages`` (those not installed are left out)."""
    out = {}
    for pkg in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out
