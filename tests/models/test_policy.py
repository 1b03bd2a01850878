"""VLAPolicy end to end on the tiny Qwen-VL: every head x fusion, sensor on/off/missing, fine-tune modes,
save/load and the seed-compatible constructors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from trainable import assert_trainable_set

from sensorvla.config import SensorVLAConfig
from sensorvla.models import finetune
from sensorvla.models.backbone import collate_vl, load_processor, pad_token_id, process_sample
from sensorvla.models.folder import CheckpointMismatchError, save_pretrained
from sensorvla.models.policy import build_policy, load_pretrained

V, T_S, C_S, H, D_A, D_ST = 2, 16, 9, 8, 7, 6


def make_cfg(vl_dir, head="regression", fusion="concat", sensor=True, mode="none") -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.head.type = head
    cfg.model.head.horizon, cfg.model.head.action_dim = H, D_A
    cfg.model.head.num_inference_steps = 4
    cfg.model.fusion.strategy = fusion
    cfg.model.sensor.enabled = sensor
    cfg.model.sensor.channels = C_S
    cfg.model.sensor.force_channels = 1
    cfg.model.num_views, cfg.model.state_dim = V, D_ST
    cfg.model.finetune.mode = mode
    cfg.data.sensor_samples = T_S
    cfg.data.views = ("cam_a", "cam_b")
    return cfg


def make_batch(vl_dir, b=4, seed=0, has_sensor=(True, False, True, True)):
    g = np.random.default_rng(seed)
    proc = load_processor(str(vl_dir), min_pixels=56 * 56, max_pixels=112 * 112)
    items = [
        process_sample(
            proc,
            [g.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(V)],
            "insert the needle" if i % 2 else "stop at the layer",
            "{instruction}",
        )
        for i in range(b)
    ]
    batch = collate_vl(items, pad_token_id(proc))
    hs = torch.tensor([has_sensor[i % len(has_sensor)] for i in range(b)])
    mask = hs[:, None].expand(b, T_S).clone()
    mask[0, :3] = False  # a partially missing window
    batch.update(
        state=torch.from_numpy(g.normal(size=(b, D_ST)).astype(np.float32)),
        sensor=torch.from_numpy(g.normal(size=(b, T_S, C_S)).astype(np.float32)) * mask[..., None],
        sensor_mask=mask,
        has_sensor=hs,
        actions=torch.from_numpy(g.normal(size=(b, H, D_A)).astype(np.float32)),
        action_mask=torch.ones(b, H, dtype=torch.bool),
        sample_id=torch.arange(b),
    )
    batch["action_mask"][1, -2:] = False
    return batch


def eval_loss(policy, batches) -> float:
    """Mean loss over both batches with fixed noise draws (diffusion/flow losses are stochastic)."""
    policy.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        out = float(np.mean([float(policy(b)[0]) for _ in range(3) for b in batches]))
    policy.train()
    return out


def overfit(policy, batches, steps=100, lr=3e-3) -> tuple[float, float, list]:
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    before = eval_loss(policy, batches)
    metrics_seen = []
    for step in range(steps):
        loss, metrics = policy(batches[step % 2], sensor_loss_weight=2.0)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            metrics_seen.append(metrics)
            metrics_seen.append(
                [n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
            )
        opt.step()
    return before, eval_loss(policy, batches), metrics_seen


@pytest.fixture(scope="module")
def batches(tiny_vl_dir):
    return [make_batch(tiny_vl_dir, seed=0), make_batch(tiny_vl_dir, seed=1)]


@pytest.mark.parametrize("head", ["regression", "diffusion", "flow"])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention", "gated"])
def test_forward_backward_and_overfit(tiny_vl_dir, batches, head, fusion):
    torch.manual_seed(0)
    policy = build_policy(make_cfg(tiny_vl_dir, head, fusion))
    before, after, (metrics, with_grad) = overfit(policy, batches)
    assert metrics["n_sensor"] == 3 and metrics["n_no_sensor"] == 1
    assert any(n.startswith("sensor_encoder.") for n in with_grad)
    assert any(n.startswith("head.") for n in with_grad) and any(n.startswith("fusion.") for n in with_grad)
    # deterministic-noise eval loss; diffusion/flow losses have an irreducible noise term
    assert after < (0.7 if head == "regression" else 0.85) * before, (head, fusion, before, after)
    out = policy.predict_chunk(batches[0], generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, H, D_A) and torch.isfinite(out).all()


@pytest.mark.parametrize("head", ["regression", "diffusion", "flow"])
def test_vision_only_policy(tiny_vl_dir, batches, head):
    torch.manual_seed(0)
    policy = build_policy(make_cfg(tiny_vl_dir, head, sensor=False))
    assert policy.sensor_encoder is None
    before, after, _ = overfit(policy, batches)
    assert after < (0.7 if head == "regression" else 0.85) * before, (head, before, after)


def test_sensor_loss_weight_weights_sensor_samples(tiny_vl_dir, batches):
    policy = build_policy(make_cfg(tiny_vl_dir)).eval()
    b = batches[0]
    l1, m = policy(b, sensor_loss_weight=1.0)
    l3, _ = policy(b, sensor_loss_weight=3.0)
    expected = (3 * 3 * m["loss_sensor"] + 1 * m["loss_no_sensor"]) / (3 * 3 + 1)
    assert float(l3) == pytest.approx(expected, rel=1e-5)
    assert float(l1) == pytest.approx((3 * m["loss_sensor"] + m["loss_no_sensor"]) / 4, rel=1e-5)


@pytest.mark.parametrize("mode", ["none", "lora", "full"])
def test_finetune_modes_trainable_set(tiny_vl_dir, batches, mode):
    torch.manual_seed(0)
    policy = build_policy(make_cfg(tiny_vl_dir, mode=mode))
    assert_trainable_set(policy, mode)
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    if mode == "none":
        assert not any(n.startswith("backbone.model.") for n in names)
    if mode == "lora":
        lora = {n for n in names if n.startswith("backbone.model.")}
        assert lora and all("lora_" in n for n in lora)
        assert all(".language_model." in n for n in lora)  # default targets: LM attention only
    if mode == "full":
        assert all(p.requires_grad for p in policy.parameters())
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    loss, _ = policy(batches[0])
    loss.backward()
    opt.step()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad}
    assert not (changed & frozen), "a frozen parameter changed"
    backbone_changed = {n for n in changed if n.startswith("backbone.model.")}
    if mode == "lora":
        assert backbone_changed and all("lora_B" in n or "lora_A" in n for n in backbone_changed)
    if mode == "none":
        assert not backbone_changed


def test_lora_zero_match_is_an_error(tiny_vl_dir):
    cfg = make_cfg(tiny_vl_dir, mode="lora")
    cfg.model.finetune.lora_target_modules = r".*no_such_module"
    with pytest.raises(finetune.FinetuneError, match="matches no Linear"):
        build_policy(cfg)


@pytest.mark.parametrize("head,mode", [("regression", "none"), ("diffusion", "lora"), ("flow", "none")])
def test_save_load_predict_identical(tiny_vl_dir, batches, tmp_path, head, mode):
    torch.manual_seed(0)
    cfg = make_cfg(tiny_vl_dir, head, mode=mode)
    policy = build_policy(cfg)
    with torch.no_grad():  # make LoRA B non-zero so the adapters matter
        for _n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    policy.eval()
    save_pretrained(policy, tmp_path / "pm", cfg)
    files = {p.name for p in (tmp_path / "pm").iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert ("adapter_model.safetensors" in files) == (mode == "lora")
    loaded, cfg2, _ = load_pretrained(tmp_path / "pm")
    assert cfg2 == cfg
    a = policy.predict_chunk(batches[0], generator=torch.Generator().manual_seed(3))
    b = loaded.eval().predict_chunk(batches[0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_load_errors(tiny_vl_dir, tmp_path):
    cfg = make_cfg(tiny_vl_dir)
    policy = build_policy(cfg)
    save_pretrained(policy, tmp_path / "pm", cfg)
    # corrupted weights
    bad = tmp_path / "bad"
    save_pretrained(policy, bad, cfg)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match="corrupt"):
        load_pretrained(bad)
    # mismatched config: another fusion -> missing and unexpected keys are listed
    other = tmp_path / "other"
    save_pretrained(policy, other, cfg)
    cfg_other = copy.deepcopy(cfg)
    cfg_other.model.fusion.strategy = "gated"
    (other / "config.json").write_text(cfg_other.to_json())
    with pytest.raises(CheckpointMismatchError, match=r"config\.json: sha256"):  # an edited file: refused
        load_pretrained(other)
    from sensorvla.integrity import write_manifest

    write_manifest(other)  # edited on purpose and recorded: now the key check speaks
    with pytest.raises(CheckpointMismatchError, match="missing=.*unexpected="):
        load_pretrained(other)
    with pytest.raises(FileNotFoundError, match="not a sensorvla pretrained_model"):
        load_pretrained(tmp_path / "nowhere")


def test_seed_class_names(tiny_vl_dir, tmp_path):
    from sensorvla.models import compat
    from sensorvla.training.checkpoint import seed_payload

    cfg = make_cfg(tiny_vl_dir)
    p1 = compat.QwenVLAWithSensor(cfg)
    assert p1.cfg.head.type == "regression"
    assert_trainable_set(p1, "none")
    p1d = compat.QwenVLAWithSensorDiffusion(cfg)
    assert p1d.cfg.head.type == "diffusion"
    assert_trainable_set(p1d, "none")
    with torch.no_grad():
        for p in p1.parameters():
            if p.requires_grad:
                p.add_(0.05)
    path = tmp_path / "stage1.pt"
    torch.save(seed_payload(p1, None, None, epoch=1, val_loss=0.5, stage="stage1"), path)
    p2 = compat.Not_freeze_QwenVLAWithSensor(cfg, stage1_checkpoint=str(path))
    assert_trainable_set(p2, "lora")
    sd1, sd2 = p1.state_dict(), p2.state_dict()
    for k in sd1:
        if k.startswith(("sensor_encoder.", "head.", "fusion.")):
            assert torch.equal(sd1[k], sd2[k]), k
    p2d = compat.Not_freeze_QwenVLAWithSensorDiffusion(cfg)
    assert p2d.cfg.head.type == "diffusion"
    assert_trainable_set(p2d, "lora")


def test_activation_checkpointing_with_lora(tiny_vl_dir, batches):
    cfg = make_cfg(tiny_vl_dir, mode="lora")
    cfg.model.backbone.activation_checkpointing = True
    policy = build_policy(cfg)
    assert policy.backbone.model.is_gradient_checkpointing
    policy.train()
    loss, _ = policy(batches[0])
    loss.backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_build_policy_from_the_model_config_and_window(tiny_vl_dir):
    """The models layer takes the model config and the sensor window; the whole config is the short form."""
    from sensorvla.config import ConfigError
    from sensorvla.data.timeline import SensorWindow
    from sensorvla.models import compat
    from sensorvla.models.policy import policy_inputs

    cfg = make_cfg(tiny_vl_dir, head="flow")
    window = SensorWindow.from_config(cfg.data)
    torch.manual_seed(0)
    whole = build_policy(cfg)
    torch.manual_seed(0)
    parts = build_policy(cfg.model, window)
    assert parts.sensor_window == whole.sensor_window and parts.cfg == whole.cfg
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), parts.state_dict().values()))
    assert compat.QwenVLAWithSensorDiffusion(cfg.model, sensor_window=window).cfg.head.type == "diffusion"
    with pytest.raises(TypeError, match="window"):
        build_policy(cfg.model)
    auto = make_cfg(tiny_vl_dir, mode="auto")
    assert policy_inputs(auto)[0].finetune.mode == "none" and auto.model.finetune.mode == "auto"  # a copy
    with pytest.raises(ConfigError, match="auto"):
        build_policy(auto.model, window)


@pytest.mark.parametrize(
    "mode,targets,layer",
    [
        ("lora", "language", -1),
        ("lora", "language", 1),  # the tiny LM has 2 layers: only layer 0 reaches the features
        ("lora", "all", 0),  # the embeddings: only the vision tower reaches them
        ("lora", "vision", 2),
        ("full", "language", 1),
        ("full", "language", 0),
    ],
)
def test_every_trainable_backbone_tensor_gets_a_gradient(tiny_vl_dir, batches, mode, targets, layer):
    """Issue 19: LoRA layers past --model.backbone.feature-layer never reached the loss (DDP crashed with
    "parameters that did not receive grad"; the demo's language LoRA got 0 of 16 gradients). Only modules that
    reach the features are adapted or trained, and every one of them gets a gradient."""
    cfg = make_cfg(tiny_vl_dir, mode=mode)
    cfg.model.finetune.lora_target_modules = targets
    cfg.model.backbone.feature_layer = layer
    torch.manual_seed(0)
    policy = build_policy(cfg)
    assert_trainable_set(policy, mode)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad and n.startswith("backbone.model.")}
    assert trainable
    if mode == "lora" and layer == 1:
        assert {n.split(".layers.")[1].split(".")[0] for n in trainable} == {"0"}
    with torch.no_grad():  # LoRA B starts at zero, which zeroes A's gradient: make every adapter matter
        for n, p in trainable.items():
            if "lora_B" in n:
                p.add_(0.01 * torch.randn_like(p))
    policy.train()
    loss, _ = policy(batches[0])
    loss.backward()
    no_grad = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0)
    assert not no_grad, f"{len(no_grad)} of {len(trainable)} trainable backbone tensors got no gradient: {no_grad[:6]}"


def test_lora_on_layers_past_the_features_only_is_an_error(tiny_vl_dir):
    """`--lora-targets language` with the embeddings as features (layer 0) adapts nothing that reaches the loss."""
    cfg = make_cfg(tiny_vl_dir, mode="lora")
    cfg.model.backbone.feature_layer = 0
    with pytest.raises(finetune.FinetuneError, match="past --model.backbone.feature-layer 0.*--lora-targets vision"):
        build_policy(cfg)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_dropout_reaches_peft(tiny_vl_dir, p):
    """Issue 19: a planted bug that dropped --lora-dropout on its way to PEFT passed every test. The flag sets the
    dropout of every adapter (an Identity at 0)."""
    from sensorvla.cli import parse_train_config

    flags = parse_train_config(["--finetune-vl", "lora", "--lora-dropout", str(p)]).model.finetune
    assert flags.lora_dropout == p
    cfg = make_cfg(tiny_vl_dir, mode="lora")
    cfg.model.finetune = flags
    policy = build_policy(cfg)
    dropouts = [m.lora_dropout["default"] for m in policy.modules() if hasattr(m, "lora_dropout")]
    assert dropouts
    if p:
        assert all(isinstance(d, torch.nn.Dropout) and d.p == p for d in dropouts)
    else:
        assert all(isinstance(d, torch.nn.Identity) for d in dropouts)
