"""Synthetic segmentation dataset: the embedded default for the demo and the tests.

Each image (side lengths drawn from `image_size`) has a textured background (smooth noise plus
stripes of random frequency, class 0) and 1-4 objects from 4 classes (disc, square, triangle, ring)
with class-dependent shape, colour and texture statistics that overlap (colour noise of about half
the distance between class means, random scale and occlusion). Object boundaries (1 px) are 255.
Images are stored as PNG, so labels stay exact functions of the generator.

Splits (in `metadata.json` under `splits`): `1_2`, `1_4`, `1_8` -- nested labeled subsets of the
train split (first n of one seeded permutation), the rest unlabeled; val is the val split.
"""
import io
import json
import pathlib

import numpy as np
from PIL import Image

from data_prep import common

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
# Mean RGB of each object class; per-object colours are drawn around these with std 40.
_CLASS_COLOURS = np.array([[200, 60, 60], [60, 170, 70], [70, 90, 200], [190, 170, 60]], np.float32)
SPLIT_FRACTIONS = {"1_2": 2, "1_4": 4, "1_8": 8}


def _smooth_noise(rng, h, w, cells) -> np.ndarray:
    """(h, w) float32 in [0, 1]: a bilinearly upsampled random grid of `cells`x`cells` values."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BILINEAR), np.float32) / 255


def render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic example: image (h, w, 3) uint8 and label (h, w) uint8 in {0..4, 255}."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 200, 3).astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.6)
    stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    image = base + 50 * (_smooth_noise(rng, h, w, 4)[..., None] - 0.5) + 15 * stripes[..., None]
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        r = rng.uniform(0.1, 0.3) * min(h, w)
        dy, dx = yy - cy, xx - cx
        if cls == 1:
            mask = dx * dx + dy * dy <= r * r
        elif cls == 2:
            mask = (np.abs(dx) <= r) & (np.abs(dy) <= r * rng.uniform(0.6, 1.0))
        elif cls == 3:
            mask = (dy <= r) & (dy >= 2 * np.abs(dx) - r)
        else:
            d2 = dx * dx + dy * dy
            mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        colour = _CLASS_COLOURS[cls - 1] + rng.normal(0, 40, 3).astype(np.float32)
        texture = (_smooth_noise(rng, h, w, 8) - 0.5) * (20 + 20 * cls)
        if cls == 2:  # checkerboard texture of random period
            period = rng.integers(3, 8)
            texture = texture + 25 * (((xx // period + yy // period) % 2) - 0.5)
        image[mask] = colour + texture[mask][:, None]
        label[mask] = cls
    edge = np.zeros((h, w), bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label[edge] = common.IGNORE
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


class Synthetic(common.SegmentationBuilder, skip_registration=True):
    """Synthetic shapes on textured backgrounds, 5 classes (csl_jax record format v1)."""

    name = "synthetic"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "png"

    def __init__(self, *, num_train: int, num_val: int, image_size: tuple[int, int], seed: int, **kw):
        self.params = {"num_train": num_train, "num_val": num_val, "image_size": list(image_size),
                       "seed": seed}
        super().__init__(**kw)

    def fingerprint_inputs(self) -> dict:
        """{'parameters': ...}: the generator's parameters are its only input (no --raw)."""
        return {"parameters": self.params}

    def legacy_fingerprint(self, version_dir: pathlib.Path) -> dict | None:
        """Rebuilt from the parameters in metadata.json (datasets prepared before fingerprints)."""
        path = version_dir / "metadata.json"
        if not path.is_file():
            return None
        return common.make_fingerprint(self.name, {"parameters": json.loads(path.read_text()).get("params")})

    def _split_generators(self, dl_manager):
        p = self.params
        order = np.random.default_rng([p["seed"], 2]).permutation(p["num_train"])
        train_ids = [f"train_{i:05d}" for i in range(p["num_train"])]
        self.info.metadata["params"] = p
        self.info.metadata["ids"] = {"train": train_ids,
                                     "val": [f"val_{i:05d}" for i in range(p["num_val"])]}
        self.info.metadata["splits"] = {
            name: {"labeled": [train_ids[i] for i in order[:max(1, len(order) // n)]],
                   "unlabeled": [train_ids[i] for i in order[max(1, len(order) // n):]]}
            for name, n in SPLIT_FRACTIONS.items()}
        return {"train": self._generate_examples(0, p["num_train"]),
                "val": self._generate_examples(1, p["num_val"])}

    def _generate_examples(self, split_code: int, count: int):
        p, (lo, hi) = self.params, self.params["image_size"]
        prefix = ("train", "val")[split_code]
        for i in range(count):
            rng = np.random.default_rng([p["seed"], split_code, i])
            h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
            image, label = render(rng, h, w)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG", compress_level=1)
            key = f"{prefix}_{i:05d}"
            yield key, {"image": buf.getvalue(), "label": common.encode_png(label), "id": key,
                        "height": h, "width": w}


def prepare(out_dir, *, num_train: int = 256, num_val: int = 64, image_size=(64, 96),
            seed: int = 0, rebuild: bool = False) -> pathlib.Path:
    """Writes the synthetic dataset under `out_dir` (a TFDS data dir) and returns `out_dir`.

    Idempotent: a dataset with the same parameters is kept; one with other parameters is an error
    (unless `rebuild`, see `common.prepare`). `image_size` is an int or an inclusive (min, max) side range.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    common.prepare(Synthetic(data_dir=out_dir, num_train=num_train, num_val=num_val, image_size=tuple(image_size),
                             seed=seed), rebuild=rebuild)
    return pathlib.Path(out_dir)
