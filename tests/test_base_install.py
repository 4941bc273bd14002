"""The base install trains a default recipe: a fresh venv with only `pip install -e .` (no torch)
prepares a small Pascal VOC layout made here and trains `configs/csl_pascal.py:1464` from a `.pth`
file that torch wrote in this (test) environment. It needs the package index, as `.ci/run` does."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import splits
from tests.test_pretrained import REPO, TINY

torch = pytest.importorskip("torch")
from tests.test_pretrained import backbone  # noqa: E402, F401  (a fixture: a torch-saved tiny ResNet)

SIDE = 24  # pixels of every fake image


def make_pascal(raw, rng):
    """Every id of the shipped train_aug (10,582) and val (1,449) lists as a SIDE x SIDE JPEG and a palette
    PNG of class indices (255 at the border, as VOC's outlines)."""
    (raw / "JPEGImages").mkdir(parents=True)
    (raw / "SegmentationClass").mkdir()
    palette = rng.integers(0, 256, 768, dtype=np.uint8).tolist()
    for image_id in splits.shipped_list("pascal/train_aug.txt") + splits.shipped_list("pascal/val.txt"):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(
            raw / "JPEGImages" / f"{image_id}.jpg", quality=90)
        label = np.full((SIDE, SIDE), 255, np.uint8)
        label[1:-1, 1:-1] = rng.integers(0, 21)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(palette)
        mask.save(raw / "SegmentationClass" / f"{image_id}.png")


def test_a_fresh_base_install_trains_csl_pascal_from_a_torch_written_pth(tmp_path, backbone):  # noqa: F811
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env["CSL_JAX_WEIGHTS_DIR"] = str(tmp_path / "weights")  # an empty cache: nothing may be fetched
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "-e", REPO], capture_output=True, text=True,
                             env=env, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr

    data_bytes, _ = backbone
    weights = tmp_path / "resnet_tiny.pth"
    weights.write_bytes(data_bytes)
    make_pascal(tmp_path / "raw", np.random.default_rng(0))
    prep = subprocess.run([python, "-m", "data_prep", "pascal", "--raw", str(tmp_path / "raw"),
                           "--out", str(tmp_path / "data"), "--num-workers", "2"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert prep.returncode == 0, prep.stderr[-3000:]

    workdir = tmp_path / "run"
    tiny = [f"--config.model.{key}={value}" for key, value in TINY.items()]
    train = subprocess.run(
        [python, "main.py", "--config=configs/csl_pascal.py:1464", f"--workdir={workdir}",
         f"--config.data.root={tmp_path / 'data'}", f"--config.model.init_from={weights}",
         "--config.model.blocks=(1,1,1,1)", *tiny, "--config.data.crop_size=33", "--config.batch.labeled=2",
         "--config.batch.unlabeled=2", "--config.loss.group_size=2", "--config.optim.total_steps=2",
         "--config.eval.max_images=4", "--config.data.num_workers=0"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "torch" not in train.stderr.lower().replace("torch_pickle", ""), train.stderr[-3000:]
    with open(workdir / "run_train.json") as f:
        init = json.load(f)["init"]
    assert init == {"path": str(weights), "name": None, "sha256": hashlib.sha256(data_bytes).hexdigest(),
                    "kind": "auto"}, init
    loaded = [line for line in train.stderr.splitlines() if f"Initialised from {weights} " in line]
    assert len(loaded) == 1 and "'kind': 'deep_backbone'" in loaded[0], train.stderr[-3000:]
    with open(workdir / "final_results.json") as f:
        results = json.load(f)
    assert results["finished"] and results["step"] == 2 and results["num_images"] == 4, results
    assert results["init"] == init and 0.0 <= results["miou"] <= 1.0, results
