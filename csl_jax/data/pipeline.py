"""Grain input pipelines: the training streams a method declares (`StreamSpec`), evaluation sets.

Sample order and augmentation are pure functions of (seed, stream id, global sample index):
- the stream NAME keys the randomness: 'labeled' 0, 'unlabeled' 1, 'mix' 2; any other name gets
  zlib.crc32(name) + 3 (stable across processes and runs; a name whose id another name of this
  process already has is refused);
- an epoch is one pass over the stream's list (`epoch_of='own'`) or over n entries of the list
  repeated k = ceil(n/|list|) times: n = |U| (`epoch_of='unlabeled'`), or n = N =
  `data.epoch_samples` when N > |list| (`epoch_of='fixed'`; else the list as it is, n = |list|):
  the first n (`repeat='tile'`) or n of the k |list| positions drawn without replacement, once per
  run, by the permutation from (seed, stream id, 3) (`repeat='sample'`); each epoch is a
  permutation of that list drawn from (seed, stream id, 1, epoch); streams never end;
- global batch k holds global sample indices [kB, (k+1)B); process p of P yields the slice
  [kB + pB/P, kB + (p+1)B/P), so batches do not depend on the number of processes or workers;
- sample i's geometry generator is seeded with (seed, stream id, 2, i, 0) and each view's with
  (seed, stream id, 2, i, view id) (`views.VIEWS`), so adding a view does not change the others.

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
  epoch_samples N of the streams with epoch_of='fixed' (UniMatch V2's supervised baseline) [0]
  view options, each view's own (views.VIEWS): cutmix_prob 0.5; tmp_prob 0.5; cover_ratio 0.7;
               block_size 32
  labeled_list, unlabeled_list: custom: '<image> <mask>' / '<image>' lines (masks optional);
               prepared data: your own split of the train pool (ids or list lines; unlabeled
               default: the rest of the pool), replacing `split` (sources.split_ids)
  custom only: val_list ('<image> <mask>'), num_classes, class_names (optional)
"""
import dataclasses
import math
import sys
import zlib

import grain
from absl import flags
import numpy as np

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data import sources, transforms, views as views_lib

SOURCES = ("labeled", "unlabeled")
EPOCHS_OF = ("own", "unlabeled", "fixed")
REPEATS = ("tile", "sample")
_FIXED_STREAM_IDS = {"labeled": 0, "unlabeled": 1, "mix": 2}
_STREAM_NAMES = {i: n for n, i in _FIXED_STREAM_IDS.items()}  # id -> name, every stream id of this process
_DEFAULTS = {"num_workers": 0, "num_threads": 2, "prefetch": 2}
#: `config.data` fields added after the first release -> the value that reproduces older runs.
LATER_FIELDS = {"epoch_samples": 0, "keep_jittered_padding": False}


