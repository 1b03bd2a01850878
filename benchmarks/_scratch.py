"""Scratch folders for benchmarks: made under the system temp dir and removed when the process exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_dir(prefix: str) -> str:
    """A fresh temp folder (`prefix` + random) that is deleted at exit, so repeated runs don't fill /tmp."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path
