"""The training loop in-process on CPU: cache equivalence, bit-exact resume, crash safety, param groups,
overfitting for each head, divergence handling, the LR schedule length and plain progress lines."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.policy import build_policy
from sensorvla.training import checkpoint as ckpt
from sensorvla.training.feature_cache import StaleCacheError
from sensorvla.training.loop import TrainingDivergedError, train
from sensorvla.training.param_groups import build_param_groups


def tiny_cfg(vl_dir, data_dir, out, head="regression", **train_kw) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.head.type = head
    cfg.model.head.num_inference_steps = 4
    cfg.data.dataset_dir = str(data_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 8
    cfg.train.grad_accum_steps = 2
    cfg.train.epochs = 1
    cfg.train.log_every_steps = 1
    cfg.train.tensorboard = False
    cfg.train.use_cache = "never"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def metric_rows(run_dir: Path) -> list[dict]:
    """Complete lines of metrics.jsonl only: a line being written by a live run has no newline yet."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(x) for x in complete if x]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir) if r["kind"] == "train"}


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metric_rows(run_dir) if r["kind"] == "train"}


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a seed .pt file (model + optimizer state), keyed by its path in the dict."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj, key):
        if torch.is_tensor(obj):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    walk(torch.load(path, weights_only=True), "")
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def test_cached_stage1_equals_uncached(tmp_path, tiny_vl_dir, synth_dataset_dir):
    base = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "plain", max_steps=3)
    train(base)
    cached = copy.deepcopy(base)
    cached.train.output_dir = str(tmp_path / "cached")
    cached.train.cache_dtype = "float32"
    build = copy.deepcopy(cached)
    build.train.mode = "cache"
    out = train(build)
    assert Path(out["cache_dir"]).exists()
    cached.train.use_cache = "always"
    train(cached)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert a.keys() == b.keys() == {1, 2, 3}
    # float32 cache: the stored features are bit-equal to what the backbone computed while building it ...
    assert_cache_holds_the_backbone_output(cached, synth_dataset_dir, tiny_vl_dir)
    # ... but a training batch pads its prompts to another length than the build batch did, and the
    # backbone's float32 output moves in the last bits with the padding (up to ~5e-7 since the 112 px
    # task images; bit-equal before), so the losses agree to float32 rounding (measured 4.5e-8 relative)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    # the default float16 cache rounds the pooled features (relative error <= 2^-11): the losses move, by
    # at most 2e-4 relative (measured: 2.2e-5)
    half = copy.deepcopy(cached)
    half.train.output_dir = str(tmp_path / "half")
    half.train.cache_dtype = "float16"
    half.train.cache_dir = str(tmp_path / "half_cache")
    build_half = copy.deepcopy(half)
    build_half.train.mode, build_half.train.use_cache = "cache", "auto"
    train(build_half)
    train(half)
    c = losses(tmp_path / "half")
    assert c.keys() == a.keys() and c != a  # the float16 features were really used
    for step in a:
        assert abs(c[step] - a[step]) <= 2e-4 * abs(a[step]), (step, a[step], c[step])
    # a fingerprint change (another prompt template) makes the cache stale: it raises, never reused
    stale = copy.deepcopy(cached)
    stale.model.backbone.prompt_template = "Task: {instruction}"
    with pytest.raises(StaleCacheError, match="sensorvla train --mode cache"):
        train(stale)
    # a partial cache raises with the command that resumes building it
    index_path = next(Path(out["cache_dir"]).glob("shard-0-of-*.index.json"))
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({"ids": index["ids"][:1], "offsets": index["offsets"][:2]}))
    with pytest.raises(StaleCacheError, match="partial"):
        train(cached)


