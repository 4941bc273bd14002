"""Opening prepared data and choosing split ids.

Built-in datasets (`pascal`, `cityscapes`, `camvid`, `coco`, `ade20k`, `synthetic`) are read from the TFDS
ArrayRecord files written by `data_prep` under `data_cfg.root/<name>/1.0.0/`, by random access.
A `custom` dataset is read straight from image/mask files named by the user's list files.

Records are returned as `{'id': str, 'image': bytes, 'label': bytes}` (label b'' when the image has
no mask) and decoded by `decode`.
"""
import dataclasses
import io
import json
import pathlib
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from csl_jax.constants import IGNORE_INDEX as IGNORE
from data_prep import splits as shipped
from data_prep.common import FINGERPRINT_FILE, quiet_tfds_logging

quiet_tfds_logging()  # no 'Load dataset info from ...' line per opened source

DATASETS = ("pascal", "cityscapes", "camvid", "coco", "ade20k", "synthetic", "custom")
RECORD_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: name, number of classes, class names, ignore label."""
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE


def _name(data_cfg) -> str:
    name = data_cfg.name
    if name not in DATASETS:
        raise ValueError(f"config.data.name={name!r} is not a known dataset; valid: {', '.join(DATASETS)}")
    return name


# ---------------------------------------------------------------------------------------- records
class RecordSource:
    """Random-access view of prepared records of one split, restricted to `indices` (record order)."""

    def __init__(self, version_dir: pathlib.Path, split: str, indices: list[int] | None = None):
        self._source = tfds.builder_from_directory(str(version_dir)).as_data_source(
            split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
        self._indices = list(range(len(self._source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        r = self._source[self._indices[i]]
        return {"id": r["id"].decode(), "image": r["image"], "label": r["label"]}


class FileSource:
    """Random-access view of (id, image path, mask path or None) entries of a custom dataset."""

    def __init__(self, entries: list[tuple[str, pathlib.Path, pathlib.Path | None]]):
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> dict:
        image_id, image, label = self._entries[i]
        try:
            return {"id": image_id, "image": image.read_bytes(),
                    "label": label.read_bytes() if label is not None else b""}
        except OSError as e:
            raise FileNotFoundError(f"custom dataset: cannot read {e.filename}: {e.strerror}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB.

    16-bit grayscale ('I;16', 'I;16B', ...) and 32-bit 'I'/'F' (holding 16-bit values, as older PIL
    reads 16-bit PNGs) are scaled by value / 257, rounded (PIL's own convert clips them at 255, so
    they turn white); other modes ('L', 'LA', 'P', 'PA', 'RGBA', 'CMYK', '1', ...) use PIL's
    conversion, alpha dropped.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = np.clip(np.rint(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    return image.convert("RGB")


def decode(record: dict, num_classes: int) -> tuple[Image.Image, np.ndarray | None]:
    """Decodes a record: image as a PIL RGB image (`to_rgb`), label (H, W) uint8 or None when absent.

    Raises ValueError naming the record when the label is not a (P or L) index PNG of the image's
    size with values < num_classes or 255 (checked for custom data; prepared data is pre-validated).
    """
    image = to_rgb(Image.open(io.BytesIO(record["image"])))
    if not record["label"]:
        return image, None
    with Image.open(io.BytesIO(record["label"])) as lab:
        if lab.mode not in ("P", "L"):
            raise ValueError(f"mask of {record['id']}: mode {lab.mode}, expected palette (P) or "
                             "grayscale (L) class indices")
        label = np.asarray(lab)
    if label.shape != (image.height, image.width):
        raise ValueError(f"mask of {record['id']}: size {label.shape} differs from the image's "
                         f"{(image.height, image.width)}")
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        raise ValueError(f"mask of {record['id']}: values {np.unique(label[bad]).tolist()} are not "
                         f"classes 0..{num_classes - 1} or 255")
    return image, label


# ------------------------------------------------------------------------------------ prepared data
def version_dir(data_cfg) -> pathlib.Path:
    """`root/<name>/1.0.0`, checked to hold prepared data."""
    name = _name(data_cfg)
    path = pathlib.Path(data_cfg.root) / name / RECORD_VERSION
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no prepared {name} data at {path} (config.data.root={data_cfg.root!r}); "
                                f"prepare it once with `python -m data_prep {name} --raw <the downloaded {name} "
                                "folder> --out <a new folder>` and pass that new folder as config.data.root")
    return path


def ensure_prepared(data_cfg, *, process_index: int | None = None, process_count: int | None = None,
                    barrier: Callable[[str], None] | None = None) -> None:
    """Makes sure every process can read `data_cfg`'s prepared data; call once per run, in every process.

    The synthetic dataset is generated here when `data_cfg.root` lacks it (parameters from
    `data_cfg.synthetic`, see `data_prep.synthetic.prepare`; a dataset with other parameters there
    is an error), by process 0 only: the others wait at `barrier` and then check that they see it,
    so `data_cfg.root` must be a directory all processes share. Other datasets are prepared
    beforehand with `python -m data_prep`; nothing happens for them here.

    Args:
      process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
      barrier: called with a name by every process when process_count > 1; returns when all have
        called it. Default `jax.experimental.multihost_utils.sync_global_devices`.
    """
    if _name(data_cfg) != "synthetic":
        return
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if process_index == 0:
        from data_prep import synthetic

        params = dict(data_cfg.get("synthetic", {}))
        if "image_size" in params:
            params["image_size"] = tuple(params["image_size"])
        synthetic.prepare(data_cfg.root, **params)
    if process_count > 1:
        if barrier is None:
            from jax.experimental import multihost_utils

            barrier = multihost_utils.sync_global_devices
        barrier("csl_jax: synthetic data prepared")
        if not (pathlib.Path(data_cfg.root) / "synthetic" / RECORD_VERSION / "dataset_info.json").is_file():
            raise FileNotFoundError(
                f"process {process_index}: no synthetic data at {data_cfg.root} after process 0 generated it "
                f"there; config.data.root must be a directory every process sees (a shared file system), or "
                f"run `python -m data_prep synthetic --out {data_cfg.root}` with the config's parameters on "
                f"every host first")


def dataset_record(data_cfg) -> dict:
    """What a run records about its data: {'name'} plus, for prepared data, `version_dir` and the
    prepared dataset's fingerprint without its file and split lists (builder, versions, the builder's
    settings such as COCO's `mask_source` or ADE20K's `labels`, and `sha256`); for custom data the
    list files. `fingerprint: None` when the dataset was prepared without one, `version_dir: None` when
    it is not prepared (predicting on a folder needs no dataset)."""
    name = _name(data_cfg)
    if name == "custom":
        return {"name": name, **{k: data_cfg.get(k, "") for k in ("labeled_list", "unlabeled_list", "val_list")}}
    try:
        path = version_dir(data_cfg)
    except FileNotFoundError:
        return {"name": name, "version_dir": None, "fingerprint": None}
    try:
        fingerprint = json.loads((path / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        fingerprint = None
    summary = None if fingerprint is None else {k: v for k, v in fingerprint.items() if k not in ("files", "splits")}
    return {"name": name, "version_dir": str(path), "fingerprint": summary}


def _metadata(data_cfg) -> dict:
    return tfds.builder_from_directory(str(version_dir(data_cfg))).info.metadata


def dataset_info(data_cfg) -> DatasetInfo:
    """DatasetInfo of `data_cfg.name` (read from the prepared data, or the config for `custom`)."""
    if _name(data_cfg) == "custom":
        n = data_cfg.num_classes
        names = tuple(data_cfg.get("class_names") or [f"class_{i}" for i in range(n)])
        if len(names) != n:
            raise ValueError(f"config.data.class_names has {len(names)} names, num_classes is {n}")
        return DatasetInfo("custom", n, names)
    names = tuple(_metadata(data_cfg)["class_names"])
    return DatasetInfo(data_cfg.name, len(names), names)


def _custom_entries(data_cfg, key: str, need_masks: bool):
    path = data_cfg.get(key)
    if not path:
        raise ValueError(f"config.data.{key} (a list file) is required for name='custom'")
    root = pathlib.Path(data_cfg.root)
    entries = []
    for line in shipped.read_list(path):
        parts = line.split()
        if need_masks and len(parts) < 2:
            raise ValueError(f"{path}: line {line!r} has no mask path (expected '<image> <mask>')")
        entries.append((parts[0], root / parts[0], root / parts[1] if len(parts) > 1 else None))
    return entries


def split_ids(data_cfg) -> tuple[list[str], list[str]]:
    """(labeled ids, unlabeled ids) of `data_cfg.split`, checked.

    On prepared data, `data_cfg.labeled_list` (a list file, lines in any format of `line_id`) replaces
    the shipped split: its ids are labeled, those of `data_cfg.unlabeled_list` unlabeled (default:
    the rest of the prepared train pool, in record order), and `data_cfg.split` is only a name.

    Checks: the split exists (else the error lists the valid ones), labeled and unlabeled are
    disjoint, their union is the prepared train split (shipped and derived splits), every id is prepared.
    """
    name = _name(data_cfg)
    if name == "custom":
        labeled = [e[0] for e in _custom_entries(data_cfg, "labeled_list", True)]
        unlabeled = ([e[0] for e in _custom_entries(data_cfg, "unlabeled_list", False)]
                     if data_cfg.get("unlabeled_list") else [])
        _check_disjoint(labeled, unlabeled, "custom")
        return labeled, unlabeled
    split = data_cfg.split
    if data_cfg.get("labeled_list"):
        meta, split = _metadata(data_cfg), data_cfg.labeled_list
        labeled = shipped.read_ids(data_cfg.labeled_list)
        if data_cfg.get("unlabeled_list"):
            unlabeled = shipped.read_ids(data_cfg.unlabeled_list)
        else:
            chosen = set(labeled)
            unlabeled = [i for i in meta["ids"]["train"] if i not in chosen]
    elif name == "synthetic":
        meta = _metadata(data_cfg)
        if split not in meta["splits"]:
            raise ValueError(f"unknown synthetic split {split!r}; valid: {', '.join(sorted(meta['splits']))}")
        labeled, unlabeled = meta["splits"][split]["labeled"], meta["splits"][split]["unlabeled"]
    else:
        family = data_cfg.get("family") or name
        valid = shipped.shipped_splits(family)
        if split not in valid:
            raise ValueError(f"unknown split {split!r} for family {family!r}; valid: {', '.join(valid)}")
        labeled = shipped.shipped_list(f"{family}/{split}/labeled.txt")
        meta = _metadata(data_cfg)
        unlabeled = shipped.unlabeled_ids(family, split, meta["ids"]["train"])
    _check_disjoint(labeled, unlabeled, f"{name} split {split}")
    pool = set(meta["ids"]["train"])
    missing = [i for i in labeled + unlabeled if i not in pool]
    if missing:
        raise ValueError(f"{name} split {split}: {len(missing)} ids are not in the prepared train data "
                         f"at {version_dir(data_cfg)}, e.g. {missing[:5]}")
    if not data_cfg.get("labeled_list") and len(labeled) + len(unlabeled) != len(pool):
        raise ValueError(f"{name} split {split}: labeled + unlabeled = {len(labeled) + len(unlabeled)} "
                         f"ids, the prepared train pool has {len(pool)}")
    return labeled, unlabeled


def _check_disjoint(labeled, unlabeled, what):
    both = set(labeled) & set(unlabeled)
    if both:
        raise ValueError(f"{what}: {len(both)} ids are both labeled and unlabeled, e.g. {sorted(both)[:5]}")


def _record_source(data_cfg, split: str, ids: list[str] | None):
    vdir = version_dir(data_cfg)
    all_ids = _metadata(data_cfg)["ids"]
    if split not in all_ids:
        raise ValueError(f"split {split!r} is not prepared in {vdir}; prepared: {', '.join(all_ids)}")
    if ids is None:
        return RecordSource(vdir, split)
    position = {i: k for k, i in enumerate(all_ids[split])}
    return RecordSource(vdir, split, [position[i] for i in ids])


def train_sources(data_cfg) -> tuple[object, object]:
    """(labeled source, unlabeled source) of the configured split; random access to records."""
    labeled, unlabeled = split_ids(data_cfg)
    if data_cfg.name == "custom":
        by_id = {e[0]: e for e in _custom_entries(data_cfg, "labeled_list", True)}
        ul = _custom_entries(data_cfg, "unlabeled_list", False) if data_cfg.get("unlabeled_list") else []
        return FileSource([by_id[i] for i in labeled]), FileSource(ul)
    return _record_source(data_cfg, "train", labeled), _record_source(data_cfg, "train", unlabeled)


def eval_source(data_cfg, split: str = "val"):
    """Random-access source of a whole evaluation split (`val`, or `test` where prepared)."""
    if _name(data_cfg) == "custom":
        return FileSource(_custom_entries(data_cfg, f"{split}_list", True))
    return _record_source(data_cfg, split, None)
