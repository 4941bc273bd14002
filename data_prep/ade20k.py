"""ADE20K (ADEChallengeData2016, SceneParsing 150): train 20,210, val 2,000, 150 classes, 255 ignore.

Raw layout (`--raw`, the official zip's `ADEChallengeData2016/`): `images/{training,validation}/<stem>.jpg`
and `annotations/{training,validation}/<stem>.png` (single-channel). `labels`:
- `raw` (the official annotations): 0 ("other", not one of the 150) -> 255, v -> v - 1 for v = 1..150
  (mmsegmentation's `reduce_zero_label`); a value above 150, or 255, is refused;
- `reduced` (the UniMatch authors' download): values 0..149 and 255 as they are; 150 is refused.
Ids are the stems; `train` and `val` in ascending id order. The unlabeled lists are derived
(`splits.unlabeled_ids`).
"""
import numpy as np

from data_prep import common

# mmsegmentation's ADE20K class list (objectInfo150 order), 'bed ' without its trailing space.
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
LABELS = ("raw", "reduced")
FOLDERS = {"train": "training", "val": "validation"}


def label_lut(labels: str) -> tuple[np.ndarray, dict[int, str]]:
    """((256,) int16 lookup table, {refused raw value: hint}) of a `labels` convention."""
    n = len(CLASS_NAMES)
    if labels == "raw":
        lut = np.full(256, -1, np.int16)
        lut[0] = common.IGNORE
        lut[1:n + 1] = np.arange(n)
        return lut, {common.IGNORE: "label value 255 is not a raw ADE20K label (0..150): already reduced? pass "
                                    "--labels reduced"}
    return common.index_lut(n), {n: f"label value {n} is not a reduced ADE20K label (0..149, 255): raw "
                                    "annotations? pass --labels raw"}


class Ade20k(common.SegmentationBuilder, skip_registration=True):
    """ADE20K SceneParsing, 150 classes ('other' -> 255) (csl_jax record format v1)."""

    name = "ade20k"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "jpeg"

    def __init__(self, *, labels: str = "raw", **kwargs):
        if labels not in LABELS:
            raise ValueError(f"labels {labels!r}: must be one of {LABELS}")
        self.labels = labels
        super().__init__(**kwargs)

    def settings(self) -> dict:
        return {"labels": self.labels}

    def pairs(self):
        lut, hints = label_lut(self.labels)
        out = {}
        for split, folder in FOLDERS.items():
            images, masks = self.raw_dir / "images" / folder, self.raw_dir / "annotations" / folder
            stems = sorted({p.stem for p in images.glob("*.jpg")} | {p.stem for p in masks.glob("*.png")})
            if not stems:
                raise FileNotFoundError(f"no images matching {images}/*.jpg")
            # a stem with only one of its two files fails in convert_pair, which names the missing one
            out[split] = [common.Pair(s, images / f"{s}.jpg", masks / f"{s}.png", lut, hints) for s in stems]
        return out
