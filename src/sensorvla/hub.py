"""Hub ids wherever a path is taken: `org/name[@revision]` -> a folder of the local Hugging Face cache.

`--dataset_dir lerobot/pusht@v3.0` and `--vl-model Qwen/Qwen2.5-VL-3B-Instruct@<commit>` name a hub repository the
way LeRobot users do (`repo_id`, optionally a branch, tag or commit). `resolve` looks the id up in the hub cache
(`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) through `huggingface_hub.snapshot_download`,
cache first; only when it is absent and the hub is not offline (`HF_HUB_OFFLINE`) is it downloaded. What comes back
carries the commit the revision resolved to, which the run records (`model.backbone.revision`,
`data.dataset_hub`) and the VL feature cache keys on, so a moved branch never reuses features of another commit.

A spec that is an existing folder, a `random:` backbone id (models/random_vl.py) or not shaped like a hub id is a
local path and is returned as it is. A hub id that is not in the cache offline raises `HubCacheMissError`, whose
message says what to download and how.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

RepoType = Literal["model", "dataset"]
# org/name, each part hub-legal; an optional @revision (branch, tag or commit; may hold '/', e.g. refs/pr/1)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubCacheMissError(FileNotFoundError):
    """A hub id is not in the local hub cache and cannot be downloaded (offline, or the download failed)."""


@dataclass(frozen=True)
class HubSpec:
    """A parsed hub id: `repo_id` (org/name) and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A spec resolved to a local folder; `repo_id` and `commit` are None for a local path."""

    path: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def pinned(self) -> str:
        """`org/name@<commit>` for a hub repository, else the local path."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else str(self.path)


def parse(spec: str | os.PathLike, revision: str | None = None) -> HubSpec | None:
    """The hub id in `spec`, or None when `spec` is a local path (an existing path, `random:...`, `./x`, `/x`,
    `~/x`, or anything not shaped `org/name[@revision]`).

    Raises:
        ValueError: `spec` carries `@rev` and `revision` names another one.
    """
    text = str(spec)
    if text.startswith(("random:", ".", "/", "~")) or Path(text).exists():
        return None
    m = HUB_ID.match(text)
    if m is None:
        return None
    rev = m.group("rev")
    if rev and revision and rev != revision:
        raise ValueError(f"{text!r} names revision {rev!r} but the revision given beside it is {revision!r}; give one")
    return HubSpec(m.group("repo"), rev or revision)


def cache_dir() -> Path:
    """The hub cache, read from the environment at call time: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """Whether downloads are off (`HF_HUB_OFFLINE` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_command(spec: HubSpec, repo_type: RepoType) -> str:
    """The command that puts `spec` into the hub cache."""
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return f"hf download {spec.repo_id}{kind}{rev}"


def resolve(
    spec: str | os.PathLike, *, repo_type: RepoType, revision: str | None = None, download: bool | None = None
) -> Resolved:
    """`spec` -> `Resolved` (a local folder; for a hub id its snapshot folder in the cache and its commit).

    Args:
        repo_type: "dataset" (`--dataset_dir`) or "model" (`--vl-model`).
        revision: the revision to use when `spec` has no `@revision` (e.g. `--model.backbone.revision`).
        download: fetch a hub id missing from the cache; None = unless `HF_HUB_OFFLINE` is set.

    Raises:
        HubCacheMissError: a hub id not in the cache that may not (or could not) be downloaded; names the command.
    """
    hub = parse(spec, revision)
    if hub is None:
        return Resolved(Path(spec).expanduser())
    from huggingface_hub import snapshot_download

    kw = dict(repo_id=hub.repo_id, repo_type=repo_type, revision=hub.revision, cache_dir=str(cache_dir()))
    try:
        path = snapshot_download(**kw, local_files_only=True)
    except Exception as cached_error:  # LocalEntryNotFoundError and friends: not (fully) in the cache
        if download is False or (download is None and offline()):
            raise HubCacheMissError(_miss_message(hub, repo_type, "HF_HUB_OFFLINE is set")) from cached_error
        try:
            path = snapshot_download(**kw)
        except Exception as e:
            raise HubCacheMissError(_miss_message(hub, repo_type, f"the download failed: {e}")) from e
    path = Path(path)
    return Resolved(path, hub.repo_id, path.name if COMMIT.match(path.name) else None)  # snapshots/<commit>


def _miss_message(hub: HubSpec, repo_type: RepoType, why: str) -> str:
    what = f"{hub.repo_id}@{hub.revision}" if hub.revision else hub.repo_id
    return (
        f"{repo_type} {what!r} is not in the local hub cache {cache_dir()} and was not downloaded ({why}). "
        f"Download it first with `{download_command(hub, repo_type)}` (or `huggingface-cli download"
        f"{' --repo-type dataset' if repo_type == 'dataset' else ''} {hub.repo_id}`), point HF_HUB_CACHE / HF_HOME "
        "at the cache that holds it, or pass a local folder (`./path` for a relative one)."
    )


def local_path(spec: str, revision: str | None = None, repo_type: RepoType = "model") -> str:
    """`spec` as a path to hand to a loader: a hub id's snapshot folder, anything else unchanged."""
    if parse(spec, revision) is None:
        return spec
    return str(resolve(spec, repo_type=repo_type, revision=revision).path)


def commit_of(spec: str, revision: str | None = None, repo_type: RepoType = "model") -> str | None:
    """The commit a hub id resolves to (a 40-hex `revision` as it is), None for a local path or one not cached."""
    hub = parse(spec, revision)
    if hub is None:
        return None
    if hub.revision and COMMIT.match(hub.revision):
        return hub.revision
    try:
        return resolve(spec, repo_type=repo_type, revision=revision, download=False).commit
    except HubCacheMissError:
        return None
