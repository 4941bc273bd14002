"""The trainer: one loop for every method, read top to bottom.

    train_and_evaluate(config, workdir)

Sections: state, train step (jit of shard_map over the ("data",) mesh), input streams, the loop
(log, evaluate, checkpoint, preemption). A method (csl_jax/methods) supplies its losses, its extra
state and its BN policy; everything else lives here once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from csl_jax import checkpoint, optim, parallel
from csl_jax import data
from csl_jax.methods import Method, StepContext, build_method
from csl_jax.models import build_model


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the run stops and keeps its last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. All leaves are replicated over the devices.

    step: int32 scalar, optimizer steps done; params/batch_stats: the student (float32);
    opt_state: optax state; extra: the method's state (EMA teacher, queues, ...).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: Any


def init_variables(model, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Initial {'params', 'batch_stats'}: random, or loaded from `config.model.init_from`."""
    crop = config.data.crop_size
    init = jax.jit(functools.partial(model.init, train=False))  # one compile instead of op-by-op dispatch
    variables = init({"params": rng, "dropout": rng}, jnp.zeros((1, crop, crop, 3), jnp.float32))
    variables = flax.core.unfreeze(variables)
    if config.model.init_from:
        from csl_jax.models import convert

        variables, report = convert.load_pretrained(variables, config.model.init_from, kind=config.model.init_kind)
        logging.info("Initialised from %s: %s", config.model.init_from, report)
    return variables


def create_train_state(variables: dict, method: Method, tx: optax.GradientTransformation) -> TrainState:
    """Step-0 train state of the student `variables`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        extra=method.init_extra(variables),
    )


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------
def _split_microbatches(tree: Any, accum_steps: int) -> Any:
    """(b, ...) leaves -> (accum_steps, b // accum_steps, ...)."""
    return jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), tree)


