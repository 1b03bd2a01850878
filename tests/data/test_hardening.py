"""Issue 10 "Data": non-finite values, truncated arrays, stale temp folders, train-split stats, content fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta, write_dataset
from sensorvla.data.normalize import NormalizationError, NormStats, compute_stats, dataset_fingerprint
from sensorvla.data.types import DataError
from sensorvla.world.synth import SimConfig, generate_dataset, simulate_episode


@pytest.fixture
def small_ds(tmp_path):
    return generate_dataset(tmp_path / "ds", num_episodes=5, seed=3, no_sensor_fraction=0.0, progress=False)


def sensor_file(root, e, part=1):
    """The sidecar file of episode e's sensor values (part=1) or timestamps (part=0)."""
    return load_meta(root).streams["sensor"].files(e)[part]


def _poke(path, row, col, value):
    arr = np.load(path, mmap_mode="r+")
    arr[row, col] = value
    arr.flush()
    del arr


def test_loader_rejects_nan_sensor_naming_episode_stream_column_index(small_ds):
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.0, test_fraction=0.0)
    ds = EpisodeDataset(small_ds, cfg, split="all")
    e, i = ds.index[len(ds) // 2]
    t = float(ds._frame_ts[e][i])
    ts = np.load(sensor_file(small_ds, e, 0))
    row = int(np.searchsorted(ts, t, side="right")) - 3  # inside the window that ends at t
    _poke(sensor_file(small_ds, e), row, 4, np.nan)
    ds = EpisodeDataset(small_ds, cfg, split="all")
    with pytest.raises(DataError) as ei:
        ds[len(ds) // 2]
    msg = str(ei.value)
    name = load_meta(small_ds).episodes[e]["name"]
    assert name in msg and "sensor" in msg and "column 4" in msg and f"sample {row}" in msg and "Fix:" in msg
    with pytest.raises(DataError) as ei:  # `sensorvla stats` refuses too, instead of writing NaN
        compute_stats(small_ds, progress=False, data_cfg=cfg)
    assert name in str(ei.value) and "column 4" in str(ei.value)


def test_stats_reject_inf_state(small_ds):
    _poke(load_meta(small_ds).streams["observation.state"].files(1)[1], 7, 2, np.inf)
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as ei:
        compute_stats(small_ds, progress=False, data_cfg=cfg)
    msg = str(ei.value)
    assert "state" in msg and "column 2" in msg and "sample 7" in msg and "observation.state" in msg  # the file


def test_truncated_npy_is_a_data_error(small_ds):
    path = sensor_file(small_ds, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as ei:
        ds = EpisodeDataset(small_ds, cfg, split="all")
        for k in range(len(ds)):
            ds[k]
    assert str(path) in str(ei.value) or path.name in str(ei.value)
    assert "truncated" in str(ei.value) and "Fix:" in str(ei.value)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_are_cleaned_with_a_message(tmp_path, caplog):
    import socket

    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32]
    out = tmp_path / "imp"
    stale = tmp_path / f".imp.{host}-{_dead_pid()}.x1y2.tmp"
    (stale / "streams").mkdir(parents=True)
    legacy = tmp_path / ".imp.abc123_z.tmp"  # named by an older version: cleaned once it is old
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    live = tmp_path / f".imp.{host}-{os.getpid()}.live.tmp"  # a running writer's folder stays
    live.mkdir()
    other = tmp_path / ".other.abc.tmp"
    other.mkdir()
    ep = simulate_episode(0, SimConfig(image_size=16, sensor_channels=5), with_sensor=True, name="e0")
    with caplog.at_level("WARNING"):
        write_dataset([ep], out, dataset_id="x", action_fps=10, progress=False)
    assert not stale.exists() and not legacy.exists() and live.exists() and other.exists()
    assert str(stale) in caplog.text and "interrupted" in caplog.text


def test_an_atomic_json_write_cleans_a_dead_writers_temp_file(tmp_path, caplog):
    """`atomic_write_json` (metrics, info.json, norm stats) goes through `atomic_file`: a killed writer's temp
    sibling is removed, a live one's kept, and the file lands whole with no temp left of its own."""
    import socket

    from sensorvla.io import atomic_write_json

    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32]
    stale = tmp_path / f".m.json.{host}-{_dead_pid()}.x1y2.tmp"
    live = tmp_path / f".m.json.{host}-{os.getpid()}.live.tmp"
    stale.write_text("{")
    live.write_text("{")
    with caplog.at_level("WARNING"):
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert not stale.exists() and live.exists() and str(stale) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.json", live.name])


def test_stats_cover_the_training_split_only(tmp_path):
    root = generate_dataset(tmp_path / "ds", num_episodes=8, seed=1, progress=False)
    cfg = DataConfig(dataset_dir=str(root), val_fraction=0.25, test_fraction=0.25, split_seed=4)
    train = EpisodeDataset(root, cfg, split="train")
    stats = compute_stats(root, progress=False, data_cfg=cfg)
    acts = np.concatenate([train._actions[e] for e in train.episodes])
    np.testing.assert_allclose(stats.stats["actions"]["mean"], acts.mean(0), rtol=1e-5, atol=1e-6)
    assert stats.counts["actions"] == len(acts)
    fp = stats.fingerprint
    assert fp["split"]["name"] == "train" and fp["split"]["episodes"] == train.episodes
    assert fp["split"]["val_fraction"] == 0.25 and fp["split"]["seed"] == 4
    other = DataConfig(dataset_dir=str(root), val_fraction=0.25, test_fraction=0.25, split_seed=5)
    with pytest.raises(NormalizationError, match="recompute"):
        stats.check(dataset_fingerprint(root, data_cfg=other))
    stats.check(dataset_fingerprint(root, data_cfg=cfg))


def test_fingerprint_is_a_content_hash_with_a_cheap_cache(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import sensorvla.data.fingerprint as fpmod

    monkeypatch.setenv("SENSORVLA_CACHE_DIR", str(tmp_path / "cache"))
    root = generate_dataset(tmp_path / "ds", num_episodes=4, seed=2, progress=False)
    cfg = DataConfig(dataset_dir=str(root))
    stats = compute_stats(root, progress=False, data_cfg=cfg)
    stats.save(root / "meta" / "norm_stats.json")  # derived: does not change the fingerprint
    calls = []
    real = fpmod.file_sha256
    monkeypatch.setattr(fpmod, "file_sha256", lambda p: calls.append(p) or real(p))
    NormStats.load(root / "meta" / "norm_stats.json").check(dataset_fingerprint(root, data_cfg=cfg))
    assert calls == []  # unchanged files: stat() only, nothing re-read
    # a re-import with the same row counts but other values
    data = next((root / "data").rglob("*.parquet"))
    table = pq.read_table(data)
    acts = np.asarray(table.column("action").to_pylist(), np.float32)
    acts[3, 0] += 1.0
    col = pa.array(acts.tolist(), type=table.schema.field("action").type)
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", col), data)
    with pytest.raises(NormalizationError, match="recompute"):
        stats.check(dataset_fingerprint(root, data_cfg=cfg))
    assert [p.name for p in calls] == [data.name]  # only the changed file is hashed again


def test_vl_cache_key_follows_dataset_content(tmp_path, monkeypatch):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training.feature_cache import fingerprint, fingerprint_key

    monkeypatch.setenv("SENSORVLA_CACHE_DIR", str(tmp_path / "cache"))
    a = generate_dataset(tmp_path / "a", num_episodes=3, seed=2, progress=False)
    b = generate_dataset(tmp_path / "b", num_episodes=3, seed=9, progress=False)  # same counts? ids equal
    cfg = SensorVLAConfig()
    ids = np.arange(10)
    cfg.data.dataset_dir = str(a)
    ka = fingerprint_key(fingerprint(cfg, ids, "same_id"))
    cfg.data.dataset_dir = str(b)
    kb = fingerprint_key(fingerprint(cfg, ids, "same_id"))
    assert ka != kb
    cfg.data.dataset_dir = str(a)
    assert fingerprint_key(fingerprint(cfg, ids, "same_id")) == ka


# --- issue 19: the sidecar is checked on read; stats check every episode and decode every video ---------------
def _all_samples(root, **kw):
    cfg = DataConfig(dataset_dir=str(root), val_fraction=0.0, test_fraction=0.0, **kw)
    ds = EpisodeDataset(root, cfg, split="all")
    for k in range(0, len(ds), 7):
        ds[k]


def _rewrite_index(root, key, scale):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "streams" / key / "episodes.parquet"
    t = pq.read_table(path)
    for col in ("t_first", "t_last"):
        k = t.schema.get_field_index(col)
        t = t.set_column(k, col, pa.array(t.column(col).to_numpy() * scale))
    pq.write_table(t, path)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("nan timestamp", "timestamps hold NaN/inf (1 values; first at sample 40)"),
        ("swapped timestamps", "not strictly increasing (sample 40"),
        ("declared 650 Hz, data at 6500 Hz", "run at 65"),
        ("timestamps in ms", "timestamps in milliseconds? they must be in seconds"),
    ],
)
def test_sidecar_timestamps_are_checked_on_read(small_ds, case, needle):
    path = sensor_file(small_ds, 2, 0)
    ts = np.load(path)
    if case == "nan timestamp":
        ts[40] = np.nan
    elif case == "swapped timestamps":
        ts[40], ts[41] = ts[41], ts[40]
    elif case == "timestamps in ms":
        ts = ts * 1000.0
        _rewrite_index(small_ds, "sensor", 1000.0)
    else:  # 650 Hz declared, this episode's samples 10x as dense
        ts = ts[0] + (ts - ts[0]) / 10.0
    np.save(path, ts)
    with pytest.raises(DataError) as ei:
        _all_samples(small_ds)
    msg = str(ei.value)
    assert needle in msg and str(path) in msg and "Fix:" in msg, msg


