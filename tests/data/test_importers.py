"""Importers: recorder episode folders and plain HDF5 -> native dataset, exact round trips and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from dataset_helpers import stream
from fixtures_importers import build_recorder_root, true_pose
from PIL import Image

from sensorvla.data.format import load_meta, read_frames
from sensorvla.data.importers import IMPORTERS, get_importer
from sensorvla.data.importers.hdf5 import import_hdf5, write_hdf5
from sensorvla.data.importers.recorder import import_recorder, rebuild_sensor_stream
from sensorvla.data.types import DataError
from sensorvla.world.examples import export_hdf5_example, iter_example_episodes


# --- helpers --------------------------------------------------------------------------------------------
def episode_actions(root: Path, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(N_a, D_a) actions and (N_a,) timestamps of episode `e` from the per-frame parquet."""
    t = read_frames(root).to_pydict()
    rows = [i for i, k in enumerate(t["episode_index"]) if k == e]
    return np.array([t["action"][i] for i in rows], np.float64), np.array([t["timestamp"][i] for i in rows])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def recorder_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorder") / "New_dataset"
    return root, build_recorder_root(root)


@pytest.fixture(scope="module")
def recorder_ds(recorder_src, tmp_path_factory):
    root, _ = recorder_src
    out = tmp_path_factory.mktemp("rec_out") / "ds"
    return import_recorder(root, out, progress=False, image_format="npy")  # lossless: frames compared exactly


@pytest.fixture
def rec_copy(recorder_src, tmp_path):
    """A private copy of the recorder tree that a test may damage."""
    root, truths = recorder_src
    dst = tmp_path / "src"
    shutil.copytree(root, dst)
    return dst, truths


def expect_error(fn, src, out, *needles):
    with pytest.raises(DataError) as ei:
        fn(src, out, progress=False)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert "Fix:" in msg, msg
    assert_nothing_written(out)
    return ei.value


# --- recorder round trip --------------------------------------------------------------------------------
def test_registry_resolves_both_importers():
    assert set(IMPORTERS) == {"recorder", "hdf5"}
    assert get_importer("recorder") is import_recorder and get_importer("hdf5") is import_hdf5
    with pytest.raises(ValueError, match="unknown importer"):
        get_importer("rosbag")


def test_recorder_meta_and_has_sensor(recorder_ds, recorder_src):
    meta = load_meta(recorder_ds)
    _, truths = recorder_src
    assert meta.views == ["View1", "View2"] and meta.action_fps == 10.0 and meta.action_dim == 7
    assert meta.state_dim == 6 and meta.sensor_channels == 1026 and meta.force_channels == 1
    assert meta.sensor_rate == 650.0
    assert [r["name"] for r in meta.episodes] == [t.name for t in truths]
    assert [r["has_sensor"] for r in meta.episodes] == [True, False]
    assert [r["instruction"] for r in meta.episodes] == [
        "Perform Blue point insertion task",
        "Perform Red point insertion task",
    ]
    off = meta.episodes[0]["clock_offsets"]
    assert off["sensor"] == 0.012 and off["image.View1"] == -0.004 and off["state"] == 0.0
    assert meta.streams["sensor"].has(0) and not meta.streams["sensor"].has(1)


def test_recorder_actions_are_pose_deltas_across_yaw_wrap(recorder_ds, recorder_src):
    _, truths = recorder_src
    for e, truth in enumerate(truths):
        actions, ts = episode_actions(recorder_ds, e)
        n = int(round(truth.robot_ts[-1] * 10))
        assert len(actions) == n
        grid = np.arange(n) * 0.1
        np.testing.assert_allclose(ts, grid, atol=1e-6)
        expected = true_pose(grid + 0.1, 0) - true_pose(grid, 0)  # yaw0 cancels out in the deltas
        np.testing.assert_allclose(actions[:, :6], expected, atol=2e-4)
        np.testing.assert_array_equal(actions[:, 6], 1.0)
        assert np.abs(actions[:, 5]).max() < 2.5  # 20 deg/s -> 2 deg per step, no 360 spike
    # the first episode's raw yaw does cross +180 -> -180
    raw = np.loadtxt(truths[0].path / "robot_states.csv", delimiter=",", skiprows=1)[:, -1]
    assert raw.max() > 179 and raw.min() < -179