def _choice(field: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"{field}={value!r}; valid: {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One input stream a method needs.

    source:   'labeled' | 'unlabeled': which image list of the split it reads.
    batch:    'labeled' | 'unlabeled': which config.batch field is its global batch size.
    views:    names in `views.VIEWS`, added to the base sample.
    geometry: name in `transforms.GEOMETRIES`.
    epoch_of: 'own': an epoch is one pass over its own list; 'unlabeled': the list repeated
              ceil(|U|/|list|) times and cut to |U| entries (the semi-supervised labeled stream);
              'fixed': the same with N = config.data.epoch_samples entries when N > |list|, else
              the list as it is (UniMatch V2's supervised baseline, `dataset/semi.py:25-27`).
    repeat:   with epoch_of='unlabeled' or 'fixed', which entries: 'tile' the first ones (UniMatch:
              the first images of the list get the extra copies), 'sample' ones drawn without
              replacement once per run seed (U2PL's `random.sample`, CCVC's shuffle and cut).
    """
    source: str
    batch: str
    views: tuple[str, ...] = ()
    geometry: str = "unimatch"
    epoch_of: str = "own"
    repeat: str = "tile"

    def __post_init__(self):
        _choice("StreamSpec.source", self.source, SOURCES)
        _choice("StreamSpec.batch", self.batch, SOURCES)
        _choice("StreamSpec.epoch_of", self.epoch_of, EPOCHS_OF)
        _choice("StreamSpec.repeat", self.repeat, REPEATS)
        if self.repeat != "tile" and self.epoch_of == "own":
            raise ValueError(f"StreamSpec.repeat={self.repeat!r} needs epoch_of='unlabeled' or 'fixed' "
                             "(nothing is repeated)")
        object.__setattr__(self, "views", tuple(self.views))
        repeated = sorted({v for v in self.views if self.views.count(v) > 1})
        if repeated:
            raise ValueError(f"StreamSpec.views={self.views}: {', '.join(repeated)} requested more than once")


def stream_id(name: str) -> int:
    """The integer that keys stream `name`'s randomness: 'labeled' 0, 'unlabeled' 1, 'mix' 2, else
    zlib.crc32(name) + 3. Refuses a name whose id another name already has in this process."""
    if name in _FIXED_STREAM_IDS:
        return _FIXED_STREAM_IDS[name]
    sid = zlib.crc32(name.encode()) + len(_FIXED_STREAM_IDS)
    owner = _STREAM_NAMES.setdefault(sid, name)
    if owner != name:
        raise ValueError(f"stream names {owner!r} and {name!r} have the same id {sid} (crc32); rename one")
    return sid


def _opt(data_cfg, key, default):
    value = data_cfg.get(key)
    return default if value is None else value


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
    """Local sample index -> augmented sample dict (numpy), for one process of a sharded stream.

    `views`: (name, view id, fn, options) per requested view, resolved from the registry at construction.
    """

    def __init__(self, records, order: _EpochOrder, *, source: str, num_classes: int, crop: int, seed: int,
                 stream: int, geometry, views: tuple, local_batch: int, global_batch: int, process_index: int):
        self.records, self.order, self.source, self.num_classes = records, order, source, num_classes
        self.crop, self.seed, self.stream, self.geometry, self.views = crop, seed, stream, geometry, views
        self.local_batch, self.global_batch, self.process_index = local_batch, global_batch, process_index

    def global_index(self, local: int) -> int:
        """Index in the global sample sequence of this process's `local`-th sample."""
        step, k = divmod(local, self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + k

    def __call__(self, local: int) -> dict:
        index = self.global_index(local)
        image, label = sources.decode(self.records[self.order(index)], self.num_classes)
        geometry = self.geometry(_rng(self.seed, self.stream, 2, index, 0), image.height, image.width, self.crop)
        weak, label, valid = transforms.apply_geometry(image, label, geometry, self.crop)
        if self.source == "labeled":
            out = {"image": transforms.normalize(weak), "label": label.astype(np.int32)}
        else:
            out = {"weak": transforms.normalize(weak), "ignore": np.where(valid, 0, IGNORE_INDEX).astype(np.int32),
                   "label": label.astype(np.int32)}
        for name, view_id, fn, options in self.views:
            arrays = fn(weak, valid, _rng(self.seed, self.stream, 2, index, view_id), self.crop, options)
            clash = sorted(out.keys() & arrays.keys())
            if clash:
                raise ValueError(f"view {name!r} returns {clash}, already in the sample")
            out.update(arrays)
        return out


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
    prefetch, threads, workers = (int(_opt(data_cfg, k, _DEFAULTS[k])) for k in ("prefetch", "num_threads",
                                                                                   "num_workers"))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=prefetch))
    return iter(it_ds)


def _epoch_samples(data_cfg) -> int:
    """config.data.epoch_samples (0 when absent)."""
    return int(_opt(data_cfg, "epoch_samples", LATER_FIELDS["epoch_samples"]))


def _epoch_size(spec: StreamSpec, n_source: int, n_unlabeled: int, epoch_samples: int) -> int:
    """Entries of one epoch of `spec` over a source of `n_source` images: n_source (epoch_of='own'),
    n_unlabeled ('unlabeled') or max(epoch_samples, n_source) ('fixed')."""
    return {"own": n_source, "unlabeled": n_unlabeled, "fixed": max(epoch_samples, n_source)}[spec.epoch_of]


def _epoch_base(n_source: int, n_unlabeled: int, spec: StreamSpec, rng: np.random.Generator,
                epoch_samples: int = 0) -> np.ndarray:
    """Per-epoch source indices (int64) of a source of `n_source` images: each once (epoch_of='own'),
    or (n,) entries (n = `_epoch_size`) of arange(n_source) tiled ceil(n / n_source) times: the
    first ones (repeat='tile') or those at n positions drawn without replacement by `rng`
    (repeat='sample')."""
    if spec.epoch_of == "own":
        return np.arange(n_source)
    if spec.epoch_of == "unlabeled" and n_unlabeled == 0:
        raise ValueError("semi-supervised epochs need unlabeled images; the split has none")
    n = _epoch_size(spec, n_source, n_unlabeled, epoch_samples)
    repeated = np.tile(np.arange(n_source), math.ceil(n / n_source))
    if spec.repeat == "tile":
        return repeated[:n]
    return repeated[rng.permutation(len(repeated))[:n]]


def stream_iterator(data_cfg, spec: StreamSpec, *, name: str, seed: int, global_batch: int, process_index: int = 0,
                    process_count: int = 1) -> grain.DatasetIterator:
    """Infinite stream `name` of this process's batches (b = global_batch // process_count), keyed by stream_id(name).

    Base sample, labeled source: 'image' (b, crop, crop, 3) float32 ImageNet-normalised (padding =
    normalised black), 'label' (b, crop, crop) int32 (255 = ignore, incl. padding). Unlabeled
    source: 'weak' (b, crop, crop, 3) float32, 'ignore' (b, crop, crop) int32 (255 on padding, else
    0), 'label' (b, crop, crop) int32 ground truth where masks exist (logging only), else 255.
    Each view adds its arrays (views.VIEWS; e.g. 'strong' -> 'strong' float32, 'cutmix_box' bool),
    computed from the weak crop, so every view shares the geometry; view padding is black before
    normalisation. Checkpointable with get_state()/set_state().
    """
    unknown = [v for v in spec.views if v not in views_lib.VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; valid: {', '.join(views_lib.VIEWS)}")
    _choice("StreamSpec.geometry", spec.geometry, transforms.GEOMETRIES)
    sid = stream_id(name)
    crop = int(data_cfg.crop_size)
    _check(global_batch, process_index, process_count, crop)
    labeled, unlabeled = sources.train_sources(data_cfg)
    records = labeled if spec.source == "labeled" else unlabeled
    if len(records) == 0:
        raise ValueError(f"config.data.split={data_cfg.get('split')!r} has no {spec.source} images")
    base = _epoch_base(len(records), len(unlabeled), spec, _rng(seed, sid, 3), _epoch_samples(data_cfg))
    order = _EpochOrder(base, seed, sid)
    resolved = []
    for view in spec.views:
        entry = views_lib.VIEWS[view]
        resolved.append((view, entry.id, entry.fn, {k: _opt(data_cfg, k, d) for k, d in entry.options.items()}))
    sample = _Sample(records, order, source=spec.source, num_classes=sources.dataset_info(data_cfg).num_classes,
                     crop=crop, seed=seed, stream=sid, geometry=transforms.GEOMETRIES[spec.geometry],
                     views=tuple(resolved), local_batch=global_batch // process_count, global_batch=global_batch,
                     process_index=process_index)
    return _iterator(data_cfg, sample)


def epoch_length(data_cfg, spec: StreamSpec, global_batch: int) -> int:
    """Batches per epoch of `spec`: floor(n / B), n = |U| (unlabeled source or epoch_of='unlabeled'),
    max(N, |L|) (epoch_of='fixed', N = data.epoch_samples), else |L|."""
    labeled, unlabeled = sources.split_ids(data_cfg)
    kind = "unlabeled" if "unlabeled" in (spec.source, spec.epoch_of) else "labeled"
    n_source = len(unlabeled) if spec.source == "unlabeled" else len(labeled)
    n = _epoch_size(spec, n_source, len(unlabeled), _epoch_samples(data_cfg))
    if global_batch <= 0:
        raise ValueError(f"global_batch={global_batch} must be positive")
    if n < global_batch:
        split = data_cfg.get("labeled_list") or data_cfg.get("split")
        what = (f"config.data.epoch_samples={n} is" if spec.epoch_of == "fixed" and n > n_source else
                f"{kind} set of split {split!r} has {n} images,")
        raise ValueError(f"{what} fewer than global_batch={global_batch}")
    return n // global_batch


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
