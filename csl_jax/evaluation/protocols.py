"""Evaluation protocols of docs/protocol.md §4 as records, and their window geometry (host, static).

A `Protocol` says what inference does; the `Evaluator` reads its fields, never its name. With g
the window (the training crop) and s the stride:

- ``whole``: the normalised image at its original size; argmax of the logits.
- ``sliding`` (UniMatch): s = int(2g/3), row/column starts 0, s, 2s, ... while start < H (resp. W);
  border tiles are truncated (the network sees the smaller tile); softmax probabilities are summed
  over tiles, then argmax.
- ``sliding_u2pl`` / ``sliding_cpcl`` (U2PL ``eval.py`` / CPCL's evaluator): s = ceil(2g/3); an
  image smaller than the window is zero-padded (in normalised space, centred: floor(pad/2) before)
  to at least g; grid ceil((H - g)/s) + 1 windows per axis, the last ones shifted back inside, so
  every window is g x g; logits are summed (U2PL divides by the overlap count, which leaves the
  argmax unchanged) and the padding is cropped off.
- ``whole_resize`` (UniMatch V2 ``original``): the normalised float32 image is resized to H' x W',
  H' = int(H/m + 0.5)*m (round half up; m = ``resize_multiple``, 14), W' likewise, bilinearly with
  align_corners=True; the float32 logits are resized back to H x W the same way, then argmax.
- ``sliding_shifted`` (UniMatch V2 ``sliding_window``): s = int(2g/3), starts 0 then min(prev + s,
  n - g) until n - g, every window g x g; no padding (an image smaller than g is refused); softmax
  probabilities summed, then argmax.
- ``center_crop``: the g x g region starting at ((H - g)//2, (W - g)//2). A side smaller than g is
  first padded as U2PL's ``Crop`` does: floor(pad/2) before and the rest after, the image with the
  ImageNet mean colour rounded to uint8 (within 0.01 of U2PL's 0 after normalisation) and the label
  with ``pad_label`` (255 = ignored by default; U2PL's in-training Pascal crop pads with 0). It
  does not cover the image, so folder prediction refuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data.transforms import IMAGENET_MEAN

Tile = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open
TILINGS = ("none", "sliding", "shifted")
#: Default m of ``whole_resize`` (config.eval.resize_multiple): the ViT-S/B/L/14 patch size of UniMatch V2.
RESIZE_MULTIPLE = 14


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How one evaluation protocol turns an image into scores whose argmax is the prediction.

    Attributes:
      name: registry key, recorded in results as results['protocol']['name'].
      tiling: 'none' (one network call on the image), 'sliding' (UniMatch: starts 0, s, 2s, ...
        < H, border tiles truncated) or 'shifted' (U2PL/CPCL/UniMatch V2: every window g x g, the
        last ones shifted back inside).
      stride_rounding: s = 'floor' or 'ceil' of 2g/3; None without tiling.
      tile_softmax: sum softmax probabilities over tiles (True) or logits (False).
      average_overlaps: divide the summed scores by the number of tiles covering each pixel.
      pads_to_window: 'shifted' only: zero-pad (centred) an image smaller than g to >= g (U2PL/CPCL);
        False refuses such an image.
      crops_center: the host crops image and label to the centred g x g window before inference.
      resizes_to_multiple: 'none' only: run the network at the size rounded to the nearest multiple of
        `resize_multiple` (align_corners bilinear there and back, in float32).
    """

    name: str
    tiling: Literal["none", "sliding", "shifted"] = "none"
    stride_rounding: Literal["floor", "ceil"] | None = None
    tile_softmax: bool = False
    average_overlaps: bool = False
    pads_to_window: bool = False
    crops_center: bool = False
    resizes_to_multiple: bool = False

    def __post_init__(self):
        if self.tiling not in TILINGS:
            raise ValueError(f"protocol {self.name!r}: tiling {self.tiling!r} is not one of {TILINGS}")
        tiled = self.tiling != "none"
        if tiled != (self.stride_rounding in ("floor", "ceil")):
            raise ValueError(f"protocol {self.name!r}: stride_rounding must be 'floor' or 'ceil' with tiling "
                             f"and None without, got {self.stride_rounding!r} with tiling {self.tiling!r}")
        if not tiled and (self.tile_softmax or self.average_overlaps):
            raise ValueError(f"protocol {self.name!r}: tile_softmax and average_overlaps need a tiling")
        if tiled and self.crops_center:
            raise ValueError(f"protocol {self.name!r}: crops_center cannot be combined with tiling")
        if self.pads_to_window and self.tiling != "shifted":
            raise ValueError(f"protocol {self.name!r}: pads_to_window needs tiling 'shifted'")
        if self.resizes_to_multiple and (tiled or self.crops_center):
            raise ValueError(f"protocol {self.name!r}: resizes_to_multiple cannot be combined with tiling or "
                             "crops_center")

    @property
    def needs_window(self) -> bool:
        """Whether the protocol needs a window size g (crop_size)."""
        return self.tiling != "none" or self.crops_center

    @property
    def refuses_small(self) -> bool:
        """Whether an image smaller than the window g (in H or W) is refused ('shifted' without padding)."""
        return self.tiling == "shifted" and not self.pads_to_window

    @property
    def covers_image(self) -> bool:
        """Whether it predicts every pixel of the image (what folder prediction needs)."""
        return not self.crops_center

    def stride(self, window: int) -> int | None:
        """Tile stride for window g: int(2g/3) ('floor') or ceil(2g/3) ('ceil'); None without tiling."""
        if self.stride_rounding is None:
            return None
        return (2 * window) // 3 if self.stride_rounding == "floor" else -(-2 * window // 3)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("whole"),
        Protocol("sliding", tiling="sliding", stride_rounding="floor", tile_softmax=True),
        Protocol("sliding_u2pl", tiling="shifted", stride_rounding="ceil", average_overlaps=True, pads_to_window=True),
        Protocol("sliding_cpcl", tiling="shifted", stride_rounding="ceil", pads_to_window=True),
        Protocol("center_crop", crops_center=True),
        Protocol("whole_resize", resizes_to_multiple=True),
        Protocol("sliding_shifted", tiling="shifted", stride_rounding="floor", tile_softmax=True),
    )
}


