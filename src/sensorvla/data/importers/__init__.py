"""Importers that convert other recording layouts into the native dataset format.

`IMPORTERS` maps a source kind to the module:function that converts it; `get_importer(kind)` resolves one
lazily so importing this package loads neither h5py nor PIL.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

IMPORTERS: dict[str, str] = {
    "recorder": "sensorvla.data.importers.recorder:import_recorder",  # the original system's episode folders
    "hdf5": "sensorvla.data.importers.hdf5:import_hdf5",  # docs/hdf5-format.md
}


def get_importer(kind: str) -> Callable[..., Path]:
    """The importer function for `kind` ("recorder" or "hdf5"): `fn(src, out_dir, **options) -> Path`."""
    if kind not in IMPORTERS:
        raise ValueError(f"unknown importer {kind!r}; choose one of {sorted(IMPORTERS)}")
    module, func = IMPORTERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


__all__ = ["IMPORTERS", "get_importer"]
