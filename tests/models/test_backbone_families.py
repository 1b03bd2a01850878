"""The backbone-family seam (models/backbones/): a second family, Idefics3, built offline and run through the same
paths as Qwen (stage 1 from the VL feature cache, stage 2 with LoRA, serving); the registry's named error; the
Qwen cache key pinned."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sensorvla.config import BackboneConfig, SensorVLAConfig  # noqa: E402
from sensorvla.models import backbones  # noqa: E402
from sensorvla.models.backbone import (  # noqa: E402
    VLBackbone,
    collate_vl,
    detect_family,
    load_processor,
    load_vl_model,
    pad_token_id,
    process_sample,
)
from sensorvla.training import feature_cache  # noqa: E402
from sensorvla.training.loop import train  # noqa: E402
from sensorvla.world.tiny_qwen import build_tiny_qwen_vl, tiny_families  # noqa: E402

PX = 112 * 112  # Idefics3 views: 112 px, patch 14, pixel shuffle 2 -> 4 x 4 tokens each


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory):
    """A tiny random Idefics3 (Llama text model, SigLIP-style vision tower) with a locally trained tokenizer."""
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("idefics3") / "idefics3", "idefics3", max_pixels=PX)


def _cfg(vl_dir, data_dir, out, **train_kw) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.backbone.grid_size = 2
    cfg.data.dataset_dir = str(data_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps = 16, 1
    cfg.train.log_every_steps = 1
    cfg.train.tensorboard = False
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


# ------------------------------------------------------------------------------------------------ registry


def test_unknown_model_type_names_the_families_and_how_to_add_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(backbones.UnknownFamilyError) as err:
        detect_family(str(tmp_path))
    msg = str(err.value)
    assert "'llava'" in msg and "idefics3" in msg and "qwen2_5_vl" in msg
    assert "models/backbones/<family>.py" in msg and "ADAPTERS" in msg
    assert isinstance(err.value, backbones.BackboneLoadError)  # the CLI's one error path for a backbone


def test_tiny_model_cli_builds_the_second_family(tmp_path, capsys):
    from sensorvla.cli.demo import tiny_model

    assert "idefics3" in tiny_families()
    assert tiny_model(tmp_path / "m", family="idefics3", image_size=56) == 0
    assert detect_family(str(tmp_path / "m")) == "idefics3"
    assert "64 px -> 2x2, 112 px -> 2x2" in capsys.readouterr().out  # one 56 px image per view
    assert tiny_model(tmp_path / "x", family="llava") == 2
    assert "choose one of" in capsys.readouterr().err


def test_qwen_cache_key_is_unchanged_by_the_seam():
    """The fingerprint (and so the cache folder name) of a Qwen run, pinned: computed by the code before the seam
    (commit 23d7bd3) for the same inputs. A new fingerprint field would orphan every user's cache."""
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = "random:Qwen/Qwen2.5-VL-3B-Instruct"
    cfg.data.dataset_dir = ""
    cfg.train.device = "cpu"
    fp = feature_cache.fingerprint(cfg, np.arange(10), "pinned-dataset", device="cpu")
    assert feature_cache.fingerprint_key(fp) == PINNED_QWEN_KEY


PINNED_QWEN_KEY = "130ec1d50dbc5407"


def test_the_memory_planner_refuses_a_family_it_does_not_model(idefics3_dir, synth_dataset_dir):
    from sensorvla.plan.planner import plan

    cfg = _cfg(idefics3_dir, synth_dataset_dir, ".")
    with pytest.raises(backbones.BackboneLoadError, match="memory planner models the blocks of .*qwen2_5_vl"):
        plan(cfg, device="cpu", gpus=(1,))


# ------------------------------------------------------------------------------------ the adapter's facts


