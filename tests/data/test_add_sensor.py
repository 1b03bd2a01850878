"""`sensorvla data add-sensor`: a high-rate stream attached to a LeRobot-written dataset as a declared sidecar,
in place and atomically, with clocks and rates validated; sidecar mismatches are refused on read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sensorvla.config import DataConfig
from sensorvla.data.attach import add_sensor
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta
from sensorvla.data.timeline import window_grid
from sensorvla.data.types import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot"
RATE = 200.0
SENSOR_CLOCK = 1000.0  # the sensor's clock runs 1000 s ahead of the dataset's: --clock-offset -1000


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def ds(tmp_path):
    return Path(shutil.copytree(FIXTURES / "video_av1", tmp_path / "video_av1"))


def recording(root: Path, episodes=None, rate=RATE, channels=3):
    """Per episode: samples over the episode's span (+ a margin) on the sensor clock; channel 0 is the
    dataset-clock time itself, so a window's values show exactly how the clock offset was applied."""
    meta = load_meta(root)
    out = {}
    for e in episodes if episodes is not None else range(len(meta.episodes)):
        n = meta.episodes[e]["length"]
        t = np.arange(-0.2, n / meta.fps + 0.2, 1.0 / rate)
        vals = np.stack([t] + [np.sin(3 * t + c) * 100 * (c + 1) for c in range(channels - 1)], axis=1)
        out[e] = (t + SENSOR_CLOCK, vals)
    return out


def write_csv(path: Path, rec) -> Path:
    lines = ["episode_index,timestamp," + ",".join(f"ch{c}" for c in range(next(iter(rec.values()))[1].shape[1]))]
    for e, (ts, vals) in rec.items():
        lines += [f"{e},{float(t)!r}," + ",".join(repr(float(v)) for v in row) for t, row in zip(ts, vals)]
    path.write_text("\n".join(lines) + "\n")
    return path


def flat(rec):
    e = np.concatenate([np.full(len(ts), k) for k, (ts, _) in rec.items()])
    return e, np.concatenate([ts for ts, _ in rec.values()]), np.concatenate([v for _, v in rec.values()])


def write_npz(path: Path, rec) -> Path:
    e, ts, vals = flat(rec)
    np.savez(path, episode_index=e, timestamps=ts, values=vals)
    return path


def write_h5(path: Path, rec, grouped: bool) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        if grouped:
            for k, (ts, vals) in rec.items():
                f[f"episodes/{k}/timestamps"], f[f"episodes/{k}/values"] = ts, vals
        else:
            e, ts, vals = flat(rec)
            f["episode_index"], f["timestamps"], f["values"] = e, ts, vals
    return path


def cfg(root, **kw):
    base = dict(dataset_dir=str(root), val_fraction=0.0, test_fraction=0.0, sensor_window_s=0.05, sensor_samples=10)
    return DataConfig(**{**base, **kw})


def test_attach_csv_and_read_windows_on_the_dataset_clock(ds, tmp_path):
    before = snapshot(ds)
    src = write_csv(tmp_path / "ft.csv", recording(ds))
    spec = add_sensor(ds, src, clock_offset=-SENSOR_CLOCK)
    assert spec["rate_hz"] == pytest.approx(RATE) and spec["shape"] == [3] and spec["names"] == ["ch0", "ch1", "ch2"]
    after = snapshot(ds)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"meta/info.json"}  # LeRobot's files are untouched; only the declaration is added
    assert all(k.startswith("streams/sensor/") for k in set(after) - set(before))
    meta = load_meta(ds)
    assert meta.sensor_keys == ["sensor"] and meta.sensor_channels == 3 and meta.sensor_rate == pytest.approx(RATE)
    assert meta.episodes[1]["clock_offsets"]["sensor"] == -SENSOR_CLOCK
    d = EpisodeDataset(ds, cfg(ds), split="all")
    for idx in (0, 5, len(d) - 1):
        s = d[idx]
        assert s["sensor_mask"].all()
        grid = window_grid(s["timestamp"], 0.05, 10)
        np.testing.assert_allclose(s["sensor"][:, 0], grid, atol=1e-6)  # channel 0 is time: the offset is exact
    # the per-frame force is still selectable by key
    forced = EpisodeDataset(ds, cfg(ds, sensor_keys=("observation.force",)), split="all")
    assert forced.meta.sensor_channels == 6


