"""`SensorEncoder`: every declared sensor stream's window -> a few tokens each, (B, N_s, D) in all.

Per token group (one stream, or the streams of one `group` that share a source window, like the legacy force +
A-scan pair): each stream's samples go through its kind's encoder (`models/sensors/<kind>.py`, (N, *shape) ->
(N, D)), are summed per grid point, get temporal position embeddings and a pre-norm Transformer with key-padding
masks, then the group's learned queries pool them into its tokens. A sample without data in a group (or with the
group dropped in training, its `dropout`) gets the group's learned "missing" tokens, never an encoding of zeros.
No BatchNorm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sensorvla.config import SensorConfig
from sensorvla.data.timeline import SensorWindow
from sensorvla.models.attention import attend, encode, keys_values, queries
from sensorvla.models.sensors import KINDS
from sensorvla.streams import LEGACY_GROUP, StreamSpec, StreamSpecError


class StreamGroup(nn.Module):
    """The tokens of one group of streams on one window grid of `num_samples` points."""

    def __init__(self, cfg: SensorConfig, specs: Sequence[StreamSpec], num_samples: int):
        super().__init__()
        d = cfg.hidden_dim
        self.specs = tuple(specs)
        self.num_samples = num_samples
        self.embed = nn.ModuleDict({s.name: KINDS[s.kind](s.shape, d, cfg) for s in specs})
        self.time_pos = nn.Parameter(torch.randn(1, num_samples, d) * 0.02)
        self.in_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        tokens = max(s.tokens for s in specs) or cfg.num_tokens
        self.queries = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(d)
        self.missing_tokens = nn.Parameter(torch.randn(1, tokens, d) * 0.02)

    def forward(self, xs: Sequence[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """xs: each stream's window (B, T, *shape); valid bool (B, T) -> tokens (B, N_g, D)."""
        b, t = valid.shape
        h = None  # the streams' sum, in declared order (no zero tensor to start from: 0 + x == x)
        for spec, x in zip(self.specs, xs, strict=True):
            e = self.embed[spec.name](x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
            h = e if h is None else h + e
        h = self.in_norm(h + self.time_pos[:, :t])
        present, kpm = key_padding(valid)
        mask = None if kpm is None else ~kpm[:, None, None, :]
        h = encode(self.encoder, h, mask)
        q = self.queries.expand(b, -1, -1)
        tokens = self.out_norm(attend(self.pool, queries(self.pool, q), *keys_values(self.pool, h), mask) + q)
        # samples without data get the learned tokens (training keeps the select, so `missing_tokens` is always in
        # the graph: DDP needs that; without gradients and every sample measured it is a no-op)
        if kpm is not None or torch.is_grad_enabled():
            tokens = torch.where(present[:, None, None], tokens, self.missing_tokens.expand(b, -1, -1))
        return tokens


def key_padding(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(present (B,), key padding mask (B, T) | None): the samples with at least one valid grid point, and the
    attention's padding mask (None when every point is valid). A sample with nothing valid would make attention NaN:
    it keeps one dummy key, and its tokens are replaced."""
    # eager: no mask when all are measured (the common case, told by one reduction); a traced graph keeps it (no
    # data-dependent branch)
    static = valid.device.type == "meta" or torch.compiler.is_compiling()
    if not static and bool(valid.all()):
        return valid[:, 0], None
    present = valid.any(dim=1)
    kpm = ~valid
    kpm[:, 0] &= present
    return present, kpm


class SensorEncoder(nn.Module):
    """Every declared stream's window -> N_s tokens (B, N_s, D), the groups' tokens in declared order.

    Args:
        cfg: sensor config (num_tokens, hidden_dim, layers, heads, dropout, conv channels).
        streams: the model's streams (`streams.model_streams`), shapes resolved.
        window: the run's sensor window (the legacy `sensor` tensor's T_s; a stream's own `samples` otherwise).
    """

    def __init__(self, cfg: SensorConfig, streams: Sequence[StreamSpec], window: SensorWindow):
        super().__init__()
        if not streams:
            raise StreamSpecError("SensorEncoder needs at least one stream")
        groups: dict[str, list[StreamSpec]] = {}
        for s in streams:
            if s.kind not in KINDS:
                raise StreamSpecError(f"stream {s.name!r}: unknown kind {s.kind!r}; choose one of {sorted(KINDS)}")
            if not s.shape:
                raise StreamSpecError(f"stream {s.name!r} has no shape; resolve it from the dataset first")
            groups.setdefault(s.group_name, []).append(s)
        self.streams = tuple(streams)
        self.out_dim = cfg.hidden_dim
        self.groups = nn.ModuleDict()
        for name, specs in groups.items():
            samples = {stream_samples(s, window) for s in specs}
            if len(samples) != 1 or len({s.source for s in specs}) != 1:
                raise StreamSpecError(f"the streams of group {name!r} must read one source on one window grid")
            self.groups[name] = StreamGroup(cfg, specs, samples.pop())

    def forward(
        self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: each stream's window `sensor[.<name>]` (B, T, ...) + `sensor_mask[.<name>]` (B, T), and
        `has_sensor` (B,) for the dataset's sensor; keep: bool (B,), False drops every stream of a sample (modality
        dropout) -> tokens (B, N_s, D), mask (B, N_s) all True."""
        out = []
        for group in self.groups.values():
            spec = group.specs[0]
            valid = batch[spec.mask_key].bool()
            if not spec.source and "has_sensor" in batch:
                valid = valid & batch["has_sensor"].bool()[:, None]
            drop = max(s.dropout for s in group.specs)
            if keep is not None:
                valid = valid & keep[:, None]
            if self.training and drop:
                valid = valid & (torch.rand(valid.shape[0], device=valid.device) >= drop)[:, None]
            out.append(group([stream_input(batch, s) for s in group.specs], valid))
        tokens = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def stream_samples(spec: StreamSpec, window: SensorWindow) -> int:
    """T of a stream's window: the run's T_s for the dataset's sensor tensor, else its own `samples` or T_s."""
    return window.samples if not spec.source else window.of(spec).samples


def stream_input(batch: Mapping[str, torch.Tensor], spec: StreamSpec) -> torch.Tensor:
    """A stream's window (B, T, *shape) from the batch (the dataset's sensor tensor sliced by `channels`)."""
    x = batch[spec.key].float()
    if not spec.source and spec.channels is not None:
        x = x[..., spec.channels[0] : spec.channels[1]]
    return x


def upgrade_state_dict(sd: dict[str, torch.Tensor], prefix: str = "sensor_encoder.") -> dict[str, torch.Tensor]:
    """A state dict saved before declared streams (one encoder of the force + A-scan tensor) in today's key layout:
    the legacy pair's group `sensor` (`force_proj` -> its `force` wrench, `ascan` -> its `ascan` profile1d)."""
    if f"{prefix}time_pos" not in sd:
        return sd
    group = f"{prefix}groups.{LEGACY_GROUP}."
    rename = {f"{prefix}force_proj.": f"{group}embed.force.proj.", f"{prefix}ascan.": f"{group}embed.ascan."}
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            old = next((o for o in rename if k.startswith(o)), None)
            k = rename[old] + k[len(old) :] if old else group + k[len(prefix) :]
        out[k] = v
    return out
