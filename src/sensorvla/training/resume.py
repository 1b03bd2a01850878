"""Resume policy: what a resumed run may change relative to the saved one.

A resumed run is compared with the config and dataset fingerprint saved in `checkpoints/last/`:
- refused (they change what the saved position means): the model, the data assembly, the dataset
  content, batch size, accumulation, epochs, schedule length, seed, stage, mode and strategy (training-only
  regularisers, modality dropout and image augmentation, may change);
- applied to the restored optimizer with a note: `--lr`, `--sensor-lr`, `--vl-lr`, `--train.vision-lr`,
  `--train.weight-decay` (the LambdaLR base_lrs follow, so the schedule continues from the new value);
- everything else (max steps, patience, logging, grad clip, ...) is taken as given and listed in the diff.
"""

from __future__ import annotations

from typing import Any

from sensorvla.config import SEED_ALIASES, ConfigError

REFUSED_TRAIN = ("stage", "mode", "batch_size", "grad_accum_steps", "epochs", "schedule_steps", "seed", "strategy")
OPTIMIZER_TRAIN = ("lr", "sensor_lr", "vl_lr", "vision_lr", "weight_decay")
FREE_DATA = ("dataset_dir", "num_workers")  # a moved dataset is fine; its content is the fingerprint's job
# training-only regularisers: they change what the next steps see, not what the saved position means
FREE_MODEL = ("view_dropout", "sensor_dropout")
FREE_DATA_SECTIONS = ("augment.",)
IGNORED = ("train.resume", "train.output_dir", "train.stage1_checkpoint")  # read before resume / stage-2 start


class ResumeMismatchError(ConfigError):
    """`--resume` was asked with a change that would reinterpret the saved training position."""


def flag_name(key: str) -> str:
    """`train.batch_size` -> `--train.batch-size` (plus the seed guide's spelling when there is one)."""
    *parents, leaf = key.split(".")
    dotted = "--" + ".".join([*parents, leaf.replace("_", "-")])
    seed = [a for a, target in SEED_ALIASES.items() if target == dotted]
    return f"{dotted} ({seed[0]})" if seed else dotted


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: leaf value} (tuples as lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every differing leaf of two `to_dict()` configs."""
    a, b = flatten(saved), flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_refused(key: str) -> bool:
    """True when changing `key` on resume would reinterpret the saved training position."""
    section, _, name = key.partition(".")
    if key in IGNORED:
        return False
    if section == "model":
        return name not in FREE_MODEL
    if section == "data":
        return name not in FREE_DATA and not name.startswith(FREE_DATA_SECTIONS)
    return section == "train" and name in REFUSED_TRAIN


def check_resume(
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_fingerprint: Any = None,
    current_fingerprint: Any = None,
    where: str = "",
) -> list[str]:
    """Diff lines for the log; raise `ResumeMismatchError` naming every flag whose change is refused."""
    lines, refused = [], []
    for key, old, new in config_diff(saved, current):
        if key in IGNORED:
            continue
        name = key.partition(".")[2]
        if is_refused(key):
            refused.append(f"{flag_name(key)}: saved {old!r}, now {new!r}")
            note = "REFUSED"
        elif key.startswith("train.") and name in OPTIMIZER_TRAIN:
            note = "applied to the restored optimizer"
        else:
            note = "taken as given"
        lines.append(f"  {flag_name(key)}: {old!r} -> {new!r} ({note})")
    if saved_fingerprint is not None and current_fingerprint is not None and saved_fingerprint != current_fingerprint:
        refused.append(
            "--data.dataset-dir: the dataset's content changed since the run was saved "
            f"(fingerprint {saved_fingerprint!r} -> {current_fingerprint!r})"
        )
    if refused:
        raise ResumeMismatchError(
            f"--resume from {where or 'the saved run'} would reinterpret the saved position: "
            + "; ".join(refused)
            + ". Resume with the saved values (drop those flags), or start a new run in another "
            "--train.output-dir."
        )
    return lines


def apply_optimizer_settings(optimizer, scheduler, lrs: dict[str, float], weight_decay: float) -> list[str]:
    """Set the configured lr / weight decay on restored param groups that differ; returns a note per group.

    `lrs`: group base name -> lr (`param_groups.group_lrs`). The LambdaLR `base_lrs` are updated too and the
    current lr is recomputed at the restored step, so the schedule continues from the new value.
    """
    notes = []
    for i, g in enumerate(optimizer.param_groups):
        name = g.get("name", str(i))
        base = name.split("/")[0]
        lr = lrs[base]
        wd = 0.0 if name.endswith("/no_decay") else weight_decay
        old_lr, old_wd = scheduler.base_lrs[i], g["weight_decay"]
        if old_lr != lr:
            scheduler.base_lrs[i] = lr
            g["initial_lr"] = lr
            g["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
            notes.append(f"{name}: lr {old_lr:g} -> {lr:g}")
        if old_wd != wd:
            g["weight_decay"] = wd
            notes.append(f"{name}: weight decay {old_wd:g} -> {wd:g}")
    if notes:
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return notes
