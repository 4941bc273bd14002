"""Two processes x 2 CPU devices (jax.distributed on localhost) train like one process x 4 devices.

The parent test starts this file twice as a worker (`python tests/test_multihost.py COORDINATOR
PROCESS_ID OUT`), each process feeding its half of every global batch through
`parallel.to_global`, and compares the workers' params and losses after 3 supervised steps with a
4-device run in the test process. A second test (`... COORDINATOR PROCESS_ID OUT data`) has both
processes prepare the synthetic dataset as main.py does: process 0 writes it, process 1 waits.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np

from benchmarks.model_forward import random_variables
from configs import common
from csl_jax import optim, parallel, train
from csl_jax.methods import build_method
from csl_jax.models import build_model

NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
NUM_CLASSES, CROP, GLOBAL_BATCH, STEPS = 5, 33, 8, 3
TIMEOUT_S = 100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    c = common.tiny_model(common.get_base_config(), width=4, head_width=8, reduce_width=4)
    c.model.update(output_stride=8, aspp_rates=(1, 2, 3))
    c.data.crop_size = CROP
    c.batch.labeled = GLOBAL_BATCH
    c.optim.lr = 0.01
    c.optim.lr_multi = 1.0
    return c


def init_variables(config):
    """Initial variables drawn in NumPy from a fixed seed (no init compile: the test stays fast)."""
    return random_variables(build_model(config.model, NUM_CLASSES), (1, CROP, CROP, 3), seed=0)


def global_batch(step):
    """The step's global labeled batch, the same in every process (seeded by the step)."""
    rng = np.random.default_rng(100 + step)
    label = rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH, CROP, CROP)).astype(np.int32)
    label[:, :4] = 255
    return {"labeled": {"image": rng.normal(size=(GLOBAL_BATCH, CROP, CROP, 3)).astype(np.float32), "label": label}}


def run(devices, process_index, process_count):
    """STEPS supervised steps on a mesh over `devices`; returns ({param path: array}, losses)."""
    config = tiny_config()
    mesh = parallel.make_mesh(devices)
    method = build_method(config, NUM_CLASSES)
    tx = optim.make_optimizer(config.optim, total_steps=10)
    variables = init_variables(config)
    state = parallel.replicate(train.TrainState(step=np.int32(0), params=variables["params"],
                                                opt_state=tx.init(variables["params"]),
                                                state={"batch_stats": variables["batch_stats"]}), mesh)
    step_fn = train.make_train_step(method, tx, mesh, seed=0, steps_per_epoch=1,
                                    offsets=train.stream_offsets(method, config.batch))
    share = GLOBAL_BATCH // process_count
    losses = []
    for step in range(STEPS):
        local = jax.tree.map(lambda x: x[process_index * share:(process_index + 1) * share], global_batch(step))
        state, metrics = step_fn(state, parallel.to_global(local, mesh))
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    params = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)) for path, leaf in leaves}
    return params, np.asarray(losses)


def _worker(coordinator, process_id, out):
    # gloo is the default CPU collectives implementation in jax 0.10; explicit in case that changes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator, num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=TIMEOUT_S)
    assert len(jax.devices()) == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    params, losses = run(jax.devices(), jax.process_index(), jax.process_count())
    np.savez(out, losses=losses, **params)
    jax.distributed.shutdown()


def _data_worker(coordinator, process_id, out):
    """main.py's data step (`data.ensure_prepared`) in one of two processes sharing `out`'s folder."""
    from csl_jax import data
    from data_prep import synthetic

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=TIMEOUT_S)
    generate = synthetic.prepare
    calls = []

    def recorded(*args, **kwargs):
        calls.append(process_id)
        time.sleep(2.0)  # process 1 reaches the data first unless it waits for process 0
        return generate(*args, **kwargs)

    synthetic.prepare = recorded
    cfg = ml_collections.ConfigDict({
        "name": "synthetic", "root": os.path.join(os.path.dirname(out), "data"), "split": "1_2", "crop_size": 32,
        "synthetic": {"num_train": 8, "num_val": 2, "image_size": (24, 24), "seed": 0}})
    data.ensure_prepared(cfg)
    with open(out, "w") as f:
        json.dump({"calls": calls, "num_classes": data.dataset_info(cfg).num_classes,
                   "val": len(data.eval_dataset(cfg))}, f)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, out_name, *mode, while_waiting=lambda: None):
    """Starts this file as NUM_PROCESSES workers, runs `while_waiting()` here, checks they succeed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    try:
        for pid in range(NUM_PROCESSES):
            logs.append(open(tmp_path / f"worker{pid}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), coordinator, str(pid),
                 str(tmp_path / out_name.format(pid)), *mode],
                env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
        result = while_waiting()
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for pid, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"worker{pid}.log").read_text()[-3000:]
    return result


def test_two_processes_match_one_process(tmp_path):
    # The 4-device reference runs here while the workers compile.
    ref_params, ref_losses = run_workers(
        tmp_path, "out{}.npz", while_waiting=lambda: run(jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS], 0, 1))

    assert len(ref_params) > 10 and np.all(np.isfinite(ref_losses))
    for pid in range(NUM_PROCESSES):
        out = np.load(tmp_path / f"out{pid}.npz")
        np.testing.assert_allclose(out["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        assert set(out.files) == set(ref_params) | {"losses"}
        for name, ref in ref_params.items():
            np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)
    # The steps did train: params moved away from the initial ones.
    init = init_variables(tiny_config())
    moved = jax.tree_util.tree_leaves_with_path(init["params"])
    assert max(float(np.max(np.abs(ref_params[jax.tree_util.keystr(p)] - np.asarray(x)))) for p, x in moved) > 1e-3


def test_synthetic_data_is_written_by_process_0_and_read_by_all(tmp_path):
    run_workers(tmp_path, "data{}.json", "data")
    results = [json.load(open(tmp_path / f"data{pid}.json")) for pid in range(NUM_PROCESSES)]
    assert [r["calls"] for r in results] == [[0]] + [[]] * (NUM_PROCESSES - 1)
    assert all(r["num_classes"] == 5 and r["val"] == 2 for r in results)


if __name__ == "__main__":
    if sys.argv[4:] == ["data"]:
        _data_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