@torch.no_grad()
def test_idefics3_views_and_instruction_are_found_by_the_adapter(idefics3_dir):
    proc = load_processor(str(idefics3_dir), min_pixels=PX, max_pixels=PX)
    model = load_vl_model(str(idefics3_dir), dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(2)]
    samples = [process_sample(proc, views, text, "{instruction}") for text in ("insert the needle", "go")]
    batch = collate_vl(samples, pad_token_id(proc))
    assert batch["pixel_values"].shape == (2, 2, 3, 112, 112) and batch["pixel_attention_mask"].shape[:2] == (2, 2)
    bb = VLBackbone(model, BackboneConfig(pooling="all"), num_views=2).eval()
    masks = bb.view_masks(batch["input_ids"], batch["attention_mask"])
    assert masks[:, :2].sum(-1).tolist() == [[16, 16], [16, 16]]  # 4 x 4 tokens per view
    tok = proc.tokenizer
    for i, text in enumerate(("insert the needle", "go")):
        assert tok.decode(batch["input_ids"][i][masks[i, 2]]) == text  # the instruction, no image or turn tokens
    feats, mask = bb(batch)
    assert feats.shape == (2, 2 * 16 + 1, 64) and mask.all()
    # the grid mode's per-view tokens are the adapter's 4 x 4 grid of the view's hidden states, pooled 2 x 2
    grid = VLBackbone(model, BackboneConfig(pooling="grid", grid_size=2), num_views=2).eval()
    g, _ = grid.encode_frozen(batch)
    hidden = model.model(**grid.family.model_kwargs(model.model, batch), use_cache=False).last_hidden_state
    view1 = hidden[0, masks[0, 1]].reshape(4, 4, -1)
    torch.testing.assert_close(g[0, 4], view1[:2, :2].mean((0, 1)), rtol=1e-5, atol=1e-5)


def test_idefics3_pixel_bounds_it_cannot_honour_are_named(idefics3_dir, caplog):
    """The view is the vision tower's S x S: bounds that include it pass quietly, bounds that exclude it (a Qwen
    setting carried over) log a warning naming both flags and the value that fits."""
    with caplog.at_level("WARNING", logger="sensorvla.models.backbones.idefics3"):
        load_processor(str(idefics3_dir), min_pixels=56 * 56, max_pixels=224 * 224)  # the defaults hold S x S
        assert not caplog.records
        proc = load_processor(str(idefics3_dir), min_pixels=56 * 56, max_pixels=56 * 56)
    (record,) = caplog.records
    msg = record.getMessage()
    assert "--model.backbone.max-pixels 3136" in msg and "112x112" in msg and f"Set both to {PX}" in msg
    assert proc.image_processor.max_image_size["longest_edge"] == 112  # the resolution is the model's all the same


def test_idefics3_vision_tower_and_language_model_split(idefics3_dir, synth_dataset_dir):
    """full_vision trains the vision tower and the connector (the family's `vision_prefixes`) in the vision LR
    group; LoRA's `language` preset adapts the text model's attention only."""
    from trainable import assert_trainable_set

    from sensorvla.config import resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.models.policy import build_policy
    from sensorvla.training.param_groups import group_of

    cfg = resolve_from_meta(_cfg(idefics3_dir, synth_dataset_dir, "."), load_meta(synth_dataset_dir))
    cfg.model.finetune.mode, cfg.model.finetune.full_vision = "lora", True
    policy = build_policy(cfg)
    assert_trainable_set(policy, "lora", full_vision=True)
    trainable = {n: group_of(n) for n, p in policy.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    vision = {n for n, g in trainable.items() if g == "vision"}
    assert any(".connector." in n for n in vision) and any(".vision_model." in n for n in vision)
    lora = {n for n, g in trainable.items() if g == "vl_lora"}
    assert lora and all(".text_model.layers." in n and "_proj.lora_" in n for n in lora)
    assert not any(".text_model." in n for n in vision)


# ------------------------------------------------------------------- stage 1 (cache), stage 2 (LoRA), serving


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, idefics3_dir, synth_dataset_dir):
    """Stage 1 from the VL feature cache, then stage 2 with LoRA from its checkpoint, on the tiny Idefics3."""
    from sensorvla.training import checkpoint as ckpt

    root = tmp_path_factory.mktemp("idefics3_runs")
    torch.manual_seed(0)
    s1 = _cfg(idefics3_dir, synth_dataset_dir, root / "s1", epochs=4, use_cache="always", cache_dtype="float32")
    s1.train.lr = s1.train.sensor_lr = 2e-3
    build = copy.deepcopy(s1)
    build.train.mode = "cache"
    cache_dir = train(build, progress=False)["cache_dir"]
    r1 = train(s1, progress=False)
    s2 = copy.deepcopy(s1)
    s2.train.output_dir = str(root / "s2")
    s2.train.stage, s2.model.finetune.mode, s2.train.use_cache = "stage2", "lora", "never"
    s2.train.stage1_checkpoint = str(root / "s1" / "checkpoints" / ckpt.BEST_NAME)
    s2.train.epochs, s2.train.max_steps, s2.train.lr = 1, 3, 5e-4
    r2 = train(s2, progress=False)
    return {"root": root, "cache_dir": cache_dir, "r1": r1, "r2": r2, "s1": s1}


