"""Evaluation: whole-image, sliding-window and centre-crop inference, confusion matrix, mIoU.

The protocols are those of docs/protocol.md §4:

- ``whole``: the normalised image at its original size; argmax of the logits.
- ``sliding`` (UniMatch): window g = crop, stride int(2g/3), row/column starts 0, s, 2s, ... while
  start < H (resp. W); border tiles are truncated (the network sees the smaller tile); softmax
  probabilities are summed over tiles, then argmax.
- ``sliding_u2pl`` / ``sliding_cpcl`` (U2PL ``eval.py`` / CPCL's evaluator): stride ceil(2g/3); an
  image smaller than the window is zero-padded (in normalised space, centred: floor(pad/2) before)
  to at least g; grid ceil((H - g)/s) + 1 windows per axis, the last ones shifted back inside, so
  every window is g x g; logits are summed (U2PL divides by the overlap count, which leaves the
  argmax unchanged) and the padding is cropped off.
- ``center_crop``: the g x g region starting at ((H - g)//2, (W - g)//2). A side smaller than g is
  first padded as U2PL's ``Crop`` does: floor(pad/2) before and the rest after, the image with the
  ImageNet mean colour rounded to uint8 (within 0.01 of U2PL's 0 after normalisation) and the label
  with ``pad_label`` (255 = ignored by default; U2PL's in-training Pascal crop pads with 0).

Inference runs under ``shard_map`` over the ("data",) mesh: consecutive images of the same shape
are batched (``batch_size``, a multiple of the device count), the batch is padded with dummy
samples whose labels are all ignored, and the per-device confusion matrices are ``psum``-ed. One
jitted program is compiled per distinct image shape and kept in the ``Evaluator``, so create the
``Evaluator`` once per run. Datasets of many image sizes (Pascal VOC) compile many programs;
``pad_to_multiple=m`` ('whole' only) pads each image bottom/right to a multiple of m (mean colour,
ignored labels) so at most a few shapes compile. It is faster but not the reference protocol:
border pixels see the padding. Use it for in-training evaluation, not for reported numbers. Batching images together gives the same result as the references'
batch 1 because eval-mode BatchNorm treats samples independently.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from csl_jax import parallel
from csl_jax.constants import IGNORE_INDEX
from csl_jax.data.transforms import IMAGENET_MEAN, normalize

PROTOCOLS = ("whole", "sliding", "sliding_u2pl", "sliding_cpcl", "center_crop")

# apply_fn(variables, images (b, h, w, 3) float32 normalised) -> logits (b, h, w, C) float32.
ApplyFn = Callable[[Any, jax.Array], jax.Array]
Tile = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open


# ---------------------------------------------------------------------------------------------
# Confusion matrix and metrics.


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Counts of (ground truth, prediction) pairs, on device.

    Args:
      labels: integer array of any shape (e.g. (B, H, W) uint8/int32).
      preds: integer array of the same shape, values in [0, num_classes).
      num_classes: C.
      ignore_index: label value that is not counted.

    Returns:
      (C, C) int32, rows = ground truth, columns = prediction. Pixels whose label is
      `ignore_index` or outside [0, C), or whose prediction is outside [0, C), are not counted
      (the Evaluator rejects such labels on the host before they get here).
    """
    labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
    preds = jnp.asarray(preds).reshape(-1).astype(jnp.int32)
    c = num_classes
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c) & (preds >= 0) & (preds < c)
    flat = jnp.where(valid, labels * c + preds, c * c)  # invalid pixels land in an extra bin
    counts = jnp.bincount(flat, length=c * c + 1)
    return counts[: c * c].reshape(c, c).astype(jnp.int32)


