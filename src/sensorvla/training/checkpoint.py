"""Checkpoints: the seed guide's `.pt` files (tensors only), `pretrained_model/`, and resume state.

<output_dir>/checkpoints/
    qwen_vla_sensor_best.pt        best by validation loss (seed keys, loads with weights_only=True)
    diffusion_epoch<N>.pt          diffusion head: one per epoch, as in the seed guide
    pretrained_model/              best model for serving/eval (config, safetensors, adapters, norm stats)
    last/                          resume state: checkpoint.pt (seed keys) + training_state.json + rng.pt
                                   + config.json (the run's resolved config) + run.json (dataset
                                   fingerprint, schedule length, world size) + manifest.json (sha256 of
                                   every file)
Every file is written atomically, so a kill during a save never leaves a broken `best` or `last`. Each
seed `.pt` file has a `<name>.sha256.json` sidecar; loading checks it (sensorvla.integrity).

Seed keys. stage 1: epoch, sensor_encoder, action_expert, optimizer_state_dict, scheduler_state_dict,
val_loss, training_stage="stage1", and vl_backbone when stage 1 trains the backbone (the trained vision tower /
LoRA adapters / full base, which stage 2 loads with the rest). stage 2: epoch, model_state_dict, and the same
others with training_stage="stage2". `action_expert` holds every non-backbone, non-sensor tensor (fusion + head + VL
projection); `model_state_dict` holds every tensor except the frozen HF base (it is named by the config).
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla import integrity
from sensorvla.io import atomic_dir, atomic_file, atomic_write_json, torch_load, torch_save
from sensorvla.models.folder import CheckpointMismatchError
from sensorvla.models.seed_checkpoint import (  # noqa: F401  (re-exported: the seed file format lives in models/)
    BACKBONE_KEY,
    BEST_NAME,
    load_seed_checkpoint,
    load_stage1_into,
    model_state,
    split_stage1,
    tensors_sha256,
    trained_backbone,
)
from sensorvla.models.seed_checkpoint import seed_mismatch as _mismatch

logger = logging.getLogger(__name__)

LAST_NAME = "last"
RUN_CONFIG_NAME = "config.json"
RUN_INFO_NAME = "run.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a file-size limit); the message names the path and
    the free space. The previous checkpoint of that name is kept (every write is atomic)."""


def _free_space(path: Path) -> str:
    """ "<free> GB free on the disk holding <folder>" for the nearest existing folder above `path`."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free on the disk holding {folder}"
    except OSError:
        return f"the free space of the disk holding {folder} is unknown"


@contextlib.contextmanager
def write_errors(path: Path):
    """Turn a failed checkpoint write (OSError, or torch's RuntimeError from its stream writer, which names no
    disk) into `CheckpointWriteError` naming `path`, the disk's free space and the fix."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(
            s in str(e) for s in ("PytorchStreamWriter", "file write failed", "unexpected pos")
        ):
            raise
        raise CheckpointWriteError(
            f"could not write the checkpoint {path}: the disk may be full ({_free_space(path)}; "
            f"{type(e).__name__}: {e}). Free space there, or point --train.output-dir at a disk with room; the "
            f"previous {Path(path).name} is kept."
        ) from e


def epoch_name(epoch: int) -> str:
    """The seed guide's per-epoch diffusion file name."""
    return f"diffusion_epoch{epoch}.pt"


def seed_payload(
    policy,
    optimizer,
    scheduler,
    *,
    epoch: int,
    val_loss: float,
    stage: str,
    state: dict | None = None,
    optimizer_state: dict | None = None,
) -> dict[str, Any]:
    """The seed guide's checkpoint dict. `state` / `optimizer_state`: gathered full states (FSDP2)."""
    payload: dict[str, Any] = {"epoch": int(epoch)}
    if stage == "stage1":
        payload["sensor_encoder"], payload["action_expert"] = split_stage1(policy, state)
        backbone = trained_backbone(policy, state)
        if backbone:  # a stage 1 that trains the backbone: stage 2 starts from these, not from the base weights
            payload[BACKBONE_KEY] = backbone
    else:
        payload["model_state_dict"] = model_state(policy, state)
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict() if optimizer is not None else {}
    payload["optimizer_state_dict"] = optimizer_state
    payload["scheduler_state_dict"] = scheduler.state_dict() if scheduler is not None else {}
    payload["val_loss"] = float(val_loss)
    payload["training_stage"] = stage
    return payload


def load_model_payload(policy, ckpt: dict, path) -> None:
    """Restore model tensors from a seed payload of either stage (used by resume)."""
    # exact key set verified by payload_model_tensors; the rest is the frozen base
    policy.load_state_dict(payload_model_tensors(policy, ckpt, path), strict=False)


def payload_model_tensors(policy, ckpt: dict, path) -> dict:
    """The model tensors of a seed payload of either stage, checked to be exactly the set `policy` saves."""
    if ckpt.get("training_stage") == "stage2":
        sd, expected = ckpt["model_state_dict"], set(model_state(policy))
    else:  # stage 1: its two seed sections, plus the backbone tensors it trains (LoRA / vision tower), if any
        sd = {**ckpt["sensor_encoder"], **ckpt["action_expert"], **ckpt.get(BACKBONE_KEY, {})}
        expected = set().union(*split_stage1(policy), trained_backbone(policy))
    if set(sd) != expected:
        raise _mismatch(path, expected - set(sd), set(sd) - expected)
    return sd