def assert_cache_holds_the_backbone_output(cfg, data_dir, vl_dir) -> None:
    """Re-encode the build's own batches (distinct VL inputs, batch_size at a time) and compare with the cache rows."""
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.processor import PolicyProcessor, collate
    from sensorvla.training import feature_cache
    from sensorvla.training.data_setup import build_normalizer, ensure_stats, raw_dataset
    from sensorvla.training.distributed import DistInfo

    cfg = resolve_from_meta(copy.deepcopy(cfg).validate(), load_meta(data_dir))
    ds = raw_dataset(cfg, "all")
    cache = feature_cache.open_cache(cfg, ds.sample_ids, load_meta(data_dir).dataset_id)
    assert cache is not None
    policy = build_policy(cfg).eval()
    bb = cfg.model.backbone
    proc = load_processor(str(vl_dir), min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    stats = ensure_stats(cfg, DistInfo(0, 1, 0, torch.device("cpu")), progress=False)
    transform = PolicyProcessor(build_normalizer(stats, cfg), proc, bb.prompt_template, cfg.model.state_dim)
    # the build encodes each distinct VL input once, in batches of batch_size, in this order
    unique, _ = feature_cache._distinct_inputs(ds.sample_ids, [ds.vl_key(i) for i in range(len(ds))])
    n = cfg.train.batch_size
    for first in (0, n * (len(unique) // (2 * n)), n * ((len(unique) - 1) // n)):
        batch = collate([transform(ds[i]) for i in unique[first : first + n]], pad_token_id(proc))
        with torch.no_grad():
            feats, mask = policy.backbone.encode_frozen(batch)
        cached_feats, cached_mask, _ = cache.lookup(batch["sample_id"])
        assert cached_feats.dtype == torch.float32
        assert torch.equal(cached_feats, feats) and torch.equal(cached_mask, mask), first


def test_resume_equals_uninterrupted(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """Stop at step 3, resume to 6: losses and every checkpoint tensor (model + optimizer) are bit-equal."""
    full = tiny_cfg(
        tiny_vl_dir, synth_dataset_dir, tmp_path / "full", head="diffusion", max_steps=6, save_every_steps=3
    )
    full.train.schedule_steps = 6  # the plan of both runs: the cut run must not shorten its schedule
    train(full)
    part = copy.deepcopy(full)
    part.train.output_dir = str(tmp_path / "part")
    part.train.max_steps = 3
    train(part)
    resumed = copy.deepcopy(part)
    resumed.train.max_steps = 6
    resumed.train.resume = True
    train(resumed)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert set(b) == set(a) == set(range(1, 7))
    assert a == b, (a, b)
    last = "checkpoints/last/checkpoint.pt"
    assert_same_tensors(tensors_of(tmp_path / "full" / last), tensors_of(tmp_path / "part" / last))
    from safetensors.torch import load_file

    pm = "checkpoints/pretrained_model/model.safetensors"
    assert_same_tensors(load_file(tmp_path / "full" / pm), load_file(tmp_path / "part" / pm))


@pytest.mark.parametrize("trains", ["lora", "full_vision"])
def test_stage1_that_trains_the_backbone_resumes_exactly(trains, tmp_path, tiny_vl_dir, synth_dataset_dir):
    """A stage 1 that also trains backbone weights (LoRA adapters, or the vision tower) keeps them in its seed
    file's `vl_backbone` section; `--resume` restores them too, so a cut run ends bit-equal to an uncut one."""
    full = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "full", max_steps=4, save_every_steps=2)
    full.train.schedule_steps = 4
    if trains == "lora":
        full.model.finetune.mode = "lora"
    else:
        full.model.finetune.full_vision = True
    train(full)
    part = copy.deepcopy(full)
    part.train.output_dir, part.train.max_steps = str(tmp_path / "part"), 2
    train(part)
    saved = torch.load(tmp_path / "part/checkpoints/last/checkpoint.pt", weights_only=True)
    assert saved[ckpt.BACKBONE_KEY], "the cut run's last/ holds the backbone tensors it trains"
    resumed = copy.deepcopy(part)
    resumed.train.max_steps, resumed.train.resume = 4, True
    train(resumed)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    last = "checkpoints/last/checkpoint.pt"
    a, b = tensors_of(tmp_path / "full" / last), tensors_of(tmp_path / "part" / last)
    assert any(k.startswith(f"/{ckpt.BACKBONE_KEY}/") for k in a)
    assert_same_tensors(a, b)


def test_sigkill_then_resume(tmp_path, tiny_vl_dir, synth_dataset_dir):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, epochs=50, save_every_steps=2)
    cfg.train.batch_size, cfg.train.grad_accum_steps = 4, 1
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    code = (
        "import sys; from sensorvla.config import SensorVLAConfig; from sensorvla.training.loop import train;"
        "train(SensorVLAConfig.load(sys.argv[1]), progress=False)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cfg.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    best = tmp_path / "checkpoints" / ckpt.BEST_NAME
    # no deadline: however slow the machine, the kill comes after 30 steps and a best checkpoint (the 50-epoch
    # run cannot end before); a run that dies early fails here instead of timing out
    while not (best.exists() and len(losses(tmp_path)) >= 30):
        assert proc.poll() is None, f"training exited with {proc.returncode} before the kill"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = max(losses(tmp_path))
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state.json").read_text())
    assert steps_done - state["step"] <= 2  # at most the work since the last checkpoint is lost
    best_ckpt = torch.load(best, weights_only=True)  # `best` is intact
    assert best_ckpt["training_stage"] == "stage1"
    resumed = copy.deepcopy(cfg)
    resumed.train.resume = True
    resumed.train.max_steps = state["step"] + 2
    out = train(resumed, progress=False)
    assert out["steps"] == state["step"] + 2


# learned positions / queries / missing tokens / type and view embeddings in our modules (grep nn.Parameter,
# nn.Embedding): a name component of theirs
NO_DECAY_PARTS = {"pos", "time_pos", "queries", "missing_tokens", "type_emb", "view_emb"}


def test_param_groups_and_trainable_sets_by_stage(tiny_vl_dir, synth_dataset_dir, tmp_path):
    for stage, mode, head, pooling, expected in [
        ("stage1", "none", "regression", "view_mean", {"head", "fusion", "sensor_encoder"}),
        ("stage1", "none", "diffusion", "resampler", {"head", "fusion", "sensor_encoder", "vl_projection"}),
        ("stage1", "none", "regression", "grid", {"head", "fusion", "sensor_encoder", "vl_projection"}),
        ("stage2", "lora", "flow", "view_mean", {"head", "fusion", "sensor_encoder", "vl_lora"}),
        ("stage2", "full", "regression", "view_mean", {"head", "fusion", "sensor_encoder", "vision", "language"}),
    ]:
        cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, head=head)
        cfg.model.backbone.pooling = pooling
        cfg.train.stage, cfg.model.finetune.mode = stage, mode
        cfg.train.stage1_checkpoint = "unused.pt"
        cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
        policy = build_policy(cfg)
        groups = build_param_groups(policy, cfg.train)
        names = {g["name"].split("/")[0] for g in groups}
        assert names == expected, (stage, mode, names)
        lr = {g["name"]: g["lr"] for g in groups}
        assert lr["sensor_encoder"] == cfg.train.sensor_lr and lr["head"] == cfg.train.lr
        if mode == "lora":
            assert lr["vl_lora"] == cfg.train.vl_lr
            assert all("lora_" in n for g in groups if g["name"].startswith("vl_lora") for n in g["param_names"])
        if mode == "full":
            assert lr["vision"] == cfg.train.vision_lr and lr["language"] == cfg.train.vl_lr
        assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
        decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
        learned_embeddings = {
            n for n, _ in policy.named_parameters() if NO_DECAY_PARTS & set(n.split(".")) and "lora_" not in n
        }
        assert learned_embeddings and not (learned_embeddings & decayed), sorted(learned_embeddings & decayed)
        assert (pooling == "resampler") == ("backbone.queries" in learned_embeddings)
        assert (pooling == "grid") == ("backbone.view_emb.weight" in learned_embeddings)
        assert any(n.endswith("linear1.weight") for n in decayed)  # projections keep their decay
        assert pooling != "grid" or "backbone.pos_proj.weight" in decayed
        in_groups = [n for g in groups for n in g["param_names"]]
        assert sorted(in_groups) == sorted(n for n, p in policy.named_parameters() if p.requires_grad)


# diffusion / flow: heavy (~25 s each); their learning is also covered by tests/models/test_policy.py
@pytest.mark.parametrize(
    "head",
    ["regression", pytest.param("diffusion", marks=pytest.mark.slow), pytest.param("flow", marks=pytest.mark.slow)],
)
def test_two_stage_overfit(tmp_path, tiny_vl_dir, synth_dataset_dir, head):
    torch.manual_seed(0)
    s1 = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "s1", head=head, epochs=6)
    s1.train.lr = s1.train.sensor_lr = 2e-3
    s1.train.batch_size, s1.train.grad_accum_steps = 16, 1
    s1.data.dataset_dir = str(synth_dataset_dir)
    r1 = train(s1, progress=False)
    l1 = r1["train_loss"]
    assert np.mean(l1[-3:]) < 0.5 * np.mean(l1[:3]), (l1[:3], l1[-3:])
    s2 = copy.deepcopy(s1)
    s2.train.output_dir = str(tmp_path / "s2")
    s2.train.stage, s2.model.finetune.mode = "stage2", "lora"
    s2.train.stage1_checkpoint = str(tmp_path / "s1" / "checkpoints" / ckpt.BEST_NAME)
    s2.train.epochs = 2
    s2.train.lr = s2.train.sensor_lr = 5e-4
    r2 = train(s2, progress=False)
    # stage 2 starts where stage 1 ended (far below stage 1's start) and does not lose it: its validation
    # loss (fixed noise draws) stays at stage 1's level or better
    assert r2["train_loss"][0] < 0.6 * np.mean(l1[:3])
    assert min(r2["val_loss"]) <= 1.2 * min(r1["val_loss"]), (r1["val_loss"], r2["val_loss"])


def test_nan_loss_stops_and_keeps_last_good(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=4, save_every_steps=1)
    from sensorvla.models.policy import VLAPolicy

    orig = VLAPolicy.forward
    calls = {"n": 0}

    def poisoned(self, batch, *args, **kwargs):
        loss, m = orig(self, batch, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), m

    monkeypatch.setattr(VLAPolicy, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="No checkpoint with finite weights") as err:
        train(cfg, progress=False)
    assert "do not --resume" in str(err.value)
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["step"] == 2  # 2 micro-batches per step: steps 1-2 were good and saved


def test_divergence_points_to_finite_best_not_last(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """Epoch 1 trains normally (best saved); resumed with --lr 1e30, the weights blow up (finite 1e28-ish
    weights reach `last`), then the loss goes NaN: the message names `best`, whose tensors are finite."""
    from sensorvla.training.data_setup import raw_dataset

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, epochs=3)
    n_train = len(raw_dataset(resolve_from_meta(copy.deepcopy(cfg), load_meta(synth_dataset_dir)), "train"))
    cfg.train.max_steps = math.ceil(math.ceil(n_train / 8) / 2)  # exactly one epoch (batch 8, accumulation 2)
    train(cfg, progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    best_before = tensors_of(ckpt_dir / ckpt.BEST_NAME)
    blown = copy.deepcopy(cfg)
    blown.train.resume, blown.train.max_steps, blown.train.save_every_steps = True, 0, 1
    blown.train.lr = blown.train.sensor_lr = 1e30  # applied to the restored optimizer (with a note)
    with pytest.raises(TrainingDivergedError) as err:
        train(blown, progress=False)
    msg = str(err.value)
    assert str(ckpt_dir / ckpt.BEST_NAME) in msg and "checked finite" in msg and "epoch 1" in msg
    assert "do not --resume" in msg
    best = tensors_of(ckpt_dir / ckpt.BEST_NAME)
    assert_same_tensors(best, best_before)  # best is the pre-blow-up epoch-1 file
    assert all(torch.isfinite(t).all() for t in best.values() if t.is_floating_point())
    last = torch.load(ckpt_dir / "last" / "checkpoint.pt", weights_only=True)
    biggest = max(float(t.abs().max()) for t in last["action_expert"].values() if t.is_floating_point())
    assert biggest > 1e20, biggest  # `last` already holds blown-up weights: pointing there would be wrong


def test_schedule_spans_the_run_not_the_epochs(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """--max-steps cuts a 5-epoch run to 4 steps: the default schedule decays over those 4 steps."""
    from sensorvla.training.loop import warmup_cosine

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "auto", epochs=5, max_steps=4)
    out = train(cfg, progress=False)
    assert out["config"]["train"]["schedule_steps"] == 4
    rows = train_rows(tmp_path / "auto")
    assert rows[4]["lr/head"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-9)  # fully decayed
    long = copy.deepcopy(cfg)
    long.train.output_dir, long.train.schedule_steps = str(tmp_path / "explicit"), 100
    train(long, progress=False)
    lr4 = train_rows(tmp_path / "explicit")[4]["lr/head"]
    assert lr4 == pytest.approx(cfg.train.lr * warmup_cosine(100, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)(4))
    assert lr4 > 0.9 * cfg.train.lr


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, tiny_vl_dir, synth_dataset_dir, capfd):
    """Plain lines in a redirected log; the start names only the changed values, the run folder holds the whole
    config and the training curves."""
    from sensorvla.config import SensorVLAConfig, config_changes
    from sensorvla.training.loop import RUN_CONFIG_FILE
    from sensorvla.training.run_log import CURVES_NAME

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=3)
    cfg.train.log_every_steps = 2
    out = train(cfg)  # progress allowed; pytest's captured stdout/stderr are not terminals
    stdout, err = capfd.readouterr()
    assert "\r" not in stdout + err  # no bar redraws (ours or transformers') in a redirected log
    for step in ("step 1/3", "step 2/3", "step 3/3"):
        assert step in err
    changed = config_changes(cfg)
    assert f"config: {len(changed)} value(s) differ from the defaults:" in err and 0 < len(changed) < 20
    assert "  --train.max-steps 3 (was 0)" in err and '"model": {' not in err  # not the whole JSON
    saved = SensorVLAConfig.load(tmp_path / RUN_CONFIG_FILE)
    assert saved.to_dict() == out["config"]
    assert (tmp_path / CURVES_NAME).stat().st_size > 0


