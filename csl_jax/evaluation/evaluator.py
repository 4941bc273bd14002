"""Sharded inference of one evaluation protocol over a dataset: confusion matrix, mIoU, predictions.

What each protocol computes is its `protocols.Protocol` record (docs/protocol.md §4). Inference runs
under ``shard_map`` over the ("data",) mesh: images of the same shape are batched (``batch_size``, a
multiple of the device count), a partial batch is filled with dummy samples whose labels are all
ignored, and the per-device confusion matrices are ``psum``-ed. One jitted program is compiled per
distinct image shape and kept in the ``Evaluator`` (``num_programs``), so create the ``Evaluator``
once per run.

`evaluate` groups images by shape across the whole stream (shape buckets, `_buckets`): a set of
many sizes in any order (COCO, ADE20K) runs in mostly full batches, exactly (every image at its
own size), with host memory bounded by ``max_pending_bytes``. `predict` batches only consecutive
images of the same shape, so that it yields in input order; both key batches by the original image
shape, also for 'whole_resize' (which resizes on device). ``pad_to_multiple=m`` ('whole' only)
pads each image bottom/right to a multiple of m (mean colour, ignored labels) so that few shapes
compile. It is faster but not the reference protocol: border pixels see the padding. Use it for
in-training evaluation, not for reported numbers. Batching images together gives the same result
as the references' batch 1 because eval-mode BatchNorm treats samples independently.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from csl_jax import parallel
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data.transforms import IMAGENET_MEAN, normalize
from csl_jax.evaluation.metrics import confusion_matrix, segmentation_metrics
from csl_jax.evaluation.protocols import (
    RESIZE_MULTIPLE,
    Protocol,
    Tile,
    center_crop,
    get_protocol,
    resized_shape,
    shifted_tiles,
    sliding_tiles,
)
from csl_jax.models.layers import resize_align_corners

# apply_fn(variables, images (b, h, w, 3) float32 normalised) -> logits (b, h, w, C) float32.
ApplyFn = Callable[[Any, jax.Array], jax.Array]
# (position in the dataset, image (H, W, 3) uint8, label (H, W) uint8)
Example = tuple[int, np.ndarray, np.ndarray]
# Host memory (image + label bytes) that images waiting for same-shape companions may hold: about
# 870 COCO images of 640 x 480, enough to batch a 5,000-image COCO-like stream at 8 images per batch
# with 6 % dummy slots (19 % with 256 MiB; `python -m benchmarks.eval_scale --plan-only --images 5000`).
MAX_PENDING_BYTES = 2**30


def _apply_stacked(apply_fn: ApplyFn, variables: Any, x: jax.Array, tiles: Sequence[Tile]) -> jax.Array:
    """Runs same-shape tiles of x (B, H, W, 3) in one call -> (B, len(tiles), th, tw, C) float32."""
    b = x.shape[0]
    crops = jnp.stack([x[:, y0:y1, x0:x1] for y0, y1, x0, x1 in tiles], axis=1)
    logits = apply_fn(variables, crops.reshape((b * len(tiles),) + crops.shape[2:]))
    return logits.astype(jnp.float32).reshape((b, len(tiles)) + logits.shape[1:])


def _resize_exact(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """x (B, H, W, C) float32 -> (B, *size, C) float32, bilinear with align_corners=True at full float32
    matmul precision (not TF32), so that it matches PyTorch's F.interpolate on any backend."""
    with jax.default_matmul_precision("highest"):
        return resize_align_corners(x, size)


def _tiled_scores(apply_fn: ApplyFn, variables: Any, x: jax.Array, tiles: Sequence[Tile], softmax: bool,
                  average: bool) -> jax.Array:
    """Per-tile logits (or softmax probabilities) of x (B, H, W, 3) summed over `tiles` -> (B, H, W, C)
    float32; divided by the number of tiles covering each pixel when `average`. One network call per
    distinct tile shape."""
    b, h, w, _ = x.shape
    groups: dict[tuple[int, int], list[Tile]] = collections.defaultdict(list)
    for t in tiles:
        groups[(t[1] - t[0], t[3] - t[2])].append(t)
    total = None
    count = np.zeros((h, w), np.float32)
    for group in groups.values():
        scores = _apply_stacked(apply_fn, variables, x, group)
        if softmax:
            scores = jax.nn.softmax(scores, axis=-1)
        if total is None:
            total = jnp.zeros((b, h, w, scores.shape[-1]), jnp.float32)
        for i, (y0, y1, x0, x1) in enumerate(group):
            total = total.at[:, y0:y1, x0:x1].add(scores[:, i])
            count[y0:y1, x0:x1] += 1
    return total / count[None, :, :, None] if average else total


