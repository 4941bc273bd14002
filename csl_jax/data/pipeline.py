"""Grain input pipelines: labeled and unlabeled training streams, evaluation sets.

Sample order and augmentation are pure functions of (seed, stream, global sample index):
- an epoch is one pass over the unlabeled set (semi-supervised; the labeled list is repeated
  ceil(|U|/|L|) times and truncated to |U|) or over the labeled list (supervised); each epoch is
  a permutation drawn from (seed, stream, epoch); streams never end;
- global batch k holds global sample indices [kB, (k+1)B); process p of P yields the slice
  [kB + pB/P, kB + (p+1)B/P), so batches do not depend on the number of processes or workers;
- each sample's generators are seeded with (seed, stream, index, view), so adding a view does
  not change the others. Streams: labeled 0, unlabeled 'main' 1, unlabeled 'mix' 2.

`data_cfg` fields (ml_collections ConfigDict; optional ones fall back to the defaults below):
  name         'pascal' | 'cityscapes' | 'camvid' | 'synthetic' | 'custom'
  root         prepared-data dir (`python -m data_prep ... --out ROOT`); for 'custom', the folder
               the list files' paths are relative to
  split        e.g. '1_8', '92', 'u2pl_1_16' (Pascal), '1_16' (Cityscapes), '1_4' (synthetic)
  family       split family (default: name), e.g. 'cityscapes_u2pl' with split '186'
  crop_size    training crop (321 / 513 / 801)
  num_workers  0: threads in this process; > 0: Grain worker processes (mp_prefetch)   [0]
  num_threads  read threads per process                                                [2]
  prefetch     batches buffered per worker                                             [2]
  cutmix_prob  0.5;  tmp_prob 0.5;  cover_ratio 0.7;  block_size 32
  custom only: labeled_list ('<image> <mask>' lines), unlabeled_list ('<image>' lines, optional
               masks), val_list ('<image> <mask>'), num_classes, class_names (optional)
"""
import math
import sys

import grain
from absl import flags
import numpy as np

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import sources, transforms

STREAMS = {"labeled": 0, "main": 1, "mix": 2}
VIEWS = {"strong": 1, "strong2": 2, "tmp": 3}
_DEFAULTS = {"num_workers": 0, "num_threads": 2, "prefetch": 2, "cutmix_prob": 0.5, "tmp_prob": 0.5,
             "cover_ratio": 0.7, "block_size": 32}


def _opt(data_cfg, key):
    value = data_cfg.get(key)
    return _DEFAULTS[key] if value is None else value


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


class _EpochOrder:
    """Global sample index -> source index: epoch e is a permutation of `base` drawn from (seed, stream, e)."""

    def __init__(self, base: np.ndarray, seed: int, stream: int):
        self.base, self.seed, self.stream = base, seed, stream
        self._cache = (-1, None)

    def __call__(self, index: int) -> int:
        epoch, pos = divmod(index, len(self.base))
        cached = self._cache  # one read: reader threads may replace it concurrently
        if cached[0] != epoch:
            cached = (epoch, _rng(self.seed, self.stream, 1, epoch).permutation(len(self.base)))
            self._cache = cached
        return int(self.base[cached[1][pos]])


