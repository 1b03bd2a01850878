"""Activations of one training micro-batch: per-block meta probes (`plan/probe.py`) summed over the step.

Blocks, in forward order: vision patch embedding, vision blocks (x depth), patch merger(s), token embedding
glue, decoder layers (x layers), final norm, VL pooling, then the trainable tail (resampler, sensor encoder,
fusion, head + loss). A repeated block is probed once and counted `count` times. The step peak is

    forward of block i:   sum_{j<i} count_j * retained_j + (count_i - 1) * retained_i + fwd_peak_i
    backward of block i:  sum_{j<i} count_j * retained_j + (count_i - 1) * retained_i + bwd_peak_i

maximised over blocks, plus tensors shared by all blocks (position embeddings, the batch). With activation
checkpointing a checkpointed block retains only its inputs and recomputes the rest in its backward, which
the probe measures directly (HF's own checkpointing runs inside the probe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from sensorvla.plan.probe import Probe, emulate_sdpa, probe


@dataclass(frozen=True)
class Shapes:
    """One micro-batch as the model sees it (from the real processor on blank images of the dataset's size)."""

    batch: int
    seq_len: int  # tokens per sample: text + image pads
    patches_per_sample: int  # vision patches before the spatial merge
    pixel_dim: int  # C * T_patch * patch^2
    grid_thw: tuple[tuple[int, int, int], ...]  # per view of one sample
    num_views: int
    sensor_samples: int
    sensor_channels: int
    horizon: int
    action_dim: int
    state_dim: int


@dataclass(frozen=True)
class Block:
    """A probed block, how many times the step runs it and its trainable parameters' gradient bytes (each)."""

    name: str
    count: int
    cost: Probe
    grad_bytes: int = 0


@dataclass(frozen=True)
class StepPeak:
    """The activation peak of a micro-batch: `peak` (activations + the gradients live at that moment, `grads`),
    and `saved`, what the forward retains for backward."""

    peak: int
    grads: int
    saved: int


def _grad_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def sample_shapes(cfg, processor, image_hw: tuple[int, int], instruction: str) -> Shapes:
    """Tokens and patches per sample from the processor (the exact count the training batch will have)."""
    from sensorvla.models.backbone import process_sample

    m = cfg.model
    images = [np.zeros((*image_hw, 3), dtype=np.uint8) for _ in range(m.num_views)]
    out = process_sample(processor, images, instruction, m.backbone.prompt_template)
    grid = tuple(tuple(int(x) for x in row) for row in out["image_grid_thw"].tolist())
    return Shapes(
        batch=cfg.train.batch_size,
        seq_len=int(out["input_ids"].shape[-1]),
        patches_per_sample=int(out["pixel_values"].shape[0]),
        pixel_dim=int(out["pixel_values"].shape[1]),
        grid_thw=grid,
        num_views=m.num_views,
        sensor_samples=cfg.data.sensor_samples,
        sensor_channels=m.sensor.channels if m.sensor.enabled else 0,
        horizon=m.head.horizon,
        action_dim=m.head.action_dim,
        state_dim=m.state_dim,
    )


def vl_token_count(pooling: str, shapes: Shapes, *, grid_size: int, num_queries: int) -> int:
    """VL features per sample that `VLBackbone.encode` returns (and the stage-1 cache stores) for a token mode."""
    if pooling == "view_mean":
        return shapes.num_views + 1
    if pooling == "grid":
        return shapes.num_views * grid_size**2 + 1
    if pooling == "all":
        return sum(t * h * w for t, h, w in shapes.grid_thw) // 4 + 1  # merged 2 x 2 patches + instruction
    return shapes.seq_len  # resampler: every token of the prompt


def _meta(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _probed(name: str, count: int, module, make_inputs, *, backward: bool, call=None, ignore=()) -> Block:
    """A block whose cost is probed on meta tensors: `call(*make_inputs())` (default: the module itself)."""
    params = list(module.parameters())
    cost = probe(call or module, make_inputs, params=params, ignore=list(ignore), backward=backward)
    return Block(name, count, grad_bytes=_grad_bytes(params), cost=cost)


def _vision_blocks(vision, shapes: Shapes, dtype: torch.dtype, vis_grad: bool):
    """(patch embedding, vision blocks, mergers) probes, the rotary tables they share and the cast pixel values."""
    from transformers.vision_utils import get_vision_position_ids

    b = shapes.batch
    p = b * shapes.patches_per_sample
    grid = torch.tensor([g for _ in range(b) for g in shapes.grid_thw], dtype=torch.long)
    sizes = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32)
    dv = vision.blocks[0].norm1.weight.shape[0]
    x = _meta(p, dv, dtype=dtype)
    pos = get_vision_position_ids(grid, vision.spatial_merge_size).to("meta")
    vcos, vsin = vision.rotary_pos_emb(x, pos)
    # the pixel values in the backbone dtype (VLBackbone._base_forward casts them): counted once, in `shared`
    px = _meta(p, shapes.pixel_dim, dtype=dtype)
    blk = vision.blocks[0]
    mergers = [vision.merger, *list(getattr(vision, "deepstack_merger_list", []))]
    blocks = [
        _probed("vision.patch_embed", 1, vision.patch_embed, lambda: (px,), ignore=[px], backward=vis_grad),
        _probed(
            "vision.blocks",
            len(vision.blocks),
            blk,
            lambda: (_meta(p, dv, dtype=dtype, grad=vis_grad),),
            call=lambda h: blk(h, cu_seqlens=cu_seqlens, position_embeddings=(vcos, vsin)),
            ignore=[vcos, vsin],
            backward=vis_grad,
        ),
        _probed(
            "vision.merger",
            len(mergers),
            vision.merger,
            lambda: (_meta(p, dv, dtype=dtype, grad=vis_grad),),
            backward=vis_grad,
        ),
    ]
    return blocks, (vcos, vsin), px


def _language_blocks(policy, lm, shapes: Shapes, dtype: torch.dtype, vis_grad: bool, lm_grad: bool):
    """(embeddings, decoder layers, final norm, view-mean pooling) probes and the rotary tables they share."""
    b, s, h = shapes.batch, shapes.seq_len, lm.config.hidden_size
    hb = b * s * h * _elem(dtype)
    # inputs_embeds, the image-feature scatter result and the merged image features (no grad: frozen embedding)
    emb = lm.get_input_embeddings()
    blocks = [
        Block(
            "embeddings", 1, Probe(fwd_peak=3 * hb, retained=0, bwd_peak=0, out_bytes=hb), _grad_bytes(emb.parameters())
        )
    ]
    tpos = torch.zeros(3, b, s, dtype=torch.long, device="meta")
    cos, sin = lm.rotary_emb(_meta(b, s, h, dtype=dtype), tpos)
    layer = lm.layers[0]
    layers = _probed(
        "language.layers",
        len(lm.layers),
        layer,
        lambda: (_meta(b, s, h, dtype=dtype, grad=vis_grad or lm_grad),),
        call=lambda t: layer(t, position_embeddings=(cos, sin), attention_mask=None),
        ignore=[cos, sin],
        backward=lm_grad,
    )
    if policy.cfg.backbone.feature_layer != -1:  # output_hidden_states keeps every layer's output
        layers = replace(layers, cost=replace(layers.cost, retained=layers.cost.retained + layers.cost.out_bytes))
    blocks += [
        layers,
        _probed("language.norm", 1, lm.norm, lambda: (_meta(b, s, h, dtype=dtype, grad=lm_grad),), backward=lm_grad),
    ]
    if policy.cfg.backbone.pooling == "view_mean":

        def pooling_inputs():
            return _meta(b, s, h, dtype=dtype, grad=lm_grad), _meta(b, shapes.num_views + 1, s, dtype=torch.bool)

        blocks.append(Block("vl.pooling", 1, probe(_view_mean, pooling_inputs, backward=lm_grad)))
    return blocks, (cos, sin)


def vl_blocks(policy, shapes: Shapes, device_type: str) -> tuple[list[Block], int]:
    """Probes of the HF backbone's blocks for one micro-batch; returns (blocks, shared bytes): the position
    embeddings every block uses (and the cast pixel values when the vision tower trains)."""
    base = policy.backbone.model
    vision, lm = base.visual, base.language_model
    dtype = next(lm.parameters()).dtype
    vis_grad = _trainable(vision)
    lm_grad = vis_grad or _trainable(lm)
    with emulate_sdpa(device_type):
        blocks, vision_tables, px = _vision_blocks(vision, shapes, dtype, vis_grad)
        language, language_tables = _language_blocks(policy, lm, shapes, dtype, vis_grad, lm_grad)
    blocks += language
    shared = sum(t.untyped_storage().nbytes() for t in (*vision_tables, *language_tables))
    if dtype != torch.float32:  # the cast copy (fp32 pixel values are the batch tensor itself): it lives through
        cast = px.untyped_storage().nbytes()  # the HF forward, and on to the backward when the patch embedding trains
        if vis_grad:
            shared += cast
        else:
            blocks = [replace(blk, cost=replace(blk.cost, fwd_peak=blk.cost.fwd_peak + cast)) for blk in blocks]
    return blocks, shared


def _view_mean(hidden: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The pooling of `VLBackbone.encode_frozen` (view_mean): masked means over each view's tokens."""
    m = masks.to(hidden.dtype)
    return torch.einsum("bnl,bld->bnd", m, hidden) / m.sum(-1).clamp_min(1)[..., None]


def tail_block(policy, shapes: Shapes, device_type: str, *, vl_dtype: torch.dtype, vl_grad: bool) -> Block:
    """Probe of everything after the HF backbone: VL projection, sensor encoder, fusion, head and its loss."""
    bb = policy.backbone
    b = shapes.batch
    n_feat = vl_token_count(bb.cfg.pooling, shapes, grid_size=bb.cfg.grid_size, num_queries=bb.cfg.num_queries)
    params = [p for n, p in policy.named_parameters() if not n.startswith("backbone.model.")]

    def inputs():
        batch = {
            "vl_features": _meta(b, n_feat, bb.hidden_size, dtype=vl_dtype, grad=vl_grad),
            "vl_mask": _meta(b, n_feat, dtype=torch.bool),
            "vl_pos": _meta(b, n_feat, 3),
            "sensor": _meta(b, shapes.sensor_samples, max(shapes.sensor_channels, 1)),
            "sensor_mask": _meta(b, shapes.sensor_samples, dtype=torch.bool),
            "has_sensor": _meta(b, dtype=torch.bool),
            "actions": _meta(b, shapes.horizon, shapes.action_dim),
            "action_mask": _meta(b, shapes.horizon, dtype=torch.bool),
        }
        if shapes.state_dim:
            batch["state"] = _meta(b, shapes.state_dim)
        return (batch,)

    def step(batch):  # VLAPolicy.forward without the float() metrics (not possible on meta)
        cond, mask = policy.condition(batch)
        return policy.head.loss(cond, mask, batch["actions"].float(), batch["action_mask"].bool()).mean()

    with emulate_sdpa(device_type):
        return Block("policy.tail", 1, probe(step, inputs, params=params), grad_bytes=_grad_bytes(params))


def step_peak(blocks: list[Block], *, grads_persist: bool) -> StepPeak:
    """The micro-batch's peak (module docstring), with gradients: `grads_persist` (gradient accumulation, or any
    micro-batch after the first of a step) keeps every gradient allocated throughout; otherwise a block's
    gradients appear during its backward and stay until the optimizer step."""
    total_g = sum(b.count * b.grad_bytes for b in blocks)
    best = (0, 0)
    run = 0
    for blk in blocks:
        g = total_g if grads_persist else 0
        best = max(best, (run + (blk.count - 1) * blk.cost.retained + blk.cost.fwd_peak + g, g))
        run += blk.count * blk.cost.retained
    saved, done = run, 0
    for blk in reversed(blocks):
        run -= blk.count * blk.cost.retained
        if blk.cost.bwd_peak:
            c, r = blk.count, blk.cost.retained
            for k in (0, c - 1):  # first and last instance in backward order; the peak is linear in between
                g = total_g if grads_persist else done + (k + 1) * blk.grad_bytes
                best = max(best, (run + (c - 1 - k) * r + blk.cost.bwd_peak + g, g))
        done += blk.count * blk.grad_bytes
    return StepPeak(peak=best[0], grads=best[1], saved=saved)
