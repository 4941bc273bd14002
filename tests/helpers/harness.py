"""The train-step harness of the method tests.

- data: `prepare_synthetic` and the module-scoped `data_root` fixture (a module takes it with
  `data_root = harness.data_root`);
- configs: `set_fields` (dotted overrides, from csl_jax.workdir), the tiny U2PL / CSS setups (`tiny_u2pl`, `tiny_css`),
  `tiny_method_config` (their small demo config) and `contract_config` (the config of the method
  contract, tests/test_method_contract.py, for any registered method), `first_batches`;
- steps: `mesh`, `sharded` (a per-device function under jit(shard_map)), `Stepper` (a method's
  train step on the first n devices, from a fresh train state) and `run_steps` (a list of global
  batches through a `Stepper`: a `Run` of host arrays);
- trees: `assert_trees_close`, `assert_trees_equal`, `assert_same_latest_checkpoint`.
"""

from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common, demo
from csl_jax import checkpoint, parallel, train
from csl_jax.workdir import set_fields
from csl_jax.methods import build_method, ccvc, cpcl, css, u2pl, unimatch_v2
from data_prep import synthetic

NUM_CLASSES = 5  # the synthetic set (data_prep/synthetic.py)
#: the synthetic set of the method tests: 32 train images (16 labeled at split 1_2), 4 val, 40 x 40
SYNTHETIC = dict(num_train=32, num_val=4, image_size=(40, 40), seed=0)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def prepare_synthetic(root, **overrides) -> str:
    """Prepares the synthetic set `SYNTHETIC` (fields replaced by `overrides`) under `root`; returns str(root)."""
    synthetic.prepare(root, **{**SYNTHETIC, **overrides})
    return str(root)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The root (str) of a synthetic set `SYNTHETIC`, one per test module."""
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"))


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def tiny_u2pl(c, variant="reference"):
    """`u2pl.configure(c, variant)` with a representation of 8 channels and small queues; returns `c`."""
    u2pl.configure(c, variant).update(
        model=dict(rep_dim=8), method=dict(queue_capacity=300, queue_capacity_class0=500, num_queries=16,
                                           num_negatives=4))
    return c


def tiny_css(c):
    """`css.configure(c)` with a representation of 8 channels, 16 queries and 8 negatives; returns `c`."""
    css.configure(c).update(model=dict(rep_dim=8), method=dict(num_queries=16, num_negatives=8))
    return c


def tiny_method_config(setup, root=None, *, total_steps, **method):
    """The demo 'supervised' config made a method's by `setup` (`tiny_u2pl`, `tiny_css`): the tiny
    network of widths 4/8/4, crop 32, split 1_2, batches of 4 labeled + 4 unlabeled images,
    `total_steps`, and the `method` options over the setup's."""
    c = setup(demo.get_config("supervised"))
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.data.update(crop_size=32, split="1_2")
    if root:
        c.data.root = root
    c.batch.update(labeled=4, unlabeled=4)
    c.optim.total_steps = total_steps
    c.method.update(method)
    return c


CONTRACT_CROP = 32
#: the tiny DINOv2 + DPT of the method tests (patch 14, so crops are multiples of 14): D 16, 4 blocks,
#: a stored 2 x 2 position grid (interpolated at every crop but 28 x 28)
TINY_DPT = dict(name="dpt", encoder="small", **common.TINY_DPT, dtype="float32", remat=False, attention="einsum",
                init_from="none", init_kind="auto")
DPT_CROP = 28


def tiny_v2(c, name="unimatch_v2", variant=""):
    """A UniMatch V2 preset on `TINY_DPT` (AdamW as its recipe, the x14-resize evaluation)."""
    unimatch_v2.configure(c, name, variant)
    tiny_dpt_supervised(c)
    c.optim.update(name="adamw", lr_multi=40.0, weight_decay=0.01, lr_after_step=True)
    return c


def tiny_dpt_supervised(c):
    """The supervised baseline on `TINY_DPT`, evaluated by 'whole_resize' (the model takes multiples of 14)."""
    c.model = type(c.model)(TINY_DPT)
    c.eval.protocol = "whole_resize"
    return c


#: name -> setup of a method's own model and options on the demo config of the contract (CutMix
#: groups of 2: the local batch of 8 devices); 'NAME:VARIANT' names a variant that changes the step
CONTRACT_SETUP = {"ccvc": lambda c: ccvc.configure(c).method.update(mix_group=2),
                  "u2pl": tiny_u2pl, "u2pl:intended": lambda c: tiny_u2pl(c, "intended"),
                  "css": tiny_css, "cpcl": cpcl.configure, "unimatch_v2": tiny_v2,
                  "fixmatch_v2": lambda c: tiny_v2(c, "fixmatch_v2"),
                  "unimatch_v2:csl": lambda c: tiny_v2(c, variant="csl"), "supervised:dpt": tiny_dpt_supervised}