class Evaluator:
    """Sharded inference + confusion matrix for one protocol; keeps compiled programs across calls.

    Args:
      apply_fn: apply_fn(variables, images (b, h, w, 3) float32 normalised) -> logits
        (b, h, w, C) float32, in eval mode (running BN statistics).
      num_classes: C.
      protocol: a `Protocol` or the name of a registered one (protocols.PROTOCOLS).
      crop_size: window / crop g (int); required when protocol.needs_window.
      batch_size: images per step, a multiple of the device count (default: the device count).
      mesh: 1-D ("data",) mesh (default: all devices).
      ignore_index: label value not counted.
      pad_label: label value for centre-crop padding (see protocols.center_crop).
      class_names: optional names, used in warnings.
      pad_to_multiple: 'whole' only: pad each image bottom/right to a multiple of this (0: exact sizes).
      resize_multiple: m of a protocol with resizes_to_multiple ('whole_resize'), a positive int;
        ignored by the others.
      shape_buckets: `evaluate` groups images by shape across the stream (True) or batches only
        consecutive same-shape images (False: the grouping `predict` uses; benchmarks/eval_scale.py).
      max_pending_bytes: host memory the shape buckets may hold (see `_buckets`).
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        *,
        num_classes: int,
        protocol: str | Protocol = "whole",
        crop_size: int | None = None,
        batch_size: int | None = None,
        mesh: Mesh | None = None,
        ignore_index: int = IGNORE_INDEX,
        pad_label: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        pad_to_multiple: int = 0,
        resize_multiple: int = RESIZE_MULTIPLE,
        shape_buckets: bool = True,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ):
        protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        if protocol.needs_window and (not isinstance(crop_size, (int, np.integer)) or crop_size <= 0):
            raise ValueError(
                f"protocol {protocol.name!r} needs crop_size, a positive int (the window), got {crop_size!r}"
            )
        crop_size = None if crop_size is None else int(crop_size)
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        if self.mesh.axis_names != (parallel.AXIS,):
            raise ValueError(f"the evaluation mesh must be 1-D with axis {parallel.AXIS!r}, got {self.mesh.axis_names}")
        self.batch_size = self.mesh.devices.size if batch_size is None else batch_size
        parallel.check_divisible(self.batch_size, "batch_size", self.mesh)
        self.apply_fn = apply_fn
        self.num_classes = num_classes
        self.protocol = protocol
        self.window = crop_size if protocol.needs_window else None
        self.stride = protocol.stride(crop_size)
        self.ignore_index = ignore_index
        if pad_label != ignore_index and not 0 <= pad_label < num_classes:
            raise ValueError(f"center-crop pad_label={pad_label} (config.eval.center_crop_pad_label) must be "
                             f"{ignore_index} (ignored) or a class id in [0, {num_classes})")
        self.pad_label = pad_label
        self.class_names = class_names
        if pad_to_multiple and (protocol.needs_window or protocol.resizes_to_multiple):
            raise ValueError(f"pad_to_multiple applies to protocol 'whole' only, not {protocol.name!r}")
        self.pad_to_multiple = pad_to_multiple
        if protocol.resizes_to_multiple and (not isinstance(resize_multiple, (int, np.integer))
                                             or isinstance(resize_multiple, bool) or resize_multiple <= 0):
            raise ValueError(f"protocol {protocol.name!r} needs resize_multiple (config.eval.resize_multiple), "
                             f"a positive int, got {resize_multiple!r}")
        self.resize_multiple = int(resize_multiple) if protocol.resizes_to_multiple else None
        self.shape_buckets = shape_buckets
        self.max_pending_bytes = max_pending_bytes
        self._shapes: set[tuple[int, int]] = set()  # padded (H, W) run so far: one program each
        self._data_sharding = NamedSharding(self.mesh, P(parallel.AXIS))
        step = parallel.shard_map(
            self._local_step,
            self.mesh,
            in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
            out_specs=(P(), P(parallel.AXIS)),
        )
        self._step = jax.jit(step)  # jit caches one executable per (batch, H, W)

    @property
    def num_programs(self) -> int:
        """Programs compiled by this Evaluator so far: its distinct padded image shapes (batch is fixed)."""
        return len(self._shapes)

    @property
    def protocol_info(self) -> dict[str, Any]:
        """The protocol and its parameters, recorded next to every result."""
        info: dict[str, Any] = {"name": self.protocol.name, "window": self.window, "stride": self.stride}
        if self.pad_to_multiple:
            info["pad_to_multiple"] = self.pad_to_multiple
        if self.resize_multiple:
            info["resize_multiple"] = self.resize_multiple
        if self.protocol.crops_center:
            info["pad_label"] = self.pad_label
        return info

    # -- device side ---------------------------------------------------------------------------

    def scores(self, variables: Any, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) float32 normalised images -> (B, H, W, C) float32 scores whose argmax is the
        prediction (logits, at the original size after a resize there and back, or tile logits/probabilities
        summed or averaged, per protocol)."""
        p = self.protocol
        _, h, w, _ = images.shape
        if p.resizes_to_multiple:  # float32 there and back, never re-quantised, no padding
            x = _resize_exact(images, resized_shape(h, w, self.resize_multiple))
            return _resize_exact(self.apply_fn(variables, x).astype(jnp.float32), (h, w))
        if p.tiling == "none":  # a centre crop, if any, happened on the host
            return self.apply_fn(variables, images).astype(jnp.float32)
        if p.tiling == "sliding":
            tiles = sliding_tiles(h, w, self.window, self.stride)
            return _tiled_scores(self.apply_fn, variables, images, tiles, p.tile_softmax, p.average_overlaps)
        ph, pw = 0, 0  # 'shifted': every window g x g; zero-pad to >= g, centred, if the protocol pads
        if p.pads_to_window:
            ph, pw = max(self.window - h, 0), max(self.window - w, 0)
        top, left = ph // 2, pw // 2
        x = jnp.pad(images, ((0, 0), (top, ph - top), (left, pw - left), (0, 0)))
        tiles = shifted_tiles(h + ph, w + pw, self.window, self.stride)
        total = _tiled_scores(self.apply_fn, variables, x, tiles, p.tile_softmax, p.average_overlaps)
        return total[:, top : top + h, left : left + w]

    def _local_step(self, variables, images, labels):
        """Per device: uint8 (b, H, W, 3), (b, H, W) -> psum-ed (C, C) int32, preds (b, H, W) int32."""
        x = normalize(images)  # the training pipeline's formula, here on device
        preds = jnp.argmax(self.scores(variables, x), axis=-1).astype(jnp.int32)
        conf = confusion_matrix(labels, preds, self.num_classes, self.ignore_index)
        return jax.lax.psum(conf, parallel.AXIS), preds

    # -- host side -----------------------------------------------------------------------------

    def _to_global(self, batch: np.ndarray) -> jax.Array:
        """Full host batch (same on every process) -> global array sharded on "data"."""
        return jax.make_array_from_callback(batch.shape, self._data_sharding, lambda index: batch[index])

    def _run(self, variables: Any, examples: list[Example]) -> tuple[jax.Array, jax.Array]:
        """One padded batch of same-shape examples -> (conf (C, C) int32, preds (batch, H, W) int32)."""
        h, w = self._padded_shape(examples[0][2].shape)
        self._shapes.add((h, w))
        images = np.empty((self.batch_size, h, w, 3), np.uint8)
        images[...] = np.round(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8)  # ~0 once normalised
        labels = np.full((self.batch_size, h, w), self.ignore_index, np.uint8)  # dummies, padding: ignored
        for i, (_, image, label) in enumerate(examples):
            images[i, : label.shape[0], : label.shape[1]] = image
            labels[i, : label.shape[0], : label.shape[1]] = label
        return self._step(variables, self._to_global(images), self._to_global(labels))

    def _padded_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(H, W) rounded up to `pad_to_multiple` (unchanged when it is 0)."""
        m = self.pad_to_multiple
        return shape if not m else (-(-shape[0] // m) * m, -(-shape[1] // m) * m)

    def _consecutive(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """Batches of consecutive same-shape examples (at most batch_size each), in input order."""
        for _, run in itertools.groupby(examples, key=lambda ex: self._padded_shape(ex[2].shape)):
            while batch := list(itertools.islice(run, self.batch_size)):
                yield batch

    def _buckets(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """Batches of same-shape examples from anywhere in the stream (shape buckets).

        Each padded shape has a pending list; a list runs when it holds batch_size examples. While the
        pending examples hold more than `max_pending_bytes` (image + label bytes), the fullest list
        runs partial (of equals, the one started first). The rest run at the end, in the order their
        lists started. The batches depend only on the sequence of shapes, so every process of a
        multi-host run, iterating the same dataset, forms the same batches in the same order.
        """
        pending: dict[tuple[int, int], list[Example]] = {}
        held = 0
        for example in examples:
            shape = self._padded_shape(example[2].shape)
            pending.setdefault(shape, []).append(example)
            held += _nbytes([example])
            if len(pending[shape]) == self.batch_size:
                held -= _nbytes(pending[shape])
                yield pending.pop(shape)
            while held > self.max_pending_bytes:
                batch = pending.pop(max(pending, key=lambda k: len(pending[k])))
                held -= _nbytes(batch)
                yield batch
        yield from pending.values()

    def _groups(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """The batches `evaluate` runs: shape buckets, or consecutive runs when not `shape_buckets`."""
        return self._buckets(examples) if self.shape_buckets else self._consecutive(examples)

    def _batches(self, variables: Any, groups: Iterable[list[Example]]):
        """Runs each group of same-shape examples; yields (conf, preds, group) per batch."""
        variables = parallel.replicate(variables, self.mesh)
        for group in groups:
            yield *self._run(variables, group), group

    def _check_size(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuses an (H, W, ...) image the protocol cannot run: smaller than the window of a protocol that
        does not pad ('sliding_shifted'), or rounding to size 0 under 'whole_resize'."""
        h, w = shape[:2]
        if self.protocol.refuses_small and min(h, w) < self.window:
            raise ValueError(f"{name}: {h}x{w} is smaller than the {self.window}x{self.window} window of protocol "
                             f"{self.protocol.name!r}, which does not pad; use a smaller crop_size or another protocol")
        if self.resize_multiple:
            try:
                resized_shape(h, w, self.resize_multiple)
            except ValueError as err:
                raise ValueError(f"{name}: {err} (protocol {self.protocol.name!r})") from None

    def _check(self, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Validates one {'id', 'image', 'label'} example and applies the centre crop if any."""
        name = example.get("id", "<no id>")
        image, label = np.asarray(example["image"]), np.asarray(example["label"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"example {name}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        self._check_size(f"example {name}", image.shape)
        if label.shape != image.shape[:2] or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(
                f"example {name}: label must be integer {image.shape[:2]}, got {label.shape} {label.dtype}"
            )
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"example {name}: label values {np.unique(label[bad]).tolist()} are neither in "
                f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}"
            )
        label = label.astype(np.uint8)
        if self.protocol.crops_center:
            image, label = center_crop(image, label, self.window, self.pad_label)
        return image, label

    def evaluate(
        self,
        variables: Any,
        dataset: Iterable[Mapping[str, Any]],
        *,
        max_images: int | None = None,
        num_samples: int = 0,
    ) -> dict[str, Any]:
        """Runs the protocol over `dataset` and returns the metrics.

        Args:
          variables: model variables ({'params', 'batch_stats'}), replicated onto the mesh here.
          dataset: sequence/iterable of {'id', 'image' (H, W, 3) uint8, 'label' (H, W) uint8}.
          max_images: evaluate only the first `max_images` examples.
          num_samples: keep this many (image, pred, label) uint8 triples for plots, spread over the
            evaluated images (`spread_indices`); the first ones when `dataset` has no len().

        Returns:
          segmentation_metrics(...) plus 'confusion' ((C, C) int64), 'num_images',
          'protocol' (protocol_info + num_images), 'samples' (list of triples) and 'sample_indices'
          (their positions in the dataset, ascending), and 'batching': 'grouping', 'batch_size',
          'batches' (device steps), 'dummy_fraction' (batch slots filled with dummies), 'programs'
          (distinct padded shapes of this call: one program each) and 'compiled' (those compiled
          during this call; 0 when every one was kept from an earlier call).
        """
        total = len(dataset) if hasattr(dataset, "__len__") else num_samples
        wanted = set(spread_indices(min(total, max_images or total), num_samples))
        examples = ((i, *self._check(ex)) for i, ex in enumerate(itertools.islice(dataset, max_images)))
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        in_flight: collections.deque = collections.deque()
        samples: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        shapes, num_images, num_batches, programs_before = set(), 0, 0, self.num_programs
        for batch_conf, preds, batch in self._batches(variables, self._groups(examples)):
            shapes.add(self._padded_shape(batch[0][2].shape))
            num_images += len(batch)
            num_batches += 1
            in_flight.append(batch_conf)
            if len(in_flight) > 2:  # bound the work queued ahead of the device
                conf += np.asarray(in_flight.popleft(), np.int64)
            if any(index in wanted for index, _, _ in batch):
                for (index, image, label), pred in zip(batch, _fetch(preds)):
                    if index in wanted:
                        samples[index] = (image, pred[: label.shape[0], : label.shape[1]].astype(np.uint8), label)
        for batch_conf in in_flight:
            conf += np.asarray(batch_conf, np.int64)
        if num_images == 0:
            raise ValueError("the evaluation dataset is empty")
        results = segmentation_metrics(conf, self.class_names)
        results.update(
            confusion=conf,
            num_images=num_images,
            protocol={**self.protocol_info, "num_images": num_images},
            samples=[samples[i] for i in sorted(samples)],
            sample_indices=sorted(samples),
            batching={
                "grouping": "shape_buckets" if self.shape_buckets else "consecutive",
                "batch_size": self.batch_size,
                "batches": num_batches,
                "dummy_fraction": 1.0 - num_images / (num_batches * self.batch_size),
                "programs": len(shapes),
                "compiled": self.num_programs - programs_before,
            },
        )
        return results

    def predict(self, variables: Any, images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yields (H, W) int32 predictions for (H, W, 3) uint8 images, in order.

        A protocol that does not cover the image (not protocol.covers_image: 'center_crop') is refused.
        """
        if not self.protocol.covers_image:
            raise ValueError(
                f"protocol {self.protocol.name!r} predicts only the centre; use 'whole' or a sliding protocol"
            )

        def examples():
            for i, image in enumerate(images):
                self._check_size(f"image {i}", image.shape)
                yield i, image, np.full(image.shape[:2], self.ignore_index, np.uint8)

        for _, preds, batch in self._batches(variables, self._consecutive(examples())):
            for (_, _, label), pred in zip(batch, _fetch(preds)):
                yield pred[: label.shape[0], : label.shape[1]]


def spread_indices(num_images: int, num_samples: int) -> list[int]:
    """`num_samples` (k) image indices evenly spread over [0, num_images) (N): i * (N - 1) / (k - 1)
    for i < k, rounded half to even, so the first and the last image are in (4 of 100 -> [0, 33, 66,
    99]); every index when k >= N, [0] when k == 1, [] when k == 0."""
    k = min(num_samples, num_images)
    if k <= 1:
        return list(range(k))
    return [int(v) for v in np.round(np.linspace(0, num_images - 1, k))]


def _nbytes(examples: Iterable[Example]) -> int:
    """Host bytes of the images and labels of `examples`."""
    return sum(image.nbytes + label.nbytes for _, image, label in examples)


def _fetch(x: jax.Array) -> np.ndarray:
    """A global array as a host NumPy array (gathering across processes when needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


