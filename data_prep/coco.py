"""COCO 2017 in UniMatch's setting: train 118,287, val 5,000, 81 classes (0 background, 1..80 things), 255 ignore.

Raw layout (`--raw`): `train2017/<12-digit id>.jpg`, `val2017/<id>.jpg`, optionally `unlabeled2017/<id>.jpg`
(split `unlabeled_extra`, without labels), and the masks, from one of two sources:
- mode A (default; needs `masks/`): `masks/<id>.png`, the UniMatch authors' pre-processed masks of train
  and val in one folder, taken as they are (values 0..80, 255);
- mode B (`from_instances`): generated from `annotations/instances_{train,val}2017.json` with pycocotools.
  Background 0; each annotation painted with its category's train id (`TRAIN_IDS`) in the `overlap`
  order (`json`: later overwrite earlier; `area_desc`: by `area`, largest first); crowd regions by
  `crowd` (`class`: painted as instances; `ignore`: 255 after all instances; `skip`: not painted).
  An approximation of the authors' masks, whose making is undocumented; `compare` measures it.

Splits: `train` = every image in train2017/ (ascending id; it must hold the shipped labeled lists),
`val` = the shipped `coco/val.txt` order. The unlabeled lists are derived (`splits.unlabeled_ids`).
The mask source is in the fingerprint and in metadata.json (`mask_source`), with `mask_stats` per split.
"""
import collections
import dataclasses
import json
import pathlib

import numpy as np
from PIL import Image

from data_prep import common, splits

