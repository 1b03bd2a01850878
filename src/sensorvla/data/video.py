"""Camera video with PyAV (its wheels ship FFmpeg): encode frames to mp4, probe a file, decode frames by time.

Encoding follows LeRobot's settings (yuv420p, a keyframe every `g` = 2 frames so that a random frame
costs one seek plus at most one more decode). Decoding keeps one open container per file per process and
continues forward from the last decoded frame when it can, so sequential reads do not seek.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sensorvla.data.types import DataError, as_data_error, error_text

logger = logging.getLogger(__name__)

# LeRobot's names (info.json "video.codec") -> the FFmpeg encoder PyAV uses
ENCODERS = {"h264": "libx264", "av1": "libsvtav1"}
VIDEO_FIX = "re-create the dataset (its video is damaged), or restore the file from the original dataset"


def _av():
    import av

    return av


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


class VideoEncoder:
    """Append (h, w, 3) uint8 frames to one mp4 at a constant `fps`; frame k is shown at k / fps."""

    def __init__(self, path: str | Path, fps: float, height: int, width: int, *, codec: str = "h264", crf: int = 20):
        self.path, self.fps, self.height, self.width = Path(path), fps, height, width
        self.codec, self.crf = codec, crf
        self.frames = 0
        self._container = None
        self._stream = None

    def _open(self) -> None:
        av = _av()
        if self.codec not in ENCODERS:
            raise ValueError(f"video codec {self.codec!r}: choose one of {sorted(ENCODERS)}")
        if self.height % 2 or self.width % 2:
            raise DataError(
                f"frames of {self.height}x{self.width} cannot be stored as yuv420p video (odd size)",
                path=str(self.path),
                fix="resize to an even size (--image-size) or store raw frames (image_format='npy')",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        options = {"g": "2", "crf": str(self.crf)}
        if self.codec == "av1":
            options["preset"] = "12"
        else:  # one x264 thread: x264's output depends on its thread count (frame threads limit motion search), so
            options["threads"] = "1"  # threaded files would differ between machines; one thread keeps them byte-equal
        stream = self._container.add_stream(ENCODERS[self.codec], rate=_rate(self.fps), options=options)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", self.height, self.width
        self._stream = stream

    def add(self, frame: np.ndarray) -> None:
        """Encode one (h, w, 3) uint8 RGB frame."""
        if self._container is None:
            self._open()
        if frame.shape != (self.height, self.width, 3):
            raise DataError(
                f"frame of shape {frame.shape} in a video of {self.height}x{self.width}",
                path=str(self.path),
                fix="use one image size per camera (--image-size)",
            )
        vf = _av().VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        # RGB -> yuv420p here, on one thread: PyAV's default for the encoder's own conversion is swscale's threaded
        # mode, and files written with it occasionally differed from a second write of the same frames
        vf = vf.reformat(format="yuv420p", threads=1)
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file (idempotent)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def nbytes(self) -> int:
        """Bytes written so far."""
        return self.path.stat().st_size if self.path.exists() else 0


@dataclass
class VideoInfo:
    """What a video file declares: frames, rate, duration (s), size, codec."""

    frames: int
    fps: float
    duration_s: float
    height: int
    width: int
    codec: str


def probe(path: str | Path) -> VideoInfo:
    """Open `path` and read its video stream's header; DataError naming the file when missing/undecodable."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise DataError("video file is missing", path=str(path), fix=VIDEO_FIX)
    unreadable = (av.error.FFmpegError, OSError, ValueError)
    with (
        as_data_error(unreadable, lambda e: f"cannot open the video ({error_text(e)})", path=path, fix=VIDEO_FIX),
        av.open(str(path)) as c,
    ):
        if not c.streams.video:
            raise DataError("file has no video stream", path=str(path), fix=VIDEO_FIX)
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0)
        if s.duration is not None:
            duration = float(s.duration * s.time_base)
        elif c.duration is not None:
            duration = c.duration / 1e6
        else:
            duration = 0.0
        frames = int(s.frames) if s.frames else int(round(duration * fps))
        return VideoInfo(frames, fps, duration, s.codec_context.height, s.codec_context.width, s.codec_context.name)


def decode_all(path: str | Path) -> int:
    """Decode every frame of `path` (no colour conversion) and return how many; DataError naming the file when
    any packet fails to decode (damaged bytes inside the file, which a header probe does not see)."""
    av = _av()
    path = Path(path)
    n = 0
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in c.decode(stream):
                n += 1
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise DataError(
            f"the video does not decode completely: {type(e).__name__}: {e} after {n} frames (damaged bytes inside)",
            path=str(path),
            fix=VIDEO_FIX,
        ) from e
    return n


