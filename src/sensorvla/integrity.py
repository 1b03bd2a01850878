"""sha256 records of checkpoint files, written at save and checked at load, so a corrupted copy never loads.

A folder (`pretrained_model/`, `checkpoints/last/`) carries `manifest.json` listing the hash of EVERY file in
it (weights, config, norm stats, adapter config, ...); an empty or partial manifest is refused, and a manifest
of an older sensorvla (weights only) loads with a warning naming `python -m sensorvla.integrity FOLDER`, which
records the folder's files as they are now. A single seed `.pt` file carries a sidecar `<name>.sha256.json`.
Callers turn the problems these functions return into `CheckpointMismatchError`s that name the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

from sensorvla.io import UnsafePathError, atomic_write_json, resolve_inside

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sensorvla-sha256-2"  # lists every file of the folder
LEGACY_FORMAT = "sensorvla-sha256-1"  # sensorvla before issue 19: the weight files only
SIDECAR_SUFFIX = ".sha256.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
logger = logging.getLogger(__name__)


def rewrite_command(folder: str | Path) -> str:
    """The one-line command that records the folder's files as they are now (`python -m sensorvla.integrity`)."""
    return f"python -m sensorvla.integrity {folder}"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (`hashlib.file_digest`: read in chunks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_files(folder: str | Path) -> list[str]:
    """Every regular file below `folder` (relative POSIX paths, sorted), except manifest.json and hidden files."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == MANIFEST_NAME:
            continue
        if path.is_file() or path.is_symlink():
            out.append(rel.as_posix())
    return out


def write_manifest(folder: str | Path, names: list[str] | None = None) -> Path:
    """Record the sha256 of every file of `folder` in `folder/manifest.json` (atomically).

    `names` must be every file (`folder_files`) when given: a manifest that leaves a file out is refused at load.
    """
    folder = Path(folder)
    every = folder_files(folder)
    names = every if names is None else sorted(names)
    if names != every:
        raise ValueError(f"a manifest lists every file of {folder}: {sorted(set(every) - set(names))} left out")
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


def _read_manifest(record: Path) -> tuple[str, dict[str, str]]:
    d = json.loads(record.read_text())
    listed = d["sha256"]
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise TypeError("'sha256' must map file names to hex digests")
    return str(d.get("format", LEGACY_FORMAT)), listed


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems (empty = intact) of `folder` against its manifest.json; [] when there is none.

    Refused: an unreadable or empty manifest, a listed file that is missing, changed or outside the folder, a
    file of the folder the manifest does not list (a partial manifest). A manifest of an older sensorvla
    (weights only) must cover every weight file; its other files load with a warning naming the fix.
    """
    folder = Path(folder)
    record = folder / MANIFEST_NAME
    if not record.exists():
        return []
    fix = (
        f"copy the whole folder again from the machine that saved it (or re-export it); if you changed its files on "
        f"purpose, record them as they are now: `{rewrite_command(folder)}`"
    )
    try:
        fmt, listed = _read_manifest(record)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        return [f"{record} is unreadable ({type(e).__name__}: {e}); {fix}"]
    if not listed:
        return [f"{record} lists no files, so nothing in {folder} would be checked; {fix}"]
    problems = []
    for name, expected in listed.items():
        try:
            path = resolve_inside(folder, name, "a file listed in manifest.json")
        except UnsafePathError as e:
            problems.append(f"{record}: {e}; {fix}")
            continue
        if not path.is_file():
            problems.append(f"{path} is listed in {record} but missing; copy the whole folder again")
            continue
        actual = file_sha256(path)
        if actual != expected:
            problems.append(_mismatch(path, expected, actual, record))
    unlisted = [n for n in folder_files(folder) if n not in listed]
    if fmt == LEGACY_FORMAT:
        weights = [n for n in unlisted if n.endswith(WEIGHT_SUFFIXES)]
        if weights:
            problems.append(f"{record} does not cover the weight files {weights}; {fix}")
        elif unlisted and not problems:
            logger.warning(
                "%s was written by an older sensorvla and covers only %s: %s are NOT integrity-checked (a changed "
                "norm_stats.json or config.json would load). After checking they are the files you saved, record "
                "them: `%s`",
                record,
                sorted(listed),
                unlisted,
                rewrite_command(folder),
            )
    elif unlisted:
        problems.append(f"{[str(folder / n) for n in unlisted]} are not in {record} (a partial manifest); {fix}")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m sensorvla.integrity FOLDER...`: (re)write each folder's manifest.json over all its files."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a.startswith("-") for a in args):
        print("usage: python -m sensorvla.integrity FOLDER [FOLDER ...]  (records every file's sha256)")
        return 2
    for folder in args:
        if not Path(folder).is_dir():
            print(f"{folder} is not a folder", file=sys.stderr)
            return 1
        print(f"wrote {write_manifest(folder)} ({len(folder_files(folder))} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
