"""What a training method declares: its networks, streams, losses, state updates and predictions.

The trainer (`csl_jax/train.py`) owns the loop, the optimiser, sharding and checkpoints; the
evaluation loop (`csl_jax/evaluation`) owns metrics and plots. A method is an object they call:

    params, state = method.init(rng, image_shape)                  # once, outside the step
    streams       = method.streams()                               # {name: StreamSpec}
    # per device, inside shard_map (axis `csl_jax.parallel.AXIS`), under jax.grad w.r.t. params:
    loss, (state, metrics) = method.loss(params, state, batch, ctx)
    state         = method.after_update(state, new_params, step)   # after the optimiser step
    # evaluation, outside shard_map:
    logits        = method.predict_fns()[name](method.eval_variables(train_state, name), images)

`params` and `state` are any pytrees: one network's params, or named trees of several networks
(`{'branch1': ..., 'branch2': ...}`); `state` holds everything else that changes, e.g.
`{'batch_stats': ..., 'teacher': ..., 'queue': ...}`. The state returned by the loss is carried
from micro-batch to micro-batch under gradient accumulation, so state written inside the loss
(BN statistics, queues, prototypes) stays exact. `batch` holds this device's share of each stream
of `streams()`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from csl_jax import optim
from csl_jax.config_checks import is_number
from csl_jax.constants import PyTree
from csl_jax.data import StreamSpec
from csl_jax.methods.parts import losses
from csl_jax.models import build_model, convert, pretrained
from csl_jax.parallel import AXIS

#: (variables, images (B, H, W, 3) float32) -> logits (B, H, W, C) float32, in inference mode.
PredictFn = Callable[[PyTree, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Per-device inputs of one train step besides params, state and batch.

    Attributes:
      rng: the step key, `fold_in(seed_key, step)` (per micro-batch: `fold_in(that, index)`),
        identical on every device. Per-sample randomness (Dropout2d masks) is drawn from it with
        global sample ids, so results do not depend on the device count.
      step: int32 scalar, optimizer steps completed before this one.
      device_index: int32 scalar, this device's position on the data axis.
      num_devices: devices on the data axis (Python int).
      steps_per_epoch: optimizer steps per epoch (Python int), for epoch-based schedules.
      stream_offsets: global id of the first sample of each stream in a step; streams are laid out
        one after the other in the order of `Method.streams()`, each over its global batch.
    """

    rng: jax.Array
    step: jax.Array
    device_index: jax.Array
    num_devices: int
    steps_per_epoch: int
    stream_offsets: Mapping[str, int]

    def sample_ids(self, stream: str, n: int) -> jax.Array:
        """(n,) int32 global ids of this device's `n` samples of `stream`, distinct over all streams."""
        return self.stream_offsets[stream] + self.device_index * n + jnp.arange(n, dtype=jnp.int32)


