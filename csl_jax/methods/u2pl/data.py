"""U2PL's data randomness, registered with the pipeline: the 'u2pl' geometry and the 'u2pl_box' view.

- geometry 'u2pl' (`RandResize`, `RandomHorizontalFlip`, `Crop` of u2pl/dataset/augmentation.py):
  with p = 0.5 the scale is s ~ U(0.5, 1.0), else U(1.0, 2.0); the image becomes
  (int(h s), int(w s)) by half-pixel bilinear without antialiasing (torch `F.interpolate`; labels
  legacy nearest); a side shorter than the crop is padded centred (floor(pad/2) before) with the
  mean colour and label 255; crop offsets are uniform and inclusive over the padded size; hflip
  p = 0.5. 'u2pl_pad0' is the same with label padding 0 (the reference's `ignore_label = 0`).
- view 'u2pl_box' (`generate_cutout_mask`, csl_jax.data.transforms.cutout_box): 'u2pl_box' (crop, crop)
  bool, True inside a box of area crop^2 / 2 where sample i takes its partner's pixels (in-batch
  CutMix, partner (i+1) mod g in its loss group). w ~ randint(floor(crop/2) + 1, crop) (upper bound exclusive),
  h = round(crop^2 / 2 / w), x0 ~ randint(0, crop - w + 1), y0 ~ randint(0, crop - h + 1). The
  per-step coin (all images or none) is drawn in the train step.
"""
from __future__ import annotations

import functools

import numpy as np

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import transforms, views
from csl_jax.data.transforms import cutout_box

#: seed id of the 'u2pl_box' view (csl_jax.data.views: ids are unique, 1-3 are UniMatch/CSL's).
BOX_VIEW_ID = 12


def _crop_start(rng: np.random.Generator, side: int, crop: int, mirrored: bool = False) -> int:
    """Window start on a resized side: uniform inclusive in [0, side - crop], or centred padding
    (negative start) when the side is shorter than the crop: floor(pad/2) before, or the rest
    before when `mirrored` (the reference flips before padding, csl_jax flips after cropping)."""
    if side >= crop:
        return int(rng.integers(0, side - crop + 1))
    pad = crop - side
    return -(pad - pad // 2) if mirrored else -(pad // 2)


def sample_u2pl_geometry(rng: np.random.Generator, height: int, width: int, crop: int,
                         label_fill: int = IGNORE_INDEX) -> transforms.Geometry:
    """U2PL's resize / crop / flip draws for an image of size (height, width); see the module docstring."""
    scale = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 2.0)
    rh, rw = max(int(height * scale), 1), max(int(width * scale), 1)
    flip = bool(rng.random() < 0.5)
    y, x = _crop_start(rng, rh, crop), _crop_start(rng, rw, crop, mirrored=flip)
    return transforms.Geometry(rh, rw, y, x, flip, fill=transforms.MEAN_FILL, label_fill=label_fill,
                               resample="torch")


def u2pl_box(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """The 'u2pl_box' view: {'u2pl_box': (crop, crop) bool}."""
    del weak, valid, options
    return {"u2pl_box": cutout_box(rng, crop)}


if "u2pl" not in transforms.GEOMETRIES:
    transforms.register_geometry("u2pl", sample_u2pl_geometry)
    transforms.register_geometry("u2pl_pad0", functools.partial(sample_u2pl_geometry, label_fill=0))
if "u2pl_box" not in views.VIEWS:
    views.register_view("u2pl_box", BOX_VIEW_ID, u2pl_box)