def test_recorder_state_is_unwrapped_pose(recorder_ds, recorder_src):
    meta = load_meta(recorder_ds)
    truth = recorder_src[1][0]
    np.testing.assert_allclose(stream(meta, 0, "state_timestamps"), truth.robot_ts, atol=1e-6)
    np.testing.assert_allclose(stream(meta, 0, "state"), truth.pose, atol=1e-3)


def test_recorder_sensor_stream_rebuilt_exactly(recorder_ds, recorder_src):
    meta = load_meta(recorder_ds)
    truth = recorder_src[1][0]
    ts, data = stream(meta, 0, "sensor_timestamps"), stream(meta, 0, "sensor")
    assert data.shape == truth.sensor.shape == (650 + 130 * 5, 1026)  # every sample once
    np.testing.assert_array_equal(data, truth.sensor)
    np.testing.assert_allclose(ts, truth.sensor_ts, atol=1e-6)
    assert np.all(np.diff(ts) > 0)
    assert meta.episodes[0]["extra"] and '"sensor_overlap_mismatch_windows": 0' in meta.episodes[0]["extra"]


def test_recorder_images_match(recorder_ds, recorder_src):
    meta = load_meta(recorder_ds)
    for e, truth in enumerate(recorder_src[1]):
        for v in ("View1", "View2"):
            frames = stream(meta, e, f"image_{v}")
            np.testing.assert_allclose(stream(meta, e, f"image_{v}_timestamps"), truth.image_ts[v], atol=1e-6)
            first = sorted((truth.path / "images" / v).iterdir())[0]
            np.testing.assert_array_equal(frames[0], np.asarray(Image.open(first).convert("RGB")))
            assert np.abs(frames.astype(int) - truth.image_frames[v].astype(int)).max() <= 8  # JPEG loss


def test_recorder_single_episode_resize_joints_instruction(recorder_src, tmp_path):
    root, truths = recorder_src
    out = import_recorder(
        truths[0].path,
        tmp_path / "one",
        image_size=(8, 12),
        instruction="insert it",
        include_joints=True,
        progress=False,
        dataset_id="one",
    )  # video: 8x12 frames held on the 10 Hz action grid
    meta = load_meta(out)
    assert meta.dataset_id == "one" and len(meta.episodes) == 1 and meta.state_dim == 12
    assert stream(meta, 0, "image_View1").shape == (meta.episodes[0]["length"], 8, 12, 3)
    assert meta.episodes[0]["instruction"] == "insert it"
    np.testing.assert_allclose(
        stream(meta, 0, "state")[:, 6],
        np.loadtxt(truths[0].path / "robot_states.csv", delimiter=",", skiprows=1)[:, 4],
        atol=1e-5,
    )
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_recorder(truths[0].path, out, progress=False)
    assert import_recorder(truths[0].path, out, overwrite=True, views=["View2"], progress=False) == out
    assert load_meta(out).views == ["View2"]


def test_rebuild_handles_jitter_and_gaps_without_duplicates():
    rate, W = 650.0, 650
    rng = np.random.default_rng(0)
    stream_ = rng.normal(size=(3000, 3)).astype(np.float32)
    last = np.array([649, 779, 912, 1041, 2500])  # hops of 130, 133, 129 and a gap of > W samples
    w_ts = 5.0 + last / rate
    s_ts, data, mismatch = rebuild_sensor_stream(w_ts, (stream_[k - W + 1 : k + 1] for k in last), rate=rate)
    keep = np.r_[np.arange(0, 1042), np.arange(2500 - W + 1, 2501)]
    np.testing.assert_array_equal(data, stream_[keep])
    np.testing.assert_allclose(s_ts, 5.0 + keep / rate, atol=1e-9)
    assert mismatch == 0
    # windows that do not overlap sample for sample are counted (the nominal-rate assumption is off)
    _, _, mismatch = rebuild_sensor_stream(w_ts[:2], [stream_[0:650], stream_[200:850]], rate=rate)
    assert mismatch == 1


# --- recorder bad input ---------------------------------------------------------------------------------
EP0 = "Blue_point/episode_20240101_120000"
EP1 = "Red_point/episode_20240101_130000"


def _ep(src: Path, name: str = EP0) -> Path:
    return src / name