@pytest.mark.parametrize("fmt", ["npz", "h5", "h5_grouped"])
def test_npz_and_hdf5_sources_attach_the_same_stream(ds, tmp_path, fmt):
    rec = recording(ds)
    ref = Path(shutil.copytree(ds, tmp_path / "ref"))
    add_sensor(ref, write_csv(tmp_path / "ft.csv", rec), clock_offset=-SENSOR_CLOCK)
    src = {
        "npz": lambda: write_npz(tmp_path / "ft.npz", rec),
        "h5": lambda: write_h5(tmp_path / "ft.h5", rec, grouped=False),
        "h5_grouped": lambda: write_h5(tmp_path / "ft.h5", rec, grouped=True),
    }[fmt]()
    add_sensor(ds, src, clock_offset=-SENSOR_CLOCK)
    a, b = load_meta(ds).streams["sensor"], load_meta(ref).streams["sensor"]
    for e in range(3):
        np.testing.assert_array_equal(a.timestamps(e), b.timestamps(e))
        np.testing.assert_allclose(a.values(e), b.values(e), rtol=1e-6)


def test_single_episode_file_and_sensorless_episodes(ds, tmp_path, caplog):
    ts, vals = recording(ds, episodes=[2])[2]
    np.savez(tmp_path / "one.npz", timestamps=ts, values=vals)
    with pytest.raises(DataError, match="--episode N"):
        add_sensor(ds, tmp_path / "one.npz", clock_offset=-SENSOR_CLOCK)
    with caplog.at_level("WARNING"):
        add_sensor(ds, tmp_path / "one.npz", clock_offset=-SENSOR_CLOCK, episode=2, force_channels=1)
    assert "2 episode(s) have no sensor samples" in caplog.text
    meta = load_meta(ds)
    assert [r["has_sensor"] for r in meta.episodes] == [False, False, True] and meta.force_channels == 1
    d = EpisodeDataset(ds, cfg(ds), split="all")
    assert {d[i]["has_sensor"] for i in range(len(d)) if d[i]["episode_index"] < 2} == {False}


def _expect_refused(ds, src, *needles, **kw):
    before = snapshot(ds)
    with pytest.raises(DataError) as ei:
        add_sensor(ds, src, **kw)
    for n in needles:
        assert n in str(ei.value), str(ei.value)
    assert "Fix:" in str(ei.value)
    assert snapshot(ds) == before  # no partial output
    assert not [p for p in ds.rglob(".*") if p.name.endswith(".tmp")]


def test_bad_sensor_files_are_refused_without_partial_output(ds, tmp_path):
    rec = recording(ds)
    bad_ep = dict(rec)
    bad_ep[7] = rec[0]
    _expect_refused(ds, write_npz(tmp_path / "a.npz", bad_ep), "episode_index [7]", "0..2", clock_offset=-SENSOR_CLOCK)
    _expect_refused(ds, write_npz(tmp_path / "b.npz", rec), "clocks do not match", "--clock-offset -999.8")
    _expect_refused(ds, write_npz(tmp_path / "c.npz", rec), "--rate 100 Hz", clock_offset=-SENSOR_CLOCK, rate=100.0)
    nan = {k: (ts, v.copy()) for k, (ts, v) in rec.items()}
    nan[1][1][17, 2] = np.nan
    _expect_refused(
        ds, write_npz(tmp_path / "d.npz", nan), "episode_000001", "sample 17, column 2", clock_offset=-SENSOR_CLOCK
    )
    shuffled = {k: (ts[::-1].copy(), v) for k, (ts, v) in rec.items()}
    _expect_refused(ds, write_npz(tmp_path / "e.npz", shuffled), "not strictly increasing", clock_offset=-SENSOR_CLOCK)
    mixed = dict(rec)
    mixed[1] = recording(ds, episodes=[1], rate=2 * RATE)[1]
    _expect_refused(ds, write_npz(tmp_path / "f.npz", mixed), "episode rates differ", clock_offset=-SENSOR_CLOCK)
    (tmp_path / "g.csv").write_text("episode_index,timestamp,x\n0,1000.0,1\n0,abc,2\n")
    _expect_refused(ds, tmp_path / "g.csv", "line 3", clock_offset=-SENSOR_CLOCK)
    add_sensor(ds, write_npz(tmp_path / "ok.npz", rec), clock_offset=-SENSOR_CLOCK)
    _expect_refused(ds, tmp_path / "ok.npz", "already has a sidecar stream 'sensor'", "--overwrite")
    add_sensor(ds, tmp_path / "ok.npz", clock_offset=-SENSOR_CLOCK, overwrite=True)