def test_validation_never_reseeds_global_generators(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    """The only global seeding is the rank's seed at start; validation (diffusion noise) uses its own
    generator, so it cannot reset the CUDA generators of every rank to one value."""
    calls = []
    for mod, name in ((torch, "manual_seed"), (torch.cuda, "manual_seed_all"), (torch.cuda, "manual_seed")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda seed, _o=orig, _n=name: (calls.append((_n, int(seed))), _o(seed))[1])
    orig_fork = torch.random.fork_rng
    monkeypatch.setattr(
        torch.random, "fork_rng", lambda *a, **k: (calls.append(("fork_rng", 0)), orig_fork(*a, **k))[1]
    )
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, head="diffusion", max_steps=2, seed=7)
    out = train(cfg, progress=False)
    assert len(out["val_loss"]) == 1
    assert ("manual_seed", 7) in calls
    assert all(seed == 7 for _, seed in calls) and ("fork_rng", 0) not in calls, calls


def test_resume_refuses_reinterpretation_and_applies_optimizer_flags(tmp_path, tiny_vl_dir, synth_dataset_dir, capfd):
    from sensorvla.cli import parse_train_config
    from sensorvla.training.loop import warmup_cosine
    from sensorvla.training.resume import ResumeMismatchError

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=2, schedule_steps=10, lr=0.5)
    train(cfg, progress=False)
    saved = json.loads((tmp_path / "checkpoints" / "last" / "config.json").read_text())
    assert saved["train"]["lr"] == 0.5 and saved["train"]["schedule_steps"] == 10
    again = copy.deepcopy(cfg)
    again.train.resume, again.train.max_steps = True, 3
    for field, value, flag in [
        ("batch_size", 4, "--train.batch-size (--batch-size)"),
        ("grad_accum_steps", 1, "--train.grad-accum-steps"),
        ("epochs", 2, "--train.epochs (--epochs)"),
        ("schedule_steps", 20, "--train.schedule-steps"),
    ]:
        bad = copy.deepcopy(again)
        setattr(bad.train, field, value)
        with pytest.raises(ResumeMismatchError, match=re.escape(flag)):
            train(bad, progress=False)
    bad = copy.deepcopy(again)
    bad.model.head.hidden_dim = 64
    with pytest.raises(ResumeMismatchError, match=re.escape("--model.head.hidden-dim")):
        train(bad, progress=False)
    run_json = tmp_path / "checkpoints" / "last" / "run.json"
    original = run_json.read_bytes()  # restored byte for byte: last/manifest.json covers every file
    info = json.loads(original)
    tampered = {**info, "dataset_fingerprint": [{"dataset_id": "another"}]}
    run_json.write_text(json.dumps(tampered))
    with pytest.raises(ResumeMismatchError, match="dataset's content changed"):
        train(copy.deepcopy(again), progress=False)
    run_json.write_bytes(original)
    assert max(losses(tmp_path)) == 2  # nothing above trained a step

    # the CLI starts from the saved config: only the flags given change
    argv = ["--resume", "--output-dir", str(tmp_path), "--lr", "1e-3", "--sensor-lr", "2e-4", "--max-steps", "3"]
    cli = parse_train_config(argv)
    assert cli.train.batch_size == 8 and cli.train.schedule_steps == 10 and cli.train.lr == 1e-3
    assert cli.model.backbone.vl_model == str(tiny_vl_dir) and cli.train.use_cache == "never"
    capfd.readouterr()
    train(cli, progress=False)
    assert "--train.lr (--lr): 0.5 -> 0.001 (applied to the restored optimizer)" in capfd.readouterr().err
    factor = warmup_cosine(10, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)(3)
    row = train_rows(tmp_path)[3]
    assert row["lr/head"] == pytest.approx(1e-3 * factor, rel=1e-12)  # not the saved 0.5
    assert row["lr/sensor_encoder"] == pytest.approx(2e-4 * factor, rel=1e-12)
    last = torch.load(tmp_path / "checkpoints" / "last" / "checkpoint.pt", weights_only=True)
    groups = {g["name"]: g for g in last["optimizer_state_dict"]["param_groups"]}
    assert groups["head"]["initial_lr"] == 1e-3 and groups["sensor_encoder"]["initial_lr"] == 2e-4
    assert last["scheduler_state_dict"]["base_lrs"][0] in (1e-3, 2e-4)


