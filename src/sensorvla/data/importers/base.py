"""The importers' shared skeleton: an importer is a source (scan once, then `load(i) -> EpisodeData`) plus
what it declares about the dataset; `run_import` does everything else the same way for all of them, with the
options every importer takes (`data.options.ImportOptions`, also the flags of `sensorvla data import-*`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensorvla.data.options import ImportOptions
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
    scan: Callable[..., ImportSource],
    src: str | Path,
    out_dir: str | Path,
    *,
    dataset_id: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Convert the episodes that `scan(src, views=, instruction=, image_size=)` finds into a dataset at `out_dir`.

    Refuses an existing `out_dir` before scanning, scans, then writes every episode (atomically: on any error
    nothing is left at `out_dir`). `options` are the `ImportOptions` keywords; `dataset_id` defaults to the
    source's own (e.g. "hdf5_<src stem>").

    Returns:
        out_dir. Raises DataError (naming episode, file and fix) on bad input, FileExistsError when out_dir
        exists without `overwrite`, TypeError for an option that is not an `ImportOptions` field.
    """
    from sensorvla.data.writer import write_dataset

    opts = ImportOptions(**options)
    out_dir = Path(out_dir)
    if out_dir.exists() and not opts.overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) or choose another --out")
    source = scan(src, views=opts.views, instruction=opts.instruction, image_size=opts.image_size)
    logger.info("importing %d %s episodes", len(source), source.kind)
    return write_dataset(
        (source.load(i) for i in range(len(source))),
        out_dir,
        dataset_id=dataset_id or source.default_id,
        action_fps=source.action_fps,
        min_actions=opts.min_actions,
        overwrite=opts.overwrite,
        progress=progress,
        extra_info={"source": source.kind, **source.info},
        image_format=opts.image_format,
    )