def segmentation_metrics(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU and accuracies from a (C, C) int64 confusion matrix (rows = ground truth).

    I_c = N_cc, U_c = row_c + col_c - N_cc, IoU_c = I_c / (U_c + 1e-10); mIoU is the mean over
    all C classes (a class with U_c = 0 counts as 0, with a warning naming it). pixel_acc is
    sum(I) / sum(N); mean_acc is the mean of N_cc / row_c over classes present in the ground truth.

    Returns:
      {'miou': float, 'iou': list[float] (C,), 'pixel_acc': float, 'mean_acc': float}.
    """
    conf = np.asarray(conf, np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    inter = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1).astype(np.float64)
    union = gt + conf.sum(axis=0) - inter
    iou = inter / (union + 1e-10)
    absent = np.flatnonzero(union == 0)
    if absent.size:
        names = [class_names[i] if class_names else str(i) for i in absent]
        logging.warning("classes never in ground truth nor prediction (IoU counted as 0): %s", ", ".join(names))
    present = gt > 0
    return {
        "miou": float(iou.mean()),
        "iou": [float(v) for v in iou],
        "pixel_acc": float(inter.sum() / max(conf.sum(), 1)),
        "mean_acc": float((inter[present] / gt[present]).mean()) if present.any() else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Window geometry (host, static).


def sliding_stride(window: int, protocol: str) -> int:
    """Stride of a sliding protocol: int(2g/3) for UniMatch ('sliding'), ceil(2g/3) for U2PL/CPCL."""
    return (2 * window) // 3 if protocol == "sliding" else -(-2 * window // 3)


def sliding_tiles(height: int, width: int, window: int, stride: int) -> list[Tile]:
    """UniMatch tiles: starts 0, s, 2s, ... < H (resp. W), truncated at the border.

    Returns a list of (y0, y1, x0, x1) half-open boxes, row-major.
    """
    return [
        (y, min(y + window, height), x, min(x + window, width))
        for y in range(0, height, stride)
        for x in range(0, width, stride)
    ]


def shifted_tiles(height: int, width: int, window: int, stride: int) -> list[Tile]:
    """U2PL/CPCL tiles of an image already padded to >= window: every tile is window x window.

    Per axis of length n: ceil((n - g)/s) + 1 windows starting at i*s, each shifted back to end
    at min(i*s + g, n). Returns (y0, y1, x0, x1) boxes, row-major.
    """
    if height < window or width < window:
        raise ValueError(f"shifted_tiles needs an image of at least {window}x{window}, got {height}x{width}")

    def starts(n: int) -> list[int]:
        count = -(-(n - window) // stride) + 1
        return [min(i * stride + window, n) - window for i in range(count)]

    return [(y, y + window, x, x + window) for y in starts(height) for x in starts(width)]


def center_crop(image: np.ndarray, label: np.ndarray, size: int,
                pad_label: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop of (H, W, 3) uint8 image and (H, W) uint8 label to (size, size).

    A side smaller than `size` is padded first (floor(pad/2) before): the image with the ImageNet
    mean colour (0 after normalisation, rounded to uint8), the label with `pad_label`. The crop
    then starts at ((H' - size)//2, (W' - size)//2) of the padded arrays.
    """
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        fill = np.round(IMAGENET_MEAN.astype(np.float64) * 255).astype(np.uint8)
        padded = np.empty((h + ph, w + pw, 3), np.uint8)
        padded[:] = fill
        padded[pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w] = image
        image, label = padded, np.pad(label, pads, constant_values=pad_label)
        h, w = label.shape
    y, x = (h - size) // 2, (w - size) // 2
    return image[y : y + size, x : x + size], label[y : y + size, x : x + size]


# ---------------------------------------------------------------------------------------------
# Per-device scores (traced inside shard_map; all shapes static).


def _apply_stacked(apply_fn: ApplyFn, variables: Any, x: jax.Array, tiles: Sequence[Tile]) -> jax.Array:
    """Runs same-shape tiles of x (B, H, W, 3) in one call -> (B, len(tiles), th, tw, C) float32."""
    b = x.shape[0]
    crops = jnp.stack([x[:, y0:y1, x0:x1] for y0, y1, x0, x1 in tiles], axis=1)
    logits = apply_fn(variables, crops.reshape((b * len(tiles),) + crops.shape[2:]))
    return logits.astype(jnp.float32).reshape((b, len(tiles)) + logits.shape[1:])


def _sliding_scores(apply_fn: ApplyFn, variables: Any, x: jax.Array, window: int, stride: int) -> jax.Array:
    """UniMatch sliding window: sum of softmax over truncated tiles -> (B, H, W, C) float32."""
    b, h, w, _ = x.shape
    groups: dict[tuple[int, int], list[Tile]] = collections.defaultdict(list)
    for t in sliding_tiles(h, w, window, stride):
        groups[(t[1] - t[0], t[3] - t[2])].append(t)
    total = None
    for tiles in groups.values():  # one apply per distinct tile shape
        probs = jax.nn.softmax(_apply_stacked(apply_fn, variables, x, tiles), axis=-1)
        if total is None:
            total = jnp.zeros((b, h, w, probs.shape[-1]), jnp.float32)
        for i, (y0, y1, x0, x1) in enumerate(tiles):
            total = total.at[:, y0:y1, x0:x1].add(probs[:, i])
    return total


def _shifted_scores(
    apply_fn: ApplyFn, variables: Any, x: jax.Array, window: int, stride: int, average: bool
) -> jax.Array:
    """U2PL/CPCL sliding window: zero-pad, shifted g x g windows, summed logits -> (B, H, W, C)."""
    b, h, w, _ = x.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    top, left = ph // 2, pw // 2
    x = jnp.pad(x, ((0, 0), (top, ph - top), (left, pw - left), (0, 0)))
    tiles = shifted_tiles(h + ph, w + pw, window, stride)
    logits = _apply_stacked(apply_fn, variables, x, tiles)
    total = jnp.zeros((b, h + ph, w + pw, logits.shape[-1]), jnp.float32)
    count = np.zeros((h + ph, w + pw), np.float32)
    for i, (y0, y1, x0, x1) in enumerate(tiles):
        total = total.at[:, y0:y1, x0:x1].add(logits[:, i])
        count[y0:y1, x0:x1] += 1
    if average:
        total = total / count[None, :, :, None]
    return total[:, top : top + h, left : left + w]


# ---------------------------------------------------------------------------------------------
# Evaluator.


class Evaluator:
    """Sharded inference + confusion matrix for one protocol; keeps compiled programs across calls.

    Args:
      apply_fn: apply_fn(variables, images (b, h, w, 3) float32 normalised) -> logits
        (b, h, w, C) float32, in eval mode (running BN statistics).
      num_classes: C.
      protocol: one of PROTOCOLS.
      crop_size: window / crop g (int); required unless protocol == 'whole'.
      batch_size: images per step, a multiple of the device count (default: the device count).
      mesh: 1-D ("data",) mesh (default: all devices).
      ignore_index: label value not counted.
      pad_label: label value for centre-crop padding (see module docstring).
      class_names: optional names, used in warnings.
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        *,
        num_classes: int,
        protocol: str = "whole",
        crop_size: int | None = None,
        batch_size: int | None = None,
        mesh: Mesh | None = None,
        ignore_index: int = IGNORE_INDEX,
        pad_label: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        pad_to_multiple: int = 0,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"evaluation protocol {protocol!r} is not one of {PROTOCOLS}")
        if protocol != "whole" and (not isinstance(crop_size, (int, np.integer)) or crop_size <= 0):
            raise ValueError(f"protocol {protocol!r} needs crop_size, a positive int (the window), got {crop_size!r}")
        crop_size = None if crop_size is None else int(crop_size)
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        if self.mesh.axis_names != (parallel.AXIS,):
            raise ValueError(f"the evaluation mesh must be 1-D with axis {parallel.AXIS!r}, got {self.mesh.axis_names}")
        self.batch_size = self.mesh.devices.size if batch_size is None else batch_size
        parallel.check_divisible(self.batch_size, "batch_size", self.mesh)
        self.apply_fn = apply_fn
        self.num_classes = num_classes
        self.protocol = protocol
        self.window = crop_size if protocol != "whole" else None
        self.stride = sliding_stride(crop_size, protocol) if protocol.startswith("sliding") else None
        self.ignore_index = ignore_index
        self.pad_label = pad_label
        self.class_names = class_names
        if pad_to_multiple and protocol != "whole":
            raise ValueError(f"pad_to_multiple applies to protocol 'whole' only, not {protocol!r}")
        self.pad_to_multiple = pad_to_multiple
        self._data_sharding = NamedSharding(self.mesh, P(parallel.AXIS))
        step = parallel.shard_map(
            self._local_step,
            self.mesh,
            in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
            out_specs=(P(), P(parallel.AXIS)),
        )
        self._step = jax.jit(step)  # jit caches one executable per (batch, H, W)

    @property
    def protocol_info(self) -> dict[str, Any]:
        """The protocol and its parameters, recorded next to every result."""
        info: dict[str, Any] = {"name": self.protocol, "window": self.window, "stride": self.stride}
        if self.pad_to_multiple:
            info["pad_to_multiple"] = self.pad_to_multiple
        if self.protocol == "center_crop":
            info["pad_label"] = self.pad_label
        return info

    # -- device side ---------------------------------------------------------------------------

    def scores(self, variables: Any, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) float32 normalised images -> (B, H, W, C) float32 scores whose argmax is the
        prediction (logits, summed tile probabilities or summed tile logits, per protocol)."""
        if self.protocol in ("whole", "center_crop"):  # centre crop happens on the host
            return self.apply_fn(variables, images).astype(jnp.float32)
        if self.protocol == "sliding":
            return _sliding_scores(self.apply_fn, variables, images, self.window, self.stride)
        average = self.protocol == "sliding_u2pl"
        return _shifted_scores(self.apply_fn, variables, images, self.window, self.stride, average)

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

    def _run(self, variables: Any, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[jax.Array, jax.Array]:
        """One padded batch of same-shape examples -> (conf (C, C) int32, preds (batch, H, W) int32)."""
        h, w = self._padded_shape(examples[0][1].shape)
        images = np.empty((self.batch_size, h, w, 3), np.uint8)
        images[...] = np.round(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8)  # ~0 once normalised
        labels = np.full((self.batch_size, h, w), self.ignore_index, np.uint8)  # dummies, padding: ignored
        for i, (image, label) in enumerate(examples):
            images[i, : label.shape[0], : label.shape[1]] = image
            labels[i, : label.shape[0], : label.shape[1]] = label
        return self._step(variables, self._to_global(images), self._to_global(labels))

    def _padded_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(H, W) rounded up to `pad_to_multiple` (unchanged when it is 0)."""
        m = self.pad_to_multiple
        return shape if not m else (-(-shape[0] // m) * m, -(-shape[1] // m) * m)

    def _batches(self, variables: Any, examples: Iterable[tuple[np.ndarray, np.ndarray]]):
        """Groups consecutive same-shape examples; yields (conf, preds, examples) per batch."""
        variables = parallel.replicate(variables, self.mesh)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        for example in examples:
            shape = self._padded_shape(example[1].shape)
            if pending and (self._padded_shape(pending[0][1].shape) != shape or len(pending) == self.batch_size):
                yield *self._run(variables, pending), pending
                pending = []
            pending.append(example)
        if pending:
            yield *self._run(variables, pending), pending

    def _check(self, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Validates one {'id', 'image', 'label'} example and applies the centre crop if any."""
        name = example.get("id", "<no id>")
        image, label = np.asarray(example["image"]), np.asarray(example["label"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"example {name}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
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
        if self.protocol == "center_crop":
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
          num_samples: keep this many (image, pred, label) uint8 triples for plots.

        Returns:
          segmentation_metrics(...) plus 'confusion' ((C, C) int64), 'num_images',
          'protocol' (protocol_info + num_images) and 'samples' (list of triples).
        """
        examples = (self._check(ex) for ex in itertools.islice(dataset, max_images))
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        in_flight: collections.deque = collections.deque()
        samples, num_images = [], 0
        for batch_conf, preds, batch in self._batches(variables, examples):
            num_images += len(batch)
            in_flight.append(batch_conf)
            if len(in_flight) > 2:  # bound the work queued ahead of the device
                conf += np.asarray(in_flight.popleft(), np.int64)
            if len(samples) < num_samples:
                for (image, label), pred in zip(batch, _fetch(preds)):
                    samples.append((image, pred[: label.shape[0], : label.shape[1]].astype(np.uint8), label))
                del samples[num_samples:]
        for batch_conf in in_flight:
            conf += np.asarray(batch_conf, np.int64)
        if num_images == 0:
            raise ValueError("the evaluation dataset is empty")
        results = segmentation_metrics(conf, self.class_names)
        results.update(
            confusion=conf,
            num_images=num_images,
            protocol={**self.protocol_info, "num_images": num_images},
            samples=samples,
        )
        return results

    def predict(self, variables: Any, images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yields (H, W) int32 predictions for (H, W, 3) uint8 images, in order.

        'center_crop' is refused: it does not predict the whole image.
        """
        if self.protocol == "center_crop":
            raise ValueError("protocol 'center_crop' predicts only the centre; use 'whole' or a sliding protocol")

        def examples():
            for image in images:
                yield image, np.full(image.shape[:2], self.ignore_index, np.uint8)

        for _, preds, batch in self._batches(variables, examples()):
            for (_, label), pred in zip(batch, _fetch(preds)):
                yield pred[: label.shape[0], : label.shape[1]]


def _fetch(x: jax.Array) -> np.ndarray:
    """A global array as a host NumPy array (gathering across processes when needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(
    apply_fn: ApplyFn,
    variables: Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    protocol: str = "whole",
    crop_size: int | None = None,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    max_images: int | None = None,
    num_samples: int = 0,
) -> dict[str, Any]:
    """One-off evaluation (compiles afresh; keep an `Evaluator` to reuse compiled programs).

    See `Evaluator` for the arguments and `Evaluator.evaluate` for the result.
    """
    evaluator = Evaluator(
        apply_fn, num_classes=num_classes, protocol=protocol, crop_size=crop_size, batch_size=batch_size, mesh=mesh
    )
    return evaluator.evaluate(variables, dataset, max_images=max_images, num_samples=num_samples)