@pytest.mark.parametrize("missing", ["robot_states.csv", "metadata.json"])
def test_recorder_missing_file(rec_copy, tmp_path, missing):
    src, _ = rec_copy
    (_ep(src, EP1) / missing).unlink()
    expect_error(import_recorder, src, tmp_path / "out", EP1, missing, "missing")


def test_recorder_missing_source(tmp_path):
    expect_error(import_recorder, tmp_path / "nope", tmp_path / "out", "does not exist")


@pytest.mark.parametrize("target", ["robot_states.csv", "sensor_data.npz", "metadata.json", "image"])
def test_recorder_corrupt_file(rec_copy, tmp_path, target):
    src, _ = rec_copy
    path = sorted((_ep(src) / "images" / "View2").iterdir())[2] if target == "image" else _ep(src) / target
    path.write_bytes(b"\xff\xd8\x00\x13garbage\x9c\x00" * 7)
    expect_error(import_recorder, src, tmp_path / "out", EP0, path.name)


def test_recorder_truncated_npz_file(rec_copy, tmp_path):
    src, _ = rec_copy
    p = _ep(src) / "sensor_data.npz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expect_error(import_recorder, src, tmp_path / "out", EP0, "sensor_data.npz")


def test_recorder_csv_missing_columns_and_bad_line(rec_copy, tmp_path):
    src, _ = rec_copy
    csv_path = _ep(src) / "robot_states.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0], *lines[1:5], "1.0,abc", *lines[5:]]) + "\n")
    expect_error(import_recorder, src, tmp_path / "out", EP0, "line 6")
    csv_path.write_text("a,b\n1,2\n")
    expect_error(import_recorder, src, tmp_path / "out2", "lacks column", "origin_timestamp")


def _rewrite_npz(src: Path, **changes) -> None:
    p = _ep(src) / "sensor_data.npz"
    with np.load(p) as z:
        arrays = {"timestamps": z["timestamps"], "data": z["data"]}
    for k, fn in changes.items():
        arrays[k] = fn(arrays[k])
    np.savez(p, **arrays)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"timestamps": lambda t: t[:-1]}, "truncated"),
        ({"data": lambda d: d[:, :600]}, "sensor_window_size=650"),
        ({"timestamps": lambda t: t[[0, 2, 1, 3, 4, 5]]}, "not strictly increasing"),
        ({"data": lambda d: np.where(np.arange(650)[None, :, None] == 7, np.nan, d)}, "NaN/inf"),
        ({"data": lambda d: d * np.where(np.arange(6)[:, None, None] == 4, np.inf, 1)}, "window 4"),
    ],
)
def test_recorder_bad_sensor_arrays(rec_copy, tmp_path, change, needle):
    src, _ = rec_copy
    _rewrite_npz(src, **change)
    expect_error(import_recorder, src, tmp_path / "out", EP0, "sensor_data.npz", needle)


def test_recorder_refuses_pickled_sensor(rec_copy, tmp_path):
    src, _ = rec_copy
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((650, 4), np.float32), np.zeros((600, 4), np.float32)
    np.savez(_ep(src) / "sensor_data.npz", timestamps=np.array([1.0, 2.0]), data=ragged)
    expect_error(import_recorder, src, tmp_path / "out", EP0, "sensor_data.npz")


def test_recorder_non_monotonic_robot_clock(rec_copy, tmp_path):
    src, _ = rec_copy
    p = _ep(src, EP1) / "robot_states.csv"
    lines = p.read_text().splitlines()
    lines[10], lines[11] = lines[11], lines[10]
    p.write_text("\n".join(lines) + "\n")
    expect_error(
        import_recorder, src, tmp_path / "out", EP1, "goes backwards", "lines 11 -> 12"
    )  # 1-based, header = line 1


def test_recorder_view_missing_in_one_episode(rec_copy, tmp_path):
    src, _ = rec_copy
    shutil.rmtree(_ep(src, EP1) / "images" / "View2")
    err = expect_error(import_recorder, src, tmp_path / "out", EP1, "View2")  # listed in metadata
    assert "--views" in err.fix
    meta = _ep(src, EP1) / "metadata.json"
    meta.write_text(meta.read_text().replace('"View2", ', ""))  # not listed: caught across episodes
    err = expect_error(import_recorder, src, tmp_path / "out2", EP1, "View2", "missing")
    assert "['View1']" in err.fix
    assert import_recorder(src, tmp_path / "ok", views=["View1"], progress=False).exists()


