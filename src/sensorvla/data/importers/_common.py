"""Helpers shared by the importers: timestamp checks, frame resizing, JPEG decoding and pose-delta actions.

Everything here is pure (arrays in, arrays out) except `decode_jpeg` and `read_numeric_csv`, which read one file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.options import ImageSize
from sensorvla.data.types import DataError, as_data_error, error_text


def size_hw(image_size: ImageSize) -> tuple[int, int] | None:
    """`image_size` (int = square side, or (h, w)) -> (h, w), or None for "keep the native size"."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        hw = (int(image_size[0]), int(image_size[1]))
    if min(hw) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}; pass e.g. --image-size 224")
    return hw


def select_views(
    episodes: Sequence[Any],
    views: Sequence[str] | None,
    *,
    src: str | Path,
    images_of: Callable[[Any], Path],
    none_found: tuple[str, str],
) -> list[str]:
    """The camera views to import: `views`, or every view some episode has (sorted); set as each episode's `.views`.

    Each episode has `.name` and `.views` (its own); `images_of(episode)` is the file or folder named when it lacks a
    view. Raises DataError when there is no view at all (`none_found`: message, fix) or an episode lacks one (the
    fix names the views every episode shares).
    """
    wanted = sorted(views) if views else sorted(set().union(*(e.views for e in episodes)))
    if not wanted:
        raise DataError(none_found[0], path=str(src), fix=none_found[1])
    for e in episodes:
        missing = sorted(set(wanted) - set(e.views))
        if missing:
            common = sorted(set.intersection(*(set(x.views) for x in episodes)))
            raise DataError(
                f"view(s) {missing} missing (other episodes have {wanted})",
                episode=e.name,
                path=str(images_of(e)),
                fix=f"import only the shared views with views={common} (--views), or move this episode out of the "
                "source folder",
            )
        e.views = wanted
    return wanted


SENSOR_CONFIG_FIX = "import each sensor configuration into its own dataset"


def check_one_sensor_setting(values: set, message: str, src: str | Path) -> None:
    """DataError (`message` and the values) unless the episodes share one sensor setting (rate, force channels)."""
    if len(values) > 1:
        raise DataError(f"{message} {sorted(values)}", path=str(src), fix=SENSOR_CONFIG_FIX)


def resize_frames(frames: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, H, W, 3) uint8, bilinear (no-op when `hw` is None or already the size)."""
    if hw is None or tuple(frames.shape[1:3]) == hw:
        return frames
    from PIL import Image

    out = np.empty((len(frames), hw[0], hw[1], 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return out


def read_numeric_csv(path: Path, *, what: str, fix: str, episode: str | None = None) -> tuple[list[str], np.ndarray]:
    """A CSV file's header (stripped names) and its rows as float64 (N, len(header)), blank lines skipped; DataError
    naming `what` (e.g. "robot CSV"), the file, the line and `fix` when it cannot be read, has no header, or a row
    is not numbers of the header's width."""
    with as_data_error(
        (OSError, UnicodeDecodeError, csv.Error),
        lambda e: f"cannot read the {what} ({error_text(e)})",
        episode=episode,
        path=path,
        fix=fix,
    ):
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    if not rows:
        raise DataError(f"{what} is empty (no header row)", episode=episode, path=str(path), fix=fix)
    header, body = [h.strip() for h in rows[0]], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            problem = f"has {len(row)} fields, the header {len(header)}"
        else:
            try:
                body.append([float(x) for x in row])
                continue
            except ValueError as e:
                problem = f"is not numeric ({e})"
        raise DataError(f"{what} line {n} {problem}: {row[:6]}", episode=episode, path=str(path), fix=fix)
    return header, np.asarray(body, np.float64).reshape(len(body), len(header))


def decode_jpeg(path: Path, hw: tuple[int, int] | None, *, episode: str) -> np.ndarray:
    """Decode one image file to (h, w, 3) uint8 RGB, resized to `hw` when given."""
    from PIL import Image, UnidentifiedImageError

    failed = as_data_error(
        (UnidentifiedImageError, OSError, SyntaxError, ValueError),
        lambda e: f"cannot decode image ({error_text(e)})",
        episode=episode,
        path=path,
        fix="delete the corrupt frame (the view keeps its other frames) or re-export it",
    )
    with failed, Image.open(path) as im:
        if hw is not None:
            # JPEG draft mode decodes at a reduced scale directly: much faster for big frames.
            im.draft("RGB", (hw[1], hw[0]))
        im = im.convert("RGB")
        if hw is not None and im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def stack_frames(frames: Sequence[np.ndarray], *, view: str, episode: str, path: str | Path) -> np.ndarray:
    """Stack per-frame arrays; DataError (with the --image-size fix) when their sizes differ."""
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DataError(
            f"view {view} has frames of different sizes {sorted(shapes)}",
            episode=episode,
            path=str(path),
            fix="pass image_size (--image-size N) to resize every frame",
        )
    return np.stack(frames).astype(np.uint8, copy=False)


def pose_delta_actions(
    ts: np.ndarray,
    pose: np.ndarray,
    *,
    fps: float,
    tool: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step pose deltas on a uniform grid.

    Args:
        ts: (N,) strictly increasing pose timestamps (seconds).
        pose: (N, 6) [x, y, z, a, b, r]; angles must already be unwrapped (continuous).
        fps: action rate; dt = 1 / fps.
        tool: value of the constant 7th channel.

    Returns:
        action_ts (N_a,) = ts[0] + k dt for every k with t_k + dt <= ts[-1], and actions (N_a, 7) float32 with
        a_k = pose(t_k + dt) - pose(t_k) (pose linearly interpolated) and a_k[6] = tool.
    """
    dt = 1.0 / fps
    span = float(ts[-1] - ts[0])
    n = int(np.floor(span / dt + 1e-6))  # number of full steps that fit inside the recording
    grid = ts[0] + np.arange(n + 1) * dt
    grid[-1] = min(grid[-1], ts[-1]) if n > 0 else grid[-1]  # guard the float round-off at the very end
    p = np.stack([np.interp(grid, ts, pose[:, k]) for k in range(pose.shape[1])], axis=1)
    actions = np.empty((n, pose.shape[1] + 1), np.float32)
    actions[:, : pose.shape[1]] = np.diff(p, axis=0)
    actions[:, pose.shape[1]] = tool
    return grid[:n].copy(), actions