def test_idefics3_stage1_reads_the_feature_cache_and_learns(two_stage, idefics3_dir, synth_dataset_dir):
    from pathlib import Path

    cache = Path(two_stage["cache_dir"])
    assert (cache / "shard-0-of-1.feats.bin").stat().st_size > 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["hidden_size"] == 64 and meta["fingerprint"]["vl_model"] == str(idefics3_dir)
    # use_cache="always" ran: the features came from the cache (a missing or stale one raises)
    losses = two_stage["r1"]["train_loss"]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), (losses[:3], losses[-3:])
    # and the cached features are what the backbone computes: an uncached run's first loss (before any update,
    # so its shorter LR schedule does not enter) is the cached run's
    plain = copy.deepcopy(two_stage["s1"])
    plain.train.output_dir = str(two_stage["root"] / "plain")
    plain.train.use_cache, plain.train.max_steps = "never", 1
    train(plain, progress=False)
    got, ref = _losses(two_stage["root"] / "plain"), _losses(two_stage["root"] / "s1")
    assert got[1] == pytest.approx(ref[1], rel=1e-5)


def test_idefics3_stage2_trains_lora_on_the_text_model(two_stage):
    folder = two_stage["root"] / "s2" / "checkpoints" / "pretrained_model"
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all(".text_model." in k and "lora_" in k for k in adapter)
    assert any("q_proj" in k for k in adapter) and not any("vision_model" in k for k in adapter)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero = it trained
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"].startswith(".*text_model")
    r1, r2 = two_stage["r1"]["train_loss"], two_stage["r2"]["train_loss"]
    assert np.isfinite(r2).all() and r2[0] < 0.6 * np.mean(r1[:3])  # stage 2 starts where stage 1 ended


def test_idefics3_serving_round_trip(two_stage, synth_dataset_dir):
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.serving.client import PolicyClient
    from sensorvla.serving.server import PolicyServer

    runner = PolicyRunner.from_pretrained(two_stage["root"] / "s2" / "checkpoints" / "pretrained_model")
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data)
    e = next(e for e in range(10) if ds.has_sensor(e))
    idx = next(i for i in range(len(ds)) if ds[i]["episode_index"] == e)
    raw = ds[idx]
    ts, values = ds.sensor_stream(e)
    keep = ts <= raw["timestamp"]
    obs = dict(images=np.stack(raw["images"]), state=raw["state"], instruction=raw["instruction"])
    obs.update(timestamp=np.float64(raw["timestamp"]), sensor=np.asarray(values[keep][-100:]))
    obs["sensor_timestamps"] = ts[keep][-100:]
    local = runner.new_session().infer(obs)
    with PolicyServer(runner).start() as server, PolicyClient(port=server.port, timeout=120) as client:
        reply = client.infer(obs)
    assert reply["actions"].ndim == 2 and reply["actions"].shape == local["actions"].shape
    np.testing.assert_allclose(reply["actions"], local["actions"], rtol=1e-5, atol=1e-5)