def contract_config(data_root, name, **overrides):
    """The demo config of `name`, tiny: crop 32, batches of 16, one loss group of 2 per device of 8;
    `overrides` by dotted keys (`set_fields`)."""
    c = demo.get_config(name if name in ("csl", "unimatch", "fixmatch") else "supervised")
    c.method.name = name.split(":")[0]
    if name in CONTRACT_SETUP:
        CONTRACT_SETUP[name](c)
    dpt = c.model.name == "dpt"
    c.data.update(root=data_root, crop_size=DPT_CROP if dpt else CONTRACT_CROP, split="1_2", block_size=8)
    if not dpt:
        common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.batch.update(labeled=16, unlabeled=16)
    c.loss.group_size = 2  # whole groups in every micro-batch: exact accumulation (groups over devices: test_semi)
    c.update(log_every_steps=1, checkpoint_every_steps=2)
    c.eval.update(every_steps=2, batch_size=8, num_plot_images=1)
    c.optim.update(total_steps=4, lr=0.01)
    return set_fields(c, overrides)


def first_batches(config, method, n=2):
    """The first `n` global batches of the method's streams (host NumPy, from the real pipeline)."""
    streams = train.make_streams(config, method)
    return [streams.next() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def mesh(num_devices):
    """The data mesh over the first `num_devices` devices."""
    return parallel.make_mesh(jax.devices()[:num_devices])


def sharded(fn, num_devices, in_specs, out_specs=P()):
    """jit(shard_map(fn)) on `mesh(num_devices)`."""
    return jax.jit(parallel.shard_map(fn, mesh(num_devices), in_specs=in_specs, out_specs=out_specs))


class Stepper:
    """`train.make_train_step` of `method` on `mesh(num_devices)`, from a fresh train state.

    The state is `train_state` when given, else `train.create_train_state` with key 0 on crops of
    `config.data.crop_size`; `tx` defaults to SGD (lr 0.01, momentum 0.9), `accum_steps` to
    `config.batch.accum_steps`; the step has seed 0, one step per epoch and the stream offsets of
    `config.batch`.

    Attributes: `mesh`, `tx`, `initial` (the train state before the first step, on the host) and
    `train_state` (the current one, replicated on the mesh). `step(batch)` runs one step on a host
    global batch and returns its metrics on the host; `host()` is the current train state on the host.
    """

    def __init__(self, config, method, num_devices, *, tx=None, accum_steps=None, train_state=None):
        self.mesh = mesh(num_devices)
        self.tx = optax.sgd(0.01, momentum=0.9) if tx is None else tx
        if train_state is None:
            crop = config.data.crop_size
            train_state = train.create_train_state(method, self.tx, jax.random.PRNGKey(0), (crop, crop, 3))
        self.initial = jax.device_get(train_state)  # a copy: the step donates the replicated state
        self.train_state = parallel.replicate(train_state, self.mesh)
        self._step = train.make_train_step(
            method, self.tx, self.mesh, seed=0, steps_per_epoch=1, offsets=train.stream_offsets(method, config.batch),
            accum_steps=config.batch.accum_steps if accum_steps is None else accum_steps)

    def step(self, batch: dict) -> dict:
        self.train_state, metrics = self._step(self.train_state, parallel.to_global(batch, self.mesh))
        return jax.device_get(metrics)

    def host(self) -> train.TrainState:
        return jax.device_get(self.train_state)


class Run(NamedTuple):
    """What `run_steps` returns, on the host: the final params, method state and step count, and
    the metrics of every step."""

    params: Any
    state: Any
    step: Any
    metrics: list

    @property
    def losses(self) -> list[float]:
        """The loss of each step."""
        return [float(m["loss"]) for m in self.metrics]


def run_steps(config, method, batches, num_devices, **stepper_options) -> Run:
    """One step per host global batch of `batches` on a `Stepper(config, method, num_devices,
    **stepper_options)`."""
    stepper = Stepper(config, method, num_devices, **stepper_options)
    metrics = [stepper.step(batch) for batch in batches]
    final = stepper.host()
    return Run(final.params, final.state, final.step, metrics)


# ---------------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------------
def assert_trees_close(a, b, **tol):
    """The same tree structure, and every leaf of `a` close to `b`'s (np.testing.assert_allclose with `tol`)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def assert_trees_equal(a, b):
    """Every leaf of `a` equal to the leaf of `b` in the same place, bit for bit (leaves paired in order)."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def assert_same_latest_checkpoint(workdir_a, workdir_b, step):
    """The latest checkpoints of two workdirs: both of `step`, the same data state and bit-equal train
    states. Returns (train state, data state) of `workdir_a`'s."""
    state_a, data_a, step_a = checkpoint.Checkpointer(workdir_a).restore(None)
    state_b, data_b, step_b = checkpoint.Checkpointer(workdir_b).restore(None)
    assert step_a == step_b == step and data_a == data_b
    assert_trees_equal(state_a, state_b)
    return state_a, data_a


# ---------------------------------------------------------------------------------------------
# option checks
# ---------------------------------------------------------------------------------------------
def assert_refuses_another_model_and_unequal_batches(tiny_config):
    """`build_method` refuses the method config `tiny_config()` with the plain 'deeplabv3plus' network
    (naming config.model.name) and with 8 unlabeled images per step (naming config.batch.labeled)."""
    c = tiny_config()
    c.model.name = "deeplabv3plus"
    with pytest.raises(ValueError, match="config.model.name"):
        build_method(c, NUM_CLASSES)
    c = tiny_config()
    c.batch.unlabeled = 8
    with pytest.raises(ValueError, match="config.batch.labeled"):
        build_method(c, NUM_CLASSES)
