"""CSS's data randomness (official `generalframeworks/dataset_helpers/{VOC,Cityscapes}.py`), registered
with the pipeline: three geometries and two views.

Geometries (`transforms.GEOMETRIES`; PIL resampling; crop offsets uniform and inclusive over the
padded size, as `RandomCrop.get_params`; padding bottom/right by reflecting the image, label
ignore, as the reference):
- 'css_labeled_rescale': the VOC labeled `transform`: s ~ U(0.5, 1.5), size (int(h s), int(w s)),
  hflip p = 0.5 (the flip commutes with the colour jitter and the blur that precede it there);
- 'css_labeled': the Cityscapes labeled `transform`: no rescale, hflip p = 0.5;
- 'css_unlabeled': the unlabeled loader: no rescale, no flip.
Views (`views.VIEWS`):
- 'css_photometric' (labeled stream): 'css_image' (crop, crop, 3) float32, the crop after
  ColorJitter(0.75-1.25 x3, hue +-0.25, random order) with p = 0.8 and Gaussian blur
  sigma ~ U(0.15, 1.15) with p = 0.5 (`photometric`);
- 'css_strong' (unlabeled stream), step 2 of `Model_cross.forward` for the parts that do not
  depend on the model: s ~ U(css_scale_low, css_scale_high) (config.data; VOC 0.5-1.5,
  Cityscapes 0.5-2.0), the weak crop PIL-bilinear resized to n = int(crop s), reflect-padded
  bottom/right to the crop, randomly cropped, then `photometric`. Returns 'css_strong' (crop,
  crop, 3) float32, 'warp_index' (crop, crop) int32 (flat index into the weak crop of each pixel's
  PIL-nearest source, -1 on this padding), 'css_flip' () bool (hflip p = 0.5, applied in the
  train step after CutMix) and 'css_box' (crop, crop) bool (`generate_cutout_mask`: the
  half-area box where a sample takes its partner's pixels; transforms.cutout_box).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from csl_jax.data import transforms, views

#: seed ids of the views (csl_jax.data.views: unique; 1-3 UniMatch/CSL, 12 U2PL).
PHOTOMETRIC_VIEW_ID = 31
STRONG_VIEW_ID = 32
#: `config.data` keys of 'css_strong' and their defaults (the VOC `scale_size`).
STRONG_OPTIONS = {"css_scale_low": 0.5, "css_scale_high": 1.5}


def _crop_offsets(rng: np.random.Generator, rh: int, rw: int, crop: int) -> tuple[int, int]:
    y = int(rng.integers(0, max(rh, crop) - crop + 1))
    x = int(rng.integers(0, max(rw, crop) - crop + 1))
    return y, x


def labeled_rescale_geometry(rng: np.random.Generator, height: int, width: int, crop: int) -> transforms.Geometry:
    """VOC labeled geometry: s ~ U(0.5, 1.5), (int(h s), int(w s)), random crop, hflip p = 0.5."""
    s = rng.uniform(0.5, 1.5)
    rh, rw = int(height * s), int(width * s)
    y, x = _crop_offsets(rng, rh, rw, crop)
    return transforms.Geometry(rh, rw, y, x, bool(rng.random() < 0.5), reflect=True)


def labeled_geometry(rng: np.random.Generator, height: int, width: int, crop: int) -> transforms.Geometry:
    """Cityscapes labeled geometry: no rescale, random crop, hflip p = 0.5."""
    y, x = _crop_offsets(rng, height, width, crop)
    return transforms.Geometry(height, width, y, x, bool(rng.random() < 0.5), reflect=True)


def unlabeled_geometry(rng: np.random.Generator, height: int, width: int, crop: int) -> transforms.Geometry:
    """Unlabeled loader geometry: no rescale, random crop, no flip."""
    y, x = _crop_offsets(rng, height, width, crop)
    return transforms.Geometry(height, width, y, x, False, reflect=True)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CSS colour augmentation of a (H, W, 3) uint8 image (module docstring); (H, W, 3) uint8."""
    img = Image.fromarray(image)
    if rng.random() < 0.8:
        img = transforms.color_jitter(img, rng, 0.25, 0.25, 0.25, 0.25)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.15, 1.15)))
    return np.asarray(img)


def nearest_source(size_in: int, size_out: int) -> np.ndarray:
    """(size_out,) int: PIL NEAREST resize source index of each output pixel, floor((i + 0.5) in / out)."""
    return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def warp(weak: np.ndarray, rng: np.random.Generator, crop: int, scale: tuple[float, float]):
    """The step-2 geometry of a (crop, crop, 3) uint8 weak crop: (image (crop, crop, 3) uint8,
    warp_index (crop, crop) int32) as described in the module docstring."""
    n = int(crop * rng.uniform(*scale))
    image = np.asarray(Image.fromarray(weak).resize((n, n), Image.BILINEAR))
    src = nearest_source(crop, n)
    index = (src[:, None] * crop + src[None, :]).astype(np.int32)
    pad = max(crop - n, 0)
    if pad:
        image = np.pad(image, ((0, pad), (0, pad), (0, 0)), mode="reflect")
        index = np.pad(index, ((0, pad), (0, pad)), constant_values=-1)
    y, x = _crop_offsets(rng, n, n, crop)
    return image[y:y + crop, x:x + crop], np.ascontiguousarray(index[y:y + crop, x:x + crop])


def css_photometric(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """The 'css_photometric' view: {'css_image': (crop, crop, 3) float32, normalised}. The reflected
    padding is jittered and blurred with the image: the reference's `transform` also pads and crops
    before its jitter and blur."""
    del valid, crop, options
    return {"css_image": transforms.normalize(photometric(weak, rng))}


def css_strong(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """The 'css_strong' view: {'css_strong', 'warp_index', 'css_flip', 'css_box'} (module docstring)."""
    low, high = float(options["css_scale_low"]), float(options["css_scale_high"])
    if not 0 < low <= high:
        raise ValueError(f"config.data.css_scale_low={low} and css_scale_high={high} must satisfy 0 < low <= high")
    del valid
    image, index = warp(weak, rng, crop, (low, high))
    image = photometric(image, rng)
    flip = bool(rng.random() < 0.5)
    return {"css_strong": transforms.normalize(image), "warp_index": index, "css_flip": np.asarray(flip),
            "css_box": transforms.cutout_box(rng, crop)}


for _name, _fn in (("css_labeled_rescale", labeled_rescale_geometry), ("css_labeled", labeled_geometry),
                   ("css_unlabeled", unlabeled_geometry)):
    if _name not in transforms.GEOMETRIES:
        transforms.register_geometry(_name, _fn)
if "css_photometric" not in views.VIEWS:
    views.register_view("css_photometric", PHOTOMETRIC_VIEW_ID, css_photometric)
if "css_strong" not in views.VIEWS:
    views.register_view("css_strong", STRONG_VIEW_ID, css_strong, STRONG_OPTIONS)
