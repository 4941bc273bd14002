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
`record_format`, and the builder's `settings()` (choices that change the records, e.g. COCO's
`mask_source`, ADE20K's `labels`).

`fingerprint.json` (next to the records) describes the inputs the dataset was built from: the
builder and its version, its `settings()`, the ids of each split (sha256), and every raw input file
used as {path relative to --raw: [size, mtime_ns]}; `sha256` digests all of it. `prepare` compares it
with the current inputs to keep, refuse or (with rebuild) replace a prepared dataset.
"""
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import uuid
from typing import Callable, NamedTuple, Sequence, TextIO

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from csl_jax.constants import IGNORE_INDEX as IGNORE  # the one ignore label of csl_jax

RECORD_FORMAT = 1
BUILDER_VERSION = 1  # bump when a builder writes other records from the same raw files
FINGERPRINT_FILE = "fingerprint.json"


class DataPrepError(ValueError):
    """The raw data is missing or invalid, or differs from what a prepared dataset was built from."""


class Prepared(NamedTuple):
    """Result of `prepare`: the version dir and `status` ('built', 'rebuilt' or 'unchanged')."""
    version_dir: pathlib.Path
    status: str


class _TfdsInfoFilter(logging.Filter):
    """Drops tensorflow_datasets' INFO records ('Load dataset info from ...', 'Generating dataset ...')."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname


def quiet_tfds_logging() -> None:
    """Hides TFDS's INFO lines (logged through absl) while keeping its warnings and everyone else's INFO.

    A filter on the `absl` logger rather than a level: csl_jax logs its own messages through absl too.
    """
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _TfdsInfoFilter) for f in logger.filters):
        logger.addFilter(_TfdsInfoFilter())


quiet_tfds_logging()


@dataclasses.dataclass(frozen=True)
class Pair:
    """One source example: `id`, image path, label, its raw-value lookup table and hints.

    `label` is a PNG path, None (no mask), or a picklable function (height, width) -> (H, W) uint8 raw
    values run in the worker (a mask generated from annotations); it raises ValueError with a message
    naming its source. `hints` {raw value: message} replace the generic error for values the lut refuses.
    """
    id: str
    image: pathlib.Path
    label: pathlib.Path | Callable[[int, int], np.ndarray] | None
    lut: np.ndarray | None = None  # (256,) int16: raw label value -> class index / 255; -1 = invalid
    hints: dict[int, str] | None = None


class Converted(NamedTuple):
    """Result of `convert_pair`: the example (None when invalid), the error ('file: what is wrong') and
    the (256,) int64 pixel count of each stored label value (None without a mask)."""
    example: dict | None
    error: str | None = None
    label_counts: np.ndarray | None = None


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


def refused(bad: list[int], hints: dict[int, str] | None = None) -> str:
    """What is wrong with the raw label values `bad` that the lut refuses."""
    hints = hints or {}
    plain = [v for v in bad if v not in hints]
    why = [f"label values {plain} are not class indices of this dataset or 255"] if plain else []
    return "; ".join(why + [hints[v] for v in bad if v in hints])


