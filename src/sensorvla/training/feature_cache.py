"""Stage-1 VL feature cache: encode every sample once with the frozen backbone, read it back by sample id.

Every token mode is cacheable (grid, all, view_mean, resampler): a sample's VL tokens (N_i, D_vl) are
stored as a variable-length row, so no padding is written and a mode whose token count varies (all,
resampler) costs only what it holds. Samples that show the backbone the same input (the same camera frame
of every view and the same instruction, common when cameras run slower than the action rate) share one
row: meta.json maps their ids to the encoded one. Layout: <cache_dir>/<key>/meta.json + per-rank shards
`shard-<r>-of-<w>.{feats,pos,mask}.bin` (raw fp16/bf16 tokens (T, D_vl), float16 positions (T, 3), bool
masks (T,); memory-mapped on read) + `shard-<r>-of-<w>.index.json` (sample ids and row offsets, rewritten
atomically after every batch: it is the progress record, so a killed build resumes where it stopped).

`key` hashes the fingerprint: backbone id, requested revision and what it resolves to (the hub snapshot's
commit, or a local folder's config hash) and files, the dtype the backbone runs in (`auto` resolved on the
run's device), the attention implementation, processor resolution, prompt template, token mode, grid size,
feature layer, views, the dataset content and the sample ids (tests/training/test_vl_modes.py changes each
one). A stale
(other fingerprint) or partial cache raises `StaleCacheError` with the rebuild command; it is never silently
reused. Before building, the size on disk is printed and checked against `--train.cache-max-gb`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from sensorvla import hub
from sensorvla.config import SensorVLAConfig
from sensorvla.data.fingerprint import content_hash
from sensorvla.io import atomic_write_json

logger = logging.getLogger(__name__)

NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 stored as raw bits
FORMAT_VERSION = 2


class StaleCacheError(RuntimeError):
    """The VL feature cache does not match the current config or is incomplete."""


def rebuild_command(cfg: SensorVLAConfig) -> str:
    """The command line that (re)builds the cache for `cfg`."""
    return (
        f"sensorvla train --mode cache --dataset_dir {cfg.data.dataset_dir} --vl-model "
        f"{cfg.model.backbone.vl_model} --train.cache-dir {cache_root(cfg)}"
    )


def cache_root(cfg: SensorVLAConfig) -> Path:
    """Where caches live: --train.cache-dir, default <output_dir>/vl_cache."""
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


def local_config_sha256(vl_model: str) -> str | None:
    """The sha256 of a local backbone folder's config.json (what its weights are, beyond the files' names, sizes
    and mtimes); None for a hub id (keyed by its commit, `hub.commit_of`)."""
    config = Path(vl_model) / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None


def run_device(cfg: SensorVLAConfig) -> torch.device:
    """The device `--train.device` resolves to (auto: CUDA when available), as `init_distributed` does."""
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def fingerprint(
    cfg: SensorVLAConfig, sample_ids: np.ndarray, dataset_id: str, device: torch.device | str | None = None
) -> dict:
    """Everything the cached tokens depend on; any change gives another cache key. `device`: where the backbone
    runs (default: `--train.device`), which decides what `--model.backbone.dtype auto` means."""
    from sensorvla.models.backbone import resolve_dtype

    bb = cfg.model.backbone
    ids = np.ascontiguousarray(np.sort(np.asarray(sample_ids, dtype=np.int64)))
    dtype = resolve_dtype(bb.dtype, run_device(cfg) if device is None else device)
    return {
        "format": FORMAT_VERSION,
        "vl_model": bb.vl_model,
        "revision": bb.revision,
        # the commit a hub id (and its revision) resolves to in the hub cache (sensorvla/hub.py), None for a folder:
        # a moved branch or tag never reuses another commit's features
        "vl_commit": hub.commit_of(bb.vl_model, bb.revision),
        "vl_config_sha256": local_config_sha256(bb.vl_model),  # a local folder's config.json (None for a hub id)
        "model_files": _model_files_signature(bb.vl_model),
        "backbone_dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": bb.attn_implementation,
        "cache_dtype": cfg.train.cache_dtype,
        "min_pixels": bb.min_pixels,
        "max_pixels": bb.max_pixels,
        "prompt_template": bb.prompt_template,
        "pooling": bb.pooling,
        "grid_size": bb.grid_size if bb.pooling == "grid" else None,
        "feature_layer": bb.feature_layer,
        "views": list(cfg.data.views),
        "image_staleness_s": cfg.data.image_staleness_s,
        "dataset_id": dataset_id,
        "dataset_content_sha256": content_hash(cfg.data.dataset_dir) if cfg.data.dataset_dir else None,
        "num_samples": int(ids.size),
        "sample_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def fingerprint_key(fp: dict) -> str:
    """A short stable hash of a fingerprint (the cache's folder name)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def backbone_frozen(cfg: SensorVLAConfig) -> bool:
    """Whether no backbone weight trains (the only case in which cached VL tokens stay valid)."""
    return cfg.model.finetune.mode == "none" and not cfg.model.finetune.full_vision


def check_cacheable(cfg: SensorVLAConfig) -> None:
    """Raise StaleCacheError (with the fix) when the run's inputs to the backbone cannot be cached."""
    if cfg.data.vl_max_staleness_steps:
        raise StaleCacheError(
            "--data.vl-max-staleness-steps changes images every epoch and cannot be cached; use --train.use-cache never"
        )
    if cfg.data.mixture:
        raise StaleCacheError("the VL cache covers one dataset; use --train.use-cache never with --data.mixture")
    if not backbone_frozen(cfg):
        raise StaleCacheError(
            "a VL cache only makes sense for a frozen backbone (--finetune-vl none, no --model.finetune.full-vision)"
        )


def _shard_stem(folder: Path, rank: int, world: int) -> Path:
    return folder / f"shard-{rank}-of-{world}"


def _read_index(stem: Path) -> dict:
    path = Path(f"{stem}.index.json")
    return json.loads(path.read_text()) if path.exists() else {"ids": [], "offsets": [0]}


class FeatureCache:
    """Read side: memory-maps every shard and looks rows up by sample id."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.cache_dtype = meta["fingerprint"]["cache_dtype"]
        dim = int(meta["hidden_size"])
        self._feats, self._pos, self._mask, self._offsets = [], [], [], []
        self._where: dict[int, tuple[int, int]] = {}
        for r in range(meta["world_size"]):
            stem = _shard_stem(folder, r, meta["world_size"])
            index = _read_index(stem)
            total = int(index["offsets"][-1])
            self._feats.append(_memmap(f"{stem}.feats.bin", NP_DTYPES[self.cache_dtype], (total, dim)))
            self._pos.append(_memmap(f"{stem}.pos.bin", np.float16, (total, 3)))
            self._mask.append(_memmap(f"{stem}.mask.bin", np.bool_, (total,)))
            self._offsets.append(np.asarray(index["offsets"], dtype=np.int64))
            for row, i in enumerate(index["ids"]):
                self._where[int(i)] = (r, row)
        for alias, owner in meta.get("aliases", {}).items():  # samples that share a camera frame set
            if int(owner) in self._where:
                self._where[int(alias)] = self._where[int(owner)]

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sample ids (B,) -> features (B, N, D_vl) in the cache dtype, mask bool (B, N), positions float32
        (B, N, 3); rows shorter than the batch's longest are right-padded and masked."""
        rows = []
        for i in sample_ids.tolist():
            if i not in self._where:
                raise StaleCacheError(f"sample {i} is not in the VL cache {self.folder}; rebuild it")
            rows.append(self._where[i])
        spans = [(s, int(self._offsets[s][r]), int(self._offsets[s][r + 1])) for s, r in rows]
        n = max(hi - lo for _, lo, hi in spans)
        dim = int(self.meta["hidden_size"])
        feats = np.zeros((len(spans), n, dim), self._feats[0].dtype)
        pos = np.zeros((len(spans), n, 3), np.float32)
        mask = np.zeros((len(spans), n), bool)
        for b, (s, lo, hi) in enumerate(spans):
            feats[b, : hi - lo] = self._feats[s][lo:hi]
            pos[b, : hi - lo] = self._pos[s][lo:hi]
            mask[b, : hi - lo] = self._mask[s][lo:hi]
        t = torch.from_numpy(feats)
        t = t.view(torch.bfloat16) if self.cache_dtype == "bfloat16" else t
        return t, torch.from_numpy(mask), torch.from_numpy(pos)


def _memmap(path: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size < expected:
        raise StaleCacheError(
            f"{path} holds {size} bytes, the index needs {expected}: the cache is corrupt; rebuild it"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def open_cache(
    cfg: SensorVLAConfig, sample_ids: np.ndarray, dataset_id: str, device: torch.device | str | None = None
) -> FeatureCache | None:
    """Return a valid cache, None when no cache exists, or raise StaleCacheError for a stale/partial one."""
    root = cache_root(cfg)
    fp = fingerprint(cfg, sample_ids, dataset_id, device)
    folder = root / fingerprint_key(fp)
    if not (folder / "meta.json").exists():
        others = [p.name for p in root.glob("*/meta.json")] if root.exists() else []
        if others:
            raise StaleCacheError(
                f"the VL cache in {root} was built for another backbone/processor/prompt/token mode/views/samples "
                f"(fingerprint differs). Rebuild it: {rebuild_command(cfg)}  (or --train.use-cache never)"
            )
        return None
    meta = json.loads((folder / "meta.json").read_text())
    done = [len(_read_index(_shard_stem(folder, r, meta["world_size"]))["ids"]) for r in range(meta["world_size"])]
    if done != meta["shard_sizes"]:
        raise StaleCacheError(
            f"the VL cache {folder} is partial ({sum(done)}/{sum(meta['shard_sizes'])} samples). "
            f"Resume building it: {rebuild_command(cfg)}"
        )
    return FeatureCache(folder, meta)


def estimate_bytes(num_samples: int, tokens_per_sample: float, dim: int, cache_dtype: str) -> int:
    """Bytes on disk for `num_samples` rows of `tokens_per_sample` tokens (features + positions + masks)."""
    per_token = dim * np.dtype(NP_DTYPES[cache_dtype]).itemsize + 3 * 2 + 1
    return int(num_samples * tokens_per_sample * per_token)


def _to_numpy(t: torch.Tensor, cache_dtype: str) -> np.ndarray:
    out = t.to(getattr(torch, cache_dtype)).cpu()
    if cache_dtype == "bfloat16":
        return out.view(torch.uint16).numpy()
    arr = out.numpy()
    if cache_dtype == "float16" and not np.isfinite(arr).all():
        raise StaleCacheError(
            "VL features overflow float16 (|x| > 65504; large activations of an intermediate layer?). "
            "Build the cache with --train.cache-dtype bfloat16 (or float32)."
        )
    return arr


class _ShardWriter:
    """Appends variable-length rows to one rank's shard; `index.json` (atomic) records what is complete."""

    def __init__(self, stem: Path, cache_dtype: str):
        self.stem, self.cache_dtype = stem, cache_dtype
        self.index = _read_index(stem)
        self.files = {}
        for part in ("feats", "pos", "mask"):
            path = Path(f"{stem}.{part}.bin")
            f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (closed in close())
            self.files[part] = f
        total = int(self.index["offsets"][-1])
        sizes = {
            "feats": None,
            "pos": total * 3 * 2,
            "mask": total,
        }
        for part, f in self.files.items():  # drop a torn tail written after the last recorded batch
            if sizes[part] is not None:
                f.truncate(sizes[part])
            f.seek(0, os.SEEK_END)

    @property
    def done(self) -> int:
        return len(self.index["ids"])

    def align_features(self, dim: int) -> None:
        itemsize = np.dtype(NP_DTYPES[self.cache_dtype]).itemsize
        f = self.files["feats"]
        f.truncate(int(self.index["offsets"][-1]) * dim * itemsize)
        f.seek(0, os.SEEK_END)

    def append(self, ids: list[int], feats: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> None:
        """One batch: feats (B, N, D), mask (B, N), pos (B, N, 3); padding beyond a row's last valid
        token is dropped (an invalid token inside a row is kept, masked)."""
        for b, sid in enumerate(ids):
            valid = np.nonzero(mask[b])[0]
            n = int(valid[-1]) + 1 if valid.size else 0
            self.files["feats"].write(np.ascontiguousarray(feats[b, :n]).tobytes())
            self.files["pos"].write(np.ascontiguousarray(pos[b, :n], dtype=np.float16).tobytes())
            self.files["mask"].write(np.ascontiguousarray(mask[b, :n], dtype=np.bool_).tobytes())
            self.index["ids"].append(int(sid))
            self.index["offsets"].append(int(self.index["offsets"][-1]) + n)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(Path(f"{self.stem}.index.json"), self.index)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


@torch.inference_mode()
def build_cache(
    cfg: SensorVLAConfig,
    policy,
    loader_factory,
    sample_ids: np.ndarray,
    dataset_id: str,
    dist_info,
    progress: bool | str = True,
    vl_keys: list | None = None,
) -> Path:
    """Encode every distinct VL input once (sharded rank r::world) and append it to this rank's shard.

    Args:
        loader_factory: callable(indices: list[int], start: int) -> iterable of model batches for
            dataset positions `indices[start:]` in order (each batch carries `sample_id`).
        sample_ids: (N,) ids of the dataset positions 0..N-1.
        vl_keys: per dataset position, a hashable key of what the backbone sees (episode, camera frame of
            each view, instruction). Samples with the same key share one row: with cameras slower than
            the action rate, most action frames reuse a camera frame, and it is encoded once.
    """
    from sensorvla.progress import Progress
    from sensorvla.training.distributed import barrier

    check_cacheable(cfg)
    fp = fingerprint(cfg, sample_ids, dataset_id, dist_info.device)
    folder = cache_root(cfg) / fingerprint_key(fp)
    folder.mkdir(parents=True, exist_ok=True)
    world, rank = dist_info.world_size, dist_info.rank
    unique, aliases = _distinct_inputs(sample_ids, vl_keys)
    positions = unique[rank::world]
    sizes = [len(unique[r::world]) for r in range(world)]
    backbone = policy.backbone
    dim = backbone.hidden_size
    meta_path = folder / "meta.json"
    if dist_info.is_main and meta_path.exists() and json.loads(meta_path.read_text())["world_size"] != world:
        raise StaleCacheError(f"{folder} was started with another world size; delete it and rebuild")
    done = len(_read_index(_shard_stem(folder, rank, world))["ids"])
    batches = iter(loader_factory(positions, done))
    backbone.eval()
    device = next(backbone.parameters()).device
    first = next(batches, None)
    first_vl = None
    if first is not None:  # size on disk from a real encoded batch, checked before anything is written
        first = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first.items()}
        first_vl = backbone.encode(first)
        if done == 0:
            _check_budget(cfg, len(unique), float(first_vl.mask.sum(1).float().mean()), dim, dist_info.is_main)
    if dist_info.is_main:
        meta = {"fingerprint": fp, "world_size": world, "shard_sizes": sizes, "hidden_size": dim}
        atomic_write_json(meta_path, {**meta, "aliases": aliases, "samples": int(len(sample_ids))})
    barrier(dist_info)
    writer = _ShardWriter(_shard_stem(folder, rank, world), cfg.train.cache_dtype)
    writer.align_features(dim)
    if writer.done:
        logger.info("resuming VL cache shard %d at %d/%d", rank, writer.done, len(positions))
    bar = Progress(
        total=len(positions), initial=writer.done, desc=f"VL cache [rank {rank}]", unit="rows", mode=progress
    )
    try:
        while first is not None:
            batch, vl = first, first_vl
            writer.append(
                batch["sample_id"].tolist(),
                _to_numpy(vl.feats, cfg.train.cache_dtype),
                vl.mask.cpu().numpy(),
                vl.pos.float().cpu().numpy(),
            )
            bar.update(vl.feats.shape[0])
            first = next(batches, None)
            if first is not None:
                first = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first.items()}
                first_vl = backbone.encode(first)
    finally:
        bar.close()
        writer.close()
    barrier(dist_info)
    return folder


def _distinct_inputs(sample_ids: np.ndarray, vl_keys: list | None) -> tuple[list[int], dict[str, int]]:
    """(dataset positions to encode, {sample id: sample id whose row it shares}) for `vl_keys`."""
    if vl_keys is None:
        return list(range(len(sample_ids))), {}
    first: dict = {}
    aliases: dict[str, int] = {}
    for pos, key in enumerate(vl_keys):
        if key in first:
            aliases[str(int(sample_ids[pos]))] = int(sample_ids[first[key]])
        else:
            first[key] = pos
    return sorted(first.values()), aliases


def _check_budget(cfg: SensorVLAConfig, num_samples: int, tokens: float, dim: int, log: bool) -> None:
    size = estimate_bytes(num_samples, tokens, dim, cfg.train.cache_dtype)
    budget = cfg.train.cache_max_gb * 1e9
    if log:
        print(
            f"[vl-cache] {num_samples} distinct inputs x ~{tokens:.0f} tokens x {dim} x {cfg.train.cache_dtype} "
            f"({cfg.model.backbone.pooling}) = {size / 1e6:,.1f} MB on disk (budget {cfg.train.cache_max_gb:g} GB, "
            "--train.cache-max-gb)",
            flush=True,
        )
    if size > budget:
        raise StaleCacheError(
            f"the VL cache would need {size / 1e9:.2f} GB, over the budget of {cfg.train.cache_max_gb:g} GB. "
            "Raise --train.cache-max-gb, use fewer tokens (--model.backbone.pooling grid with a smaller "
            "--model.backbone.grid-size), or train without the cache (--train.use-cache never)."
        )
