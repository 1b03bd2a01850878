"""Rollout videos: the camera views side by side, the sensor trace(s) beside them with a cursor at the current
time, the action and the episode's outcome; H.264 mp4 through the dataset writer's `VideoEncoder` (one x264
thread and one swscale thread, so a video is the same bytes on every machine).

The plots are drawn once per episode with matplotlib (the whole trace; the part after the cursor is faded per
frame), and each frame is composed in numpy with its text drawn by Pillow, so a 60-step episode costs well
under a second on top of the encoding. `write_rollout_video` takes plain arrays: any env, any number of views
and sensor channels. `EpisodeRecorder` collects them from the observation dicts of a rollout.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.video import VideoEncoder

PANEL_WIDTH = 480  # px of the plot panel
VIEW_HEIGHT = 300  # views are scaled up by an integer factor towards this height (nearest neighbour)
BAR = 30  # px of the title bar and of the action bar
COLORS = {"success": (30, 150, 60), "failure": (200, 40, 40), None: (90, 90, 90)}
CURSOR = (220, 30, 30)
FADE = 0.65  # how far the trace after the cursor is blended towards white


@dataclass
class SensorPanel:
    """How the sensor trace is drawn: `lines` channels as curves, `heatmap` channels as an image over time
    (rows = channels; e.g. the depth bins of an A-scan); `names` label the curves. Defaults (None): up to 6
    channels as curves, more as one heatmap; `lines` alone: the other channels as the heatmap."""

    lines: Sequence[int] | None = None
    heatmap: Sequence[int] | None = None
    names: Sequence[str] | None = None

    def resolve(self, channels: int) -> tuple[list[int], list[int]]:
        """(curve channels, heatmap channels) for a sensor of `channels` channels."""
        if self.lines is None and self.heatmap is None:
            return (list(range(channels)), []) if channels <= 6 else ([], list(range(channels)))
        lines = [c for c in (self.lines or ()) if c < channels]
        if self.heatmap is None:
            return lines, [c for c in range(channels) if c not in lines]
        heat = [c for c in self.heatmap if c < channels]
        return lines, heat


@functools.lru_cache(maxsize=4)
def _font(size: int):
    """Matplotlib's DejaVu Sans at `size` px (the same font file on every machine)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _as_views(views: Mapping[str, Sequence[np.ndarray]] | Sequence[Sequence[np.ndarray]]) -> dict[str, list]:
    if isinstance(views, Mapping):
        return {str(k): list(v) for k, v in views.items()}
    return {f"view {i}": list(v) for i, v in enumerate(views)}