def test_recorder_episode_shorter_than_horizon(rec_copy, tmp_path):
    src, _ = rec_copy
    expect_error(
        lambda s, o, **kw: import_recorder(s, o, min_actions=18, **kw),
        src,
        tmp_path / "out",
        EP1,
        "fewer than the horizon",
    )


def test_recorder_bad_image_name_and_empty_view(rec_copy, tmp_path):
    src, _ = rec_copy
    d = _ep(src) / "images" / "View1"
    first = sorted(d.iterdir())[0]
    first.rename(d / "frame.jpg")
    expect_error(import_recorder, src, tmp_path / "out", EP0, "frame.jpg")
    for p in d.iterdir():
        p.unlink()
    expect_error(import_recorder, src, tmp_path / "out2", EP0, "no frames")


# --- HDF5 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def h5_episodes():
    return list(iter_example_episodes(2, seed=3, image_size=16, sensor_channels=9, with_sensor=[True, False]))


@pytest.fixture(scope="module")
def h5_src(h5_episodes, tmp_path_factory):
    d = tmp_path_factory.mktemp("h5src")
    for ep in h5_episodes:
        write_hdf5(d / f"{ep.name}.h5", ep, action_fps=10.0, force_channels=1, sensor_rate=650.0)
    return d


def _check_h5_round_trip(out: Path, episodes, names) -> None:
    meta = load_meta(out)
    assert meta.views == sorted(episodes[0].images) and meta.action_fps == 10.0 and meta.sensor_rate == 650.0
    assert [r["name"] for r in meta.episodes] == names
    assert [r["has_sensor"] for r in meta.episodes] == [ep.sensor is not None for ep in episodes]
    for e, ep in enumerate(episodes):
        actions, ts = episode_actions(out, e)
        np.testing.assert_array_equal(actions.astype(np.float32), ep.actions)
        np.testing.assert_array_equal(stream(meta, e, "action_timestamps"), ep.action_timestamps)  # exact
        np.testing.assert_allclose(ts, np.arange(len(ts)) / 10.0, atol=1e-6)  # LeRobot's grid (float32)
        np.testing.assert_array_equal(stream(meta, e, "state"), ep.state)
        np.testing.assert_array_equal(stream(meta, e, "state_timestamps"), ep.state_timestamps)
        for v, s in ep.images.items():
            np.testing.assert_array_equal(stream(meta, e, f"image_{v}"), s.frames)
            np.testing.assert_array_equal(stream(meta, e, f"image_{v}_timestamps"), s.timestamps)
        if ep.sensor is not None:
            np.testing.assert_array_equal(stream(meta, e, "sensor"), ep.sensor)
            np.testing.assert_array_equal(stream(meta, e, "sensor_timestamps"), ep.sensor_timestamps)
        assert meta.episodes[e]["instruction"] == ep.instruction
        assert meta.episodes[e]["clock_offsets"]["image.front"] == ep.clock_offsets["image.front"]


def test_hdf5_round_trip_one_file_per_episode(h5_src, h5_episodes, tmp_path):
    out = import_hdf5(h5_src, tmp_path / "ds", progress=False, image_format="npy")
    _check_h5_round_trip(out, h5_episodes, [ep.name for ep in h5_episodes])
    assert load_meta(out).sensor_channels == 9


def test_hdf5_round_trip_grouped_file_and_resize(h5_episodes, tmp_path):
    f = write_hdf5(tmp_path / "all.h5", h5_episodes, action_fps=10.0, sensor_rate=650.0)
    out = import_hdf5(f, tmp_path / "ds", progress=False, image_format="npy")
    _check_h5_round_trip(out, h5_episodes, [f"all/{ep.name}" for ep in h5_episodes])
    small = import_hdf5(f, tmp_path / "small", image_size=8, instruction="do it", progress=False)
    meta = load_meta(small)
    assert stream(meta, 0, "image_front").shape[1:] == (8, 8, 3) and meta.cameras["front"].storage == "video"
    assert {r["instruction"] for r in meta.episodes} == {"do it"}


