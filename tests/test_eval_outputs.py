"""What an evaluation hands the user: the prediction grid (PNG and TensorBoard image, val images
spread over the split) and per-class IoU named by class, with the unit, in results and eval_*.json,
and as a table in the log."""

import json
import logging
import os
import re

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from configs import common, demo
from csl_jax import checkpoint, data, parallel, train
from csl_jax.evaluation import loop, modes
from csl_jax.methods import build_method
from data_prep import synthetic

SIDE = 24  # synthetic images are SIDE x SIDE
NUM_VAL = 5


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.prepare(root, num_train=8, num_val=NUM_VAL, image_size=SIDE, seed=0)
    return str(root)


def tiny_config(data_root):
    c = demo.get_config("supervised")
    c.data.update(root=data_root, crop_size=SIDE, split="1_2")
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.eval.update(batch_size=8, num_plot_images=2)
    return c


def init_state(method):
    return train.create_train_state(method, optax.sgd(0.1), jax.random.PRNGKey(0), (SIDE, SIDE, 3))


class FakeWriter:
    def __init__(self):
        self.images = []

    def write_image(self, step, tag, image):
        self.images.append((step, tag, image))


def check_named_iou(results, class_names, caplog):
    """Named IoU fractions in the results, and the logged per-class table (name, IoU %) in class order."""
    assert results["unit"] == "fraction"
    assert list(results["iou_per_class"]) == list(class_names) == list(synthetic.CLASS_NAMES)
    assert list(results["iou_per_class"].values()) == results["iou"]  # the list is kept, in class order
    assert all(0.0 <= v <= 1.0 for v in results["iou"]) and 0.0 <= results["miou"] <= 1.0
    [table] = [r.getMessage() for r in caplog.records if "IoU per class (%)" in r.getMessage()]
    cells = re.findall(r"(\S+) +(\d+\.\d)", table.split("\n", 1)[1])
    assert cells == [(name, f"{100 * v:.1f}") for name, v in results["iou_per_class"].items()]


def test_eval_loop_logs_a_spread_grid_and_named_iou(data_root, tmp_path, caplog):
    config = tiny_config(data_root)
    info = data.dataset_info(config.data)
    method = build_method(config, info.num_classes)
    evaluator = loop.EvalLoop(config, info, str(tmp_path), parallel.make_mesh(), method)
    writer = FakeWriter()
    with caplog.at_level(logging.INFO):
        out = evaluator.run(7, init_state(method), writer=writer)

    results = out[evaluator.best.name]
    check_named_iou(results, info.class_names, caplog)
    assert results["sample_indices"] == [0, NUM_VAL - 1]  # 2 of 5 val images: first and last
    json.dumps(results)  # JSON-ready
    [(step, tag, grid)] = writer.images
    assert (step, tag) == (7, "val/predictions")
    # 3 labelled rows (image / prediction / ground truth) of 2 samples, left margin 20 px
    assert grid.dtype == np.uint8 and grid.shape == (3 * SIDE + 8, 20 + 2 * SIDE + 4, 3)
    val = data.eval_dataset(config.data)
    np.testing.assert_array_equal(grid[:SIDE, 20 + SIDE + 4:], val[NUM_VAL - 1]["image"])
    png = np.asarray(Image.open(os.path.join(str(tmp_path), "plots", "val_step0000007.png")))
    np.testing.assert_array_equal(png, grid)


def test_eval_json_has_named_iou_and_unit(data_root, tmp_path, caplog):
    config = tiny_config(data_root)
    info = data.dataset_info(config.data)
    method = build_method(config, info.num_classes)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save_best(3, method.eval_variables(init_state(method), method.best_predict), 0.1,
                   evaluation=method.best_predict, predict=method.best_predict)
    ckpt.close()
    with caplog.at_level(logging.INFO):
        results = modes.evaluate_checkpoint(config, str(tmp_path), "best")
    with open(tmp_path / "eval_best.json") as f:
        saved = json.load(f)
    assert saved == results
    check_named_iou(saved, info.class_names, caplog)
    assert saved["protocol"]["num_images"] == NUM_VAL


def test_json_ready_refuses_a_wrong_number_of_names():
    with pytest.raises(ValueError, match="2 class names for 3 IoU values"):
        loop.json_ready({"miou": 0.5, "iou": [0.1, 0.2, 0.3]}, ["a", "b"])
