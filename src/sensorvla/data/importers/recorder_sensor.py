"""Sensor windows of the recorder's sensor_data.npz: streamed reading and the continuous-stream rebuild.

The recorder stored, every 200 ms, the last 650 received samples (count-based, so each sample ~5x); this
module turns those overlapping windows back into one stream with one timestamp per sample.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sensorvla.data.types import DataError, check_increasing
from sensorvla.data.writer import check_finite

CLEAN_FIX = "clean the sensor recording, or delete sensor_data.npz to import without sensor"


def _sensor_error(message: str, episode: str, path: Path, e: BaseException | None = None) -> DataError:
    return DataError(
        message + (f" ({type(e).__name__}: {e})" if e else ""),
        episode=episode,
        path=str(path),
        fix="re-export sensor_data.npz, or delete it to import the episode without sensor",
    )


def iter_npz_windows(path: Path, episode: str, window: int) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """Open sensor_data.npz: window timestamps (N,) and an iterator over the N windows (window, C) float32.

    The `data` member is streamed window by window (one window, 2.7 MB, in memory at a time) instead of
    loading N x 650 x 1026 at once; pickled or ragged arrays are refused.
    """
    npz = None
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        keys = set(npz.files)
        if not {"timestamps", "data"} <= keys:
            npz.close()
            raise _sensor_error(f"sensor npz has keys {sorted(keys)}, expected 'timestamps' and 'data'", episode, path)
        ts = np.asarray(npz["timestamps"], np.float64)
        f = npz.zip.open("data.npy")
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        if isinstance(npz, np.lib.npyio.NpzFile):
            npz.close()
        raise _sensor_error("cannot read the sensor npz (corrupt, truncated or pickled)", episode, path, e) from e
    problem = None
    if dtype.hasobject:
        problem = "sensor data holds Python objects (ragged windows?); refusing to unpickle"
    elif len(shape) != 3 or shape[1] != window:
        problem = (
            f"sensor data has shape {shape}, expected (N, {window}, C) windows of "
            f"sensor_window_size={window} samples (a truncated window?)"
        )
    elif shape[0] != len(ts) or ts.ndim != 1:
        problem = f"sensor npz has {ts.shape} timestamps but {shape[0]} windows (truncated array?)"
    if problem:
        f.close()
        npz.close()
        raise _sensor_error(problem, episode, path)

    def windows() -> Iterator[np.ndarray]:
        try:
            if fortran:  # rare; cannot be streamed in C order
                yield from (np.asarray(w, np.float32) for w in npz["data"])
                return
            nbytes = window * shape[2] * dtype.itemsize
            for n in range(shape[0]):
                buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise _sensor_error(
                        f"sensor data ends inside window {n} of {shape[0]} (truncated file)", episode, path
                    )
                yield np.frombuffer(buf, dtype).reshape(window, shape[2]).astype(np.float32)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise _sensor_error("sensor data is corrupt", episode, path, e) from e
        finally:
            f.close()
            npz.close()

    return ts, windows()


def rebuild_sensor_stream(
    window_ts: np.ndarray,
    windows: Iterable[np.ndarray],
    *,
    rate: float,
    episode: str = "",
    path: str | Path = "sensor_data.npz",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rebuild the continuous stream from overlapping "last W samples" windows.

    Assumption (the recorder stores no per-sample times): sample k of window n was measured at
    ts_n - (W - 1 - k) / rate, ts_n being the window's timestamp (its last sample). Of each window only the
    samples newer than the previous window's last sample (by more than half a period) are kept, so no sample
    appears twice.

    Args:
        window_ts: (N,) timestamps of each window's last sample (seconds).
        windows: N arrays (W, C).
        rate: nominal sample rate (Hz).

    Returns:
        timestamps (N_s,) float64, samples (N_s, C) float32, and the number of windows whose overlap with the
        previous one did not match sample for sample (0 when the nominal-rate assumption holds).
    """
    check_increasing(window_ts, what="sensor window", episode=episode, path=path, fix=CLEAN_FIX)
    ts_parts, data_parts = [], []
    prev_t, prev, mismatches = -np.inf, None, 0
    n = -1
    for n, win in enumerate(windows):
        if n >= len(window_ts):
            raise DataError(
                f"more windows than the {len(window_ts)} timestamps",
                episode=episode,
                path=str(path),
                fix="re-export sensor_data.npz or delete it to import without sensor",
            )
        win = np.asarray(win, np.float32)
        W = win.shape[0]
        if win.ndim != 2 or (prev is not None and win.shape != prev.shape):
            raise DataError(
                f"sensor window {n} has shape {win.shape}",
                episode=episode,
                path=str(path),
                fix="every window must hold the same number of samples and channels",
            )
        check_finite(win, episode=episode, stream=f"sensor window {n}", path=str(path), fix=CLEAN_FIX, max_abs=None)
        t_n = float(window_ts[n])
        sample_ts = t_n - (W - 1 - np.arange(W)) / rate
        first = int(np.searchsorted(sample_ts, prev_t + 0.5 / rate, side="right"))
        if prev is not None and 0 < first < W and not np.array_equal(win[:first], prev[W - first :]):
            mismatches += 1
        ts_parts.append(sample_ts[first:])
        data_parts.append(win[first:])
        prev_t, prev = t_n, win
    if n + 1 != len(window_ts):
        raise DataError(
            f"{len(window_ts)} window timestamps but {n + 1} windows (truncated array?)",
            episode=episode,
            path=str(path),
            fix="re-export sensor_data.npz",
        )
    if not ts_parts:
        return np.zeros(0), np.zeros((0, 0), np.float32), 0
    return np.concatenate(ts_parts), np.concatenate(data_parts), mismatches