def convert_pair(pair: Pair) -> Converted:
    """Decode and check one pair; the example, or the error 'file: what is wrong'."""
    try:
        data = pair.image.read_bytes()
    except OSError as e:
        return Converted(None, f"{pair.image}: cannot read image ({e.strerror or e})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
    except Exception as e:  # PIL raises many types for corrupt files
        return Converted(None, f"{pair.image}: image does not decode ({e})")
    if mode not in ("RGB", "L"):
        return Converted(None, f"{pair.image}: image mode {mode}, expected RGB or L")
    label, counts = b"", None
    if callable(pair.label):
        try:
            raw, where = pair.label(h, w), f"mask of {pair.image}"
        except ValueError as e:
            return Converted(None, str(e))
    elif pair.label is not None:
        if not pair.label.is_file():
            return Converted(None, f"{pair.label}: mask missing (for image {pair.image})")
        try:
            raw, where = read_index_png(pair.label), pair.label
        except Exception as e:
            return Converted(None, f"{pair.label}: mask does not decode ({e})")
        if raw.shape != (h, w):
            return Converted(None, f"{pair.label}: mask size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from "
                                   f"image {pair.image} size {w}x{h}")
    if pair.label is not None:
        mapped = pair.lut[raw]
        if (mapped < 0).any():
            return Converted(None, f"{where}: {refused(np.unique(raw[mapped < 0]).tolist(), pair.hints)}")
        mapped = mapped.astype(np.uint8)
        label, counts = encode_png(mapped), np.bincount(mapped.ravel(), minlength=256)
    return Converted({"image": data, "label": label, "id": pair.id, "height": h, "width": w}, None, counts)


def _map_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def parallel_map(fn: Callable, items: Sequence, num_workers: int):
    """Ordered map over `items`, in `num_workers` processes (0: in this process).

    Items go to the workers in chunks of up to 32 (at least 8 chunks per worker), with at most 4 chunks
    per worker in flight, so results never pile up when the consumer is slower than the workers.
    """
    if num_workers <= 0:
        yield from map(fn, items)
        return
    size = max(1, min(32, len(items) // (8 * num_workers)))
    # spawn, not fork: forking a process that already runs JAX's threads can deadlock
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending = collections.deque()
        for start in range(0, len(items), size):
            pending.append(pool.submit(_map_chunk, fn, list(items[start:start + size])))
            if len(pending) >= 4 * num_workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a long conversion on `stream` (default stderr): '<what>: done/total images, rate, ETA'.

    On a terminal, one line rewritten in place at most 5 times a second; otherwise (a log) one line per
    further 10 % or 30 s, none in the first second. `close` writes the final line in any case.
    """

    def __init__(self, what: str, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.clock = what, total, clock
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = clock()
        self.done = 0
        self.next_tenth = 1

    def update(self, done: int) -> None:
        """`done` steps of `total` are finished; writes a line when one is due."""
        self.done, now = done, self.clock()
        if self.tty:
            due = now - self.last >= 0.2
        else:
            due = (now - self.start >= 1 and done < self.total
                   and (10 * done >= self.next_tenth * self.total or now - self.last >= 30))
        if due:
            self._write(now, final=False)

    def close(self) -> None:
        """Writes the final line: images, time taken, rate."""
        self._write(self.clock(), final=True)

    def _write(self, now: float, final: bool) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if final:
            text = f"{self.what}: {self.done}/{self.total} images in {_clock(elapsed)}, {rate:.1f} images/s"
        else:
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
            text = f"{self.what}: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta}"
        if self.tty:
            text = "\r" + text + "\x1b[K" + ("\n" if final else "")
        else:
            text += "\n"
        self.stream.write(text)
        self.stream.flush()
        self.last = now
        self.next_tenth = 10 * self.done // max(self.total, 1) + 1


def invalid_files_error(what: str, errors: list[str], outcome: str) -> DataPrepError:
    """The error listing every invalid source file, one line each."""
    return DataPrepError(f"{what}: {len(errors)} invalid source file(s); {outcome}:\n  " + "\n  ".join(errors))


def split_digest(ids: list[str]) -> dict:
    """{'count', 'ids_sha256'} of a split's ids in record order."""
    return {"count": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def make_fingerprint(name: str, inputs: dict) -> dict:
    """Fingerprint of dataset `name` built from `inputs` (JSON data) by this builder version; adds `sha256`."""
    body = {"builder": name, "builder_version": BUILDER_VERSION, "record_format": RECORD_FORMAT, **inputs}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {**body, "sha256": digest}


def read_fingerprint(version_dir: pathlib.Path) -> dict | None:
    """The stored fingerprint of a prepared dataset, None when it has none."""
    path = version_dir / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataPrepError(f"{path}: not a valid fingerprint ({e}); rerun with --rebuild") from e


def _names(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def describe_change(old: dict, new: dict) -> str:
    """How the dataset of fingerprint `old` differs from `new` (now), in words: settings, splits, file
    counts with a few names. Reads after 'holds a <name> dataset with'."""
    settings = sorted((old.keys() | new.keys()) - {"files", "splits", "sha256"})
    parts = [f"{key} {json.dumps(old.get(key), sort_keys=True)}, not {json.dumps(new.get(key), sort_keys=True)}"
             for key in settings if old.get(key) != new.get(key)]
    old_splits, new_splits = old.get("splits", {}), new.get("splits", {})
    for split in sorted(old_splits.keys() | new_splits.keys()):
        a, b = old_splits.get(split), new_splits.get(split)
        if a != b:
            parts.append(f"no split {split} (now present)" if a is None else f"a split {split} (now absent)"
                         if b is None else f"split {split} of other ids ({a['count']}, now {b['count']})")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    changes = {"added since": sorted(new_files.keys() - old_files.keys()),
               "removed since": sorted(old_files.keys() - new_files.keys()),
               "changed since (size or modification time)": sorted(k for k in old_files.keys() & new_files.keys()
                                                             if old_files[k] != new_files[k])}
    parts += [f"{len(names)} file(s) {what}: {_names(names)}" for what, names in changes.items() if names]
    return "; ".join(parts) or "another fingerprint"


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base TFDS builder: subclasses set `name`, `CLASS_NAMES`, `IMAGE_FORMAT` and implement `pairs()`.

    `data_dir` is the output dir (`--out`); TFDS itself writes into a private staging dir below it,
    which `prepare` moves into place once the dataset is complete.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "record format v1 (see data_prep/common.py)"}
    CLASS_NAMES: tuple[str, ...] = ()
    IMAGE_FORMAT = "jpeg"

    def __init__(self, *, data_dir, raw_dir=None, num_workers: int = 0, **kwargs):
        self.raw_dir = pathlib.Path(raw_dir) if raw_dir is not None else None
        self.num_workers = num_workers
        self.out_dir = pathlib.Path(data_dir)
        self.staging_dir = self.out_dir / f".{self.name}-building-{uuid.uuid4().hex[:8]}"
        self._errors: list[str] = []
        self._checked: set[str] = set()  # splits whose every pair went through convert_pair
        super().__init__(data_dir=str(self.staging_dir), file_format="array_record", **kwargs)

    @property
    def version_dir(self) -> pathlib.Path:
        """Where the prepared dataset lives: `<data_dir>/<name>/<version>`."""
        return self.out_dir / self.name / str(self.version)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file. (TFDS's default needs `importlib_resources`, absent on Python 3.11.)"""
        return epath.Path(inspect.getfile(cls))

    def pairs(self) -> dict[str, list[Pair]]:
        """{split: [Pair, ...]} in record order. Missing files may be left to `convert_pair` to report."""
        raise NotImplementedError

    @functools.cached_property
    def split_pairs(self) -> dict[str, list[Pair]]:
        """`pairs()`, computed once for the fingerprint and the records."""
        return self.pairs()

    def settings(self) -> dict:
        """Choices that change the records besides the raw files (JSON data); in the fingerprint and metadata."""
        return {}

    def extra_inputs(self) -> list[pathlib.Path]:
        """Raw files the records depend on besides the pairs' images and mask files (e.g. annotation files)."""
        return []

    def observe_label(self, split: str, counts: np.ndarray) -> None:
        """Called with the (256,) int64 pixel count of each value of every mask written; for statistics."""
        del split, counts

    def fingerprint_inputs(self) -> dict:
        """{**settings(), 'splits': {split: split_digest}, 'files': {path relative to --raw: [size, mtime_ns]}}
        of the existing input files; raises DataPrepError when --raw is missing or holds none of them."""
        if self.raw_dir is None or not self.raw_dir.is_dir():
            raise DataPrepError(f"--raw {self.raw_dir}: not a directory; {self.name} needs its raw dataset "
                                "folder (layouts in docs/data.md)")
        pairs = self.split_pairs
        paths = [p for ps in pairs.values() for pair in ps for p in (pair.image, pair.label)
                 if isinstance(p, pathlib.Path)] + self.extra_inputs()
        files = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # missing: reported by convert_pair, and absent from the fingerprint
            files[path.relative_to(self.raw_dir).as_posix()] = [st.st_size, st.st_mtime_ns]
        if paths and not files:
            expected = _names([p.relative_to(self.raw_dir).as_posix() for p in paths])
            raise DataPrepError(f"--raw {self.raw_dir} holds none of the {len(paths)} input files of {self.name} "
                                f"(expected e.g. {expected}); see docs/data.md for the layout")
        return {**self.settings(), "splits": {s: split_digest([p.id for p in ps]) for s, ps in pairs.items()},
                "files": files}

    def fingerprint(self) -> dict:
        """The fingerprint of the dataset this builder would write now (see the module docstring)."""
        return make_fingerprint(self.name, self.fingerprint_inputs())

    def legacy_fingerprint(self, version_dir: pathlib.Path) -> dict | None:
        """Fingerprint of a dataset prepared without `fingerprint.json`, None when it cannot be known."""
        del version_dir
        return None

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
                                            record_format=RECORD_FORMAT, **self.settings()),
        )

    def _split_generators(self, dl_manager):
        pairs = self.split_pairs
        self.info.metadata["ids"] = {s: [p.id for p in ps] for s, ps in pairs.items()}
        return {s: self._generate_examples(ps, s) for s, ps in pairs.items()}

    def _generate_examples(self, pairs: list[Pair], split: str):
        progress = Progress(f"{self.name} {split}", len(pairs))
        for done, (example, error, counts) in enumerate(parallel_map(convert_pair, pairs, self.num_workers), 1):
            progress.update(done)
            if error is not None:
                self._errors.append(error)
                continue
            if counts is not None:
                self.observe_label(split, counts)
            yield example["id"], example
        progress.close()
        self._checked.add(split)

    def _download_and_prepare(self, dl_manager, download_config):
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except Exception:
            if not self._errors:
                raise
            # TFDS stopped early (e.g. a split left without a valid example): check the other splits too
            for split, pairs in self.split_pairs.items():
                if split not in self._checked:
                    self._errors += [c.error for c in parallel_map(convert_pair, pairs, self.num_workers) if c.error]
            self._errors = list(dict.fromkeys(self._errors))  # a split stopped halfway was checked twice
        if self._errors:  # raised inside the staging dir: nothing partial is left behind
            raise invalid_files_error(self.name, self._errors, "nothing was written")

    def _log_download_bytes(self) -> None:
        """Silenced: TFDS prints 'Downloading and preparing dataset Unknown size ...' for local data."""

    def _log_download_done(self) -> None:
        """Silenced: TFDS prints 'Dataset ... downloaded and prepared to <the staging dir>'."""


def _keep(builder: SegmentationBuilder, fingerprint: dict) -> Prepared:
    """'unchanged' when the prepared dataset has `fingerprint`; else a DataPrepError saying what differs."""
    final = builder.version_dir
    stored = read_fingerprint(final) or builder.legacy_fingerprint(final)
    how = (f"to replace it, rerun `python -m data_prep {builder.name}` with --rebuild (the prepared data stays "
           "until the new build is complete), or prepare into another output dir")
    if stored is None:
        raise DataPrepError(f"{final} holds a {builder.name} dataset without a fingerprint of its inputs (prepared "
                            f"by an older data_prep, or incomplete), so it cannot be checked against them; {how}")
    if stored.get("sha256") != fingerprint["sha256"]:
        raise DataPrepError(f"{final} holds a {builder.name} dataset with {describe_change(stored, fingerprint)}: "
                            f"it was prepared from other inputs; {how}")
    return Prepared(final, "unchanged")


def prepare(builder: SegmentationBuilder, *, rebuild: bool = False) -> Prepared:
    """Prepares `builder`'s dataset in `builder.version_dir`, checked against the fingerprint of its inputs.

    A missing or invalid --raw is always an error. A prepared dataset with the same fingerprint is
    kept ('unchanged'); one with another fingerprint, or none, is an error saying what changed,
    unless `rebuild`: the new dataset is then built completely in the staging dir, and only then
    replaces the old one ('rebuilt'). On failure the staging dir is removed and the old data stays.
    """
    fingerprint = builder.fingerprint()
    final = builder.version_dir
    if final.exists() and not rebuild:
        return _keep(builder, fingerprint)
    tfds.disable_progress_bar()
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        staged = pathlib.Path(builder.data_dir)
        (staged / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        existed = final.exists()
        if existed and not rebuild:  # another process prepared it meanwhile
            return _keep(builder, fingerprint)
        final.parent.mkdir(parents=True, exist_ok=True)
        if existed:  # two renames: the old dataset stays whole until the new one is in place
            final.rename(builder.staging_dir / "replaced")
        staged.rename(final)
    finally:
        shutil.rmtree(builder.staging_dir, ignore_errors=True)
    return Prepared(final, "rebuilt" if existed else "built")