def _static_panel(
    times: np.ndarray,
    sensor_times: np.ndarray | None,
    sensor_values: np.ndarray | None,
    actions: np.ndarray | None,
    panel: SensorPanel,
    action_names: Sequence[str],
    size: tuple[int, int],
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], tuple[float, float]]:
    """The plots over the whole episode: (RGB image, each axes' pixel box (x0, y0, x1, y1), (px of the first
    frame's time, px per second))."""
    from sensorvla.eval.plots import pyplot

    plt = pyplot()
    w, h = size
    t0, t1 = float(times[0]), float(times[-1]) if times[-1] > times[0] else float(times[0]) + 1.0
    rows: list[str] = []
    lines, heat = [], []
    if sensor_values is not None and len(sensor_values):
        lines, heat = panel.resolve(sensor_values.shape[1])
        rows += ["lines"] * bool(lines) + ["heat"] * bool(heat)
    else:
        rows.append("none")
    if actions is not None and len(actions):
        rows.append("actions")
    fig, axes = plt.subplots(len(rows), 1, figsize=(w / 100, h / 100), dpi=100, sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, kind in zip(axes, rows):
        ax.tick_params(labelsize=7, pad=1)
        if kind == "lines":
            names = panel.names or [f"ch {c}" for c in range(sensor_values.shape[1])]
            for c in lines:
                ax.plot(sensor_times, sensor_values[:, c], lw=1.0, label=names[c] if c < len(names) else f"ch {c}")
            ax.set_ylabel("sensor", fontsize=8)
            ax.legend(fontsize=6, loc="upper left", ncol=3, framealpha=0.8)
        elif kind == "heat":
            vals = sensor_values[:, heat].T
            ax.imshow(vals, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                      extent=(float(sensor_times[0]), float(sensor_times[-1]), -0.5, len(heat) - 0.5))  # fmt: skip
            ax.set_ylabel(f"ch {heat[0]}-{heat[-1]}", fontsize=8)
        elif kind == "none":
            ax.text(0.5, 0.5, "no sensor data", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_yticks([])
        else:
            for d in range(actions.shape[1]):
                name = action_names[d] if d < len(action_names) else f"a{d}"
                ax.step(times[: len(actions)], actions[:, d], where="post", lw=1.0, label=name)
            ax.set_ylabel("action", fontsize=8)
            ax.legend(fontsize=6, loc="upper left", ncol=4, framealpha=0.8)
    axes[-1].set_xlim(t0, t1)
    axes[-1].set_xlabel("time (s)", fontsize=8, labelpad=1)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.97, bottom=0.1, hspace=0.12)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    boxes = []
    for ax in axes:
        b = ax.get_window_extent()  # display pixels, origin bottom-left
        boxes.append((int(round(b.x0)), int(round(h - b.y1)), int(round(b.x1)), int(round(h - b.y0))))
    xa = axes[-1].transData.transform([(t0, 0.0), (t1, 0.0)])[:, 0]
    plt.close(fig)
    return img, boxes, (float(xa[0]), float((xa[1] - xa[0]) / (t1 - t0)))


def _fmt_action(action: np.ndarray | None, names: Sequence[str]) -> str:
    if action is None:
        return "action: (episode over)"
    items = [f"{names[d] if d < len(names) else f'a{d}'} {v:+.2f}" for d, v in enumerate(np.asarray(action).ravel())]
    return "action  " + "   ".join(items)


@dataclass
class _Layout:
    views: dict[str, list]
    scale: int
    view_w: int
    view_h: int
    width: int
    height: int


def _layout(views: dict[str, list]) -> _Layout:
    h, w = np.asarray(views[next(iter(views))][0]).shape[:2]
    scale = max(1, round(VIEW_HEIGHT / h))
    body = max(h * scale, 240)
    width = len(views) * w * scale + PANEL_WIDTH
    height = 2 * BAR + body
    return _Layout(views, scale, w * scale, h * scale, width + width % 2, height + height % 2)


@dataclass
class _Scene:
    """One episode's video content; `frame(k)` composes frame k (views, plots with the cursor, text)."""

    views: dict[str, list]
    times: np.ndarray
    actions: np.ndarray | None
    names: list[str]
    lay: _Layout
    plot: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    x_first: float
    px_per_s: float
    outcome: str | None
    title: str

    def __post_init__(self):
        self.faded = (self.plot * (1 - FADE) + 255 * FADE).astype(np.uint8)

    def _panel(self, t: float) -> np.ndarray:
        """The plots with the part after `t` faded and a red cursor at `t` (3 px, kept inside each axes)."""
        panel = self.plot.copy()
        x = int(round(self.x_first + (t - self.times[0]) * self.px_per_s))
        for x0, y0, x1, y1 in self.boxes:
            if x + 2 < x1:
                panel[y0:y1, max(x + 2, x0) : x1] = self.faded[y0:y1, max(x + 2, x0) : x1]
            c0 = min(max(x - 1, x0), x1 - 3)
            panel[y0:y1, c0 : c0 + 3] = CURSOR
        return panel

    def frame(self, k: int) -> np.ndarray:
        """Frame `k` as (height, width, 3) uint8."""
        from PIL import Image, ImageDraw

        lay, n, last = self.lay, len(self.times), k == len(self.times) - 1
        canvas = np.full((lay.height, lay.width, 3), 255, np.uint8)
        for i, frames in enumerate(self.views.values()):
            img = np.asarray(frames[k], np.uint8)
            img = img.repeat(lay.scale, 0).repeat(lay.scale, 1) if lay.scale > 1 else img
            canvas[BAR : BAR + lay.view_h, i * lay.view_w : (i + 1) * lay.view_w] = img
        left = len(self.views) * lay.view_w
        canvas[BAR : lay.height - BAR, left : left + PANEL_WIDTH] = self._panel(self.times[k])
        canvas[:BAR] = COLORS[self.outcome] if last else (40, 40, 40)
        canvas[-BAR:] = (245, 245, 245)
        im = Image.fromarray(canvas)
        draw, font = ImageDraw.Draw(im), _font(15)
        head = f"{self.title}   t = {self.times[k] - self.times[0]:.1f} s   step {k}/{n - 1}".strip()
        draw.text((8, 6), head, fill=(255, 255, 255), font=font)
        tag = "outcome: " + (self.outcome or "unknown").upper()
        colour = (255, 255, 255) if last else COLORS[self.outcome]
        draw.text((lay.width - 8, 6), tag, fill=colour, font=font, anchor="ra")
        for i, name in enumerate(self.views):  # each view's name in its corner
            draw.text((i * lay.view_w + 6, BAR + 4), name, fill=(60, 60, 60), font=_font(13))
        action = self.actions[k] if self.actions is not None and k < len(self.actions) else None
        draw.text((8, lay.height - BAR + 6), _fmt_action(action, self.names), fill=(20, 20, 20), font=font)
        if last and self.outcome:  # the outcome over the views on the last frame
            centre = (left // 2, BAR + lay.view_h // 2)
            draw.text(centre, self.outcome.upper(), fill=COLORS[self.outcome], font=_font(40), anchor="mm",
                      stroke_width=3, stroke_fill=(255, 255, 255))  # fmt: skip
        return np.asarray(im)


def write_rollout_video(
    path: str | Path,
    views: Mapping[str, Sequence[np.ndarray]] | Sequence[Sequence[np.ndarray]],
    times: Sequence[float],
    sensor_times: np.ndarray | None = None,
    sensor_values: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    *,
    success: bool | None = None,
    title: str = "",
    action_names: Sequence[str] | None = None,
    sensor_panel: SensorPanel | None = None,
    fps: float | None = None,
) -> Path:
    """Write one episode's video: frame k shows every view at `times[k]`, the sensor trace with a cursor at
    `times[k]` and the action taken from that frame; the title bar carries `title` and the outcome.

    Args:
        views: view name -> T frames (H, W, 3) uint8 (all views of one size), or a list of such sequences.
        times: (T,) the time (s) of each frame; the sensor and action axes share it.
        sensor_times, sensor_values: (N,) and (N, C): the sensor history (any number of channels), or None.
        actions: (T, D_a) or (T - 1, D_a): the action executed after frame k (the last frame may have none).
        success: the episode's outcome (None: unknown).
        sensor_panel: which channels are curves and which a heatmap (`SensorPanel`).
        fps: the video's frame rate (default: from `times`).

    Returns `path`; the video has T frames of `rollout_video_size(...)` pixels.
    """
    views_d = _as_views(views)
    times_a = np.asarray(times, np.float64)
    n = len(times_a)
    if n == 0 or any(len(v) != n for v in views_d.values()):
        raise ValueError(f"every view needs one frame per time ({n} times; views {[len(v) for v in views_d.values()]})")
    acts = None if actions is None else np.asarray(actions, np.float64).reshape(min(len(actions), n), -1)
    lay = _layout(views_d)
    body_h = lay.height - 2 * BAR
    s_t = None if sensor_times is None else np.asarray(sensor_times, np.float64)
    s_v = None if sensor_values is None else np.asarray(sensor_values, np.float64).reshape(len(s_t), -1)
    if s_t is not None and len(s_t):  # keep the history that overlaps the episode (a window before it too)
        keep = (s_t >= times_a[0] - 1.0) & (s_t <= times_a[-1])
        s_t, s_v = s_t[keep], s_v[keep]
    names = list(action_names) if action_names is not None else []
    plot, boxes, (x_first, px_per_s) = _static_panel(
        times_a, s_t, s_v, acts, sensor_panel or SensorPanel(), names, (PANEL_WIDTH, body_h)
    )
    outcome = None if success is None else ("success" if success else "failure")
    scene = _Scene(views_d, times_a, acts, names, lay, plot, boxes, x_first, px_per_s, outcome, title)
    fps = fps or (float((n - 1) / (times_a[-1] - times_a[0])) if n > 1 and times_a[-1] > times_a[0] else 10.0)
    enc = VideoEncoder(path, fps=fps, height=lay.height, width=lay.width)
    try:
        for k in range(n):
            enc.add(scene.frame(k))
    finally:
        enc.close()
    return Path(path)


def rollout_video_size(views: Mapping[str, Sequence[np.ndarray]] | Sequence[Sequence[np.ndarray]]) -> tuple[int, int]:
    """(height, width) of the video `write_rollout_video` makes for these views."""
    lay = _layout(_as_views(views))
    return lay.height, lay.width


@dataclass
class EpisodeRecorder:
    """Collects a rollout episode for `write_rollout_video` from its observation dicts and actions.

    An observation with "images" (V, H, W, 3) gives one frame per view (else `render()` is one view);
    "timestamp" gives the frame's time (else step / `fps`); "sensor" (N, C) with "sensor_timestamps" (N,)
    extends the sensor history with the samples newer than those already held.
    """

    view_names: Sequence[str] | None = None
    fps: float = 10.0
    views: dict[str, list] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    _sensor_t: list[np.ndarray] = field(default_factory=list)
    _sensor_v: list[np.ndarray] = field(default_factory=list)

    def observe(self, obs: Mapping[str, Any], render=None) -> None:
        """Record one observation (before the action taken from it); `render()` when it carries no images."""
        images = obs.get("images") if isinstance(obs, Mapping) else None
        frames = list(np.asarray(images)) if images is not None else [np.asarray(render())]
        names = list(self.view_names or [f"view {i}" for i in range(len(frames))])
        for name, frame in zip(names, frames):
            self.views.setdefault(name, []).append(np.asarray(frame, np.uint8).copy())
        t = obs.get("timestamp") if isinstance(obs, Mapping) else None
        self.times.append(float(t) if t is not None else len(self.times) / self.fps)
        if isinstance(obs, Mapping) and obs.get("sensor") is not None and obs.get("sensor_timestamps") is not None:
            ts = np.asarray(obs["sensor_timestamps"], np.float64)
            vals = np.asarray(obs["sensor"], np.float32).reshape(len(ts), -1)
            last = self._sensor_t[-1][-1] if self._sensor_t and len(self._sensor_t[-1]) else -np.inf
            new = ts > last
            if new.any():
                self._sensor_t.append(ts[new])
                self._sensor_v.append(vals[new])

    def act(self, action: np.ndarray) -> None:
        """Record the action executed after the latest observation."""
        self.actions.append(np.asarray(action, np.float32).ravel().copy())

    def sensor(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The sensor history held: (times (N,), values (N, C)), or (None, None)."""
        if not self._sensor_t:
            return None, None
        return np.concatenate(self._sensor_t), np.concatenate(self._sensor_v)

    def write(self, path: str | Path, **kwargs: Any) -> Path:
        """`write_rollout_video(path, ...)` of what was recorded; `kwargs`: success, title, action_names, ..."""
        s_t, s_v = self.sensor()
        acts = np.stack(self.actions) if self.actions else None
        return write_rollout_video(path, self.views, self.times, s_t, s_v, acts, fps=self.fps, **kwargs)