def test_resume_policy_classifies_every_change():
    from sensorvla.training.resume import ResumeMismatchError, check_resume

    saved = SensorVLAConfig().to_dict()
    ok = SensorVLAConfig()
    ok.train.lr, ok.train.max_steps, ok.train.patience = 1e-3, 50, 2
    ok.model.sensor_dropout, ok.data.augment.enabled = 0.2, True  # training-only regularisers
    ok.data.dataset_dir, ok.data.num_workers, ok.train.output_dir = "/moved/data", 4, "/copied/run"
    lines = "\n".join(check_resume(saved, ok.to_dict(), [{"id": 1}], [{"id": 1}]))
    assert "--train.lr (--lr): 0.0001 -> 0.001 (applied to the restored optimizer)" in lines
    assert "--train.max-steps (--max-steps): 0 -> 50 (taken as given)" in lines
    assert "--model.sensor-dropout: 0.0 -> 0.2 (taken as given)" in lines and "output-dir" not in lines
    for mutate, flag in [
        (lambda c: setattr(c.data, "horizon", 4), "--data.horizon"),
        (lambda c: setattr(c.data, "views", ("front",)), "--data.views"),
        (lambda c: setattr(c.train, "seed", 3), "--train.seed (--seed)"),
        (lambda c: setattr(c.train, "stage", "stage2"), "--train.stage (--training-stage)"),
        (lambda c: setattr(c.model.backbone, "pooling", "grid"), "--model.backbone.pooling"),
    ]:
        bad = SensorVLAConfig()
        mutate(bad)
        with pytest.raises(ResumeMismatchError, match=re.escape(flag)):
            check_resume(saved, bad.to_dict())