def test_a_video_with_damaged_bytes_inside_fails_the_stats(small_ds):
    """2,000 random bytes inside an mp4 pass the header probe (and most samples); the stats decode every frame."""
    video = sorted((small_ds / "videos").rglob("*.mp4"))[0]
    raw = bytearray(video.read_bytes())
    at = len(raw) * 2 // 3
    raw[at : at + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    video.write_bytes(bytes(raw))
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError, match="does not decode completely") as ei:
        compute_stats(small_ds, progress=False, data_cfg=cfg)
    assert str(video) in str(ei.value) and "Fix:" in str(ei.value)


def test_an_absurd_sensor_value_is_refused_not_averaged(small_ds):
    _poke(sensor_file(small_ds, 1), 11, 3, 3e38)  # finite in float32; it would be the whole std
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as ei:
        compute_stats(small_ds, progress=False, data_cfg=cfg)
    msg = str(ei.value)
    assert "absurd" in msg and "sample 11, column 3: 3e+38" in msg and load_meta(small_ds).episodes[1]["name"] in msg


def test_nan_in_an_episode_outside_the_training_split_fails_the_stats(small_ds):
    cfg = DataConfig(dataset_dir=str(small_ds), val_fraction=0.2, test_fraction=0.2, split_seed=1)
    from sensorvla.data.dataset import split_episodes

    held_out = split_episodes(5, 1, 0.2, 0.2)["val"][0]
    _poke(sensor_file(small_ds, held_out), 5, 0, np.nan)
    with pytest.raises(DataError) as ei:
        compute_stats(small_ds, progress=False, data_cfg=cfg)
    assert load_meta(small_ds).episodes[held_out]["name"] in str(ei.value) and "NaN/inf" in str(ei.value)


