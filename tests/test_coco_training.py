"""UniMatch and CSL train 20 steps through main.py on a tiny COCO-format dataset (instances JSON with
overlapping polygons and a crowd RLE, images of several sizes, a grayscale one, one without annotations),
prepared by data_prep's COCO builder, with the COCO configs and a labeled list of the user's."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import coco, common

pytest.importorskip("pycocotools.mask")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, NumPy 2

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = [(40, 48), (48, 40), (44, 44), (40, 48)]  # (H, W), cycled: the val images have three distinct shapes
CATEGORIES = (1, 18, 44, 90)  # person, dog, bottle, toothbrush -> train ids 1, 17, 40, 80


def write_tiny_coco(raw: pathlib.Path, num_train: int = 16, num_val: int = 6) -> list[str]:
    """Images with two overlapping rectangles of class colour each (+ a crowd RLE on every 5th image;
    image 3 has no annotation, image 2 is grayscale); returns the train ids."""
    rng = np.random.default_rng(0)
    colours = {c: rng.integers(0, 256, 3) for c in CATEGORIES}
    annotations = {"train": [], "val": []}
    images = {"train": [], "val": []}
    ann_id = 1
    for n in range(1, num_train + num_val + 1):
        split = "train" if n <= num_train else "val"
        h, w = SIZES[n % len(SIZES)]
        pixels = np.full((h, w, 3), 110, np.uint8)
        if n != 3:
            for k in range(2):
                category = CATEGORIES[(n + k) % len(CATEGORIES)]
                x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
                x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
                pixels[y0:y1, x0:x1] = colours[category]
                annotations[split].append({"id": ann_id, "image_id": n, "category_id": category, "iscrowd": 0,
                                           "area": float((x1 - x0) * (y1 - y0)),
                                           "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
                ann_id += 1
        if n % 5 == 0:
            crowd = np.zeros((h, w), np.uint8)
            crowd[-8:, -8:] = 1
            flat = crowd.T.ravel()  # uncompressed RLE: column-major runs, zeros first
            edges = np.flatnonzero(np.diff(flat)) + 1
            counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
            annotations[split].append({"id": ann_id, "image_id": n, "category_id": 1, "iscrowd": 1, "area": 64.0,
                                       "segmentation": {"counts": counts, "size": [h, w]}})
            ann_id += 1
        image = Image.fromarray(pixels).convert("L") if n == 2 else Image.fromarray(pixels)
        (raw / f"{split}2017").mkdir(parents=True, exist_ok=True)
        image.save(raw / f"{split}2017" / f"{n:012d}.jpg", quality=95)
        images[split].append({"id": n, "file_name": f"{n:012d}.jpg", "height": h, "width": w})
    (raw / "annotations").mkdir(exist_ok=True)
    for split in ("train", "val"):
        (raw / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images[split], "annotations": annotations[split], "categories": []}))
    (raw / "val.txt").write_text("\n".join(f"val2017/{i['id']:012d}.jpg masks/{i['id']:012d}.png"
                                           for i in images["val"]))
    return [f"{i['id']:012d}" for i in images["train"]]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """(data root with a prepared tiny COCO, labeled list file of 4 of its 16 train images)."""
    root = tmp_path_factory.mktemp("coco")
    train_ids = write_tiny_coco(root / "raw")
    builder = coco.Coco(data_dir=root / "data", raw_dir=root / "raw", from_instances=True,
                        val_list=root / "raw" / "val.txt", required_train_ids=(), num_workers=0)
    common.prepare(builder)
    labeled = root / "labeled.txt"
    labeled.write_text("\n".join(f"train2017/{i}.jpg masks/{i}.png" for i in train_ids[::4]))
    return root / "data", labeled


@pytest.mark.parametrize("config", ["unimatch_coco.py:1_512", "csl_coco.py:1_512"])
def test_twenty_steps_on_a_tiny_coco_through_main(tiny_coco, tmp_path, config):
    data, labeled = tiny_coco
    workdir = tmp_path / "run"
    args = [f"--config=configs/{config}", f"--workdir={workdir}", f"--config.data.root={data}",
            f"--config.data.labeled_list={labeled}", "--config.model.init_from=none", "--config.model.width=8",
            "--config.model.blocks=(1,)", "--config.model.head_width=16", "--config.model.reduce_width=8",
            "--config.data.crop_size=33", "--config.data.block_size=8", "--config.data.num_workers=0",
            "--config.optim.total_steps=20", "--config.eval.every_steps=20", "--config.log_every_steps=10",
            "--config.checkpoint_every_steps=20"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["model"]["backbone"], saved["data"]["name"], saved["model"]["output_stride"]) == \
        ("xception65", "coco", 16)
    record = json.loads((workdir / "run_train.json").read_text())["data"]
    assert record["fingerprint"]["mask_source"] == {"mode": "instances", "overlap": "json", "crowd": "class"}
    losses = [m["loss"] for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses and np.all(np.isfinite(losses))
    results = json.loads((workdir / "final_results.json").read_text())
    assert results["step"] == 20 and results["finished"] and results["num_images"] == 6
    assert list(results["iou_per_class"]) == list(coco.CLASS_NAMES) and len(results["iou"]) == 81
    assert results["batching"]["programs"] == 3  # one program per val image shape, not one per image
    # 12 unlabeled images (the pool minus the 4 labeled) at global batch 8: 1 step per epoch
    assert f"on coco split {labeled}: 20 steps (1 per epoch)" in proc.stderr


def test_a_labeled_list_of_the_users_replaces_the_split(tiny_coco, tmp_path):
    import ml_collections

    from csl_jax import config_checks
    from csl_jax.data import sources

    data, labeled = tiny_coco
    pool = [f"{n:012d}" for n in range(1, 17)]
    cfg = ml_collections.ConfigDict({"name": "coco", "root": str(data), "split": "mine",
                                     "labeled_list": str(labeled), "unlabeled_list": ""})
    config_checks._check_split(ml_collections.ConfigDict({"data": cfg}))  # the split is only a name here
    with pytest.raises(ValueError, match="config.data.split='mine': must be a coco split"):
        config_checks._check_split(ml_collections.ConfigDict({"data": dict(cfg.to_dict(), labeled_list="")}))
    chosen = pool[::4]
    assert sources.split_ids(cfg) == (chosen, [i for i in pool if i not in chosen])  # the rest, record order
    subset = tmp_path / "unlabeled.txt"
    subset.write_text("\n".join(pool[1:3]))  # ids alone are lines too
    cfg.unlabeled_list = str(subset)
    assert sources.split_ids(cfg) == (chosen, pool[1:3])
    subset.write_text(f"{pool[1]}\n000000999999")
    with pytest.raises(ValueError, match=r"1 ids are not in the prepared train data .* e.g. \['000000999999'\]"):
        sources.split_ids(cfg)
    subset.write_text(pool[0])
    with pytest.raises(ValueError, match=r"1 ids are both labeled and unlabeled"):
        sources.split_ids(cfg)
