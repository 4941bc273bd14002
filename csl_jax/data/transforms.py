"""Per-sample augmentation in NumPy/PIL, following UniMatch's `dataset/transform.py` and CSL's TMP view.

Every function takes an explicit `np.random.Generator`, so a sample's augmentation is a pure
function of the generator's seed. Photometric operations use PIL (torchvision's PIL semantics).
`GEOMETRIES` names the geometric augmentations a stream can use ('unimatch': `sample_geometry`).
"""
import dataclasses
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from csl_jax.constants import IGNORE_INDEX as IGNORE

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_SHIFT = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) float32: x/255 minus ImageNet mean, divided by ImageNet std."""
    return images.astype(np.float32) * _SCALE - _SHIFT


#: the ImageNet mean colour as RGB uint8 (0 after `normalize`, up to the rounding): centred-padding fill.
MEAN_FILL = tuple(int(round(float(v) * 255)) for v in IMAGENET_MEAN)
RESAMPLES = ("pil", "torch")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shared geometric augmentation of one sample.

    The image is resized to (resized_h, resized_w); the crop window is rows [y, y + crop) and
    columns [x, x + crop) of the resized image. y and x may be negative (padding before) and the
    window may extend past the image (padding after); padding gets `fill` (RGB uint8) in the image,
    or with `reflect` the image reflected at its edges (edge pixel not repeated, np.pad /
    torchvision 'reflect'), `label_fill` in the label and False in the valid map. The flip is
    applied last.

    resample: 'pil' (PIL bilinear, antialiased when shrinking; labels PIL nearest, source pixel
      floor((i + 0.5) in/out)) or 'torch' (half-pixel bilinear without antialiasing, torch
      `F.interpolate(align_corners=False)` and cv2 INTER_LINEAR up to cv2's fixed-point rounding;
      labels legacy nearest, source floor(i in/out) in float32 as torch 'nearest'; cv2 INTER_NEAREST
      may differ where i in/out is an exact integer).
    """
    resized_h: int
    resized_w: int
    y: int
    x: int
    flip: bool
    fill: tuple = (0, 0, 0)
    label_fill: int = IGNORE
    resample: str = "pil"
    reflect: bool = False

    def __post_init__(self):
        if self.resample not in RESAMPLES:
            raise ValueError(f"Geometry.resample={self.resample!r}; expected one of {RESAMPLES}")
        if self.resized_h <= 0 or self.resized_w <= 0:
            raise ValueError(f"Geometry resized size {self.resized_h}x{self.resized_w} must be positive")


def sample_geometry(rng: np.random.Generator, height: int, width: int, crop: int,
                    scale_range=(0.5, 2.0)) -> Geometry:
    """UniMatch's resize/crop/flip draws for an image of size (height, width).

    Long side L -> L' = randint[int(0.5 L), int(2.0 L)] inclusive, short side S -> int(S L'/L + 0.5);
    after padding to at least `crop`, the crop corner is uniform (inclusive); hflip with p = 0.5.
    """
    long_side = max(height, width)
    new_long = int(rng.integers(int(long_side * scale_range[0]), int(long_side * scale_range[1]) + 1))
    if height > width:
        rh, rw = new_long, int(width * new_long / height + 0.5)
    else:
        rh, rw = int(height * new_long / width + 0.5), new_long
    y = int(rng.integers(0, max(rh, crop) - crop + 1))
    x = int(rng.integers(0, max(rw, crop) - crop + 1))
    return Geometry(rh, rw, y, x, bool(rng.random() < 0.5))


GEOMETRIES: dict[str, Callable[[np.random.Generator, int, int, int], Geometry]] = {"unimatch": sample_geometry}


def register_geometry(name: str, fn: Callable[[np.random.Generator, int, int, int], Geometry]) -> None:
    """Adds geometry `name`: fn(rng, height, width, crop) -> Geometry; refuses a taken name."""
    if name in GEOMETRIES:
        raise ValueError(f"geometry {name!r} is already registered; registered: {', '.join(GEOMETRIES)}")
    GEOMETRIES[name] = fn