def test_an_interrupted_attach_leaves_the_dataset_as_it_was(ds, tmp_path, monkeypatch):
    from sensorvla.data import sidecar

    src = write_npz(tmp_path / "ok.npz", recording(ds))
    before = snapshot(ds)
    calls = {"n": 0}
    real = sidecar.StreamWriter.add

    def crash(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed mid-way
        return real(self, *a, **kw)

    monkeypatch.setattr(sidecar.StreamWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        add_sensor(ds, src, clock_offset=-SENSOR_CLOCK)
    assert snapshot(ds) == before and load_meta(ds).sensor_keys == ["observation.force"]
    assert not [p for p in (ds / "streams").iterdir()] if (ds / "streams").exists() else True


def _attached(ds, tmp_path):
    add_sensor(ds, write_npz(tmp_path / "ok.npz", recording(ds)), clock_offset=-SENSOR_CLOCK)
    return ds / "streams" / "sensor" / "episodes.parquet"


def test_sidecar_whose_episode_index_does_not_match_is_refused(ds, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = _attached(ds, tmp_path)
    t = pq.read_table(index)
    e = t.column("episode_index").to_numpy().copy()
    e[2] = 9
    pq.write_table(t.set_column(0, "episode_index", pa.array(e)), index)
    with pytest.raises(DataError, match=r"episode_index \[9\].*episodes 0\.\.2") as ei:
        EpisodeDataset(ds, cfg(ds), split="all")
    assert str(index) in str(ei.value) and "Fix:" in str(ei.value)


def test_sidecar_whose_clock_does_not_match_is_refused(ds, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = _attached(ds, tmp_path)
    t = pq.read_table(index)
    k = t.schema.get_field_index("clock_offset_s")
    pq.write_table(t.set_column(k, "clock_offset_s", pa.array(np.zeros(t.num_rows))), index)  # the offset got lost
    with pytest.raises(DataError, match="clocks do not match") as ei:
        EpisodeDataset(ds, cfg(ds), split="all")
    assert "--clock-offset -999.8" in str(ei.value)  # as if the sensor had started with the episode


def test_sidecar_truncated_file_is_a_data_error(ds, tmp_path):
    _attached(ds, tmp_path)
    values = load_meta(ds).streams["sensor"].files(1)[1]
    values.write_bytes(values.read_bytes()[:200])
    with pytest.raises(DataError) as ei:  # memory-mapped when the dataset opens: refused at once
        EpisodeDataset(ds, cfg(ds), split="all")
    assert str(values) in str(ei.value) and "truncated" in str(ei.value)


def test_cli_add_sensor(ds, tmp_path):
    src = write_csv(tmp_path / "ft.csv", recording(ds))
    run = [sys.executable, "-m", "sensorvla.cli", "data", "add-sensor", "--dataset", str(ds), "--src", str(src)]
    bad = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 1 and "clocks do not match" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([*run, "--clock-offset", str(-SENSOR_CLOCK)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((ds / "meta" / "info.json").read_text())["sensorvla"]["streams"]["sensor"]["rate_hz"] == RATE


# --- issue 19: names are identifiers, paths stay inside the dataset ------------------------------------------
@pytest.mark.parametrize("name", ["../../victim_dir", "ABSOLUTE", "a/b", "..", ".hidden", ""])
def test_stream_names_that_would_leave_the_dataset_are_refused(ds, tmp_path, name):
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    name = str(victim) if name == "ABSOLUTE" else name
    if name == "../../victim_dir":  # from ds/streams/<name>: streams/../../victim_dir is tmp_path/victim_dir
        assert (ds / "streams" / name).resolve() == victim.resolve()
    before = snapshot(ds)
    src = write_npz(tmp_path / "ok.npz", recording(ds))
    with pytest.raises(DataError, match="stream name .* is not allowed: use 1-128 characters of letters") as ei:
        add_sensor(ds, src, clock_offset=-SENSOR_CLOCK, name=name, overwrite=True)
    assert "Fix:" in str(ei.value)
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(p.name for p in victim.iterdir()) == [
        "precious.txt"
    ]
    assert snapshot(ds) == before


def test_cli_add_sensor_with_a_climbing_name_exits_1_and_leaves_the_victim(ds, tmp_path):
    victim = tmp_path / "victim_dir"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    src = write_csv(tmp_path / "ft.csv", recording(ds))
    run = [sys.executable, "-m", "sensorvla.cli", "data", "add-sensor", "--dataset", str(ds), "--src", str(src)]
    run += ["--clock-offset", str(-SENSOR_CLOCK), "--name", "../../victim_dir", "--overwrite"]
    r = subprocess.run(run, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "is not allowed" in r.stderr and "Traceback" not in r.stderr
    assert (victim / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "field,value",
    [
        ("path", "../outside/chunk-{chunk_index:03d}/episode_{episode_index:06d}"),
        ("path", "ABSOLUTE/episode_{episode_index:06d}"),
        ("index", "../outside/episodes.parquet"),
        ("index", "ABSOLUTE/episodes.parquet"),
    ],
)
def test_sidecar_paths_outside_the_dataset_are_refused(ds, tmp_path, field, value):
    """A copy of the stream outside the dataset would be read if the declaration were followed."""
    _attached(ds, tmp_path)
    outside = ds.parent / "outside"
    shutil.copytree(ds / "streams" / "sensor", outside)
    value = value.replace("ABSOLUTE", str(outside))
    info_path = ds / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["sensorvla"]["streams"]["sensor"][field] = value
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="a dataset reads and writes only inside its folder") as ei:
        ds_ = EpisodeDataset(ds, cfg(ds), split="all")
        ds_[0]
    assert value.split("{")[0].removesuffix("episode_") in str(ei.value) and "Fix:" in str(ei.value)


def test_a_symlinked_stream_file_pointing_outside_is_refused(ds, tmp_path):
    _attached(ds, tmp_path)
    values = load_meta(ds).streams["sensor"].files(0)[1]
    outside = tmp_path / "elsewhere.npy"
    shutil.move(values, outside)
    values.symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        EpisodeDataset(ds, cfg(ds), split="all")


def test_an_attached_stream_with_an_encoder_is_a_declared_stream(ds, tmp_path):
    """`--encoder KIND`: the sensor joins as a stream of its own (window, tokens), beside the sensor tensor."""
    add_sensor(
        ds, write_csv(tmp_path / "imu.csv", recording(ds)), clock_offset=-SENSOR_CLOCK, name="imu", encoder="wrench"
    )
    d = EpisodeDataset(ds, cfg(ds), split="all")
    assert d.meta.sensor_keys == ["observation.force"] and [(s.name, s.kind, s.shape) for s in d.streams] == [
        ("imu", "wrench", (3,))
    ]
    s = d[5]
    assert s["sensor.imu"].shape == (10, 3) and s["sensor_mask.imu"].all()
    np.testing.assert_allclose(s["sensor.imu"][:, 0], window_grid(s["timestamp"], 0.05, 10), atol=1e-6)
