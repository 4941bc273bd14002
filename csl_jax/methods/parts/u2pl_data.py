"""U2PL's data randomness, registered with the pipeline: the 'u2pl' geometry and the 'u2pl_box' view.

- geometry 'u2pl' (`RandResize`, `RandomHorizontalFlip`, `Crop` of u2pl/dataset/augmentation.py):
  with p = 0.5 the scale is s ~ U(0.5, 1.0), else U(1.0, 2.0); the image becomes
  (int(h s), int(w s)); crop offsets are uniform and inclusive over the padded size; hflip p = 0.5.
- view 'u2pl_box' (`generate_cutout_mask`): 'u2pl_box' (crop, crop) bool, True inside a box of
  area crop^2 / 2 where sample i takes its partner's pixels (in-batch CutMix, partner (i+1) mod g
  in its loss group). w ~ randint(floor(crop/2) + 1, crop) (upper bound exclusive),
  h = round(crop^2 / 2 / w), x0 ~ randint(0, crop - w + 1), y0 ~ randint(0, crop - h + 1). The
  per-step coin (all images or none) is drawn in the train step.
"""
from __future__ import annotations

import numpy as np

from csl_jax.data import transforms, views

#: seed id of the 'u2pl_box' view (csl_jax.data.views: ids are unique, 1-3 are UniMatch/CSL's).
BOX_VIEW_ID = 12


def sample_u2pl_geometry(rng: np.random.Generator, height: int, width: int, crop: int) -> transforms.Geometry:
    """U2PL's resize / crop / flip draws for an image of size (height, width); see the module docstring."""
    scale = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 2.0)
    rh, rw = int(height * scale), int(width * scale)
    y = int(rng.integers(0, max(rh, crop) - crop + 1))
    x = int(rng.integers(0, max(rw, crop) - crop + 1))
    return transforms.Geometry(rh, rw, y, x, bool(rng.random() < 0.5))


def cutout_box(rng: np.random.Generator, crop: int) -> np.ndarray:
    """(crop, crop) bool box of `generate_cutout_mask` (module docstring), True inside."""
    area = crop * crop / 2
    w = int(rng.integers(crop // 2 + 1, crop))
    h = int(np.round(area / w))
    x0 = int(rng.integers(0, crop - w + 1))
    y0 = int(rng.integers(0, crop - h + 1))
    box = np.zeros((crop, crop), bool)
    box[y0:y0 + h, x0:x0 + w] = True
    return box


def u2pl_box(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """The 'u2pl_box' view: {'u2pl_box': (crop, crop) bool}."""
    del weak, valid, options
    return {"u2pl_box": cutout_box(rng, crop)}


if "u2pl" not in transforms.GEOMETRIES:
    transforms.register_geometry("u2pl", sample_u2pl_geometry)
if "u2pl_box" not in views.VIEWS:
    views.register_view("u2pl_box", BOX_VIEW_ID, u2pl_box)