def get_protocol(name: str) -> Protocol:
    """The registered protocol called `name`; raises ValueError listing the valid names."""
    if name not in PROTOCOLS:
        raise ValueError(f"evaluation protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def resized_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(H', W') of ``whole_resize``: each side rounded half up to a multiple, int(n/m + 0.5)*m (500 x 375, m=14
    -> 504 x 378). A side under m/2 rounds to 0 and is refused."""
    size = tuple(int(n / multiple + 0.5) * multiple for n in (height, width))
    if 0 in size:
        raise ValueError(f"an image of {height}x{width} rounds to {size[0]}x{size[1]} at multiples of {multiple}")
    return size


def sliding_tiles(height: int, width: int, window: int, stride: int) -> list[Tile]:
    """UniMatch tiles: starts 0, s, 2s, ... < H (resp. W), truncated at the border.

    Returns a list of (y0, y1, x0, x1) half-open boxes, row-major.
    """
    return [
        (y, min(y + window, height), x, min(x + window, width))
        for y in range(0, height, stride)
        for x in range(0, width, stride)
    ]


def shifted_tiles(height: int, width: int, window: int, stride: int) -> list[Tile]:
    """U2PL/CPCL/UniMatch V2 tiles of an image of at least window x window: every tile is window x window.

    Per axis of length n: ceil((n - g)/s) + 1 windows starting at i*s, each shifted back to end
    at min(i*s + g, n); the same starts as UniMatch V2's loop 0, min(prev + s, n - g), ... up to
    n - g. Returns (y0, y1, x0, x1) boxes, row-major.
    """
    if height < window or width < window:
        raise ValueError(f"shifted_tiles needs an image of at least {window}x{window}, got {height}x{width}")

    def starts(n: int) -> list[int]:
        count = -(-(n - window) // stride) + 1
        return [min(i * stride + window, n) - window for i in range(count)]

    return [(y, y + window, x, x + window) for y in starts(height) for x in starts(width)]


def center_crop(image: np.ndarray, label: np.ndarray, size: int,
                pad_label: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop of (H, W, 3) uint8 image and (H, W) uint8 label to (size, size).

    A side smaller than `size` is padded first (floor(pad/2) before): the image with the ImageNet
    mean colour (0 after normalisation, rounded to uint8), the label with `pad_label`. The crop
    then starts at ((H' - size)//2, (W' - size)//2) of the padded arrays.
    """
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        fill = np.round(IMAGENET_MEAN.astype(np.float64) * 255).astype(np.uint8)
        padded = np.empty((h + ph, w + pw, 3), np.uint8)
        padded[:] = fill
        padded[pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w] = image
        image, label = padded, np.pad(label, pads, constant_values=pad_label)
        h, w = label.shape
    y, x = (h - size) // 2, (w - size) // 2
    return image[y : y + size, x : x + size], label[y : y + size, x : x + size]
