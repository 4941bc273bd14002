"""CPCL's data randomness, registered with the pipeline: the 'cpcl' geometry and the 'cpcl_mask' view.

- geometry 'cpcl' (`TrainPre` of exp_*/dataloader.py with furnace's img_utils), in the reference's
  order: hflip with p = 0.5; a scale s from {0.5, 0.75, 1, 1.5, 1.75, 2}, the image becomes
  (int(h s), int(w s)) by cv2 INTER_LINEAR (half-pixel, no antialias; 'torch' resampling) and the
  label by INTER_NEAREST; crop offset per axis uniform in [0, side - crop + 1] INCLUSIVE when
  side > crop (the last offset leaves one row/column of padding after), else 0 with the padding
  centred (floor(pad/2) before); image padding is the ImageNet mean colour (0 after
  normalisation), label padding 255. The reference flips before cropping; csl_jax flips last, so
  the offset is mirrored (x -> W' - x - crop), which gives the same crop.
- view 'cpcl_mask' (`BoxMaskGenerator` with CPCL's config: 3 boxes, prop_range (0.25, 0.5),
  random aspect ratio, by area, within bounds, inverted start): 'cpcl_mask' (crop, crop) bool, True
  where the mixed image takes the second unlabeled stream (an odd number of boxes cover the pixel).
"""
from __future__ import annotations

import numpy as np

from csl_jax.data import transforms, views

#: `config.train_scale_array` of exp_voc / exp_city.
SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
#: seed id of the 'cpcl_mask' view (csl_jax.data.views: ids are unique).
MASK_VIEW_ID = 41
N_BOXES = 3
PROP_RANGE = (0.25, 0.5)


def _offset(rng: np.random.Generator, side: int, crop: int) -> int:
    """Window start in the resized image: randint[0, side - crop + 1] when side > crop, else -(pad // 2)."""
    if side > crop:
        return int(rng.integers(0, side - crop + 2))
    return -((crop - side) // 2)


def sample_cpcl_geometry(rng: np.random.Generator, height: int, width: int, crop: int) -> transforms.Geometry:
    """CPCL's flip / discrete scale / crop draws for an image of size (height, width); module docstring."""
    flip = bool(rng.random() < 0.5)
    scale = SCALES[int(rng.integers(0, len(SCALES)))]
    rh, rw = int(height * scale), int(width * scale)
    y, x = _offset(rng, rh, crop), _offset(rng, rw, crop)
    if flip:  # the reference crops the flipped image at x: the same pixels as the mirrored window, flipped
        x = rw - x - crop
    return transforms.Geometry(rh, rw, y, x, flip, fill=transforms.MEAN_FILL, resample="torch")


def box_mask(rng: np.random.Generator, size: int, n_boxes: int = N_BOXES, prop_range=PROP_RANGE) -> np.ndarray:
    """One (size, size) bool mask of `BoxMaskGenerator` (module docstring), drawn in the reference's order.

    Per box: area a ~ U(prop_range); height fraction a^u, u ~ U(0, 1), width fraction a / that, both
    times sqrt(1/n_boxes), rounded to pixels; corner round((size - box) U(0, 1)); each box toggles.
    """
    props = rng.uniform(prop_range[0], prop_range[1], size=(1, n_boxes))
    y_props = np.exp(rng.uniform(0.0, 1.0, size=(1, n_boxes)) * np.log(props))
    x_props = props / y_props
    fac = np.sqrt(1.0 / n_boxes)
    sizes = np.round(np.stack([y_props * fac, x_props * fac], axis=2) * np.array([size, size])[None, None, :])
    corners = np.round((np.array([size, size]) - sizes) * rng.uniform(0.0, 1.0, size=sizes.shape))
    mask = np.zeros((size, size), bool)
    for y0, x0, y1, x1 in np.append(corners, corners + sizes, axis=2)[0]:
        mask[int(y0):int(y1), int(x0):int(x1)] ^= True
    return mask


def cpcl_mask(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """The 'cpcl_mask' view: {'cpcl_mask': (crop, crop) bool}."""
    del weak, valid, options
    return {"cpcl_mask": box_mask(rng, crop)}


if "cpcl" not in transforms.GEOMETRIES:
    transforms.register_geometry("cpcl", sample_cpcl_geometry)
if "cpcl_mask" not in views.VIEWS:
    views.register_view("cpcl_mask", MASK_VIEW_ID, cpcl_mask)
