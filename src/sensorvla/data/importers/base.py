"""The importers' shared skeleton: an importer is a source (scan once, then `load(i) -> EpisodeData`) plus
what it declares about the dataset; `run_import` does everything else the same way for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensorvla.data.types import EpisodeData

logger = logging.getLogger(__name__)


@dataclass
class ImportSource:
    """Episodes found by an importer's scan, and what the whole dataset declares.

    `load(i)` reads episode i into memory; `action_fps` is the action rate; `info` goes into
    info.json["sensorvla"] (source, rates, force channels, state names, action semantics).
    """

    kind: str
    items: list[Any]
    loader: Callable[[Any], EpisodeData]
    action_fps: float
    default_id: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        """A readable name of episode `i` (its source's name, else the index)."""
        return str(getattr(self.items[i], "name", i))

    def load(self, i: int) -> EpisodeData:
        """Load episode `i` of the source."""
        return self.loader(self.items[i])


def run_import(
    scan: Callable[[], ImportSource],
    out_dir: str | Path,
    *,
    dataset_id: str | None,
    min_actions: int,
    overwrite: bool,
    progress: bool,
    image_format: str = "video",
) -> Path:
    """Refuse an existing `out_dir` before scanning, scan, then write every episode (atomically)."""
    from sensorvla.data.writer import write_dataset

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) or choose another --out")
    source = scan()
    logger.info("importing %d %s episodes", len(source), source.kind)
    return write_dataset(
        (source.load(i) for i in range(len(source))),
        out_dir,
        dataset_id=dataset_id or source.default_id,
        action_fps=source.action_fps,
        min_actions=min_actions,
        overwrite=overwrite,
        progress=progress,
        extra_info={"source": source.kind, **source.info},
        image_format=image_format,
    )