def test_val_max_samples_validates_on_a_fixed_evenly_spaced_subset(
    tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch
):
    from sensorvla.config import ConfigError
    from sensorvla.training import loop
    from sensorvla.training.data_setup import ShardedEpochSampler, evenly_spaced

    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 5) == evenly_spaced(3, 0) == [0, 1, 2]
    ranks = [ShardedEpochSampler(10, seed=0, rank=r, world=2, shuffle=False, pad=False, limit=4) for r in range(2)]
    assert sorted(ranks[0].indices() + ranks[1].indices()) == [0, 2, 5, 7]  # an exact partition of the subset
    with pytest.raises(ValueError, match="shuffle=False"):
        ShardedEpochSampler(10, seed=0, rank=0, world=1, limit=4)
    bad = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, val_max_samples=-1)
    with pytest.raises(ConfigError, match="--train.val-max-samples"):
        bad.validate()

    seen = []
    real = loop.make_loader
    monkeypatch.setattr(
        loop, "make_loader", lambda ds, tf, sampler, *a: (seen.append(sampler), real(ds, tf, sampler, *a))[1]
    )
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=2, epochs=2, val_max_samples=3)
    cfg.train.grad_accum_steps = 1
    train(cfg, progress=False)
    val_calls = [list(s) for s in seen if isinstance(s, ShardedEpochSampler) and not s.shuffle]
    n_val = len(build_dataset_for(cfg, "val"))
    assert n_val > 3 and val_calls and all(idx == evenly_spaced(n_val, 3) for idx in val_calls), (n_val, val_calls)


