"""VL token modes through the stage-1 cache: cached == uncached for every mode, masks respected, the disk
budget, float16 overflow, the size print, and resuming a killed build."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.policy import build_policy
from sensorvla.training import feature_cache
from sensorvla.training.feature_cache import StaleCacheError
from sensorvla.training.loop import train

MODES = ["grid", "all", "view_mean", "resampler"]


def mode_cfg(vl_dir, data_dir, out, pooling, **train_kw) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.backbone.pooling = pooling
    cfg.model.backbone.grid_size = 2
    cfg.data.dataset_dir = str(data_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 8
    cfg.train.grad_accum_steps = 1
    cfg.train.epochs = 1
    cfg.train.log_every_steps = 1
    cfg.train.tensorboard = False
    cfg.train.use_cache = "never"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def build(cfg: SensorVLAConfig, dtype: str) -> Path:
    b = copy.deepcopy(cfg)
    b.train.mode, b.train.cache_dtype = "cache", dtype
    return Path(train(b, progress=False)["cache_dir"])


@pytest.mark.parametrize("pooling", MODES)
def test_cached_equals_uncached_for_every_token_mode(tmp_path, tiny_vl_dir, synth_dataset_dir, pooling):
    plain = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "plain", pooling, max_steps=3)
    train(plain, progress=False)
    ref = losses(tmp_path / "plain")
    # float32: only the batch composition differs (padding to another length changes the matmul blocking)
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-3)):
        cached = copy.deepcopy(plain)
        cached.train.output_dir = str(tmp_path / f"cached_{dtype}")
        folder = build(cached, dtype)
        assert (folder / "shard-0-of-1.feats.bin").stat().st_size > 0
        cached.train.use_cache, cached.train.cache_dtype = "always", dtype
        train(cached, progress=False)
        got = losses(tmp_path / f"cached_{dtype}")
        assert got.keys() == ref.keys() == {1, 2, 3}
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=tol, abs=tol), (dtype, step)


def _policy_and_batch(vl_dir, data_dir, pooling, n=4):
    from sensorvla.data.normalize import compute_stats
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.processor import PolicyProcessor, collate
    from sensorvla.training.data_setup import build_normalizer, raw_dataset

    cfg = resolve_from_meta(mode_cfg(vl_dir, data_dir, data_dir, pooling), load_meta(data_dir))
    policy = build_policy(cfg).eval()
    bb = cfg.model.backbone
    proc = load_processor(bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    tf = PolicyProcessor(build_normalizer(compute_stats(data_dir, progress=False), cfg), proc, "{instruction}", 6)
    ds = raw_dataset(cfg, "all")
    return policy, collate([tf(ds[i]) for i in range(n)], pad_token_id(proc)), cfg


@pytest.mark.parametrize("pooling", ["grid", "all"])
def test_token_layout_positions_and_masks(tiny_vl_dir, synth_dataset_dir, pooling):
    policy, batch, cfg = _policy_and_batch(tiny_vl_dir, synth_dataset_dir, pooling)
    bb = policy.backbone
    with torch.no_grad():
        vl = bb.encode(batch)
    b, v = batch["input_ids"].shape[0], cfg.model.num_views
    per_view = int(batch["image_grid_thw"][0].prod()) // 4  # merged tokens of one view
    n_img = v * (cfg.model.backbone.grid_size**2 if pooling == "grid" else per_view)
    assert vl.feats.shape == (b, n_img + 1, bb.hidden_size) and vl.mask.shape == (b, n_img + 1)
    assert bb.num_tokens == (n_img + 1 if pooling == "grid" else None)
    views = vl.pos[..., 0]
    assert set(views[0].tolist()) == {*range(v), -1.0} and (views[:, -1] == -1).all()
    rc = vl.pos[:, :-1, 1:]
    assert (rc > 0).all() and (rc < 1).all()  # cell centres inside [0, 1]
    # every view's tokens cover its grid exactly once
    k = int(round((n_img / v) ** 0.5))
    cells = {tuple(x) for x in (rc[0, : k * k] * k - 0.5).round().long().tolist()}
    assert cells == {(i, j) for i in range(k) for j in range(k)}
    if pooling == "grid":  # the fixed layout is recoverable without the stored positions
        torch.testing.assert_close(bb.default_positions(vl.feats), vl.pos)


def test_all_mode_masks_padding_and_changing_one_view_changes_only_its_tokens(tiny_vl_dir, synth_dataset_dir):
    policy, batch, _ = _policy_and_batch(tiny_vl_dir, synth_dataset_dir, "all", n=2)
    bb = policy.backbone
    with torch.no_grad():
        vl = bb.encode(batch)
        # padded rows: garbage behind a False mask never reaches the head
        feats = torch.cat([vl.feats, torch.full_like(vl.feats[:, :3], 1e4)], 1)
        mask = torch.cat([vl.mask, torch.zeros_like(vl.mask[:, :3])], 1)
        pos = torch.cat([vl.pos, torch.zeros_like(vl.pos[:, :3])], 1)
        out = policy.head.sample(*policy.fusion(*bb.project(feats, mask, pos)))
        ref = policy.head.sample(*policy.fusion(*bb.project(*vl)))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("pooling", ["grid", "all", "view_mean"])
def test_view_keep_masks_exactly_that_views_tokens(tiny_vl_dir, synth_dataset_dir, pooling):
    policy, batch, cfg = _policy_and_batch(tiny_vl_dir, synth_dataset_dir, pooling, n=2)
    bb = policy.backbone
    with torch.no_grad():
        vl = bb.encode(batch)
        keep = torch.tensor([[True, False], [False, True]])
        _, mask = bb.project(*vl, view_keep=keep)
        views = bb.token_views(vl.feats, vl.pos)
    for i in range(2):
        for t in range(vl.feats.shape[1]):
            v = int(views[i, t])
            expected = bool(vl.mask[i, t]) and (v == cfg.model.num_views or bool(keep[i, v]))
            assert bool(mask[i, t]) == expected


def test_feature_layer_selects_the_hidden_state(tiny_vl_dir, synth_dataset_dir):
    from sensorvla.config import BackboneConfig
    from sensorvla.models.backbone import VLBackbone

    policy, batch, _ = _policy_and_batch(tiny_vl_dir, synth_dataset_dir, "grid", n=1)
    hf = policy.backbone.model
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        states = hf(**{k: batch[k] for k in keys if k in batch}, output_hidden_states=True).hidden_states
        for layer in (0, 1, -1, -2, -3):  # negative ones count from the end of the full stack
            bb = VLBackbone(type("M", (), {"model": hf, "config": hf.config})(), BackboneConfig(feature_layer=layer), 2)
            got = bb._base_forward(batch)
            want = states[layer] if layer != -1 else hf(**{k: batch[k] for k in keys if k in batch}).last_hidden_state
            torch.testing.assert_close(got, want)
    assert not torch.allclose(states[0], states[-1])
    # layers past the feature layer are skipped when nothing there needs gradients, and run when something does
    layers, ran = hf.language_model.layers, []
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(layers)]
    bb = VLBackbone(type("M", (), {"model": hf, "config": hf.config})(), BackboneConfig(feature_layer=0), 2)
    with torch.no_grad():
        torch.testing.assert_close(bb._base_forward(batch), states[0])
    assert ran == [0] and hf.language_model.layers is layers
    ran.clear()
    layers[1].mlp.down_proj.weight.requires_grad_(True)
    bb._base_forward(batch)
    assert ran == [0, 1]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="feature-layer 9 is outside"):
        VLBackbone(type("M", (), {"model": hf, "config": hf.config})(), BackboneConfig(feature_layer=9), 2)


def test_cache_prints_its_size_and_refuses_past_the_budget(tmp_path, tiny_vl_dir, synth_dataset_dir, capsys):
    cfg = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, "all")
    cfg.train.cache_max_gb = 1e-6  # 1 kB
    with pytest.raises(StaleCacheError, match="--train.cache-max-gb"):
        build(cfg, "float16")
    printed = capsys.readouterr().out
    assert "[vl-cache]" in printed and "MB on disk" in printed and "--train.cache-max-gb" in printed
    assert not list((tmp_path / "vl_cache").rglob("*.bin"))  # refused before anything was written
    cfg.train.cache_max_gb = 50.0
    folder = build(cfg, "float16")
    fp = json.loads((folder / "meta.json").read_text())
    size = sum(f.stat().st_size for f in folder.glob("*.bin"))
    index = json.loads((folder / "shard-0-of-1.index.json").read_text())
    n = len(index["ids"])
    est = feature_cache.estimate_bytes(n, index["offsets"][-1] / n, fp["hidden_size"], "float16")
    assert size == est  # what is printed is what lands on disk (no padding is stored)


def test_float16_overflow_names_bfloat16(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    from sensorvla.models.backbone import VLBackbone

    real = VLBackbone.encode

    def huge(self, batch):
        vl = real(self, batch)
        return vl._replace(feats=vl.feats * 1e6)

    monkeypatch.setattr(VLBackbone, "encode", huge)
    with pytest.raises(StaleCacheError, match="cache-dtype bfloat16"):
        build(mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, "grid"), "float16")


def test_killed_build_resumes_to_the_same_cache(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    cfg = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "once", "all")
    whole = build(cfg, "float16")
    cut = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "cut", "all")
    calls = {"n": 0}
    real = feature_cache._ShardWriter.append

    def die_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            self.files["feats"].write(b"torn tail")  # a partial write the index never recorded
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(feature_cache._ShardWriter, "append", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(cut, "float16")
    with pytest.raises(StaleCacheError, match="partial"):
        train(dict_replace(cut, use_cache="always"), progress=False)
    monkeypatch.setattr(feature_cache._ShardWriter, "append", real)
    folder = build(cut, "float16")
    for part in ("feats", "pos", "mask"):
        assert (folder / f"shard-0-of-1.{part}.bin").read_bytes() == (whole / f"shard-0-of-1.{part}.bin").read_bytes()
    a = json.loads((folder / "shard-0-of-1.index.json").read_text())
    b = json.loads((whole / "shard-0-of-1.index.json").read_text())
    assert a == b


def dict_replace(cfg: SensorVLAConfig, **train_kw) -> SensorVLAConfig:
    out = copy.deepcopy(cfg)
    for k, v in train_kw.items():
        setattr(out.train, k, v)
    return out


def test_lookup_pads_and_masks_variable_rows(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    writer = feature_cache._ShardWriter(folder / "shard-0-of-1", "float32")
    feats = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[True, True, False, False], [True, False, True, False]])
    writer.append([7, 9], feats, mask, np.zeros((2, 4, 3), np.float32))
    writer.close()
    meta = {"fingerprint": {"cache_dtype": "float32"}, "world_size": 1, "shard_sizes": [2], "hidden_size": 3}
    cache = feature_cache.FeatureCache(folder, meta)
    f, m, _ = cache.lookup(torch.tensor([9, 7]))
    assert f.shape == (2, 3, 3)  # row 9 keeps its masked middle token; trailing padding is not stored
    assert m.tolist() == [[True, False, True], [True, True, False]]
    torch.testing.assert_close(f[0], torch.from_numpy(feats[1, :3]))
    torch.testing.assert_close(f[1, :2], torch.from_numpy(feats[0, :2]))
    with pytest.raises(StaleCacheError, match="not in the VL cache"):
        cache.lookup(torch.tensor([8]))


def test_samples_sharing_a_camera_frame_share_one_cache_row(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """5 Hz cameras, 10 Hz actions: every camera frame set is encoded once, and each sample reads its own."""
    from sensorvla.data.dataset import EpisodeDataset

    cfg = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, "grid")
    folder = build(cfg, "float32")
    ds = EpisodeDataset(synth_dataset_dir, cfg.data, split="all", load_images=False)
    keys = [ds.vl_key(i) for i in range(len(ds))]
    rows = len(json.loads((folder / "shard-0-of-1.index.json").read_text())["ids"])
    assert rows == len(set(keys)) < len(ds) * 0.6
    meta = json.loads((folder / "meta.json").read_text())
    cache = feature_cache.FeatureCache(folder, meta)
    assert len(cache) == len(ds)
    policy, batch, _ = _policy_and_batch(tiny_vl_dir, synth_dataset_dir, "grid", n=6)
    with torch.no_grad():
        direct = policy.backbone.encode(batch)
    feats, mask, pos = cache.lookup(batch["sample_id"])
    torch.testing.assert_close(feats, direct.feats, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, direct.mask)


def test_cached_stage1_says_it_cannot_augment(tmp_path, tiny_vl_dir, synth_dataset_dir, capfd):
    cfg = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, "grid", max_steps=1)
    build(cfg, "float16")
    cfg.train.use_cache, cfg.train.cache_dtype = "always", "float16"
    cfg.data.augment.enabled = True
    train(cfg, progress=False)
    err = capfd.readouterr().err
    assert "NO image augmentation is applied" in err and "--train.use-cache never" in err


def test_preloaded_cached_stage1_equals_the_lazy_loader(tmp_path, tiny_vl_dir, synth_dataset_dir):
    lazy = mode_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "lazy", "all", max_steps=4, preload_max_gb=0.0)
    build(lazy, "float16")
    lazy.train.use_cache, lazy.train.cache_dtype = "always", "float16"
    fast = dict_replace(lazy, preload_max_gb=2.0)
    fast.train.output_dir = str(tmp_path / "fast")
    fast.train.cache_dir = str(tmp_path / "lazy" / "vl_cache")
    train(lazy, progress=False)
    train(fast, progress=False)
    a, b = losses(tmp_path / "lazy"), losses(tmp_path / "fast")
    assert a.keys() == {1, 2, 3, 4} and a == b  # the same batches, bit for bit


def _edit_config_json(cfg, args):
    """The same local folder with another config.json of the same size and mtime: only its content differs."""
    import os

    path = Path(cfg.model.backbone.vl_model) / "config.json"
    st, text = path.stat(), path.read_text()
    i = next(i for i, ch in enumerate(text) if ch.isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _grow_weights(cfg, args):
    with (Path(cfg.model.backbone.vl_model) / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 8)


KEY_CHANGES = {
    "vl_model (another folder, the same files)": lambda cfg, a: setattr(cfg.model.backbone, "vl_model", a["twin"]),
    "revision": lambda cfg, a: setattr(cfg.model.backbone, "revision", "v2"),
    "local config.json content": _edit_config_json,
    "model files (weights of another size)": _grow_weights,
    "dtype": lambda cfg, a: setattr(cfg.model.backbone, "dtype", "bfloat16"),
    "dtype auto on CUDA (bf16)": lambda cfg, a: a.update(device="cuda"),
    "attn_implementation": lambda cfg, a: setattr(cfg.model.backbone, "attn_implementation", "eager"),
    "min_pixels": lambda cfg, a: setattr(cfg.model.backbone, "min_pixels", 28 * 28),
    "max_pixels": lambda cfg, a: setattr(cfg.model.backbone, "max_pixels", 112 * 112),
    "prompt_template": lambda cfg, a: setattr(cfg.model.backbone, "prompt_template", "do: {instruction}"),
    "pooling": lambda cfg, a: setattr(cfg.model.backbone, "pooling", "view_mean"),
    "grid_size": lambda cfg, a: setattr(cfg.model.backbone, "grid_size", 3),
    "feature_layer": lambda cfg, a: setattr(cfg.model.backbone, "feature_layer", 1),
    "cache_dtype": lambda cfg, a: setattr(cfg.train, "cache_dtype", "bfloat16"),
    "views": lambda cfg, a: setattr(cfg.data, "views", ("cam_a",)),
    "image_staleness_s": lambda cfg, a: setattr(cfg.data, "image_staleness_s", 0.25),
    "dataset_id": lambda cfg, a: a.update(dataset_id="another"),
    "sample ids": lambda cfg, a: a.update(ids=np.arange(11)),
}


@pytest.mark.parametrize("change", sorted(KEY_CHANGES))
def test_each_cache_key_ingredient_changes_the_key(tmp_path, tiny_vl_dir, monkeypatch, change):
    """Issue 19: the key stored the unresolved dtype `auto`, omitted the attention implementation and the
    resolved revision, and no test noticed dropping the pixel bounds or the pooling. Each ingredient matters."""
    import shutil

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what `auto` means on a CUDA device
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    vl = shutil.copytree(tiny_vl_dir, tmp_path / "vl")
    twin = shutil.copytree(tiny_vl_dir, tmp_path / "twin")
    cfg = SensorVLAConfig()
    # grid_size matters for the grid pooling only; the pooling change starts from "all" (its grid_size is None)
    cfg.model.backbone.vl_model = str(vl)
    cfg.model.backbone.pooling = "grid" if change == "grid_size" else "all"
    cfg.data.views = ("cam_a", "cam_b")
    args = {"ids": np.arange(10), "dataset_id": "ds", "device": "cpu", "twin": str(twin)}

    def key(cfg, args):
        return feature_cache.fingerprint_key(
            feature_cache.fingerprint(cfg, args["ids"], args["dataset_id"], args["device"])
        )

    before = key(cfg, args)
    assert key(copy.deepcopy(cfg), dict(args)) == before  # deterministic
    KEY_CHANGES[change](cfg, args)
    assert key(cfg, args) != before, f"changing {change} leaves the VL cache key unchanged"


def test_cache_key_resolves_auto(tmp_path):
    """`auto` on CPU is float32: the same key as asking for float32 (a hub id's commit: tests/test_hub.py)."""
    cfg = SensorVLAConfig()
    ids = np.arange(4)

    def key(c):
        return feature_cache.fingerprint_key(feature_cache.fingerprint(c, ids, "ds", "cpu"))

    fp32 = copy.deepcopy(cfg)
    fp32.model.backbone.dtype = "float32"
    assert cfg.model.backbone.dtype == "auto" and key(cfg) == key(fp32)
