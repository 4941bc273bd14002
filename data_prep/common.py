"""Shared TFDS builder for segmentation datasets: record format, validation, conversion.

Record format v1 (one TFDS example per image, ArrayRecord files, no TensorFlow needed):

| key | TFDS feature | content |
|---|---|---|
| `image` | `Image(shape=(None, None, 3))` | the source file's original encoded bytes (JPEG or PNG), never re-encoded |
| `label` | `Image(shape=(None, None, 1), png)` | PNG of uint8 class indices, 255 = ignore; empty bytes without mask |
| `id` | `Text` | image id (file stem, `_leftImg8bit` removed) |
| `height`, `width` | `int32` | image size |

Records are written in a fixed order (`disable_shuffling=True`: the order of the split's id list).
`metadata.json` holds `ids` ({split: [id, ...]} in record order), `class_names`, `ignore_index`,
`record_format`.
"""
import concurrent.futures
import multiprocessing
import dataclasses
import inspect
import io
import pathlib
import shutil
from typing import Callable, Iterable

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from csl_jax.constants import IGNORE_INDEX as IGNORE  # the one ignore label of csl_jax

RECORD_FORMAT = 1


class DataPrepError(ValueError):
    """Some source files are missing or invalid; the message lists every one of them."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One source example: `id`, image path, label path (None: no mask) and its raw-value lookup table."""
    id: str
    image: pathlib.Path
    label: pathlib.Path | None
    lut: np.ndarray | None = None  # (256,) int16: raw label value -> class index / 255; -1 = invalid


def index_lut(num_classes: int, extra: dict[int, int] | None = None) -> np.ndarray:
    """(256,) int16 lookup table: 0..num_classes-1 and 255 map to themselves, `extra` as given, others -1."""
    lut = np.full(256, -1, np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE] = IGNORE
    for k, v in (extra or {}).items():
        lut[k] = v
    return lut


def encode_png(label: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) uint8 array (grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_index_png(path) -> np.ndarray:
    """(H, W) uint8 raw values of a palette (P) or grayscale (L) PNG; the palette is never applied."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"mode {im.mode}: expected a palette (P) or grayscale (L) PNG of class indices")
        return np.asarray(im)  # mode P: the palette indices, not colours or luminance


def convert_pair(pair: Pair) -> tuple[dict | None, str | None]:
    """Decode and check one pair; returns (example dict, None) or (None, 'file: what is wrong')."""
    try:
        data = pair.image.read_bytes()
    except OSError as e:
        return None, f"{pair.image}: cannot read image ({e.strerror or e})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
    except Exception as e:  # PIL raises many types for corrupt files
        return None, f"{pair.image}: image does not decode ({e})"
    if mode not in ("RGB", "L"):
        return None, f"{pair.image}: image mode {mode}, expected RGB or L"
    label = b""
    if pair.label is not None:
        if not pair.label.is_file():
            return None, f"{pair.label}: mask missing (for image {pair.image})"
        try:
            raw = read_index_png(pair.label)
        except Exception as e:
            return None, f"{pair.label}: mask does not decode ({e})"
        if raw.shape != (h, w):
            return None, (f"{pair.label}: mask size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from "
                          f"image {pair.image} size {w}x{h}")
        mapped = pair.lut[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0]).tolist()
            return None, f"{pair.label}: label values {bad} are not class indices of this dataset or 255"
        label = encode_png(mapped.astype(np.uint8))
    return {"image": data, "label": label, "id": pair.id, "height": h, "width": w}, None


def parallel_map(fn: Callable, items: Iterable, num_workers: int):
    """Ordered map over `items`, in `num_workers` processes (0: in this process)."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    # spawn, not fork: forking a process that already runs JAX's threads can deadlock
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        yield from pool.map(fn, items, chunksize=4)


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base TFDS builder: subclasses set `name`, `CLASS_NAMES`, `IMAGE_FORMAT` and implement `pairs()`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "record format v1 (see data_prep/common.py)"}
    CLASS_NAMES: tuple[str, ...] = ()
    IMAGE_FORMAT = "jpeg"

    def __init__(self, *, data_dir, raw_dir=None, num_workers: int = 0, **kwargs):
        self.raw_dir = pathlib.Path(raw_dir) if raw_dir is not None else None
        self.num_workers = num_workers
        self._errors: list[str] = []
        super().__init__(data_dir=str(data_dir), file_format="array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file. (TFDS's default needs `importlib_resources`, absent on Python 3.11.)"""
        return epath.Path(inspect.getfile(cls))

    def pairs(self) -> dict[str, list[Pair]]:
        """{split: [Pair, ...]} in record order. Missing files may be left to `convert_pair` to report."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "id": tfds.features.Text(),
                "height": np.int32,
                "width": np.int32,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(class_names=list(self.CLASS_NAMES), ignore_index=IGNORE,
                                            record_format=RECORD_FORMAT),
        )

    def _split_generators(self, dl_manager):
        if self.raw_dir is not None and not self.raw_dir.is_dir():
            raise FileNotFoundError(f"--raw {self.raw_dir} is not a directory")
        pairs = self.pairs()
        self.info.metadata["ids"] = {s: [p.id for p in ps] for s, ps in pairs.items()}
        return {s: self._generate_examples(ps) for s, ps in pairs.items()}

    def _generate_examples(self, pairs: list[Pair]):
        for example, error in parallel_map(convert_pair, pairs, self.num_workers):
            if error is not None:
                self._errors.append(error)
            else:
                yield example["id"], example

    def _download_and_prepare(self, dl_manager, download_config):
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except Exception:
            if not self._errors:
                raise
        if self._errors:  # raised inside TFDS's temporary dir: nothing partial is left behind
            raise DataPrepError(f"{self.name}: {len(self._errors)} invalid source file(s); nothing was "
                                "written:\n  " + "\n  ".join(self._errors))


def prepare(builder: SegmentationBuilder) -> pathlib.Path:
    """Runs a builder (idempotent: an already prepared dataset is kept). Returns its version dir.

    On failure, the empty folders TFDS created (`<name>/`, `downloads/`) are removed again.
    """
    root = pathlib.Path(builder.data_dir).parent.parent
    created = [d for d in (root / builder.name, root / "downloads") if not d.exists()]
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except BaseException:
        for d in created:
            if d.is_dir() and not any(p.is_file() for p in d.rglob("*")):
                shutil.rmtree(d)
        raise
    return pathlib.Path(builder.data_dir)