def test_export_hdf5_example_imports(tmp_path):
    files = export_hdf5_example(tmp_path / "ex", num_episodes=2, image_size=16, sensor_channels=5)
    assert [p.name for p in files] == ["example_0000.h5", "example_0001.h5"]
    assert not [p for p in (tmp_path / "ex").iterdir() if p.suffix == ".tmp"]
    meta = load_meta(import_hdf5(tmp_path / "ex", tmp_path / "ds", progress=False))
    assert meta.sensor_channels == 5 and len(meta.episodes) == 2


def _bad_h5(tmp_path, h5_episodes, mutate, name="ep"):
    """A source folder with episode 0 valid and episode 1 mutated (EpisodeData -> EpisodeData)."""
    import copy

    src = tmp_path / "h5bad"
    src.mkdir()
    good = h5_episodes[0]
    write_hdf5(src / "a.h5", good, action_fps=10.0)
    write_hdf5(src / f"{name}.h5", mutate(copy.deepcopy(good)), action_fps=10.0)
    return src


def _set(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)
    return obj


@pytest.mark.parametrize(
    ("mutate", "needles"),
    [
        (lambda ep: _set(ep, sensor_timestamps=ep.sensor_timestamps[:-3]), ["/sensor", "truncated"]),
        (
            lambda ep: _set(ep, state_timestamps=ep.state_timestamps[::-1].copy()),
            ["/state", "not strictly increasing"],
        ),
        (
            lambda ep: _set(ep, sensor=np.where(np.arange(len(ep.sensor))[:, None] == 11, np.inf, ep.sensor)),
            ["/sensor/data", "NaN/inf", "sample 11"],
        ),
        (
            lambda ep: _set(ep, sensor=np.where(np.arange(len(ep.sensor))[:, None] == 3, np.nan, ep.sensor)),
            ["NaN/inf", "sample 3"],
        ),
        (lambda ep: _set(ep, images={"front": ep.images["front"]}), ["['top']", "missing"]),
        (
            lambda ep: _set(ep, actions=ep.actions[:5], action_timestamps=ep.action_timestamps[:5]),
            ["fewer than the horizon"],
        ),
    ],
)
def test_hdf5_bad_input(tmp_path, h5_episodes, mutate, needles):
    src = _bad_h5(tmp_path, h5_episodes, mutate)
    expect_error(import_hdf5, src, tmp_path / "out", "'ep'", *needles)


def test_hdf5_corrupt_and_missing(tmp_path, h5_episodes):
    import h5py

    src = _bad_h5(tmp_path, h5_episodes, lambda ep: ep)
    good = (src / "ep.h5").read_bytes()
    (src / "ep.h5").write_bytes(b"\x89HDF garbage\x00" * 50)
    expect_error(import_hdf5, src, tmp_path / "o1", "ep.h5", "corrupt")
    (src / "ep.h5").write_bytes(good[: len(good) // 3])  # truncated file
    expect_error(import_hdf5, src, tmp_path / "o2", "ep.h5")
    (src / "ep.h5").write_bytes(good)
    with h5py.File(src / "ep.h5", "a") as f:
        del f["state"]
    expect_error(import_hdf5, src, tmp_path / "o3", "'ep'", "state", "missing")
    expect_error(import_hdf5, tmp_path / "nothing", tmp_path / "o4", "does not exist")
    (src / "ep.h5").write_bytes(good)
    with h5py.File(src / "ep.h5", "a") as f:
        del f["images/top/data"]
        f["images/top/data"] = np.zeros((len(f["images/top/timestamps"]), 4, 4, 3), np.float32)
    expect_error(import_hdf5, src, tmp_path / "o5", "'ep'", "uint8")


def test_hdf5_instruction_required_and_rates_inferred(tmp_path, h5_episodes):
    import h5py

    src = _bad_h5(tmp_path, h5_episodes, lambda ep: ep)
    for p in src.iterdir():
        with h5py.File(p, "a") as f:
            del f.attrs["action_fps"]  # _bad_h5 writes no sensor rate either: both are inferred
    with h5py.File(src / "ep.h5", "a") as f:
        del f.attrs["instruction"]
    expect_error(import_hdf5, src, tmp_path / "out", "'ep'", "instruction", "--instruction")
    meta = load_meta(import_hdf5(src, tmp_path / "ok", instruction="go", progress=False))
    assert meta.action_fps == pytest.approx(10.0) and meta.sensor_rate == pytest.approx(
        650.0, rel=0.01
    )  # jittered clock


def test_recorder_drops_repeated_robot_timestamps(rec_copy, tmp_path, caplog):
    src, truths = rec_copy
    p = _ep(src, EP1) / "robot_states.csv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([*lines[:20], lines[19], *lines[20:]]) + "\n")  # one row recorded twice
    with caplog.at_level("WARNING"):
        out = import_recorder(src, tmp_path / "out", progress=False)
    assert "dropped 1 robot rows" in caplog.text
    np.testing.assert_allclose(stream(load_meta(out), 1, "state_timestamps"), truths[1].robot_ts, atol=1e-6)


def test_one_episode_interface_import_source_equals_the_written_dataset(h5_src, tmp_path):
    """An importer's source and the LeRobot source of what it wrote serve the same streams (npy frames)."""
    from sensorvla.data.importers.hdf5 import scan_hdf5_source
    from sensorvla.data.source import EpisodeSource, LeRobotSource

    src = scan_hdf5_source(h5_src)
    out = import_hdf5(h5_src, tmp_path / "ds", progress=False, image_format="npy")
    back = LeRobotSource.open(out)
    assert isinstance(src, EpisodeSource) and isinstance(back, EpisodeSource)
    assert len(src) == len(back) == 2
    for i in range(len(src)):
        a, b = src.load(i), back.load(i)
        assert a.name == b.name and a.instruction == b.instruction
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.action_timestamps, b.action_timestamps)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.state_timestamps, b.state_timestamps)
        assert (a.sensor is None) == (b.sensor is None)
        if a.sensor is not None:
            np.testing.assert_array_equal(a.sensor, b.sensor)
        for v in a.images:
            np.testing.assert_array_equal(a.images[v].frames, np.asarray(b.images[v].frames))
        assert {k: v for k, v in b.clock_offsets.items() if v} == {k: v for k, v in a.clock_offsets.items() if v}


