"""`sensorvla demo` and `sensorvla tiny-model`: the embedded world (tiny model, synthetic task, built-in env)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def demo(
    out: Path = Path("demo_out"),
    head: Literal["regression", "diffusion", "flow"] = "regression",
    quick: bool = False,
    episodes: int | None = None,
    rollouts: int | None = None,
    baseline: bool | None = None,
    videos: Literal["some", "all", "none"] = "some",
) -> int:
    """The full two-stage demo: tiny model + synthetic data -> cache -> stage 1 -> stage 2 -> eval -> closed-loop
    table (all / sensor ablated / vision ablated) beside a plain CNN reference. `--quick` is the < 2 min variant.
    The table and whether each target was met are printed and written to OUT/report.md, with links to the
    rollout videos (`--videos some`: a success, a failure, one with the sensor ablated; `all`: every episode)."""
    import dataclasses

    from sensorvla.demo import DemoSettings, run_demo

    s = DemoSettings.quick() if quick else DemoSettings()
    overrides = {"episodes": episodes, "rollouts": rollouts, "baseline": baseline}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    run_demo(out, head=head, quick=quick, settings=s, videos=videos)
    return 0


def tiny_model(
    out: Path,
    family: str = "qwen2_5_vl",
    seed: int = 0,
    patch_size: int | None = None,
    image_size: int | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
) -> int:
    """Build a tiny random VLM (model + tokenizer + processor) in the hub layout, offline.

    Args:
        family: the model type: qwen2_5_vl, qwen2_vl, qwen3_vl, or another registered backbone family with a tiny
            builder (`sensorvla.world.tiny_qwen.tiny_families()`, e.g. idefics3).
        patch_size: vision patch side in px (default: the family's, 14 or 16); tokens merge 2 x 2 patches, so a
            token covers 2 x patch px. The demo's model: --patch-size 7 --image-size 112 (8 x 8 tokens per view).
        image_size: views are resized to image_size x image_size (sets both pixel bounds to image_size^2).
        min_pixels: the processor's lower pixel bound (smaller views are upsampled to it).
        max_pixels: the processor's upper pixel bound.
    """
    import sys

    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl, tiny_families

    if image_size is not None:
        min_pixels = max_pixels = image_size * image_size
    problem = tiny_model_problem(patch_size, image_size, min_pixels, max_pixels)
    if family not in tiny_families():
        problem = problem or f"--family {family!r}: choose one of {', '.join(tiny_families())}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    path = build_tiny_qwen_vl(
        out,
        family=family,
        seed=seed,
        patch_size=patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        text_hidden=text_hidden,
        text_layers=text_layers,
        vision_hidden=vision_hidden,
        vision_depth=vision_depth,
    )
    print(f"wrote {path}")
    print(tiny_model_note(path, min_pixels, max_pixels))
    return 0


def tiny_model_problem(patch_size: int | None, image_size: int | None, min_pixels: int, max_pixels: int) -> str:
    """What is wrong with `tiny-model`'s size flags ("" when nothing)."""
    if patch_size is not None and patch_size <= 0:
        return f"--patch-size must be > 0, got {patch_size}"
    if image_size is not None and image_size <= 0:
        return f"--image-size must be > 0, got {image_size}"
    if not 0 < min_pixels <= max_pixels:
        return f"--min-pixels ({min_pixels}) must be > 0 and <= --max-pixels ({max_pixels})"
    return ""


def tiny_model_note(path: Path, min_pixels: int, max_pixels: int) -> str:
    """What the built model sees of square views (tokens per view) and the train flags that keep its pixel bounds
    (the run's --model.backbone.min/max-pixels decide the resize, not the saved processor)."""
    from sensorvla.models.backbone import load_processor, token_grid

    proc = load_processor(str(path), min_pixels=min_pixels, max_pixels=max_pixels)
    sizes = []
    for px in (64, 112, 224):
        seen = token_grid(proc, px, px)
        if seen is not None:
            sizes.append(f"{px} px -> {seen[0][0]}x{seen[0][1]}")
    return (
        f"VL tokens per square view: {', '.join(sizes)}. Train with --model.backbone.vl-model {path} "
        f"--model.backbone.min-pixels {min_pixels} --model.backbone.max-pixels {max_pixels}"
    )


def register(app) -> None:
    """Add `demo` and `tiny-model` to the `sensorvla` app."""
    app.command(demo, name="demo")
    app.command(tiny_model, name="tiny-model")