def load_sharded_payload(policy, optimizer, ckpt: dict, path) -> None:
    """Resume under FSDP2: the payload's full model and optimizer states (saved gathered) -> this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    sd = payload_model_tensors(policy, ckpt, path)
    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen HF base is not in the payload
    set_model_state_dict(policy, sd, options=options)
    set_optimizer_state_dict(policy, optimizer, ckpt["optimizer_state_dict"], options=options)


# --- resume state ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The torch / numpy / python (and CUDA) RNG states, for resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# numpy's RNG state holds a uint32 array: what `weights_only` loading must be allowed to rebuild to read it back
RNG_SAFE_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def _legacy_rng(t: dict[str, Any]) -> dict[str, Any]:
    """An rng.pt rank entry written before the states were saved as they are (packed into tensors) -> them."""
    meta, gauss = t["numpy_meta"].tolist(), float(t["numpy_gauss"][0])
    return {
        **{k: t[k] for k in ("torch", "cuda") if k in t},
        "numpy": ("MT19937", t["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], gauss),
        "python": (int(t["python_version"][0]), tuple(t["python"].tolist()), None),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state` (also from an rng.pt that packed them into tensors)."""
    if "numpy_keys" in state:
        state = _legacy_rng(state)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(
    ckpt_dir: Path,
    payload: dict,
    state: dict,
    rng_per_rank: list[dict],
    config_json: str | None = None,
    run_info: dict | None = None,
) -> Path:
    """Atomically replace <ckpt_dir>/last with the seed payload, JSON state, every rank's RNG, the run's
    config and run info (what resume compares against), and a sha256 manifest of every file."""
    with write_errors(ckpt_dir / LAST_NAME), atomic_dir(ckpt_dir / LAST_NAME) as tmp:
        torch_save(payload, tmp / "checkpoint.pt")
        torch_save({"ranks": rng_per_rank}, tmp / "rng.pt")
        atomic_write_json(tmp / "training_state.json", state)
        if config_json is not None:
            (tmp / RUN_CONFIG_NAME).write_text(config_json)
        if run_info is not None:
            atomic_write_json(tmp / RUN_INFO_NAME, run_info)
        integrity.write_manifest(tmp)  # every file: the seed payload, RNG, state, config, run info
    return ckpt_dir / LAST_NAME


def load_last(ckpt_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(seed payload, training state, per-rank RNG) from <ckpt_dir>/last, checked against its manifest."""
    import json

    last = Path(ckpt_dir) / LAST_NAME
    if not (last / "training_state.json").exists():
        raise FileNotFoundError(f"--resume: no resumable state in {last}; start without --resume")
    problems = integrity.verify_manifest(last)
    if problems:
        raise CheckpointMismatchError("--resume: " + "; ".join(problems))
    state = json.loads((last / "training_state.json").read_text())
    payload = load_seed_checkpoint(last / "checkpoint.pt")
    with torch.serialization.safe_globals(list(RNG_SAFE_GLOBALS)):
        rng = torch_load(last / "rng.pt")["ranks"]
    return payload, state, rng


def load_run_config(output_dir: str | Path):
    """The saved run's config from <output_dir>/checkpoints/last/config.json, or None (no saved run)."""
    from sensorvla.config import ConfigError, SensorVLAConfig

    path = Path(output_dir) / "checkpoints" / LAST_NAME / RUN_CONFIG_NAME
    if not path.exists():
        return None
    try:
        return SensorVLAConfig.load(path)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError; so is a JSON syntax error
        raise ConfigError(
            f"--resume: {path} (the saved run's config) is unreadable: {e}. Fix it, or start a new run in another "
            "--train.output-dir"
        ) from e


def load_run_info(ckpt_dir: str | Path) -> dict | None:
    """The saved run's run.json (fingerprint, schedule length, world size), or None."""
    import json

    path = Path(ckpt_dir) / LAST_NAME / RUN_INFO_NAME
    return json.loads(path.read_text()) if path.exists() else None


def save_seed_file(path: Path, payload: dict) -> Path:
    """torch.save a seed payload atomically with its sha256 sidecar (see `integrity.write_sidecar`)."""
    path = Path(path)
    previous = integrity.file_sha256(path) if path.exists() else None
    with write_errors(path), atomic_file(path) as tmp:
        torch.save(payload, tmp)
        digest = integrity.file_sha256(tmp)
        integrity.write_sidecar(path, digest, previous=previous)  # both accepted until the rename
    integrity.write_sidecar(path, digest)
    return path


def finite_checkpoint(path: Path) -> dict | None:
    """{"epoch", "val_loss"} of a seed `.pt` file whose tensors and val_loss are all finite; None otherwise
    (unreadable, failed its sha256 check, or holding a NaN/inf)."""
    try:
        payload = load_seed_checkpoint(path)
    except (CheckpointMismatchError, FileNotFoundError):
        return None
    sections = [payload.get(k) for k in ("sensor_encoder", "action_expert", BACKBONE_KEY, "model_state_dict")]
    tensors = [t for sd in sections if isinstance(sd, dict) for t in sd.values() if torch.is_tensor(t)]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    val_loss = float(payload.get("val_loss", float("nan")))
    if not tensors or not finite or not np.isfinite(val_loss):
        return None
    return {"epoch": payload.get("epoch"), "val_loss": val_loss}


def backup_if_overwritten(ckpt_dir: Path, stage1_checkpoint: str | None, names: list[str]) -> None:
    """Stage 2 writes the same file names as stage 1; keep the stage-1 input under checkpoints/stage1/."""
    if not stage1_checkpoint:
        return
    src = Path(stage1_checkpoint).resolve()
    for name in names:
        if (ckpt_dir / name).resolve() == src and src.exists():
            dst = ckpt_dir / "stage1" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                import shutil

                shutil.copy2(src, dst)
                if integrity.sidecar(src).exists():
                    shutil.copy2(integrity.sidecar(src), integrity.sidecar(dst))
                logger.warning("stage 2 will overwrite %s; the stage-1 file is kept at %s", src, dst)