# --- issue 19: file modes, stats outside the dataset, episodes that lost their sensor --------------------------
def _mode(p):
    return os.stat(p).st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_datasets_and_streams_we_write_get_the_umasks_mode(tmp_path, umask):
    from sensorvla.data.attach import add_sensor

    old = os.umask(umask)
    try:
        ep = simulate_episode(0, SimConfig(image_size=16, sensor_channels=5), with_sensor=True, name="e0")
        root = write_dataset([ep], tmp_path / "ds", dataset_id="x", action_fps=10, progress=False)
        ts = np.arange(0.0, 3.0, 0.01)
        src = tmp_path / "ft.npz"
        np.savez(src, episode_index=np.zeros(len(ts), int), timestamps=ts, values=np.sin(ts)[:, None])
        add_sensor(root, src, name="ft")
    finally:
        os.umask(old)
    folders = [root, root / "meta", root / "streams", root / "streams" / "sensor", root / "streams" / "ft"]
    assert {str(p): _mode(p) for p in folders} == {str(p): 0o777 & ~umask for p in folders}
    files = [root / "meta" / "info.json", root / "streams" / "ft" / "episodes.parquet"]
    files += sorted((root / "streams" / "ft").rglob("*.npy"))
    assert {str(p): _mode(p) for p in files} == {str(p): 0o666 & ~umask for p in files}


