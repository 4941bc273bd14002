"""Cityscapes (fine): train 2,975, val 500, 19 classes (trainIds), 255 ignore.

Raw layout (`--raw`): `leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png` and
`gtFine/{train,val}/<city>/<id>_gtFine_labelIds.png` (mapped with the trainId table of
docs/protocol.md; every other value -> 255) or, when no labelIds file is present,
`<id>_gtFine_labelTrainIds.png` (used as is).
"""
import numpy as np

from data_prep import common

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
               "motorcycle", "bicycle")
# labelId -> trainId (docs/protocol.md §1); every labelId not listed -> 255.
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                  25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def label_id_lut() -> np.ndarray:
    """(256,) int16 labelId -> trainId table (all values valid; unlisted -> 255)."""
    lut = np.full(256, common.IGNORE, np.int16)
    for k, v in LABEL_TO_TRAIN.items():
        lut[k] = v
    return lut


class Cityscapes(common.SegmentationBuilder, skip_registration=True):
    """Cityscapes fine annotations, 19 trainId classes (csl_jax record format v1)."""

    name = "cityscapes"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "png"

    def pairs(self):
        label_ids, train_ids = label_id_lut(), common.index_lut(len(CLASS_NAMES))
        out = {}
        for split in ("train", "val"):
            images = sorted((self.raw_dir / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
            if not images:
                raise FileNotFoundError(f"no images matching {self.raw_dir}/leftImg8bit/{split}/*/"
                                        "*_leftImg8bit.png")
            out[split] = []
            for image in images:
                stem = image.name.removesuffix("_leftImg8bit.png")
                gt = self.raw_dir / "gtFine" / split / image.parent.name
                mask = gt / f"{stem}_gtFine_labelIds.png"
                if mask.exists() or not (gt / f"{stem}_gtFine_labelTrainIds.png").exists():
                    out[split].append(common.Pair(stem, image, mask, label_ids))
                else:
                    out[split].append(common.Pair(stem, image, gt / f"{stem}_gtFine_labelTrainIds.png",
                                                  train_ids))
        return out