def test_importers_share_one_options_dataclass(h5_src, tmp_path):
    """`ImportOptions` are both importers' keywords and the CLI's flags: an option outside it is refused before
    anything is written, and the recorder's own `include_joints` is not an HDF5 option."""
    import dataclasses

    from sensorvla.data.options import ImportOptions

    names = {f.name for f in dataclasses.fields(ImportOptions)}
    assert names == {"instruction", "image_size", "min_actions", "views", "overwrite", "image_format"}
    with pytest.raises(TypeError, match="include_joints"):
        import_hdf5(h5_src, tmp_path / "ds", include_joints=True, progress=False)
    assert not (tmp_path / "ds").exists()


def test_a_foreign_read_error_becomes_a_data_error(tmp_path):
    """`as_data_error`: the importers' one way to report a corrupt input (chained); a DataError passes unchanged."""
    from sensorvla.data.types import as_data_error

    failing = as_data_error(KeyError, lambda e: f"cannot read x ({type(e).__name__}: {e})", episode="e", path=tmp_path)
    with pytest.raises(DataError, match=r"cannot read x \(KeyError: 'k'\)") as ei, failing:
        {}["k"]
    assert ei.value.episode == "e" and ei.value.path == str(tmp_path) and isinstance(ei.value.__cause__, KeyError)
    inner = DataError("already precise", fix="f")
    with pytest.raises(DataError) as ei, as_data_error(ValueError, "outer"):
        raise inner
    assert ei.value is inner


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "is empty (no header row)"),
        ("t,a\n0,1\n2\n", "line 3 has 1 fields, the header 2"),
        ("t,a\n0,1\n\n1,x\n", "line 4 is not numeric"),  # the file's own line number, blank lines counted
    ],
)
def test_numeric_csv_errors_name_the_line(tmp_path, text, needle):
    """The one CSV reader of the recorder's robot states and `add-sensor`: a bad file names its line and the fix."""
    from sensorvla.data.importers._common import read_numeric_csv

    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(DataError, match="Fix: re-export") as ei:
        read_numeric_csv(path, what="sensor CSV", fix="re-export it")
    assert needle in str(ei.value) and str(path) in str(ei.value)
    path.write_text("\ufefft,a\n0,1\n\n1,2\n")  # a byte-order mark and a blank line are fine
    header, table = read_numeric_csv(path, what="sensor CSV", fix="re-export it")
    assert header == ["t", "a"] and table.tolist() == [[0.0, 1.0], [1.0, 2.0]]