def test_training_computes_stats_into_the_cache_not_the_dataset(small_ds, tmp_path, monkeypatch):
    import hashlib

    import torch

    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.normalize import dataset_fingerprint
    from sensorvla.training.data_setup import cached_stats_path, ensure_stats
    from sensorvla.training.distributed import DistInfo

    monkeypatch.setenv("SENSORVLA_CACHE_DIR", str(tmp_path / "cache"))

    def snap():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(small_ds.rglob("*")) if p.is_file()}

    before = snap()
    cfg = SensorVLAConfig()
    cfg.data.dataset_dir, cfg.train.output_dir = str(small_ds), str(tmp_path / "run")
    stats = ensure_stats(cfg, DistInfo(0, 1, 0, torch.device("cpu")), progress=False)
    assert snap() == before  # nothing written into the user's dataset
    path = cached_stats_path(cfg, dataset_fingerprint(small_ds, cfg.data))
    assert path.parent == tmp_path / "cache" / "norm_stats" and NormStats.load(path).fingerprint == stats.fingerprint
    mtime = path.stat().st_mtime_ns
    ensure_stats(cfg, DistInfo(0, 1, 0, torch.device("cpu")), progress=False)  # a second run reuses them
    assert path.stat().st_mtime_ns == mtime


def _two_datasets(tmp_path):
    """A (3 episodes) and B = A without its episode 0, renumbered, as LeRobot's delete_episodes writes it."""
    cfg = SimConfig(image_size=16, sensor_channels=5)
    eps = [simulate_episode(s, cfg, with_sensor=s != 13, name=f"e{s}") for s in (11, 12, 13)]
    assert len({len(e.actions) for e in eps}) == 3  # the lengths tell the episodes apart
    a = write_dataset(eps, tmp_path / "a", dataset_id="a", action_fps=10, progress=False)
    b = write_dataset(eps[1:], tmp_path / "b", dataset_id="b", action_fps=10, progress=False)
    return a, b


def test_a_sidecar_copied_onto_renumbered_episodes_is_refused(tmp_path):
    import json
    import shutil

    a, b = _two_datasets(tmp_path)  # A's sensor covers its episodes 0 and 1, which B calls -, 0
    shutil.rmtree(b / "streams" / "sensor")
    shutil.copytree(a / "streams" / "sensor", b / "streams" / "sensor")  # the sensor copied back after the edit
    info = json.loads((b / "meta" / "info.json").read_text())
    info["sensorvla"]["streams"]["sensor"] = json.loads((a / "meta" / "info.json").read_text())["sensorvla"]["streams"][
        "sensor"
    ]
    (b / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="episodes were deleted, reordered or re-recorded") as ei:
        load_meta(b)
    assert "add-sensor" in str(ei.value) and "episodes.parquet" in str(ei.value)


def test_a_dataset_that_lost_its_sidecar_declaration_says_so(tmp_path, caplog):
    import json

    _, b = _two_datasets(tmp_path)
    info = json.loads((b / "meta" / "info.json").read_text())
    del info["sensorvla"]  # what LeRobot's tools write; the streams/ folder stays where it was edited in place
    (b / "meta" / "info.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        meta = load_meta(b)
    assert meta.sensor_channels == 0
    assert "does not declare" in caplog.text and "'sensor'" in caplog.text and "add-sensor" in caplog.text


def test_episodes_without_the_sensor_are_named_in_a_warning(tmp_path, caplog):
    root = generate_dataset(tmp_path / "ds", num_episodes=6, seed=2, no_sensor_fraction=0.5, progress=False)
    with caplog.at_level("WARNING"):
        meta = load_meta(root)
    missing = [e for e in range(6) if not meta.streams["sensor"].has(e)]
    assert missing and f"have no 'sensor' samples (episodes {missing}" in caplog.text