class _Sample:
    """Local sample index -> augmented sample dict (numpy), for one process of a sharded stream."""

    def __init__(self, source, order: _EpochOrder, *, num_classes: int, crop: int, seed: int,
                 stream: int, local_batch: int, global_batch: int, process_index: int,
                 views: tuple[str, ...] = (), options: dict | None = None):
        self.source, self.order, self.num_classes, self.crop = source, order, num_classes, crop
        self.seed, self.stream, self.views, self.options = seed, stream, views, options or {}
        self.local_batch, self.global_batch, self.process_index = local_batch, global_batch, process_index

    def global_index(self, local: int) -> int:
        """Index in the global sample sequence of this process's `local`-th sample."""
        step, k = divmod(local, self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + k

    def __call__(self, local: int) -> dict:
        index = self.global_index(local)
        image, label = sources.decode(self.source[self.order(index)], self.num_classes)
        geometry = transforms.sample_geometry(_rng(self.seed, self.stream, 2, index, 0),
                                             image.height, image.width, self.crop)
        weak, label, valid = transforms.apply_geometry(image, label, geometry, self.crop)
        if self.stream == STREAMS["labeled"]:
            return {"image": transforms.normalize(weak), "label": label.astype(np.int32)}
        out = {"weak": transforms.normalize(weak), "ignore": np.where(valid, 0, IGNORE_INDEX).astype(np.int32),
               "label": label.astype(np.int32)}
        for view in self.views:
            out.update(self._view(view, weak, valid, _rng(self.seed, self.stream, 2, index, VIEWS[view])))
        return out

    def _view(self, view: str, weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> dict:
        o = self.options
        if view in ("strong", "strong2"):
            image = transforms.strong_photometric(weak, rng)
            box = transforms.cutmix_box(rng, self.crop, o["cutmix_prob"])
            suffix = "" if view == "strong" else "2"
            return {view: _normalize_valid(image, valid), f"cutmix_box{suffix}": box}
        if rng.random() < o["tmp_prob"]:  # TMP branch (a): mild colour + block mask
            image = transforms.mild_photometric(weak, rng)
            mask = transforms.block_mask(rng, self.crop, o["block_size"], o["cover_ratio"])
        else:  # branch (b): the strong colour view, no mask
            image = transforms.strong_photometric(weak, rng)
            mask = np.zeros((self.crop, self.crop), bool)
        return {"tmp": _normalize_valid(image, valid), "block_mask": mask}


def _normalize_valid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Normalised (H, W, 3) float32 view whose padding (valid False) is reset to black first."""
    return transforms.normalize(np.where(valid[..., None], image, 0).astype(np.uint8))


def _check(global_batch: int, process_index: int, process_count: int, crop: int):
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if crop <= 0:
        raise ValueError(f"config.data.crop_size={crop} must be positive")


def _iterator(data_cfg, sample: _Sample) -> grain.DatasetIterator:
    ds = grain.MapDataset.range(sys.maxsize).map(sample).batch(sample.local_batch, drop_remainder=True)
    prefetch = int(_opt(data_cfg, "prefetch"))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(_opt(data_cfg, "num_threads")),
                                                 prefetch_buffer_size=prefetch))
    workers = int(_opt(data_cfg, "num_workers"))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=prefetch))
    return iter(it_ds)


def _labeled_base(n_labeled: int, n_unlabeled: int, semi: bool) -> np.ndarray:
    """Per-epoch labeled index list: repeated to |U| (semi) or once (supervised)."""
    if not semi:
        return np.arange(n_labeled)
    if n_unlabeled == 0:
        raise ValueError("semi-supervised epochs need unlabeled images; the split has none")
    return np.tile(np.arange(n_labeled), math.ceil(n_unlabeled / n_labeled))[:n_unlabeled]


def labeled_iterator(data_cfg, *, seed: int, global_batch: int, process_index: int = 0,
                     process_count: int = 1, semi: bool = True) -> grain.DatasetIterator:
    """Infinite labeled stream of this process's batches (b = global_batch // process_count):

    'image' (b, crop, crop, 3) float32 ImageNet-normalised (padding = normalised black),
    'label' (b, crop, crop) int32 (255 = ignore, incl. padding). Weak augmentation only.
    `semi`: epochs of |U| samples (labeled list repeated) instead of |L|.
    """
    crop = int(data_cfg.crop_size)
    _check(global_batch, process_index, process_count, crop)
    labeled, unlabeled = sources.train_sources(data_cfg)
    order = _EpochOrder(_labeled_base(len(labeled), len(unlabeled), semi), seed, STREAMS["labeled"])
    sample = _Sample(labeled, order, num_classes=sources.dataset_info(data_cfg).num_classes, crop=crop,
                     seed=seed, stream=STREAMS["labeled"], local_batch=global_batch // process_count,
                     global_batch=global_batch, process_index=process_index)
    return _iterator(data_cfg, sample)


def unlabeled_iterator(data_cfg, *, seed: int, global_batch: int, views: tuple[str, ...],
                       stream: str = "main", process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
    """Infinite unlabeled stream ('main' or the independently shuffled 'mix') of this process's batches.

    Always: 'weak' (b, crop, crop, 3) float32, 'ignore' (b, crop, crop) int32 (255 on padding,
    else 0), 'label' (b, crop, crop) int32 ground truth where masks exist (logging only), else 255.
    Per requested view: 'strong' -> 'strong', 'cutmix_box' (b, crop, crop) bool; 'strong2' ->
    'strong2', 'cutmix_box2'; 'tmp' -> 'tmp', 'block_mask' (b, crop, crop) bool. Views share the
    geometric augmentation; their padding is black before normalisation.
    """
    if stream not in ("main", "mix"):
        raise ValueError(f"stream={stream!r}; valid: 'main', 'mix'")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; valid: {', '.join(VIEWS)}")
    crop = int(data_cfg.crop_size)
    _check(global_batch, process_index, process_count, crop)
    _, unlabeled = sources.train_sources(data_cfg)
    if len(unlabeled) == 0:
        raise ValueError(f"config.data.split={data_cfg.get('split')!r} has no unlabeled images")
    options = {k: _opt(data_cfg, k) for k in ("cutmix_prob", "tmp_prob", "cover_ratio", "block_size")}
    order = _EpochOrder(np.arange(len(unlabeled)), seed, STREAMS[stream])
    sample = _Sample(unlabeled, order, num_classes=sources.dataset_info(data_cfg).num_classes,
                     crop=crop, seed=seed, stream=STREAMS[stream],
                     local_batch=global_batch // process_count, global_batch=global_batch,
                     process_index=process_index, views=tuple(views), options=options)
    return _iterator(data_cfg, sample)


class _EvalDecode:
    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, record: dict) -> dict:
        image, label = sources.decode(record, self.num_classes)
        if label is None:
            raise ValueError(f"evaluation image {record['id']} has no mask")
        return {"id": record["id"], "image": np.asarray(image), "label": label}


def eval_dataset(data_cfg, split: str = "val") -> grain.MapDataset:
    """Random-access evaluation set at original size: items {'id': str, 'image': (H, W, 3) uint8,
    'label': (H, W) uint8 (255 = ignore)}; no normalisation (use transforms.normalize)."""
    info = sources.dataset_info(data_cfg)
    return grain.MapDataset.source(sources.eval_source(data_cfg, split)).map(_EvalDecode(info.num_classes))


def iterations_per_epoch(data_cfg, global_batch: int, semi: bool) -> int:
    """floor(|U| / B) for semi-supervised epochs, floor(|L| / B) for supervised ones."""
    labeled, unlabeled = sources.split_ids(data_cfg)
    n = len(unlabeled) if semi else len(labeled)
    if n < global_batch:
        raise ValueError(f"{'unlabeled' if semi else 'labeled'} set of split {data_cfg.get('split')!r} "
                         f"has {n} images, fewer than global_batch={global_batch}")
    return n // global_batch