def build_dataset_for(cfg, split):
    from sensorvla.training.data_setup import raw_dataset

    return raw_dataset(cfg, split, load_images=False)


def test_stage1_from_the_cache_never_loads_the_backbone_weights(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    """Every VL feature comes from the cache, so the trainer builds the policy from the backbone's config alone
    (a 3B's 7 GiB never reach the GPU); the checkpoint it writes loads into a full policy and predicts."""
    from sensorvla.models import backbone

    cached = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "cached", max_steps=2)
    build = copy.deepcopy(cached)
    build.train.mode = "cache"
    train(build)  # building the cache runs the backbone: it loads the weights
    loads = []
    real = backbone.load_vl_model
    monkeypatch.setattr(backbone, "load_vl_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    cached.train.use_cache = "always"
    train(cached)
    assert loads == []  # the cached run never loaded them
    monkeypatch.undo()
    from sensorvla.models.policy import load_pretrained

    policy, cfg, _ = load_pretrained(tmp_path / "cached" / "checkpoints" / "pretrained_model")
    assert policy.backbone.has_weights and cfg.model.finetune.mode == "none"
    weightless = build_policy(cfg, vl_weights=False)
    assert not weightless.backbone.has_weights
    with pytest.raises(RuntimeError, match="without the VL backbone's weights"):
        weightless.backbone.encode({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    trained = {k for k in policy.state_dict() if not k.startswith("backbone.model.")}
    assert trained == set(weightless.state_dict())  # the same trained parts, nothing but the base is missing


def test_early_divergence_names_only_what_exists(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    """Issue 19: a loss that goes NaN at step 1, before anything was saved, was told that `checkpoints/last` holds
    the latest state; no such folder existed. The message says that nothing was saved."""
    from sensorvla.models.policy import VLAPolicy

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=2)
    orig = VLAPolicy.forward

    def poisoned(self, batch, *args, **kwargs):
        loss, m = orig(self, batch, *args, **kwargs)
        return loss * float("nan"), m

    monkeypatch.setattr(VLAPolicy, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="at step 1") as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert not (tmp_path / "checkpoints" / "last").exists()
    assert "last" not in msg and "Nothing was saved in" in msg and str(tmp_path / "checkpoints") in msg, msg


def test_resume_with_nothing_saved_says_so(tmp_path, capsys):
    """Issue 19: `train --resume` in a folder without a saved run said the folder "is not a dataset"."""
    from sensorvla.cli import main

    assert main(["train", "--resume", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and str(tmp_path / "checkpoints" / "last") in err, err
    assert "without --resume" in err and "dataset" in err and "not a sensorvla or LeRobot" not in err


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_gradients_are_clipped_to_grad_clip_before_the_step(
    tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch, clip
):
    """Issue 19: a planted bug in gradient clipping passed every test. The optimizer must see a global gradient
    norm of at most --train.grad-clip, and the logged grad_norm is the norm before clipping."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=2, grad_clip=clip)
    train(cfg, progress=False)
    logged = [train_rows(tmp_path)[s]["grad_norm"] for s in (1, 2)]
    # every logged step also carries its CPU-seconds per sample (benchmarks/bench_train.py compares budgets in it)
    # (present, positive and finite: a CPU time, never bounded above in a test)
    assert all(0 < train_rows(tmp_path)[s]["cpu_s_per_sample"] < float("inf") for s in (1, 2))
    assert len(seen) == 2 and all(n > 1e-2 for n in logged), (seen, logged)  # the raw norms exceed the small clip
    for before, at_step in zip(logged, seen, strict=True):
        assert at_step == pytest.approx(min(before, clip), rel=1e-4)


def _scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """A copy of a dataset whose actions are `factor` times the original's (another robot's units)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    for f in (dst / "data").rglob("*.parquet"):
        t = pq.read_table(f)
        actions = np.stack(t.column("action").to_pylist()).astype(np.float32) * factor
        col = pa.FixedSizeListArray.from_arrays(pa.array(actions.ravel()), actions.shape[1])
        t = t.set_column(t.schema.get_field_index("action"), t.schema.field("action"), col)
        pq.write_table(t, f)
    return dst


def test_mixture_stats_cover_every_member(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    """Issue 19: `--data.mixture` normalized every member with the primary's stats (a member with actions x100
    trained at |z| ~ 52). The stats are pooled over every member's training split, kept in the user cache under
    the mixture's fingerprint, and are what the checkpoint carries."""
    from types import SimpleNamespace

    from sensorvla.data import normalize
    from sensorvla.data.normalize import Normalizer, compute_stats
    from sensorvla.training import data_setup

    big = _scaled_copy(synth_dataset_dir, tmp_path / "x100", 100.0)
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "run", max_steps=1)
    cfg.data.mixture = (f"{big}:1.0",)
    one = SimpleNamespace(is_main=True, enabled=False)
    stats = data_setup.ensure_stats(cfg, one, progress=False)
    pooled_key = normalize.mixture_fingerprint(data_setup.mixture_roots(cfg), cfg.data)
    assert data_setup.cached_stats_path(cfg, json.loads(json.dumps(pooled_key))).exists()  # the user cache
    a, b = (compute_stats(root, progress=False, data_cfg=cfg.data) for root in (synth_dataset_dir, big))
    na, nb = a.counts["actions"], b.counts["actions"]
    assert stats.counts["actions"] == na + nb
    pooled_mean = (na * a.stats["actions"]["mean"] + nb * b.stats["actions"]["mean"]) / (na + nb)
    np.testing.assert_allclose(stats.stats["actions"]["mean"], pooled_mean, rtol=1e-4, atol=1e-6)
    mixture = data_setup.raw_dataset(cfg, "train", load_images=False)
    norm = Normalizer(stats)
    for member in mixture.members:  # every member's actions are O(1) after normalization
        z = np.stack([norm.normalize("actions", member[i]["actions"]) for i in range(0, len(member), 7)])
        assert np.abs(z).max() < 10, np.abs(z).max()
    # loaded, not recomputed, while the members are unchanged
    monkeypatch.setattr(normalize, "compute_stats", lambda *a, **k: pytest.fail("recomputed"))
    again = data_setup.ensure_stats(cfg, one, progress=False)
    np.testing.assert_array_equal(again.stats["actions"]["std"], stats.stats["actions"]["std"])
    monkeypatch.undo()
    train(cfg, progress=False)
    saved = normalize.NormStats.load(tmp_path / "run" / "checkpoints" / "pretrained_model" / "norm_stats.json")
    np.testing.assert_array_equal(saved.stats["actions"]["std"], stats.stats["actions"]["std"])
