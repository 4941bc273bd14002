"""The trainer: one loop for every method, read top to bottom.

    train_and_evaluate(config, workdir)

Sections: state, train step (jit of shard_map over the ("data",) mesh), input streams, the loop
(log, evaluate, checkpoint, preemption). A method (csl_jax/methods) supplies its networks, streams,
losses, state and predictions; the evaluation loop (csl_jax/evaluation) its evaluations; everything
else lives here once.

A finished run writes final_results.json; a stopped one (SIGTERM, a first Ctrl-C,
`config.stop_after_steps`) does not and is resumed by the same command; rerunning a finished run
returns its final_results.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from csl_jax import checkpoint, config_checks, optim, parallel, run_info
from csl_jax import workdir as workdir_lib
from csl_jax import data
from csl_jax.methods import Method, StepContext, build_method
from csl_jax.models import pretrained
from csl_jax.state import TrainState  # defined in csl_jax.state; csl_jax.train.TrainState still works


DEFAULT_COMPILATION_CACHE = "~/.cache/csl_jax/xla"  # config.compilation_cache_dir ""
FINAL_RESULTS = "final_results.json"  # written by finished runs only


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the run stops and keeps its last good checkpoint (its message names it)."""


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
def create_train_state(method: Method, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape) -> TrainState:
    """Step-0 train state: the method's `init(rng, image_shape)` and the optimiser state of its params."""
    params, state = method.init(rng, image_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), state=state)


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------
def _split_microbatches(tree: Any, accum_steps: int) -> Any:
    """(b, ...) leaves -> (accum_steps, b // accum_steps, ...)."""
    return jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), tree)


