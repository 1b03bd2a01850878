"""Content fingerprint of a dataset folder: a sha256 over every data file, cached by size, mtime and inode.

The first call hashes every file once; later calls cost one `stat()` per file, because a file's hash is
reused while its (size, mtime_ns, inode) is unchanged. A re-import or an edited file changes the
fingerprint even when every row count stays the same. Derived files that we write into the dataset
later (meta/norm_stats.json) and hidden files are left out, so computing stats does not change it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from sensorvla.integrity import file_sha256
from sensorvla.io import atomic_write_json

logger = logging.getLogger(__name__)

EXCLUDED = {"meta/norm_stats.json"}  # derived from the data, written after it


def cache_dir() -> Path:
    """$SENSORVLA_CACHE_DIR, else $XDG_CACHE_HOME/sensorvla, else ~/.cache/sensorvla."""
    if os.environ.get("SENSORVLA_CACHE_DIR"):
        return Path(os.environ["SENSORVLA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sensorvla"


def data_files(root: str | Path) -> list[Path]:
    """Every regular file under `root` that belongs to the data (sorted, relative paths)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root)
            if rel.as_posix() not in EXCLUDED:
                out.append(rel)
    return sorted(out)


def _cache_path(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "file-hashes" / f"{key}.json"


def content_hash(root: str | Path) -> str:
    """sha256 over (relative path, file sha256) of every data file of `root`; see the module docstring."""
    root = Path(root)
    cpath = _cache_path(root)
    try:
        cache = json.loads(cpath.read_text())
    except (OSError, ValueError):
        cache = {}
    new_cache, changed = {}, False
    total = hashlib.sha256()
    for rel in data_files(root):
        st = (root / rel).stat()
        sig = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = rel.as_posix()
        hit = cache.get(key)
        if hit is not None and hit[:3] == sig:
            digest = hit[3]
        else:
            digest = file_sha256(root / rel)
            changed = True
        new_cache[key] = [*sig, digest]
        total.update(f"{key}\0{digest}\n".encode())
    if changed or set(new_cache) != set(cache):
        try:
            atomic_write_json(cpath, new_cache)
        except OSError as e:  # a read-only cache is only slower
            logger.debug("cannot write the file-hash cache %s: %s", cpath, e)
    return total.hexdigest()
