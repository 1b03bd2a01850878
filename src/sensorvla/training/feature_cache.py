"""Stage-1 VL feature cache: encode every sample once with the frozen backbone, read it back by sample id.

Layout: <cache_dir>/<key>/meta.json + per-rank shards `shard-<r>-of-<w>.{feats,mask,ids}.npy` (a few large
memory-mapped arrays, not one file per sample) + `progress-<r>.json`. `key` hashes the fingerprint:
backbone id/revision/files, dtype, processor resolution, prompt template, pooling, views and the sample
ids. A stale (other fingerprint) or partial cache raises `StaleCacheError` with the rebuild command;
it is never silently reused. Building resumes from each shard's progress file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from sensorvla.config import SensorVLAConfig
from sensorvla.data.fingerprint import content_hash
from sensorvla.io import atomic_write_json

logger = logging.getLogger(__name__)

NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 stored as raw bits


class StaleCacheError(RuntimeError):
    """The VL feature cache does not match the current config or is incomplete."""


def rebuild_command(cfg: SensorVLAConfig) -> str:
    return (
        f"sensorvla train --mode cache --dataset_dir {cfg.data.dataset_dir} --vl-model "
        f"{cfg.model.backbone.vl_model} --train.cache-dir {cache_root(cfg)}"
    )


def cache_root(cfg: SensorVLAConfig) -> Path:
    return Path(cfg.train.cache_dir or Path(cfg.train.output_dir) / "vl_cache")


def _model_files_signature(vl_model: str) -> list:
    """Names, sizes and mtimes of a local backbone's files (a hub id is keyed by id + revision)."""
    p = Path(vl_model)
    if not p.is_dir():
        return []
    return sorted(
        (f.name, f.stat().st_size, int(f.stat().st_mtime))
        for f in p.iterdir()
        if f.suffix in {".json", ".safetensors", ".jinja"}
    )


