"""sha256 records of weight files, written at save and checked at load, so a corrupted copy never loads.

A folder (`pretrained_model/`, `checkpoints/last/`) carries `manifest.json` listing its weight files'
hashes. A single seed `.pt` file carries a sidecar `<name>.sha256.json`. Callers turn the problems these
functions return into `CheckpointMismatchError`s that name the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sensorvla.io import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sensorvla-sha256-1"
SIDECAR_SUFFIX = ".sha256.json"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, names: list[str]) -> Path:
    """Record the sha256 of `folder/<name>` for each name in `folder/manifest.json` (atomically)."""
    folder = Path(folder)
    return atomic_write_json(
        folder / MANIFEST_NAME,
        {"format": MANIFEST_FORMAT, "sha256": {n: file_sha256(folder / n) for n in names}},
    )


def _mismatch(path: Path, expected: str, actual: str, record: Path) -> str:
    return (
        f"{path}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded in {record} when it was "
        "saved: the file was changed or corrupted after saving. Copy it again from the machine that trained "
        f"it (or re-export it); if you replaced it on purpose, delete {record} to skip the check."
    )


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems (empty = intact) of the files listed in `folder/manifest.json`; [] when there is none."""
    folder = Path(folder)
    record = folder / MANIFEST_NAME
    if not record.exists():
        return []
    try:
        listed = json.loads(record.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{record} is unreadable ({e}); re-export the folder or delete {record} to skip the check"]
    problems = []
    for name, expected in listed.items():
        path = folder / name
        if not path.exists():
            problems.append(f"{path} is listed in {record} but missing; copy the whole folder again")
            continue
        actual = file_sha256(path)
        if actual != expected:
            problems.append(_mismatch(path, expected, actual, record))
    return problems


def has_manifest(folder: str | Path) -> bool:
    """True when `folder` has a manifest.json."""
    return (Path(folder) / MANIFEST_NAME).exists()


def sidecar(path: str | Path) -> Path:
    """The `<name>.sha256.json` sidecar path of a file."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, sha256: str, previous: str | None = None) -> Path:
    """Record `sha256` for `path`. `previous` stays accepted too while the file itself is being replaced,
    so a kill between the two renames never leaves a file that fails its own check."""
    accepted = [sha256] + ([previous] if previous and previous != sha256 else [])
    return atomic_write_json(sidecar(path), {"format": MANIFEST_FORMAT, "file": Path(path).name, "sha256": accepted})


def recorded_sha256(path: str | Path) -> list[str]:
    """The hashes the sidecar of `path` accepts ([] when there is no readable sidecar)."""
    rec = sidecar(path)
    if not rec.exists():
        return []
    try:
        value = json.loads(rec.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return []
    return [value] if isinstance(value, str) else list(value)


def verify_sidecar(path: str | Path) -> list[str]:
    """Problems (empty = intact) of a single file against its sidecar; [] when there is none."""
    path = Path(path)
    accepted = recorded_sha256(path)
    if not accepted:
        return []
    actual = file_sha256(path)
    return [] if actual in accepted else [_mismatch(path, accepted[0], actual, sidecar(path))]
