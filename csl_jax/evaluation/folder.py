"""Segments every image of a folder: class-index masks, colour masks and overlays as PNG.

Images (.jpg, .jpeg, .png, .bmp, any case, any size; not recursive) are read with PIL, converted to
8-bit RGB as in training (`csl_jax.data.sources.to_rgb`: 16-bit images scaled, not clipped), and
used as stored (EXIF orientation is not applied, as in training). A file that cannot be decoded is
skipped with a warning naming it; every other image's outputs are written, and then
`FolderPredictionError` lists the skipped files, so a run with bad files never looks successful.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from csl_jax import visualize
from csl_jax.data.sources import to_rgb
from csl_jax.evaluation.evaluator import ApplyFn, Evaluator
from csl_jax.evaluation.protocols import RESIZE_MULTIPLE, Protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class FolderPredictionError(ValueError):
    """Some images could not be decoded; raised after the outputs of all the others are written.

    Attributes:
      written: paths of the masks written, in sorted input order.
      failed: (image path, reason) of each skipped image, in sorted input order.
    """

    def __init__(self, in_dir: str, out_dir: str, written: list[str], failed: list[tuple[str, str]]):
        self.written, self.failed = written, failed
        lines = "".join(f"\n  {path}: {reason}" for path, reason in failed)
        super().__init__(f"{len(failed)} of {len(written) + len(failed)} images in {in_dir!r} could not be decoded "
                         f"and were skipped (the outputs of the other {len(written)} are in {out_dir!r}):{lines}")


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


def check_output_dir(in_dir: str, out_dir: str) -> None:
    """Refuses an output folder equal to or inside the input folder (resolved real paths): a second run
    would segment the first run's outputs."""
    real_in, real_out = os.path.realpath(in_dir), os.path.realpath(out_dir)
    if os.path.commonpath([real_in, real_out]) == real_in:
        raise ValueError(f"output folder {out_dir!r} is the input folder {in_dir!r} or inside it (resolved: "
                         f"{real_out!r} in {real_in!r}); a later run would segment these outputs as images: "
                         "choose an output folder outside the input folder")


def load_rgb(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; raises ValueError naming the file if it is corrupt."""
    try:
        with Image.open(path) as image:
            return np.asarray(to_rgb(image))
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
    resize_multiple: int = RESIZE_MULTIPLE,
) -> list[str]:
    """Segments every image of `in_dir` and writes, per image <name>.<ext>, into `out_dir`:
    <name>_mask.png ((H, W) uint8 class indices), <name>_color.png ((H, W, 3) palette colours)
    and <name>_overlay.png (image blended 50 % with the colours).

    Args:
      apply_fn, num_classes, protocol, crop_size, batch_size, mesh, resize_multiple: as for `Evaluator`
        (a protocol whose record has covers_image False, such as 'center_crop', is refused).
      variables: model variables.
      palette: (num_classes, 3) uint8.

    Returns:
      The paths of the written masks, in sorted input order.

    Raises:
      FolderPredictionError: after writing the outputs of every good image, when some could not be
        decoded (each is also logged as a warning when it is skipped).
      ValueError: `out_dir` is `in_dir` or inside it (checked first; nothing is written).
    """
    if num_classes > 256:
        raise ValueError(f"num_classes={num_classes} does not fit a uint8 mask")
    paths = list_images(in_dir)
    check_output_dir(in_dir, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    evaluator = Evaluator(
        apply_fn, num_classes=num_classes, protocol=protocol, crop_size=crop_size, batch_size=batch_size, mesh=mesh,
        resize_multiple=resize_multiple)
    in_flight: collections.deque = collections.deque()  # (path, image) read but not yet written
    failed: list[tuple[str, str]] = []

    def images():
        for path in paths:
            try:
                image = load_rgb(path)
            except ValueError as err:
                logging.warning("skipping %s: %s", path, err.__cause__ or err)
                failed.append((path, str(err.__cause__ or err)))
                continue
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
    if failed:
        raise FolderPredictionError(in_dir, out_dir, written, failed)
    return written