def with_later_fields(opts: ml_collections.ConfigDict, later: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config.method` options `opts` with the fields added after a method's first release
    (`later`: name -> value that reproduces the older behaviour) filled in where absent, so configs
    saved in older workdirs still load and resume."""
    opts = ml_collections.ConfigDict(opts.to_dict())
    for key, value in later.items():
        if key not in opts:
            opts[key] = value
    return opts


def check_fields(opts: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, module: str,
                 choices: Mapping[str, Any] = ()) -> None:
    """Raises ValueError naming the first `config.method` field of `defaults` missing from `opts`
    (a method needs all of `csl_jax.methods.<module>.default_options()`), or whose value is not
    among its `choices` (field -> allowed values)."""
    for key in defaults.keys():
        if key not in opts:
            raise ValueError(f"config.method.{key} is missing; {module} needs every field of "
                             f"csl_jax.methods.{module}.default_options() (configs/{module}_*.py have them)")
    for key, allowed in dict(choices).items():
        if opts[key] not in allowed:
            raise ValueError(f"config.method.{key}={opts[key]!r}; expected one of {list(allowed)}")


#: A range of a `config.method` field: (predicate on the value, what is valid in words).
Range = tuple[Callable[[Any], bool], str]


def above(low: float) -> Range:
    """A number > low."""
    return (lambda v: is_number(v) and v > low), f"> {low:g}"


def at_least(low: float) -> Range:
    """A number >= low."""
    return (lambda v: is_number(v) and v >= low), f">= {low:g}"


def within(low: float, high: float, high_open: bool = False) -> Range:
    """A number in [low, high] ([low, high) with `high_open`)."""
    return ((lambda v: is_number(v) and low <= v and (v < high if high_open else v <= high)),
            f"in [{low:g}, {high:g}{')' if high_open else ']'}")


def whole_at_least(low: int) -> Range:
    """A whole number (int, or a float such as 2.0) >= low."""
    return (lambda v: is_number(v) and int(v) == v and v >= low), f"an int >= {low}"


#: True or False (not 0/1 or a string).
BOOLEAN: Range = ((lambda v: isinstance(v, bool)), "True or False")


def check_ranges(opts: ml_collections.ConfigDict, ranges: Mapping[str, Range]) -> None:
    """Raises ValueError `config.method.KEY=value must be VALID` for the first field of `ranges` (key ->
    (predicate, what is valid)) whose value fails its predicate; a value of another type fails too."""
    for key, (ok, valid) in ranges.items():
        try:
            good = bool(ok(opts[key]))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ValueError(f"config.method.{key}={opts[key]!r} must be {valid}")


def check_network(config: ml_collections.ConfigDict, name: str, paired_batches: bool = False) -> None:
    """Raises ValueError naming the key unless `config.model.name` is `name` (a method that trains its
    own network variant, csl_jax/models/<name>.py) and, with `paired_batches`, the labeled and
    unlabeled global batches are equal (the method pairs their loss groups)."""
    if config.model.get("name") != name:
        raise ValueError(f"config.model.name={config.model.get('name')!r}: method {name!r} trains the {name!r} "
                         f"network (csl_jax/models/{name}.py); set --config.model.name={name}")
    if paired_batches and config.batch.labeled != config.batch.unlabeled:
        raise ValueError(f"config.batch.labeled={config.batch.labeled} and config.batch.unlabeled="
                         f"{config.batch.unlabeled} must be equal: method {name!r} pairs labeled and unlabeled "
                         "loss groups")


def init_network(model, model_cfg: ml_collections.ConfigDict, rng: jax.Array, image_shape) -> dict:
    """Initial {'params', 'batch_stats'} of a network: random, or loaded from `model_cfg.init_from`.

    init_from: 'none' (random), 'imagenet', a registered name or a file (`pretrained.resolve_init`).
    image_shape: (H, W, 3) of one input image (any size the network accepts).
    """
    init = jax.jit(functools.partial(model.init, train=False))  # one compile instead of op-by-op dispatch
    variables = flax.core.unfreeze(init({"params": rng, "dropout": rng}, jnp.zeros((1, *image_shape), jnp.float32)))
    variables.setdefault("batch_stats", {})
    source = pretrained.resolve_init(model_cfg)
    if source is None:
        logging.info("Initialised at random (config.model.init_from=%r).", model_cfg.get("init_from", ""))
        return variables
    variables, report = convert.load_pretrained(variables, source.path, kind=source.kind)
    variables.setdefault("batch_stats", {})  # a network without BatchNorm (DPT) has none
    logging.info("Initialised from %s (%s, sha256 %s): %s", source.name or source.path, source.path, source.sha256,
                 report)
    return variables


class Method:
    """Base class: one network from `config.model` trained on the labeled stream; subclasses override.

    Args:
      config: the full run config (reads `config.model`, `config.method`, `config.loss`).
      num_classes: number of classes of the dataset.

    `self.model` is the network of `config.model.name` (csl_jax.models registry), with SyncBN over
    the data axis; it returns `(logits, out)`.
    """

    #: the stream whose pass over its image list is one epoch (protocol.md §3).
    epoch_stream: str = "labeled"
    #: the predict function whose evaluation picks the best checkpoint.
    best_predict: str = "model"
    #: whether `diagnostics` returns arrays for the evaluation loop's pseudo-label plots.
    has_diagnostics: bool = False
    #: `config.method` fields added after the method's first release -> the value that reproduces the
    #: runs saved before them (read by `with_later_fields` and by a resume, csl_jax.workdir).
    later_fields: Mapping[str, Any] = {}

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.model = build_model(config.model, num_classes, bn_axis_name=AXIS)

    # -- networks and state ----------------------------------------------------------------------
    def init(self, rng: jax.Array, image_shape) -> tuple[PyTree, PyTree]:
        """(params, state) at step 0: the network's params and {'batch_stats': its BN statistics}."""
        variables = init_network(self.model, self.config.model, rng, image_shape)
        return variables["params"], {"batch_stats": variables["batch_stats"]}

    def param_labels(self, params: PyTree) -> PyTree:
        """The optimiser group of every parameter: a pytree of 'backbone' / 'head' like `params`.

        'backbone' trains at `config.optim.lr`, 'head' at `lr * lr_multi` (`optim.make_optimizer`);
        'frozen' and 'no_grad' leaves are never updated (a method labelling a tree 'frozen' also
        stop_gradients it in its loss, so its backward is skipped).
        The default labels a leaf 'backbone' when any module on its path is named `backbone`, so
        two-network params (`{'branch1': {'backbone': ...}, 'branch2': {'backbone': ...}}`) work as
        they are. It must look only at paths: optax also calls it on the updates.
        """
        return optim.param_groups(params)

    def schedule_epochs(self, steps_per_epoch: int) -> float:
        """E of epoch-annealed rules (e/E): config.optim.epochs, or total_steps / L when total_steps is set."""
        total = self.config.optim.get("total_steps", 0)
        return total / steps_per_epoch if total else float(self.config.optim.epochs)

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """The input streams, by name (the keys of `batch`); an epoch is one pass of `epoch_stream`."""
        return {"labeled": StreamSpec(source="labeled", batch="labeled")}

    # -- the step --------------------------------------------------------------------------------
    def loss(self, params: PyTree, state: PyTree, batch: Mapping[str, Any], ctx: StepContext):
        """Per-device loss (scalar float32, normalised per loss group), new state and metrics.

        Returns:
          (loss, (state, metrics)): the state after this (micro-)batch, and a dict of float32
          scalars (averaged over devices and micro-batches by the trainer).
        """
        raise NotImplementedError

    def after_update(self, state: PyTree, params: PyTree, step: jax.Array) -> PyTree:
        """State after an optimizer step (`params`: the updated ones; `step`: steps done before it)."""
        del params, step
        return state

    # -- evaluation ------------------------------------------------------------------------------
    def predict_fns(self) -> dict[str, PredictFn]:
        """The named inference functions; `eval_variables(train_state, name)` gives their variables."""
        return {"model": self._predict}

    def eval_variables(self, train_state, name: str) -> PyTree:
        """Variables of predict function `name` in a train state (also what a best checkpoint holds)."""
        self._check_predict_name(name)
        return {"params": train_state.params, "batch_stats": train_state.state["batch_stats"]}

    def _predict(self, variables: PyTree, images: jax.Array) -> jax.Array:
        logits, _ = self.model.apply(variables, images, train=False)
        return logits

    def _check_predict_name(self, name: str) -> None:
        if name not in self.predict_fns():
            raise ValueError(f"{type(self).__name__} has no predict function {name!r}; "
                             f"valid: {sorted(self.predict_fns())}")

    def diagnostics(self, train_state, batch: Mapping[str, Any]) -> dict:
        """jit-able arrays for the evaluation loop's plots (see `has_diagnostics`) from a train batch."""
        raise NotImplementedError

    # -- shared loss -----------------------------------------------------------------------------
    def labeled_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """L_x: CE with ignore 255 or OHEM (`config.loss.labeled`), per group of images.

        logits: (B, H, W, C) float32; labels: (B, H, W) int32. Returns a float32 scalar.
        """
        cfg = self.config.loss
        if cfg.labeled == "ce":
            return losses.ce_loss(logits, labels, group_size=cfg.group_size, axis_name=AXIS)
        if cfg.labeled == "ohem":
            return losses.ohem_loss(
                logits, labels, group_size=cfg.group_size, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept
            )
        raise ValueError(f"config.loss.labeled must be 'ce' or 'ohem', got {cfg.labeled!r}")


def teacher_or_student(train_state, name: str) -> PyTree:
    """The variables of the EMA teacher (`state['teacher']`) for name 'teacher', else the student's."""
    if name == "teacher":
        return train_state.state["teacher"]
    return {"params": train_state.params, "batch_stats": train_state.state["batch_stats"]}


class TeacherStudentMethod(Method):
    """A method whose state holds an EMA teacher {'params', 'batch_stats'} at `state['teacher']`: predict
    functions 'teacher' (it picks the best checkpoint) and 'student', the same network."""

    best_predict = "teacher"

    def predict_fns(self):
        return {"teacher": self._predict, "student": self._predict}

    def eval_variables(self, train_state, name):
        self._check_predict_name(name)
        return teacher_or_student(train_state, name)
