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


def tiny_model(out: Path, family: Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl"] = "qwen2_5_vl", seed: int = 0) -> int:
    """Build a tiny random Qwen-VL (model + tokenizer + processor) in the hub layout, offline."""
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    print(f"wrote {build_tiny_qwen_vl(out, family=family, seed=seed)}")
    return 0


def register(app) -> None:
    """Add `demo` and `tiny-model` to the `sensorvla` app."""
    app.command(demo, name="demo")
    app.command(tiny_model, name="tiny-model")