def _source_coords(out_index: np.ndarray, in_size: int, out_size: int) -> tuple:
    """Half-pixel bilinear taps (align_corners=False, no antialias): (i0, i1, weight of i1)."""
    src = np.maximum((out_index + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    return i0, np.minimum(i0 + 1, in_size - 1), (src - i0)


def _torch_resize_window(image: np.ndarray, g: Geometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows `rows` x columns `cols` of the 'torch'-resampled image (H, W, 3) uint8, rounded."""
    h, w = image.shape[:2]
    r0, r1, wr = _source_coords(rows, h, g.resized_h)
    c0, c1, wc = _source_coords(cols, w, g.resized_w)
    img = image.astype(np.float64)
    top = img[r0][:, c0] * (1 - wc)[None, :, None] + img[r0][:, c1] * wc[None, :, None]
    bottom = img[r1][:, c0] * (1 - wc)[None, :, None] + img[r1][:, c1] * wc[None, :, None]
    out = top * (1 - wr)[:, None, None] + bottom * wr[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _nearest_window(label: np.ndarray, g: Geometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Rows `rows` x columns `cols` of the label (H, W) resized by legacy nearest ('torch')."""
    h, w = label.shape
    return label[_nearest_source(rows, h, g.resized_h)][:, _nearest_source(cols, w, g.resized_w)]


def _nearest_source(out_index: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """Legacy nearest source index floor(i in/out), in float32 as torch computes it (an exact
    integer product may land one below)."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(out_index.astype(np.float32) * scale).astype(np.int64), in_size - 1)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Source index of `index` on a side of `size` pixels reflected at its edges without repeating
    the edge pixel (np.pad / torchvision 'reflect'), bouncing as often as needed."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    m = np.mod(index, period)
    return np.where(m < size, m, period - m)


def apply_geometry(image: Image.Image, label: np.ndarray | None, g: Geometry,
                   crop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize, cut the crop window (padding where it leaves the image), flip; see `Geometry`.

    image: PIL RGB; label: (H, W) uint8 or None (output all 255).
    Returns image (crop, crop, 3) uint8, label (crop, crop) uint8 and valid (crop, crop) bool
    (False on padding, reflected or not).
    """
    top, left = max(g.y, 0), max(g.x, 0)
    bottom, right = max(min(g.y + crop, g.resized_h), top), max(min(g.x + crop, g.resized_w), left)
    dst = (slice(top - g.y, bottom - g.y), slice(left - g.x, right - g.x))
    rows, cols = np.arange(top, bottom), np.arange(left, right)
    if g.reflect:  # every window pixel comes from the reflected image
        image_dst = (slice(None), slice(None))
        image_rows = _reflect(np.arange(g.y, g.y + crop), g.resized_h)
        image_cols = _reflect(np.arange(g.x, g.x + crop), g.resized_w)
    else:
        image_dst, image_rows, image_cols = dst, rows, cols
    out_image = np.empty((crop, crop, 3), np.uint8)
    out_image[:] = np.asarray(g.fill, np.uint8)
    out_label = np.full((crop, crop), g.label_fill if label is not None else IGNORE, np.uint8)
    valid = np.zeros((crop, crop), bool)
    valid[dst] = True
    if g.resample == "pil":
        resized = np.asarray(image.resize((g.resized_w, g.resized_h), Image.BILINEAR))
        out_image[image_dst] = resized[image_rows][:, image_cols]
        if label is not None:
            resized_label = np.asarray(Image.fromarray(label).resize((g.resized_w, g.resized_h), Image.NEAREST))
            out_label[dst] = resized_label[rows][:, cols]
    else:
        out_image[image_dst] = _torch_resize_window(np.asarray(image), g, image_rows, image_cols)
        if label is not None:
            out_label[dst] = _nearest_window(label, g, rows, cols)
    if g.flip:
        out_image, out_label, valid = out_image[:, ::-1], out_label[:, ::-1], valid[:, ::-1]
    return np.ascontiguousarray(out_image), np.ascontiguousarray(out_label), np.ascontiguousarray(valid)


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL hue shift: add int(shift*255) mod 256 to the HSV hue byte."""
    h, s, v = img.convert("HSV").split()
    hue = (np.asarray(h, np.uint8) + np.uint8(int(shift * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """torchvision ColorJitter on a PIL RGB image: factors U[1-x, 1+x], hue U[-hue, hue], random order."""
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    for op in rng.permutation(4):
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(factors[0])
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(factors[1])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(factors[2])
        else:
            img = _adjust_hue(img, factors[3])
    return img


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with sigma ~ U(0.1, 2.0), applied with p = 0.5 (UniMatch `blur`)."""
    if rng.random() < 0.5:
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img


def strong_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """UniMatch strong colour view of a (H, W, 3) uint8 crop: ColorJitter(0.5, 0.5, 0.5, 0.25) p=0.8,
    grayscale p=0.2, Gaussian blur p=0.5. Returns (H, W, 3) uint8."""
    img = Image.fromarray(image)
    if rng.random() < 0.8:
        img = color_jitter(img, rng, 0.5, 0.5, 0.5, 0.25)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return np.asarray(_blur(img, rng))


def mild_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CSL TMP branch (a) colour view of a (H, W, 3) uint8 crop: ColorJitter(0.2, 0.2, 0.2, 0.2)
    p=0.8 and Gaussian blur p=0.5, no grayscale. Returns (H, W, 3) uint8."""
    img = Image.fromarray(image)
    if rng.random() < 0.8:
        img = color_jitter(img, rng, 0.2, 0.2, 0.2, 0.2)
    return np.asarray(_blur(img, rng))


def cutmix_box(rng: np.random.Generator, crop: int, p: float = 0.5,
               area=(0.02, 0.4), ratio=(0.3, 1 / 0.3)) -> np.ndarray:
    """UniMatch `obtain_cutmix_box`: (crop, crop) bool, a box with probability p, else all False.

    Area A = U(area)*crop^2; redraw r ~ U(ratio), w = int(sqrt(A/r)), h = int(sqrt(A r)),
    x, y ~ randint[0, crop) until x + w <= crop and y + h <= crop; rows [y, y+h), cols [x, x+w).
    """
    mask = np.zeros((crop, crop), bool)
    if rng.random() > p:
        return mask
    size = rng.uniform(*area) * crop * crop
    while True:
        r = rng.uniform(*ratio)
        w, h = int(np.sqrt(size / r)), int(np.sqrt(size * r))
        x, y = int(rng.integers(0, crop)), int(rng.integers(0, crop))
        if x + w <= crop and y + h <= crop:
            break
    mask[y:y + h, x:x + w] = True
    return mask


def cutout_box(rng: np.random.Generator, crop: int) -> np.ndarray:
    """U2PL `generate_cutout_mask` (U2PL's and CSS's in-batch CutMix): (crop, crop) bool, True inside a
    box of area crop^2 / 2: w ~ randint(floor(crop/2) + 1, crop) (upper bound exclusive),
    h = round(crop^2 / 2 / w), x0 ~ randint(0, crop - w + 1), y0 ~ randint(0, crop - h + 1)."""
    area = crop * crop / 2
    w = int(rng.integers(crop // 2 + 1, crop))
    h = int(np.round(area / w))
    x0 = int(rng.integers(0, crop - w + 1))
    y0 = int(rng.integers(0, crop - h + 1))
    box = np.zeros((crop, crop), bool)
    box[y0:y0 + h, x0:x0 + w] = True
    return box


def block_mask(rng: np.random.Generator, crop: int, block_size: int = 32,
               cover_ratio: float = 0.7) -> np.ndarray:
    """CSL TMP block mask, (crop, crop) bool: a G x G grid, G = round(crop/block_size), each cell
    True with probability cover_ratio, nearest-upsampled (pixel i -> cell floor((i + 0.5) G / crop))."""
    grid = max(1, round(crop / block_size))
    cells = rng.random((grid, grid)) < cover_ratio
    index = np.floor((np.arange(crop) + 0.5) * grid / crop).astype(np.intp)
    return cells[index[:, None], index[None, :]]
