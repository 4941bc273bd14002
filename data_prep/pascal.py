"""Pascal VOC 2012 + SBD ("aug"): train_aug (10,582) and val (1,449), 21 classes, 255 ignore.

Raw layout (`--raw`): `JPEGImages/<id>.jpg` and, per id, `SegmentationClass/<id>.png` (palette
PNG; UniMatch's re-packed folder covers all 10,582) or else `SegmentationClassAug/<id>.png`
(grayscale indices). Palette PNGs are read as raw palette indices.
"""
import pathlib

from data_prep import common, splits

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


class Pascal(common.SegmentationBuilder, skip_registration=True):
    """Pascal VOC 2012 augmented with SBD, semantic segmentation (csl_jax record format v1)."""

    name = "pascal"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "jpeg"

    def __init__(self, *, train_list=None, val_list=None, **kwargs):
        self.lists = {"train": train_list, "val": val_list}
        super().__init__(**kwargs)

    def pairs(self):
        lut = common.index_lut(len(CLASS_NAMES))
        shipped = {"train": "pascal/train_aug.txt", "val": "pascal/val.txt"}
        out = {}
        for split, path in self.lists.items():
            ids = splits.read_ids(path) if path else splits.shipped_list(shipped[split])
            out[split] = [common.Pair(i, self.raw_dir / "JPEGImages" / f"{i}.jpg", self._mask(i), lut)
                          for i in ids]
        return out

    def _mask(self, image_id: str) -> pathlib.Path:
        palette = self.raw_dir / "SegmentationClass" / f"{image_id}.png"
        aug = self.raw_dir / "SegmentationClassAug" / f"{image_id}.png"
        return aug if not palette.exists() and aug.exists() else palette