def make_train_step(method: Method, tx: optax.GradientTransformation, mesh, seed: int,
                    accum_steps: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(shard_map(per-device step)): (state, global batch) -> (new state, metrics).

    Per device, as PyTorch DDP: the method's loss is normalised per loss group on the local batch,
    BN statistics are synchronised by the model (axis "data"), grads and metrics are pmean'ed.
    With `accum_steps` > 1 the local batch is split into micro-batches whose gradients are
    averaged (BN statistics chain through them). The state is donated.
    """
    seed_key = jax.random.PRNGKey(seed)

    def per_device(state: TrainState, batch: dict):
        step_rng = jax.random.fold_in(seed_key, state.step)
        device_index = jax.lax.axis_index(parallel.AXIS)

        def loss_and_grads(batch_stats, micro_batch, rng):
            ctx = StepContext(batch_stats=batch_stats, extra=state.extra, rng=rng, step=state.step,
                              device_index=device_index)
            (loss, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(state.params, ctx, micro_batch)
            return grads, aux["batch_stats"], aux["metrics"]

        if accum_steps == 1:
            grads, batch_stats, metrics = loss_and_grads(state.batch_stats, batch, step_rng)
        else:
            def micro_step(carry, inputs):
                batch_stats, grad_sum, metric_sum = carry
                index, micro_batch = inputs
                grads, batch_stats, metrics = loss_and_grads(
                    batch_stats, micro_batch, jax.random.fold_in(step_rng, index))
                return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads),
                        jax.tree.map(jnp.add, metric_sum, metrics)), None

            zeros_grads = jax.tree.map(jnp.zeros_like, state.params)
            metric_shapes = jax.eval_shape(
                lambda: loss_and_grads(state.batch_stats, jax.tree.map(lambda x: x[0], _split_microbatches(batch, accum_steps)), step_rng)[2])
            zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            (batch_stats, grad_sum, metric_sum), _ = jax.lax.scan(
                micro_step, (state.batch_stats, zeros_grads, zeros_metrics),
                (jnp.arange(accum_steps), _split_microbatches(batch, accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            metrics = jax.tree.map(lambda m: m / accum_steps, metric_sum)

        grads = jax.lax.pmean(grads, parallel.AXIS)
        metrics = jax.lax.pmean(metrics, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = method.update_extra(state.extra, params, batch_stats, state.step)
        metrics = dict(metrics, grad_norm=jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                               extra=extra)
        return new_state, metrics

    step_fn = parallel.shard_map(per_device, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))
    return jax.jit(step_fn, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Input streams
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Streams:
    """The labeled stream and, for semi-supervised methods, the unlabeled 'main' and 'mix' streams."""

    iterators: dict

    def next(self) -> dict:
        return {name: next(it) for name, it in self.iterators.items()}

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self.iterators.items()}

    def set_state(self, state: dict) -> None:
        missing = set(self.iterators) - set(state)
        if missing:
            raise ValueError(f"checkpointed data state lacks the streams {sorted(missing)}; "
                             "was it written by another method config?")
        for name, it in self.iterators.items():
            it.set_state(state[name])


def make_streams(config: ml_collections.ConfigDict, method: Method) -> Streams:
    """Per-process iterators of every stream the method needs, seeded from `config.seed`."""
    common = dict(process_index=jax.process_index(), process_count=jax.process_count())
    iterators = {"labeled": iter(data.labeled_iterator(
        config.data, seed=config.seed, global_batch=config.batch.labeled, semi=method.uses_unlabeled, **common))}
    if method.uses_unlabeled:
        for stream in ("unlabeled", "mix"):
            iterators[stream] = iter(data.unlabeled_iterator(
                config.data, seed=config.seed, global_batch=config.batch.unlabeled, views=method.unlabeled_views,
                stream="main" if stream == "unlabeled" else "mix", **common))
    return Streams(iterators)


def schedule_length(config: ml_collections.ConfigDict, method: Method) -> tuple[int, int]:
    """(iterations per epoch, total steps) as defined by protocol.md §3."""
    if method.uses_unlabeled:
        per_epoch = data.iterations_per_epoch(config.data, config.batch.unlabeled, semi=True)
    else:
        per_epoch = data.iterations_per_epoch(config.data, config.batch.labeled, semi=False)
    total = config.optim.total_steps or config.optim.epochs * per_epoch
    return per_epoch, total


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class _Preemption:
    """Remembers a SIGTERM so the loop can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(pending: list[tuple[int, dict]], start_step: int) -> dict:
    """Fetches the pending per-step metrics, checks the loss is finite, returns their means."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, fetched):
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"loss became {float(metrics['loss'])} at step {step + 1}; stopping. The last good checkpoint "
                f"(step <= {start_step}) is kept in the workdir; lower optim.lr or check the data.")
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final eval."""
    from csl_jax import evaluation_loop
    from csl_jax.metrics_writer import MetricsWriter

    mesh = parallel.make_mesh()
    info = data.dataset_info(config.data)
    model = build_model(config.model, info.num_classes, bn_axis_name=parallel.AXIS)
    method = build_method(config, model, info.num_classes)
    group = config.loss.group_size * config.batch.accum_steps
    parallel.check_divisible(config.batch.labeled, "config.batch.labeled", mesh, group)
    if method.uses_unlabeled:
        parallel.check_divisible(config.batch.unlabeled, "config.batch.unlabeled", mesh, group)
    steps_per_epoch, total_steps = schedule_length(config, method)
    tx = optim.make_optimizer(config.optim, total_steps, param_labels=method.param_labels)

    state = create_train_state(init_variables(model, config, jax.random.PRNGKey(config.seed)), method, tx)
    state = parallel.replicate(state, mesh)
    streams = make_streams(config, method)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state, data_state, restored = ckpt.restore(checkpoint.abstract_like(state))
        streams.set_state(data_state)
        logging.info("Resumed from %s at step %d.", workdir, restored)
    start_step = int(state.step)

    train_step = make_train_step(method, tx, mesh, config.seed, config.batch.accum_steps)
    evaluator = evaluation_loop.EvalLoop(config, info, workdir, mesh, method)
    writer = MetricsWriter(workdir, total_steps=total_steps, is_main_process=jax.process_index() == 0)
    eval_every = config.eval.every_steps or steps_per_epoch
    best = (ckpt.best_meta() or {}).get("miou", -1.0)
    pending: list[tuple[int, dict]] = []
    last_saved = start_step
    results: dict = {}
    data_wait = 0.0
    timer = time.perf_counter()

    def flush(step: int) -> None:
        nonlocal data_wait, timer, pending
        if not pending:
            return
        metrics = _mean_metrics(pending, last_saved)
        elapsed = time.perf_counter() - timer
        metrics.update({k: float(v) for k, v in optim.learning_rates(config.optim, total_steps, step - 1).items()})
        metrics.update(steps_per_sec=len(pending) / elapsed, data_wait=data_wait / elapsed)
        writer.write(step, metrics)
        pending, data_wait, timer = [], 0.0, time.perf_counter()

    logging.info("Training %s on %s split %s: %d steps (%d per epoch) on %d device(s).", config.method.name,
                 config.data.name, config.data.split, total_steps, steps_per_epoch, mesh.devices.size)
    with _Preemption() as preemption:
        for step in range(start_step, total_steps):
            fetch_start = time.perf_counter()
            batch = parallel.to_global(streams.next(), mesh)
            data_wait += time.perf_counter() - fetch_start
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            done = step + 1
            is_last = done == total_steps
            if done % config.log_every_steps == 0 or is_last or preemption.requested:
                flush(done)
            if done % eval_every == 0 or is_last:
                flush(done)
                variables = method.eval_variables(state.params, state.batch_stats, state.extra)
                results = evaluator.run(done, variables, state, streams_sample=batch)
                writer.write_eval(done, results)
                if results["miou"] > best:
                    best = results["miou"]
                    ckpt.save_best(done, variables, best)
                timer = time.perf_counter()  # steps/s and data-wait exclude evaluation time
            stop = preemption.requested or done - start_step == config.stop_after_steps
            if done % config.checkpoint_every_steps == 0 or is_last or stop:
                flush(done)
                ckpt.save(done, state, streams.get_state())
                last_saved = done
            if stop:
                logging.warning("Stopping at step %d (%s); checkpoint saved, rerun to resume.", done,
                                "SIGTERM" if preemption.requested else "config.stop_after_steps")
                break
    ckpt.close()
    writer.close()
    if results:
        results = dict(results, best_miou=best)
        with open(os.path.join(workdir, "final_results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results
