"""Segments every image of a folder: class-index masks, colour masks and overlays as PNG.

Images (.jpg, .jpeg, .png, .bmp, any case, any size; not recursive) are read with PIL, converted to
RGB, and used as stored (EXIF orientation is not applied, as in training). A file that cannot be
decoded stops the run with an error naming it (nothing is skipped silently); the outputs of the
images before it are already written.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
from PIL import Image

from csl_jax import visualize
from csl_jax.evaluation.evaluator import ApplyFn, Evaluator
from csl_jax.evaluation.protocols import Protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(in_dir: str) -> list[str]:
    """Sorted paths of the images directly in `in_dir`; raises if there is none or if two images
    would write the same outputs (same name, different extension)."""
    if not os.path.isdir(in_dir):
        raise FileNotFoundError(f"input folder {in_dir!r} does not exist")
    paths = sorted(
        os.path.join(in_dir, f) for f in os.listdir(in_dir) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise ValueError(f"input folder {in_dir!r} holds no image with extension {IMAGE_EXTENSIONS}")
    stems: dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise ValueError(f"{stems[stem]!r} and {path!r} would write the same outputs {stem}_*.png; rename one")
        stems[stem] = path
    return paths


def load_rgb(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; raises ValueError naming the file if it is corrupt."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unreadable/truncated files
        raise ValueError(f"cannot decode image {path!r}: {err}") from err


def predict_folder(
    apply_fn: ApplyFn,
    variables: Any,
    in_dir: str,
    out_dir: str,
    *,
    palette: np.ndarray,
    num_classes: int,
    protocol: str | Protocol = "whole",
    crop_size: int | None = None,
    batch_size: int | None = None,
    mesh=None,
) -> list[str]:
    """Segments every image of `in_dir` and writes, per image <name>.<ext>, into `out_dir`:
    <name>_mask.png ((H, W) uint8 class indices), <name>_color.png ((H, W, 3) palette colours)
    and <name>_overlay.png (image blended 50 % with the colours).

    Args:
      apply_fn, num_classes, protocol, crop_size, batch_size, mesh: as for `Evaluator`
        (a protocol whose record has covers_image False, such as 'center_crop', is refused).
      variables: model variables.
      palette: (num_classes, 3) uint8.

    Returns:
      The paths of the written masks, in sorted input order.
    """
    if num_classes > 256:
        raise ValueError(f"num_classes={num_classes} does not fit a uint8 mask")
    paths = list_images(in_dir)
    os.makedirs(out_dir, exist_ok=True)
    evaluator = Evaluator(
        apply_fn, num_classes=num_classes, protocol=protocol, crop_size=crop_size, batch_size=batch_size, mesh=mesh
    )
    in_flight: collections.deque = collections.deque()  # (path, image) read but not yet written

    def images():
        for path in paths:
            image = load_rgb(path)
            in_flight.append((path, image))
            yield image

    written = []
    for pred in evaluator.predict(variables, images()):
        path, image = in_flight.popleft()
        mask = pred.astype(np.uint8)
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        Image.fromarray(mask).save(stem + "_mask.png")
        visualize.save_png(visualize.colorize(mask, palette), stem + "_color.png")
        visualize.save_png(visualize.overlay(image, mask, palette), stem + "_overlay.png")
        written.append(stem + "_mask.png")
    return written