class _Decoder:
    """One open container; serves frames by time, moving forward without seeking when it can."""

    def __init__(self, path: Path):
        av = _av()
        self.path = path
        try:
            self.container = av.open(str(path))
            self.stream = self.container.streams.video[0]
        except (av.error.FFmpegError, OSError, IndexError) as e:
            raise DataError(f"cannot open the video ({type(e).__name__}: {e})", path=str(path), fix=VIDEO_FIX) from e
        # one decoding thread: DataLoader workers are the parallelism (frame threads add latency to seeks)
        self.stream.thread_count = 1
        # one reformatter per container: to_ndarray(format=...) would build a new swscale context per frame (25x)
        self._rgb = av.video.reformatter.VideoReformatter()
        self._iter = None
        self._last: tuple[float, np.ndarray] | None = None
        self._forward_s = 4.0 / float(self.stream.average_rate or 10)

    def frame_at(self, t: float, tol: float) -> np.ndarray:
        if self._last is not None and abs(self._last[0] - t) <= tol:
            return self._last[1]
        if self._iter is None or self._last is None or not (self._last[0] < t <= self._last[0] + self._forward_s):
            self.container.seek(max(int(t / self.stream.time_base), 0), stream=self.stream, backward=True)
            self._iter = self.container.decode(self.stream)
        av = _av()
        try:
            for frame in self._iter:
                ft = float(frame.time)
                if ft < t - tol:
                    continue
                if ft > t + tol:
                    self._iter = None
                    raise DataError(
                        f"no frame at t={t:.6f} s (the nearest later frame is at {ft:.6f} s; tolerance {tol} s): "
                        "the timestamps are off the video's frame grid",
                        path=str(self.path),
                        fix="check the dataset's fps and timestamps, or raise --data.timestamp-tolerance-s",
                    )
                self._last = (ft, self._rgb.reformat(frame, format="rgb24").to_ndarray())
                return self._last[1]
        except av.error.FFmpegError as e:
            self._iter = None
            raise DataError(f"cannot decode the video ({e})", path=str(self.path), fix=VIDEO_FIX) from e
        self._iter = None
        raise DataError(
            f"the video ends before t={t:.6f} s (it is shorter than its episode)",
            path=str(self.path),
            fix=VIDEO_FIX,
        )


class DecoderPool:
    """Per-process LRU of open decoders (reset after fork: containers never cross processes)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._pid = os.getpid()
        self._open: OrderedDict[Path, _Decoder] = OrderedDict()

    def get(self, path: Path) -> _Decoder:
        """The open decoder of `path` (opened on demand; the least recently used one is closed past `max_open`)."""
        if os.getpid() != self._pid:
            # a forked DataLoader worker: never touch (or free: closing hangs) the parent's containers
            _INHERITED.extend(self._open.values())
            self._open, self._pid = OrderedDict(), os.getpid()
        dec = self._open.pop(path, None) or _Decoder(path)
        self._open[path] = dec
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return dec

    def __getstate__(self):  # a pickled dataset carries no open containers
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])


_INHERITED: list[_Decoder] = []  # decoders a forked process got from its parent, kept alive, never used
POOL = DecoderPool()


class VideoFrames:
    """Frames of one episode inside an mp4: frame j is the one shown at `from_s + j / fps`.

    Array-like for the timeline code: `len()`, `[j]` -> (h, w, 3) uint8, `.shape`, `.dtype`.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, from_s: float, fps: float, n: int, shape: tuple[int, int, int], tol: float):
        self.path, self.from_s, self.fps, self.n, self.tol = Path(path), from_s, fps, n, tol
        self.shape = (n, *shape)

    def __len__(self) -> int:
        return self.n

    def time_of(self, j: int) -> float:
        """The timestamp (s) of frame `j`."""
        return self.from_s + j / self.fps

    def __getitem__(self, j: int) -> np.ndarray:
        j = int(j)
        if not 0 <= j < self.n:
            raise IndexError(j)
        frame = POOL.get(self.path).frame_at(self.time_of(j), self.tol)
        if frame.shape != self.shape[1:]:
            raise DataError(
                f"decoded frame is {frame.shape}, info.json declares {self.shape[1:]}",
                path=str(self.path),
                fix="fix the feature's shape in meta/info.json or re-encode the video",
            )
        return frame
