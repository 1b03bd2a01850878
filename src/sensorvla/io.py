"""Atomic, pickle-free file I/O: JSON, safetensors, torch tensors-only files and whole directories.

A crash at any point leaves either the old file/folder or the new one, never a torn one. What is written
gets the mode the umask gives (0644 / 0755 under umask 022), although its temporary copy is private (0600 /
0700) while it is built. Names of things we write are identifiers (`check_name`) and every path read or
written below a root is resolved inside it (`resolve_inside`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"  # one path component: never "", ".", ".." or a separator
NAME_RULE = "1-128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'"
LEGACY_TMP_AGE_S = 24 * 3600  # temp folders named before the owner pid was recorded count as stale after this


class UnsafePathError(ValueError):
    """A name that is not an identifier, or a path that would leave its root (`..`, absolute, a symlink out)."""


def check_name(name: str, what: str = "name") -> str:
    """`name` when it is an identifier (`NAME_PATTERN`: one path component); UnsafePathError saying what is allowed."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise UnsafePathError(f"{what} {name!r} is not allowed: use {NAME_RULE} (it names a file or folder)")
    return name


def resolve_inside(root: str | Path, rel: str | Path, what: str = "path") -> Path:
    """`root / rel`, after checking that it resolves (symlinks followed) inside `root`; UnsafePathError if not.

    `rel` must be relative: an absolute path, a `..` that climbs out or a symlink pointing out is refused.
    """
    rel_s = str(rel)
    if "\x00" in rel_s or Path(rel_s).is_absolute() or Path(rel_s).drive:
        raise UnsafePathError(f"{what} {rel_s!r} must be a path relative to {root}")
    base = Path(root).resolve()
    full = (base / rel_s).resolve()
    if full != base and base not in full.parents:
        raise UnsafePathError(f"{what} {rel_s!r} leads to {full}, outside {base}")
    return Path(root) / rel_s


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def public_mode(path: str | Path, directory: bool) -> None:
    """Give a private temp file (0600) or folder (0700) the mode a plain open()/mkdir() would (umask applied)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _owner_tag() -> str:
    """`<host>-<pid>`: written into every temp name so a later run can tell whether its owner still lives."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_owner_tag()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` that a killed atomic write left behind, and say so.

    Ours are `.<name>.<host>-<pid>.<random>.tmp` (and `.<name>.old-<pid>`): removed when that pid no
    longer runs on this host. Names without an owner (written by older versions) are removed once they
    are older than a day. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    host = _owner_tag().rsplit("-", 1)[0]
    owned = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\..+\.tmp$")
    old = re.compile(rf"^\.{re.escape(path.name)}\.old-(?P<pid>\d+)$")
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    for p in path.parent.iterdir():
        m = owned.match(p.name) or old.match(p.name)
        if m:
            if m.groupdict().get("host", host) != host or _pid_alive(int(m["pid"])):
                continue
        elif not legacy.match(p.name) or time.time() - p.stat().st_mtime < LEGACY_TMP_AGE_S:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        logger.warning("removed %s, a temporary copy left by an interrupted write of %s", p, path)
        removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (`atomic_file`: temporary file in the same folder, fsync, rename)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        public_mode(tmp, directory=False)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (detached, contiguous, on CPU) to a safetensors file atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file then rename. `obj` must hold only tensors and plain containers."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load(path: str | Path) -> Any:
    """Load a tensors-only torch file. Never unpickles arbitrary objects (weights_only=True; a caller allows more
    with `torch.serialization.safe_globals`, as resume does for numpy's RNG state)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a sibling temp folder; swap it into place only when the block succeeds.

    Temp folders that an earlier, killed run left beside `path` are removed first (with a warning).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        public_mode(tmp, directory=True)  # mkdtemp made it 0700; the finished folder gets the umask's mode
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