def stream_offsets(method: Method, batch_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Global id of each stream's first sample in a step: the streams one after the other (StepContext)."""
    offsets, total = {}, 0
    for name, spec in method.streams().items():
        offsets[name] = total
        total += int(batch_cfg[spec.batch])
    return offsets


def make_train_step(method: Method, tx: optax.GradientTransformation, mesh, seed: int, *,
                    steps_per_epoch: int, offsets: dict[str, int],
                    accum_steps: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(shard_map(per-device step)): (state, global batch) -> (new state, metrics).

    Per device, as PyTorch DDP: the method's loss is normalised per loss group on the local batch,
    BN statistics are synchronised by the model (axis "data"), grads and metrics are pmean'ed.
    With `accum_steps` > 1 the local batch is split into micro-batches whose gradients are
    averaged; the method's state (BN statistics, ...) is carried from one micro-batch to the next.
    `offsets`: `stream_offsets` of the method and batch sizes. The state is donated.
    """
    seed_key = jax.random.PRNGKey(seed)
    num_devices = mesh.devices.size

    def per_device(ts: TrainState, batch: dict):
        step_rng = jax.random.fold_in(seed_key, ts.step)
        device_index = jax.lax.axis_index(parallel.AXIS)

        def loss_and_grads(state, micro_batch, rng):
            ctx = StepContext(rng=rng, step=ts.step, device_index=device_index, num_devices=num_devices,
                              steps_per_epoch=steps_per_epoch, stream_offsets=offsets)
            (_, (state, metrics)), grads = jax.value_and_grad(method.loss, has_aux=True)(
                ts.params, state, micro_batch, ctx)
            return grads, state, metrics

        if accum_steps == 1:
            grads, state, metrics = loss_and_grads(ts.state, batch, step_rng)
        else:
            def micro_step(carry, inputs):
                state, grad_sum, metric_sum = carry
                index, micro_batch = inputs
                grads, state, metrics = loss_and_grads(state, micro_batch, jax.random.fold_in(step_rng, index))
                return (state, jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, metric_sum, metrics)), None

            micro_batches = _split_microbatches(batch, accum_steps)
            metric_shapes = jax.eval_shape(
                lambda: loss_and_grads(ts.state, jax.tree.map(lambda x: x[0], micro_batches), step_rng)[2])
            zeros = (jax.tree.map(jnp.zeros_like, ts.params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
            (state, grad_sum, metric_sum), _ = jax.lax.scan(
                micro_step, (ts.state, *zeros), (jnp.arange(accum_steps), micro_batches))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            metrics = jax.tree.map(lambda m: m / accum_steps, metric_sum)

        grads = jax.lax.pmean(grads, parallel.AXIS)
        metrics = jax.lax.pmean(metrics, parallel.AXIS)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        state = method.after_update(state, params, ts.step)
        metrics = dict(metrics, grad_norm=jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
        return TrainState(step=ts.step + 1, params=params, opt_state=opt_state, state=state), metrics

    step_fn = parallel.shard_map(per_device, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))
    return jax.jit(step_fn, donate_argnums=(0,))


def compile_train_step(train_step, state: TrainState, batch: dict) -> tuple[Callable, float]:
    """(the compiled `train_step` for `state` and `batch`'s shapes and shardings, compile seconds), logged.

    The compiled function donates the state as `train_step` does and computes the same numbers; it
    accepts only arguments of those shapes and shardings (every step's).
    """
    logging.info("Compiling the train step ...")
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    logging.info("Compiled the train step in %.1f s.", seconds)
    return compiled, seconds


def enable_compilation_cache(directory: str) -> None:
    """Keeps XLA's compiled programs in `directory` across runs ("" = ~/.cache/csl_jax/xla, "none" =
    off), for programs that took >= 1 s to compile; a cache directory already set (tests) is kept."""
    if directory.lower() == "none" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory or DEFAULT_COMPILATION_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ---------------------------------------------------------------------------------------------
# Input streams
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Streams:
    """The iterators of the method's streams (`Method.streams()`), by name."""

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
    """Per-process iterators of every stream the method declares, seeded from `config.seed`."""
    return Streams({name: iter(data.stream_iterator(
        config.data, spec, name=name, seed=config.seed, global_batch=int(config.batch[spec.batch]),
        process_index=jax.process_index(), process_count=jax.process_count()))
        for name, spec in method.streams().items()})


def schedule_length(config: ml_collections.ConfigDict, method: Method) -> tuple[int, int]:
    """(iterations per epoch of the method's `epoch_stream`, total steps), as defined by protocol.md §3."""
    spec = method.streams()[method.epoch_stream]
    per_epoch = data.epoch_length(config.data, spec, int(config.batch[spec.batch]))
    total = config.optim.total_steps or config.optim.epochs * per_epoch
    return per_epoch, total


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class _Preemption:
    """Remembers a SIGTERM or a first SIGINT (Ctrl-C) so the loop can save and exit cleanly; a second
    SIGINT raises KeyboardInterrupt at once (nothing more is saved). `reason`: the signal's name or ''."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.reason = ""
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.reason:
            raise KeyboardInterrupt
        logging.warning("%s received: saving a checkpoint and exiting%s.", name,
                        " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")
        self.reason = self.reason or name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _mean_metrics(pending: list[tuple[int, dict]], kept: str) -> dict:
    """Fetches the pending per-step metrics, checks the loss is finite, returns their means.

    Raises NonFiniteLossError naming the step and `kept`, what the workdir holds to resume from."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, fetched):
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"loss became {float(metrics['loss'])} at step {step + 1}; stopped. {kept}; "
                                     "lower optim.lr or check the data")
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def check_loss_groups(config: ml_collections.ConfigDict, method: Method, mesh) -> None:
    """Raises ValueError unless every stream's batch splits over the devices and accumulation steps
    into micro-batches whose loss groups (`config.loss.group_size` consecutive images) are whole:
    within a device's micro-batch, or spanning devices (CE losses; OHEM groups must be local)."""
    group, accum = config.loss.group_size, config.batch.accum_steps
    for spec in sorted({spec.batch for spec in method.streams().values()}):
        key = f"config.batch.{spec}"
        micro = parallel.check_divisible(config.batch[spec], key, mesh, accum) // accum
        local = micro % group == 0
        if not local and (micro * mesh.devices.size) % group:
            raise ValueError(f"{key}={config.batch[spec]} gives micro-batches of {micro} image(s) per device "
                             f"({micro * mesh.devices.size} over {mesh.devices.size} device(s)); "
                             f"config.loss.group_size={group} must divide one of them; change {key}, "
                             "loss.group_size or batch.accum_steps")
        if not local and config.loss.labeled == "ohem" and spec == "labeled":
            raise ValueError(f"config.loss.labeled='ohem' needs whole loss groups on each device: "
                             f"config.loss.group_size={group} does not divide the {micro} labeled image(s) per "
                             "device and micro-batch; change config.batch.labeled, loss.group_size or "
                             "batch.accum_steps")


def check_devices(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (`check_loss_groups`) when a batch of the method's streams does not split over
    this machine's devices and accumulation steps into whole loss groups. Reads the prepared data's
    class count (to build the method); writes nothing."""
    method = build_method(config, data.dataset_info(config.data).num_classes)
    check_loss_groups(config, method, parallel.make_mesh())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns what it did.

    Returns, always, 'step' (the last step done), 'total_steps' and 'finished' (the schedule is
    complete). A finished run adds the results of the evaluation that picks the best checkpoint
    (`config.eval.best`) at the last step, with 'best_miou', 'evaluations' ({name: mIoU} of every
    evaluation), 'iou_per_class' ({class name: IoU}), 'unit' ('fraction') and 'init' (the initial
    weights, `pretrained.init_record`), and writes them to
    final_results.json. A stopped run adds 'stop_reason' ('SIGTERM', 'SIGINT' or 'stop_after_steps') and
    writes no final_results.json. Rerunning a finished run returns its final_results.json with
    'already_finished': True, without building the input streams or compiling.
    """
    from csl_jax.evaluation.loop import EvalLoop
    from csl_jax.metrics_writer import MetricsWriter

    config_checks.check(config)  # one-line ValueError on a bad setting, before anything is built
    # a fresh run's initial weights, downloaded before anything is built (a resumed one restores its state)
    fresh = not workdir_lib.checkpoint_steps(workdir, "checkpoints")
    init = pretrained.check_available(config.model) if fresh else None
    enable_compilation_cache(config.compilation_cache_dir)
    mesh = parallel.make_mesh()
    info = data.dataset_info(config.data)
    method = build_method(config, info.num_classes)
    check_loss_groups(config, method, mesh)
    steps_per_epoch, total_steps = schedule_length(config, method)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and latest >= total_steps:
        ckpt.close()
        return _already_finished(workdir, latest, total_steps)
    tx = optim.make_optimizer(config.optim, total_steps, param_labels=method.param_labels)
    evaluator = EvalLoop(config, info, workdir, mesh, method)  # checks the evaluations before training

    if latest is None:
        init, init_method = (init if fresh else pretrained.check_available(config.model)), method
    else:  # the restored state replaces the initial weights: random ones give its structure
        init_method = build_method(pretrained.random_init_config(config), info.num_classes)
    crop = config.data.crop_size
    state = create_train_state(init_method, tx, jax.random.PRNGKey(config.seed), (crop, crop, 3))
    state = parallel.replicate(state, mesh)
    streams = make_streams(config, method)
    if latest is not None:
        state, data_state, restored = ckpt.restore(checkpoint.abstract_like(state))
        streams.set_state(data_state)
        logging.info("Resumed from %s at step %d.", workdir, restored)
    start_step = int(state.step)

    train_step = make_train_step(method, tx, mesh, config.seed, steps_per_epoch=steps_per_epoch,
                                 offsets=stream_offsets(method, config.batch), accum_steps=config.batch.accum_steps)
    writer = MetricsWriter(workdir, total_steps=total_steps, is_main_process=jax.process_index() == 0,
                           start_step=start_step)
    eval_every = config.eval.every_steps or steps_per_epoch
    best = (ckpt.best_meta() or {}).get("miou", -1.0)
    pending: list[tuple[int, dict]] = []
    last_saved = done = start_step
    results: dict = {}
    stop_reason = ""
    compiled = None
    data_wait = 0.0
    timer = time.perf_counter()

    def flush(step: int) -> None:
        nonlocal data_wait, timer, pending
        if not pending:
            return
        kept = (f"The checkpoint of step {last_saved} is kept ({os.path.join(workdir, 'checkpoints')})"
                if last_saved else "No checkpoint was written before it")
        try:
            metrics = _mean_metrics(pending, kept)
        except NonFiniteLossError:
            ckpt.close()  # the kept checkpoint's write completes before the run ends
            raise
        ckpt.check_saves()  # a failed checkpoint write stops the run at the next log line
        elapsed = time.perf_counter() - timer
        metrics.update({k: float(v) for k, v in optim.learning_rates(config.optim, total_steps, step - 1).items()})
        metrics.update(steps_per_sec=len(pending) / elapsed, data_wait=data_wait / elapsed)
        writer.write(step, metrics)
        pending, data_wait, timer = [], 0.0, time.perf_counter()

    logging.info("Training %s on %s split %s: %d steps (%d per epoch) on %d device(s).", config.method.name,
                 config.data.name, config.data.get("labeled_list") or config.data.split, total_steps, steps_per_epoch,
                 mesh.devices.size)
    with _Preemption() as preemption:
        for step in range(start_step, total_steps):
            fetch_start = time.perf_counter()
            batch = parallel.to_global(streams.next(), mesh)
            data_wait += time.perf_counter() - fetch_start
            if compiled is None:
                compiled, compile_seconds = compile_train_step(train_step, state, batch)
                timer += compile_seconds  # steps/s and the ETA exclude compiling
            state, metrics = compiled(state, batch)
            pending.append((step, metrics))
            done = step + 1
            is_last = done == total_steps
            # the first step of an invocation is logged too: a progress line (and an ETA) right after compiling
            if done % config.log_every_steps == 0 or done == start_step + 1 or is_last or preemption.reason:
                flush(done)
            if done % eval_every == 0 or is_last:
                flush(done)
                evaluations = evaluator.run(done, state, train_batch=batch, writer=writer)
                for evaluation, result in evaluations.items():
                    writer.write_eval(done, result, name=evaluation, is_best_metric=evaluation == evaluator.best.name)
                results = evaluations[evaluator.best.name]
                if results["miou"] > best:
                    best = results["miou"]
                    ckpt.save_best(done, method.eval_variables(state, evaluator.best.predict), best,
                                   evaluation=evaluator.best.name, predict=evaluator.best.predict)
                results = dict(results, evaluations={k: v["miou"] for k, v in evaluations.items()})
                timer = time.perf_counter()  # steps/s and data-wait exclude evaluation time
            if preemption.reason:
                stop_reason = preemption.reason
            elif done - start_step == config.stop_after_steps:
                stop_reason = "stop_after_steps"
            if done % config.checkpoint_every_steps == 0 or is_last or stop_reason:
                flush(done)
                ckpt.save(done, state, streams.get_state())
                last_saved = done
            if stop_reason:
                logging.warning("Stopping at step %d (%s); checkpoint saved, rerun to resume.", done, stop_reason)
                break
    ckpt.close()
    writer.close()
    summary = {"step": done, "total_steps": total_steps, "finished": done == total_steps}
    if not summary["finished"]:
        return dict(summary, stop_reason=stop_reason)
    # the weights of step 0: the fresh run's record (a resume may change init_from, which it does not read)
    initial = run_info.initial_weights(workdir) or pretrained.init_record(init)
    results = dict(summary, **results, best_miou=best, init=initial)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, FINAL_RESULTS), "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


def _already_finished(workdir: str, step: int, total_steps: int) -> dict:
    """The saved final_results.json of a run whose latest checkpoint is at `step` >= `total_steps`."""
    path = os.path.join(workdir, FINAL_RESULTS)
    logging.warning("%s is already trained (checkpoint of step %d, %d steps in the schedule); nothing to do. "
                    "Raise config.optim.total_steps (or epochs) to train on, or use --mode=eval.", workdir, step,
                    total_steps)
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    else:
        logging.warning("%s is missing; --mode=eval evaluates the checkpoints.", path)
    return dict({"step": step, "total_steps": total_steps, "finished": True}, **saved, already_finished=True)
