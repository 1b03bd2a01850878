"""Training-only image augmentation on raw uint8 views: random shift (DrQ) and mild colour jitter.

Applied by the transform chain (`PolicyProcessor(augment=...)`) before the image processor, in training
only; `PolicyRunner` never builds one. Draws are deterministic in (seed, epoch, sample id, view), so a
resumed run sees exactly the augmentations of an uninterrupted one, with any number of loader workers.
"""

from __future__ import annotations

import numpy as np

from sensorvla.config import AugmentConfig


class ImageAugment:
    """Augment a list of V uint8 (h, w, 3) views.

    Random shift: pad by `shift_frac * max(h, w)` pixels (edge replication) and crop a random (h, w)
    window, so the content moves by up to that many pixels and nothing is scaled. Colour jitter: a
    brightness factor, a contrast factor (around the view's mean) and a saturation factor (around its
    grey), each drawn from [1 - s, 1 + s].

    Args:
        cfg: `--data.augment.*`.
        seed: the run's seed (`--train.seed`).
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def rng(self, sample_id: int, epoch: int, view: int) -> np.random.Generator:
        """The generator of one view of one sample in one epoch."""
        return np.random.default_rng([self.seed, epoch, int(sample_id) & 0x7FFFFFFFFFFFFFFF, view])

    def view(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uint8 (h, w, 3) view -> an augmented uint8 view of the same shape."""
        c = self.cfg
        h, w = img.shape[:2]
        pad = int(round(c.shift_frac * max(h, w)))
        out = img
        if pad > 0:
            padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            dy, dx = rng.integers(0, 2 * pad + 1, size=2)
            out = padded[dy : dy + h, dx : dx + w]
        if c.brightness or c.contrast or c.saturation:
            b, k, s = (1.0 + rng.uniform(-v, v) if v else 1.0 for v in (c.brightness, c.contrast, c.saturation))
            x = out.astype(np.float32) * b
            x = (x - x.mean()) * k + x.mean()
            grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
            x = grey[..., None] + (x - grey[..., None]) * s
            out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)

    def __call__(self, images: list[np.ndarray], sample_id: int, epoch: int) -> list[np.ndarray]:
        """V views of one sample -> V augmented views (independent draws per view)."""
        return [self.view(np.asarray(im, np.uint8), self.rng(sample_id, epoch, v)) for v, im in enumerate(images)]