# The 80 COCO 2017 category ids in ascending order; train id = rank (1..80), 0 is background.
CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                85, 86, 87, 88, 89, 90)
TRAIN_IDS = {category: rank for rank, category in enumerate(CATEGORY_IDS, 1)}
CLASS_NAMES = ("background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
               "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
               "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
               "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
               "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
               "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
               "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
               "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
               "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
OVERLAPS = ("json", "area_desc")
CROWDS = ("class", "ignore", "skip")
LABELED_SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
ANNOTATION_KEYS = ("id", "category_id", "iscrowd", "area", "segmentation")


def _mask_api():
    """pycocotools.mask, imported when mode B needs it."""
    try:
        from pycocotools import mask
    except ImportError as e:
        raise common.DataPrepError("coco --from-instances needs pycocotools: pip install 'csl_jax[data]'") from e
    return mask


@dataclasses.dataclass(frozen=True)
class InstanceMask:
    """Mode-B mask of one image, made in the worker: called as (height, width) -> (H, W) uint8 train ids / 255.

    Carries only this image's annotations (`ANNOTATION_KEYS` of each, JSON order). `size` is the JSON
    `images` entry's (height, width), None when the JSON has no entry for the image.
    """
    image: str  # e.g. 'train2017/000000000139.jpg', for messages
    source: str  # the JSON file, for messages
    size: tuple[int, int] | None
    annotations: tuple[dict, ...]
    overlap: str = "json"
    crowd: str = "class"

    def __call__(self, height: int, width: int) -> np.ndarray:
        return self._paint(self._binaries(height, width))

    def _binaries(self, height: int, width: int) -> list[np.ndarray]:
        """(H, W) uint8 0/1 mask of each annotation; ValueError naming every problem of this image."""
        if self.size is None:
            raise ValueError(f"{self.source}: no `images` entry for {self.image}")
        if tuple(self.size) != (height, width):
            raise ValueError(f"{self.source}: {self.image} is {self.size[1]}x{self.size[0]} (WxH) in the JSON, "
                             f"the JPEG is {width}x{height}")
        api, binaries, problems = _mask_api(), [], []
        for ann in self.annotations:
            where = f"annotation {ann['id']} of {self.image}"
            if ann["category_id"] not in TRAIN_IDS:
                problems.append(f"{where} has category_id {ann['category_id']}, not one of the 80 COCO categories")
                continue
            segm = ann["segmentation"]
            try:
                if isinstance(segm, list):  # polygons: the union of the parts
                    rle = api.merge(api.frPyObjects(segm, height, width))
                elif isinstance(segm["counts"], list):  # uncompressed RLE
                    rle = api.frPyObjects(segm, height, width)
                else:  # compressed RLE
                    rle = segm
                binary = api.decode(rle)
            except Exception as e:  # pycocotools raises several types on malformed input
                problems.append(f"{where}: segmentation does not decode ({e})")
                continue
            if binary.shape != (height, width):
                problems.append(f"{where}: RLE size {list(binary.shape)} differs from the image's {[height, width]}")
            binaries.append(binary)
        if problems:
            raise ValueError(f"{self.source}: " + "; ".join(problems))
        return binaries

    def _paint(self, binaries: list[np.ndarray]) -> np.ndarray:
        """(H, W) uint8 mask of the annotations' (H, W) 0/1 masks, by `overlap` and `crowd`."""
        order = range(len(binaries))
        if self.overlap == "area_desc":  # stable: equal areas keep the JSON order
            order = sorted(order, key=lambda k: -self.annotations[k]["area"])
        mask = np.zeros(self.size, np.uint8)
        for k in order:
            ann = self.annotations[k]
            if not ann["iscrowd"] or self.crowd == "class":
                mask[binaries[k] > 0] = TRAIN_IDS[ann["category_id"]]
        if self.crowd == "ignore":
            for ann, binary in zip(self.annotations, binaries):
                if ann["iscrowd"]:
                    mask[binary > 0] = common.IGNORE
        return mask

    def layers(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask (H, W) uint8, number of annotations covering each pixel (H, W) int32, crowd region (H, W) bool)."""
        binaries = self._binaries(height, width)
        coverage = np.zeros((height, width), np.int32)
        crowd = np.zeros((height, width), bool)
        for ann, binary in zip(self.annotations, binaries):
            coverage += binary
            if ann["iscrowd"]:
                crowd |= binary > 0
        return self._paint(binaries), coverage, crowd


def labeled_ids() -> set[str]:
    """Ids of the shipped labeled lists (the train pool must hold them)."""
    return {i for split in LABELED_SPLITS for i in splits.shipped_list(f"coco/{split}/labeled.txt")}


class Coco(common.SegmentationBuilder, skip_registration=True):
    """COCO 2017, 81 classes (background + the 80 things), UniMatch's setting (csl_jax record format v1)."""

    name = "coco"
    CLASS_NAMES = CLASS_NAMES
    IMAGE_FORMAT = "jpeg"

    def __init__(self, *, from_instances: bool = False, overlap: str = "json", crowd: str = "class",
                 val_list=None, required_train_ids=None, **kwargs):
        """`val_list`: a list file for val (default the shipped coco/val.txt); `required_train_ids`: ids the
        train pool must hold (default `labeled_ids()`)."""
        if overlap not in OVERLAPS or crowd not in CROWDS:
            raise ValueError(f"overlap {overlap!r} / crowd {crowd!r}: must be one of {OVERLAPS} / {CROWDS}")
        self.from_instances, self.overlap, self.crowd = from_instances, overlap, crowd
        self.val_list, self.required_train_ids = val_list, required_train_ids
        self.mask_stats: dict[str, dict] = {}
        super().__init__(**kwargs)

    def settings(self) -> dict:
        if self.from_instances:
            return {"mask_source": {"mode": "instances", "overlap": self.overlap, "crowd": self.crowd}}
        return {"mask_source": {"mode": "authors_masks"}}

    def annotation_file(self, split: str) -> pathlib.Path:
        return self.raw_dir / "annotations" / f"instances_{split}2017.json"

    def extra_inputs(self) -> list[pathlib.Path]:
        return [self.annotation_file(s) for s in ("train", "val")] if self.from_instances else []

    def pairs(self):
        train = sorted(p.stem for p in (self.raw_dir / "train2017").glob("*.jpg"))
        if not train:
            raise FileNotFoundError(f"no images matching {self.raw_dir}/train2017/*.jpg")
        required = labeled_ids() if self.required_train_ids is None else set(self.required_train_ids)
        absent = sorted(required - set(train))
        if absent:
            raise common.DataPrepError(
                f"{self.raw_dir}/train2017 lacks {len(absent)} images of the shipped labeled lists, e.g. "
                f"{', '.join(absent[:3])}; prepare the complete train2017 (118,287 images)")
        ids = {"train": train,
               "val": splits.read_ids(self.val_list) if self.val_list else splits.shipped_list("coco/val.txt")}
        if self.from_instances:
            labels = {s: self._instance_masks(s, split_ids) for s, split_ids in ids.items()}
        elif (self.raw_dir / "masks").is_dir():
            labels = {s: [self.raw_dir / "masks" / f"{i}.png" for i in split_ids] for s, split_ids in ids.items()}
        else:
            raise common.DataPrepError(
                f"{self.raw_dir} has no masks/ folder (the UniMatch authors' masks); pass --from-instances to "
                "generate masks from annotations/instances_{train,val}2017.json (docs/data.md)")
        lut = common.index_lut(len(CLASS_NAMES))
        out = {s: [common.Pair(i, self.raw_dir / f"{s}2017" / f"{i}.jpg", label, lut)
                   for i, label in zip(split_ids, labels[s])] for s, split_ids in ids.items()}
        extra = sorted((self.raw_dir / "unlabeled2017").glob("*.jpg"))
        if extra:
            out["unlabeled_extra"] = [common.Pair(p.stem, p, None) for p in extra]
        return out

    def _instance_masks(self, split: str, ids: list[str]) -> list[InstanceMask]:
        """One InstanceMask per id, from the split's instances JSON (read here, in the main process)."""
        _mask_api()  # fail before reading the JSON when pycocotools is missing
        path = self.annotation_file(split)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise common.DataPrepError(f"{path}: cannot read the instances JSON ({e}); --from-instances needs "
                                       "annotations/instances_{train,val}2017.json") from e
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        by_image = collections.defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append({k: ann[k] for k in ANNOTATION_KEYS})
        del data
        return [InstanceMask(f"{split}2017/{i}.jpg", str(path), sizes.get(int(i)) if i.isdigit() else None,
                             tuple(by_image.get(int(i), ()) if i.isdigit() else ()), self.overlap, self.crowd)
                for i in ids]

    def observe_label(self, split: str, counts: np.ndarray) -> None:
        stats = self.mask_stats.setdefault(split, {"images": 0, "pixels": 0, "ignore_pixels": 0,
                                                   "images_without_foreground": 0})
        stats["images"] += 1
        stats["pixels"] += int(counts.sum())
        stats["ignore_pixels"] += int(counts[common.IGNORE])
        stats["images_without_foreground"] += int(counts[1:len(CLASS_NAMES)].sum() == 0)

    def _split_generators(self, dl_manager):
        self.info.metadata["mask_stats"] = self.mask_stats  # filled while the records are written
        return super()._split_generators(dl_manager)

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        for stats in self.mask_stats.values():
            stats["ignore_fraction"] = stats["ignore_pixels"] / max(stats["pixels"], 1)
        source = self.settings()["mask_source"]
        print(f"coco masks ({', '.join(f'{k} {v}' for k, v in source.items())}): " + "; ".join(
            f"{split} {s['ignore_fraction']:.4%} pixels 255, {s['images_without_foreground']} of {s['images']} "
            "images without a foreground pixel" for split, s in self.mask_stats.items()))


def _compare_one(task: tuple[common.Pair, pathlib.Path]) -> tuple[dict | None, str | None]:
    """Mode-B mask of one image against its reference mask: (per-image statistics, None) or (None, error)."""
    pair, reference = task
    try:
        with Image.open(pair.image) as im:
            width, height = im.size
    except Exception as e:  # PIL raises many types for corrupt files
        return None, f"{pair.image}: image does not decode ({e})"
    try:
        generated, coverage, crowd = pair.label.layers(height, width)
    except ValueError as e:
        return None, str(e)
    if not reference.is_file():
        return None, f"{reference}: reference mask missing (for image {pair.image})"
    try:
        ref = common.read_index_png(reference)
    except Exception as e:
        return None, f"{reference}: reference mask does not decode ({e})"
    if ref.shape != (height, width):
        return None, (f"{reference}: mask size {ref.shape[1]}x{ref.shape[0]} (WxH) differs from image {pair.image} "
                      f"size {width}x{height}")
    if (pair.lut[ref] < 0).any():
        return None, f"{reference}: {common.refused(np.unique(ref[pair.lut[ref] < 0]).tolist())}"
    differ, overlap = generated != ref, coverage >= 2
    codes, counts = np.unique(generated.astype(np.int32) * 256 + ref, return_counts=True)
    return {"id": pair.id, "pixels": height * width, "agreeing": int((~differ).sum()), "joint": (codes, counts),
            "overlap_pixels": int(overlap.sum()), "overlap_disagreeing": int((differ & overlap).sum()),
            "crowd_pixels": int(crowd.sum()), "crowd_disagreeing": int((differ & crowd).sum()),
            "crowd_reference_255": int((crowd & (ref == common.IGNORE)).sum())}, None


def _region(pixels: int, disagreeing: int, all_disagreeing: int) -> dict:
    return {"pixels": pixels, "disagreeing": disagreeing, "disagreeing_fraction": disagreeing / max(pixels, 1),
            "share_of_all_disagreeing": disagreeing / max(all_disagreeing, 1)}


def compare(builder: Coco, masks_dir, out_path) -> dict:
    """Compares `builder`'s mode-B masks (train and val) with reference masks `masks_dir/<id>.png`; writes
    the report JSON to `out_path` and returns it. Writes no dataset; DataPrepError listing every bad file.

    Report: `images`, `pixels`, `agreement` (fraction of equal pixels, 255 included), `per_image`
    {id: agreement}, `confusion` [generated][reference] (81 x 81 pixel counts, 255 left out), `overlap`
    and `crowd` (pixels covered by >= 2 annotations / by a crowd annotation, the disagreeing ones, their
    fraction and their share of all disagreeing pixels), `ignore` (255 pixels of each side, both, and
    the other side's labels there; reference 255 inside crowd regions).
    """
    masks_dir, out_path = pathlib.Path(masks_dir), pathlib.Path(out_path)
    pairs = [p for split in ("train", "val") for p in builder.split_pairs[split]]
    tasks = [(p, masks_dir / f"{p.id}.png") for p in pairs]
    progress = common.Progress("coco compare", len(tasks))
    n = len(CLASS_NAMES)
    joint = np.zeros((256, 256), np.int64)  # [generated, reference]
    totals, per_image, errors = collections.Counter(), {}, []
    for done, (stats, error) in enumerate(common.parallel_map(_compare_one, tasks, builder.num_workers), 1):
        progress.update(done)
        if error is not None:
            errors.append(error)
            continue
        codes, counts = stats.pop("joint")
        np.add.at(joint, (codes // 256, codes % 256), counts)
        per_image[stats.pop("id")] = stats["agreeing"] / stats["pixels"]
        totals.update(stats)
    progress.close()
    if errors:
        raise common.invalid_files_error("coco compare", errors, "no report was written")
    disagreeing = totals["pixels"] - totals["agreeing"]
    ignore = common.IGNORE
    report = {
        "generated": builder.settings()["mask_source"], "reference": str(masks_dir),
        "images": len(per_image), "pixels": totals["pixels"],
        "agreement": totals["agreeing"] / max(totals["pixels"], 1), "per_image": per_image,
        "confusion": joint[:n, :n].tolist(),
        "overlap": _region(totals["overlap_pixels"], totals["overlap_disagreeing"], disagreeing),
        "crowd": _region(totals["crowd_pixels"], totals["crowd_disagreeing"], disagreeing),
        "ignore": {"generated_pixels": int(joint[ignore].sum()), "reference_pixels": int(joint[:, ignore].sum()),
                   "both": int(joint[ignore, ignore]),
                   "generated_where_reference_255": {str(v): int(c) for v, c in enumerate(joint[:, ignore]) if c},
                   "reference_where_generated_255": {str(v): int(c) for v, c in enumerate(joint[ignore]) if c},
                   "reference_255_in_crowd_regions": totals["crowd_reference_255"]},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    return report


def summary(report: dict) -> str:
    """Two lines on a `compare` report."""
    ignore, pixels = report["ignore"], max(report["pixels"], 1)
    return (f"coco compare ({', '.join(f'{k} {v}' for k, v in report['generated'].items())} vs "
            f"{report['reference']}): {report['images']} images, pixel agreement {report['agreement']:.4%}\n"
            f"  disagreeing at instance overlaps {report['overlap']['disagreeing_fraction']:.2%} of "
            f"{report['overlap']['pixels']} px, at crowd regions {report['crowd']['disagreeing_fraction']:.2%} "
            f"of {report['crowd']['pixels']} px; 255: reference {ignore['reference_pixels'] / pixels:.4%}, "
            f"generated {ignore['generated_pixels'] / pixels:.4%}")
