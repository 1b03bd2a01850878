"""`sensorvla export`: a trained pretrained_model folder -> one folder that `sensorvla serve` and LeRobot load."""

from __future__ import annotations

import re
import sys
from pathlib import Path

SHAPE = re.compile(r"^(?P<view>[^=]+)=(?P<h>\d+)x(?P<w>\d+)$")


def parse_image_shapes(specs: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """`("top=96x96", ...)` -> {"top": (3, 96, 96)}; ValueError naming a malformed one."""
    out = {}
    for spec in specs:
        m = SHAPE.match(spec)
        if m is None:
            raise ValueError(f"--image-shape {spec!r}: expected VIEW=HxW, e.g. top=480x640")
        out[m.group("view")] = (3, int(m.group("h")), int(m.group("w")))
    return out


def export(
    checkpoint: Path,
    out: Path,
    image_shape: tuple[str, ...] = (),
    vl_model: str | None = None,
) -> int:
    """Export a pretrained_model folder for `sensorvla serve` and LeRobot (`--policy.path`, `lerobot-eval`,
    `lerobot-record`, the async policy server) through the lerobot_policy_sensorvla plugin (docs/lerobot.md).

    The weights, stats and config are copied after their integrity check; config.json gains LeRobot's policy keys
    (`"type": "sensorvla"`, input and output features), LeRobot's processor files are added, and the manifest covers
    every file.

    Args:
        checkpoint: a pretrained_model folder (e.g. outputs/run/checkpoints/pretrained_model).
        out: the folder to write (replaced atomically).
        image_shape: each camera's frame size as the robot gives it, VIEW=HxW (default: the training dataset's).
        vl_model: the backbone to record instead of the trained one: a folder, or a hub id `org/name[@revision]`
            that is pinned to the commit it resolves to in the local hub cache.
    """
    from sensorvla import hub
    from sensorvla.models.folder import export_folder

    try:
        shapes = parse_image_shapes(image_shape)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    revision = None
    if vl_model is not None and hub.parse(vl_model) is not None:
        got = hub.resolve(vl_model, repo_type="model")
        vl_model, revision = got.repo_id, got.commit
    try:
        dst = export_folder(checkpoint, out, image_shapes=shapes or None, vl_model=vl_model, vl_revision=revision)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {dst} (sensorvla serve --checkpoint {dst}; LeRobot: --policy.path={dst})")
    return 0


def register(app) -> None:
    """Add `export` to the `sensorvla` app."""
    app.command(export, name="export")
