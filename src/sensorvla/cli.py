"""`sensorvla` command line: parse, then call ONE library function per subcommand.

`sensorvla train` takes dotted overrides of `SensorVLAConfig` (tyro), e.g. `--model.head.type diffusion`,
and also every flag spelling of the seed guide (`--training-stage`, `--grad_accum`, `--batch_size`, ...),
which `SEED_ALIASES` rewrites to the dotted form. Environment variables are read here only.
"""

from __future__ import annotations

import logging
import os
import sys

# seed-guide flag (hyphenated) -> dotted config flag. Both `--a-b` and `--a_b` spellings are accepted.
SEED_ALIASES = {
    "--training-stage": "--train.stage",
    "--stage1-checkpoint": "--train.stage1-checkpoint",
    "--finetune-vl": "--model.finetune.mode",
    "--lora-r": "--model.finetune.lora-r",
    "--lora-alpha": "--model.finetune.lora-alpha",
    "--lora-dropout": "--model.finetune.lora-dropout",
    "--lora-target-modules": "--model.finetune.lora-target-modules",
    "--lora-targets": "--model.finetune.lora-target-modules",  # language | vision | all | a regex
    "--vl-lr": "--train.vl-lr",
    "--lr": "--train.lr",
    "--sensor-lr": "--train.sensor-lr",
    "--mode": "--train.mode",
    "--diffusion-timesteps": "--model.head.diffusion-timesteps",
    "--sensor-loss-weight": "--train.sensor-loss-weight",
    "--sensor-enabled": "--model.sensor.enabled",
    "--no-sensor-enabled": "--model.sensor.no-enabled",
    "--fusion-strategy": "--model.fusion.strategy",
    "--epochs": "--train.epochs",
    "--batch-size": "--train.batch-size",
    "--grad-accum-steps": "--train.grad-accum-steps",
    "--grad-accum": "--train.grad-accum-steps",
    "--dataset-dir": "--data.dataset-dir",
    "--vl-model": "--model.backbone.vl-model",
    "--head": "--model.head.type",
    "--output-dir": "--train.output-dir",
    "--resume": "--train.resume",
    "--max-steps": "--train.max-steps",
    "--seed": "--train.seed",
    "--num-workers": "--data.num-workers",
}
VL_MODEL_ENV = "SENSORVLA_VL_MODEL"  # default backbone, e.g. a local tiny model for offline runs


def rewrite_seed_flags(argv: list[str]) -> list[str]:
    """Translate seed-guide spellings into dotted flags; underscores in flag names become hyphens."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("_", "-")
            name = SEED_ALIASES.get(name, name)
            arg = f"{name}{eq}{value}"
        out.append(arg)
    return out


def parse_train_config(argv: list[str], default_head: str = "regression"):
    """argv (seed or dotted flags) -> SensorVLAConfig with the seed's stage defaults applied.

    With `--resume`, the saved run's config (`<output_dir>/checkpoints/last/config.json`) is the default
    that the given flags override, so a resumed run changes only what the command line names.
    """
    import tyro

    from sensorvla.config import SensorVLAConfig, resolve_stage_defaults
    from sensorvla.presets import apply_preset, pop_preset, preset_help

    preset, args = pop_preset(rewrite_seed_flags(argv))
    cfg = SensorVLAConfig()
    cfg.model.head.type = default_head
    if os.environ.get(VL_MODEL_ENV):
        cfg.model.backbone.vl_model = os.environ[VL_MODEL_ENV]
    if preset:
        apply_preset(cfg, preset)  # the flags below override it
    aliases = ", ".join(sorted(SEED_ALIASES))

    def parse(default: SensorVLAConfig) -> SensorVLAConfig:
        return tyro.cli(
            SensorVLAConfig,
            args=args,
            default=default,
            prog="sensorvla train",
            description="Train stage 1 / stage 2 with one loop. Seed-guide flags are accepted too "
            f"(with - or _): {aliases}. Default backbone: ${VL_MODEL_ENV} or {cfg.model.backbone.vl_model}. "
            "With --resume, the saved run's config is the default. --preset NAME starts from a named config "
            f"({preset_help()}).",
        )

    parsed = parse(cfg)
    if parsed.train.resume:
        from sensorvla.training.checkpoint import load_run_config

        saved = load_run_config(parsed.train.output_dir)
        if saved is not None:
            parsed = parse(saved)
    return resolve_stage_defaults(parsed)


def cmd_train(argv: list[str], default_head: str = "regression") -> int:
    from sensorvla.config import ConfigError

    try:
        cfg = parse_train_config(argv, default_head)
        cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sensorvla.training.loop import train

    try:
        train(cfg)  # logs the stage warnings (config.stage_warnings) itself, for Python callers too
    except KNOWN_ERRORS() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def KNOWN_ERRORS() -> tuple[type[BaseException], ...]:  # noqa: N802
    """Errors whose message already says what to do: print it without a traceback."""
    from sensorvla.config import ConfigError
    from sensorvla.data.normalize import NormalizationError
    from sensorvla.data.types import DataError
    from sensorvla.models.backbone import BackboneLoadError
    from sensorvla.models.finetune import FinetuneError
    from sensorvla.models.pretrained import CheckpointMismatchError
    from sensorvla.training.feature_cache import StaleCacheError
    from sensorvla.training.loop import TrainingDivergedError

    return (
        ConfigError,  # e.g. a resume that would reinterpret the saved run
        CheckpointMismatchError,
        StaleCacheError,
        NormalizationError,
        DataError,
        FinetuneError,
        TrainingDivergedError,
        BackboneLoadError,
        FileNotFoundError,
        FileExistsError,
    )


def _sub(fn, argv: list[str], prog: str):
    import tyro

    return tyro.cli(fn, args=argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sensorvla import commands
    from sensorvla.runtime import configure_threads

    table = commands.COMMANDS
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: sensorvla <command> [flags]\n\ncommands:")
        for name, (_, help_text) in table.items():
            print(f"  {name:<22}{help_text}")
        print("  train                 train stage 1 / stage 2 (seed-guide flags or dotted overrides)")
        return 0
    verb, rest = argv[0], argv[1:]
    configure_threads()
    if verb == "train":
        return cmd_train(rest)
    if verb in commands.RAW_ARGV_COMMANDS:  # `plan` parses the train flags itself
        try:
            return table[verb][0](rest)
        except KNOWN_ERRORS() as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    if verb in {"data", "bench"} and rest and f"{verb} {rest[0]}" in table:
        verb, rest = f"{verb} {rest[0]}", rest[1:]
    if verb not in table:
        print(f"error: unknown command {verb!r}; run `sensorvla --help`", file=sys.stderr)
        return 2
    try:
        result = _sub(table[verb][0], rest, f"sensorvla {verb}")
    except KNOWN_ERRORS() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def train_entry() -> None:
    """`python -m sensorvla.train` (regression by default), usable under torchrun."""
    from sensorvla.runtime import configure_threads

    configure_threads()
    sys.exit(cmd_train(sys.argv[1:], "regression"))


def train_diffusion_entry() -> None:
    """`python -m sensorvla.train_diffusion`: the seed's diffusion script (diffusion head by default)."""
    from sensorvla.runtime import configure_threads

    configure_threads()
    sys.exit(cmd_train(sys.argv[1:], "diffusion"))


if __name__ == "__main__":
    sys.exit(main())