def fingerprint(cfg: SensorVLAConfig, sample_ids: np.ndarray, dataset_id: str) -> dict:
    bb = cfg.model.backbone
    ids = np.ascontiguousarray(np.sort(np.asarray(sample_ids, dtype=np.int64)))
    return {
        "vl_model": bb.vl_model,
        "revision": bb.revision,
        "model_files": _model_files_signature(bb.vl_model),
        "backbone_dtype": bb.dtype,
        "cache_dtype": cfg.train.cache_dtype,
        "min_pixels": bb.min_pixels,
        "max_pixels": bb.max_pixels,
        "prompt_template": bb.prompt_template,
        "pooling": bb.pooling,
        "views": list(cfg.data.views),
        "image_staleness_s": cfg.data.image_staleness_s,
        "dataset_id": dataset_id,
        "dataset_content_sha256": content_hash(cfg.data.dataset_dir) if cfg.data.dataset_dir else None,
        "num_samples": int(ids.size),
        "sample_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def check_cacheable(cfg: SensorVLAConfig) -> None:
    if cfg.model.backbone.pooling != "view_mean":
        raise StaleCacheError(
            "the VL cache stores pooled per-view tokens; use --model.backbone.pooling view_mean "
            "or --train.use-cache never"
        )
    if cfg.data.vl_max_staleness_steps:
        raise StaleCacheError(
            "--data.vl-max-staleness-steps changes images every epoch and cannot be cached; use --train.use-cache never"
        )
    if cfg.data.mixture:
        raise StaleCacheError("the VL cache covers one dataset; use --train.use-cache never with --data.mixture")
    if cfg.model.finetune.mode != "none":
        raise StaleCacheError("a VL cache only makes sense for a frozen backbone (--finetune-vl none)")


class FeatureCache:
    """Read side: memory-maps every shard and looks rows up by sample id."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.torch_dtype = getattr(torch, meta["fingerprint"]["cache_dtype"])
        feats, masks, ids = [], [], []
        for r in range(meta["world_size"]):
            stem = folder / f"shard-{r}-of-{meta['world_size']}"
            feats.append(np.load(f"{stem}.feats.npy", mmap_mode="r"))
            masks.append(np.load(f"{stem}.mask.npy", mmap_mode="r"))
            ids.append(np.load(f"{stem}.ids.npy"))
        self._feats, self._masks = feats, masks
        self._where = {int(i): (s, row) for s, arr in enumerate(ids) for row, i in enumerate(arr)}

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sample ids (B,) -> features (B, N, D_vl) in the cache dtype, mask bool (B, N)."""
        rows = []
        for i in sample_ids.tolist():
            if i not in self._where:
                raise StaleCacheError(f"sample {i} is not in the VL cache {self.folder}; rebuild it")
            rows.append(self._where[i])
        f = np.stack([self._feats[s][r] for s, r in rows])
        m = np.stack([self._masks[s][r] for s, r in rows])
        t = torch.from_numpy(f.copy())
        t = t.view(torch.bfloat16) if self.meta["fingerprint"]["cache_dtype"] == "bfloat16" else t
        return t, torch.from_numpy(m.copy())


def open_cache(cfg: SensorVLAConfig, sample_ids: np.ndarray, dataset_id: str) -> FeatureCache | None:
    """Return a valid cache, None when no cache exists, or raise StaleCacheError for a stale/partial one."""
    root = cache_root(cfg)
    fp = fingerprint(cfg, sample_ids, dataset_id)
    folder = root / fingerprint_key(fp)
    if not (folder / "meta.json").exists():
        others = [p.name for p in root.glob("*/meta.json")] if root.exists() else []
        if others:
            raise StaleCacheError(
                f"the VL cache in {root} was built for another backbone/processor/prompt/views/samples "
                f"(fingerprint differs). Rebuild it: {rebuild_command(cfg)}  (or --train.use-cache never)"
            )
        return None
    meta = json.loads((folder / "meta.json").read_text())
    done = [
        json.loads((folder / f"progress-{r}.json").read_text())["done"]
        if (folder / f"progress-{r}.json").exists()
        else 0
        for r in range(meta["world_size"])
    ]
    if done != meta["shard_sizes"]:
        raise StaleCacheError(
            f"the VL cache {folder} is partial ({sum(done)}/{sum(meta['shard_sizes'])} samples). "
            f"Resume building it: {rebuild_command(cfg)}"
        )
    return FeatureCache(folder, meta)


@torch.inference_mode()
def build_cache(
    cfg: SensorVLAConfig,
    policy,
    loader_factory,
    sample_ids: np.ndarray,
    dataset_id: str,
    dist_info,
    progress: bool = True,
) -> Path:
    """Encode every sample (sharded rank r::world) and write it into the memory-mapped shards.

    Args:
        loader_factory: callable(indices: list[int], start: int) -> iterable of model batches for
            dataset positions `indices[start:]` in order (each batch carries `sample_id`).
        sample_ids: (N,) ids of the dataset positions 0..N-1.
    """
    from tqdm.auto import tqdm

    from sensorvla.training.distributed import barrier

    check_cacheable(cfg)
    fp = fingerprint(cfg, sample_ids, dataset_id)
    folder = cache_root(cfg) / fingerprint_key(fp)
    folder.mkdir(parents=True, exist_ok=True)
    world, rank = dist_info.world_size, dist_info.rank
    positions = list(range(rank, len(sample_ids), world))
    sizes = [len(range(r, len(sample_ids), world)) for r in range(world)]
    backbone = policy.backbone
    n_tok, dim = backbone.num_tokens, backbone.hidden_size
    if dist_info.is_main:
        meta_path = folder / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text())["world_size"] != world:
            raise StaleCacheError(f"{folder} was started with another world size; delete it and rebuild")
        atomic_write_json(
            meta_path,
            {"fingerprint": fp, "world_size": world, "shard_sizes": sizes, "num_tokens": n_tok, "hidden_size": dim},
        )
    barrier(dist_info)
    stem = folder / f"shard-{rank}-of-{world}"
    prog_path = folder / f"progress-{rank}.json"
    done = json.loads(prog_path.read_text())["done"] if prog_path.exists() else 0
    np_dtype = NP_DTYPES[cfg.train.cache_dtype]
    if done == 0 or not Path(f"{stem}.feats.npy").exists():
        done = 0
        feats = np.lib.format.open_memmap(
            f"{stem}.feats.npy", mode="w+", dtype=np_dtype, shape=(len(positions), n_tok, dim)
        )
        masks = np.lib.format.open_memmap(f"{stem}.mask.npy", mode="w+", dtype=np.bool_, shape=(len(positions), n_tok))
        np.save(f"{stem}.ids.npy", np.asarray(sample_ids, dtype=np.int64)[positions])
    else:
        feats = np.load(f"{stem}.feats.npy", mmap_mode="r+")
        masks = np.load(f"{stem}.mask.npy", mmap_mode="r+")
        logger.info("resuming VL cache shard %d at %d/%d", rank, done, len(positions))
    backbone.eval()
    device = next(backbone.parameters()).device
    tdtype = getattr(torch, cfg.train.cache_dtype)
    bar = tqdm(total=len(positions), initial=done, desc=f"VL cache [rank {rank}]", disable=not progress)
    row = done
    for batch in loader_factory(positions, done):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        f, m = backbone.encode_frozen(batch)
        n = f.shape[0]
        out = f.to(tdtype).cpu()
        feats[row : row + n] = (out.view(torch.uint16) if cfg.train.cache_dtype == "bfloat16" else out).numpy()
        masks[row : row + n] = m.cpu().numpy()
        row += n
        feats.flush()
        masks.flush()
        atomic_write_json(prog_path, {"done": row})
        bar.update(n)
    bar.close()
    barrier(dist_info)
    return folder
