"""Input-pipeline throughput: samples/s of one worker (one process, one thread).

Measures csl_jax's Grain streams (labeled; unlabeled with UniMatch's views strong+strong2 and CSL's
strong+tmp) against a plain PIL/NumPy re-implementation of UniMatch's `dataset/semi.py` transforms
written below, at crops 321/513/801, on synthetic images of Pascal size (500x375 JPEG) and
Cityscapes size (2048x1024 PNG). Throughput with W workers is about W times these numbers.

Also measures `data_prep` itself: images/s of preparing a synthetic COCO-like raw folder (640x480 JPEGs,
an instances JSON with two overlapping polygons and a crowd RLE per image) with masks generated from the
instances (mode B), with 0 and 2 worker processes (the rate includes starting the workers).

    python benchmarks/pipeline.py [--quick] [--out results.json]

Prints one JSON object, then a table.
"""
import argparse
import copy
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from csl_jax import data
from csl_jax.constants import IGNORE_INDEX
from data_prep import coco, common

SIZES = {"pascal": (500, 375, "JPEG", ".jpg"), "cityscapes": (2048, 1024, "PNG", ".png")}
ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def smooth_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: random colours at 1/16 resolution, bilinearly upsampled, plus noise (photo-like JPEG sizes)."""
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8))
    image = np.asarray(coarse.resize((w, h), Image.BILINEAR))
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def make_images(folder: pathlib.Path, kind: str, count: int) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Writes `count` smooth random images (+ masks) of the given kind; returns (image, mask) paths."""
    w, h, fmt, ext = SIZES[kind]
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(count):
        image = smooth_image(rng, w, h)
        mask = (image[..., 0] // 16).astype(np.uint8)
        paths = (folder / f"{kind}_{i}{ext}", folder / f"{kind}_{i}_mask.png")
        Image.fromarray(image).save(paths[0], format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        Image.fromarray(mask).save(paths[1])
        pairs.append(paths)
    return pairs


# ------------------------------------------- baseline: UniMatch's transforms, plain PIL and NumPy
def _jitter(img, rng, b, c, s, hue):
    factors = [rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s)]
    shift = rng.uniform(-hue, hue)
    for op in rng.permutation(4):
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(factors[0])
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(factors[1])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(factors[2])
        else:
            hh, ss, vv = img.convert("HSV").split()
            hh = Image.fromarray((np.asarray(hh) + np.uint8(int(shift * 255) % 256)).astype(np.uint8))
            img = Image.merge("HSV", (hh, ss, vv)).convert("RGB")
    return img


def _baseline_strong(img, rng, crop):
    img = copy.deepcopy(img)
    if rng.random() < 0.8:
        img = _jitter(img, rng, 0.5, 0.5, 0.5, 0.25)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    box = np.zeros((crop, crop), np.float32)
    if rng.random() < 0.5:
        size = rng.uniform(0.02, 0.4) * crop * crop
        while True:
            r = rng.uniform(0.3, 1 / 0.3)
            w, h = int(np.sqrt(size / r)), int(np.sqrt(size * r))
            x, y = rng.integers(0, crop), rng.integers(0, crop)
            if x + w <= crop and y + h <= crop:
                break
        box[y:y + h, x:x + w] = 1
    return _baseline_normalize(img), box


def _baseline_normalize(img):
    return ((np.asarray(img, np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def baseline_sample(pair, rng, crop, unlabeled):
    """UniMatch semi.py: open, resize, pad+crop, flip; weak (+ two strong views when unlabeled)."""
    img = Image.open(pair[0]).convert("RGB")
    mask = Image.open(pair[1])
    w, h = img.size
    long_side = int(rng.integers(int(max(h, w) * 0.5), int(max(h, w) * 2.0) + 1))
    ow, oh = (long_side, int(h * long_side / w + 0.5)) if w >= h else (int(w * long_side / h + 0.5), long_side)
    img, mask = img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
    pw, ph = max(crop - ow, 0), max(crop - oh, 0)
    img = ImageOps.expand(img, border=(0, 0, pw, ph), fill=0)
    mask = ImageOps.expand(mask, border=(0, 0, pw, ph), fill=254 if unlabeled else IGNORE_INDEX)
    x, y = int(rng.integers(0, img.size[0] - crop + 1)), int(rng.integers(0, img.size[1] - crop + 1))
    img, mask = img.crop((x, y, x + crop, y + crop)), mask.crop((x, y, x + crop, y + crop))
    if rng.random() < 0.5:
        img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    if not unlabeled:
        return _baseline_normalize(img), np.asarray(mask, np.int64)
    s1, s2 = _baseline_strong(img, rng, crop), _baseline_strong(img, rng, crop)
    ignore = np.where(np.asarray(mask) == 254, IGNORE_INDEX, 0)
    return _baseline_normalize(img), s1, s2, ignore


# ------------------------------------------------------------------------------------ measurement
def rate(fn, count: int) -> float:
    """Samples/s of `fn(i)` over `count` calls after one warm-up call."""
    fn(0)
    start = time.perf_counter()
    for i in range(1, count + 1):
        fn(i)
    return count / (time.perf_counter() - start)


def measure(folder: pathlib.Path, pairs: list, crop: int, count: int) -> dict:
    """Samples/s of our streams and of the baseline for one image set and crop."""
    (folder / "all.txt").write_text("\n".join(f"{a.name} {b.name}" for a, b in pairs))
    (folder / "labeled.txt").write_text(f"{pairs[0][0].name} {pairs[0][1].name}")
    (folder / "unlabeled.txt").write_text("\n".join(a.name for a, _ in pairs[1:]))
    base = {"name": "custom", "root": str(folder), "crop_size": crop, "num_classes": 16,
            "num_workers": 0, "num_threads": 1, "prefetch": 1}
    cfg = ml_collections.ConfigDict({**base, "labeled_list": str(folder / "all.txt")})
    ucfg = ml_collections.ConfigDict({**base, "labeled_list": str(folder / "labeled.txt"),
                                      "unlabeled_list": str(folder / "unlabeled.txt")})
    it = data.stream_iterator(cfg, data.StreamSpec("labeled", "labeled"), name="labeled", seed=0, global_batch=1)
    result = {"ours_labeled": rate(lambda i: next(it), count)}
    for name, views in (("ours_unlabeled_unimatch", ("strong", "strong2")),
                        ("ours_unlabeled_csl", ("strong", "tmp"))):
        spec = data.StreamSpec("unlabeled", "unlabeled", views=views)
        uit = data.stream_iterator(ucfg, spec, name="unlabeled", seed=0, global_batch=1)
        result[name] = rate(lambda i: next(uit), count)
    rng = np.random.default_rng(0)
    n = len(pairs)
    result["baseline_labeled"] = rate(lambda i: baseline_sample(pairs[i % n], rng, crop, False), count)
    result["baseline_unlabeled_unimatch"] = rate(
        lambda i: baseline_sample(pairs[i % n], rng, crop, True), count)
    return result


def stream_rows(count: int) -> list[dict]:
    """Samples/s of every stream and the baseline, per image kind and crop."""
    rows = []
    for kind in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = make_images(pathlib.Path(tmp), kind, 4)
            for crop in (321, 513, 801):
                rows.append({"images": kind, "crop": crop, **measure(pathlib.Path(tmp), pairs, crop, count)})
    return rows


def make_coco(raw: pathlib.Path, count: int, w: int = 640, h: int = 480) -> pathlib.Path:
    """A COCO-like raw folder for mode B: `count` JPEGs in train2017/ and one in val2017/, each with two
    overlapping 24-gon instances and a crowd region (uncompressed RLE); returns the val list file."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        images, annotations = [], []
        for n in range(1, (count if split == "train" else 1) + 1):
            image_id = n if split == "train" else 10 ** 6 + n
            path = raw / f"{split}2017" / f"{image_id:012d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(rng, w, h)).save(path, quality=90)
            images.append({"id": image_id, "height": h, "width": w})
            for k, (cx, cy, r, category) in enumerate(((0.4, 0.5, 0.3, 1), (0.6, 0.5, 0.25, 18))):
                angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
                polygon = np.stack([w * cx + h * r * np.cos(angles), h * cy + h * r * np.sin(angles)], 1)
                annotations.append({"id": 2 * image_id + k, "image_id": image_id, "category_id": category,
                                    "iscrowd": 0, "area": math.pi * (h * r) ** 2,
                                    "segmentation": [polygon.ravel().round(2).tolist()]})
            start = h * (w - w // 8)  # the last eighth of the columns (column-major runs)
            annotations.append({"id": 3 * 10 ** 7 + image_id, "image_id": image_id, "category_id": 3, "iscrowd": 1,
                                "area": h * (w // 8), "segmentation": {"counts": [start, h * w - start],
                                                                       "size": [h, w]}})
        path = raw / "annotations" / f"instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
    (raw / "val.txt").write_text(f"val2017/{10 ** 6 + 1:012d}.jpg")
    return raw / "val.txt"


def data_prep_rate(raw: str, val_list: str, out: str, workers: int) -> float:
    """Images/s of preparing `raw` (from `make_coco`) into `out` with masks from the instances, start to end."""
    builder = coco.Coco(data_dir=out, raw_dir=raw, num_workers=workers, from_instances=True, val_list=val_list,
                        required_train_ids=())
    start = time.perf_counter()
    common.prepare(builder)
    return sum(len(p) for p in builder.split_pairs.values()) / (time.perf_counter() - start)


def data_prep_rows(count: int, workers=(0, 2)) -> list[dict]:
    """`data_prep_rate` on `make_coco(count)` per worker count, each in a fresh process as `python -m data_prep`
    runs (spawned workers re-import the main module: this one would bring JAX along)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = pathlib.Path(tmp) / "raw"
        val_list = make_coco(raw, count)
        for n in workers:
            code = (f"from benchmarks import pipeline; "
                    f"print(pipeline.data_prep_rate({str(raw)!r}, {str(val_list)!r}, {tmp + f'/out{n}'!r}, {n}))")
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append({"workers": n, "images": count + 1, "images_per_s": float(proc.stdout.split()[-1])})
    return rows


def main(argv=None) -> dict:
    """Runs all measurements; prints JSON, then the tables; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 samples per measurement, data_prep on 8 images")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    count = 4 if args.quick else 40
    rows = stream_rows(count)
    prep = data_prep_rows(8 if args.quick else 64)
    report = {"unit": "samples/s per worker (1 process, 1 thread)", "samples_per_measurement": count,
              "results": rows, "data_prep": {"dataset": "coco --from-instances, 640x480 JPEG", "results": prep}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    keys = [k for k in rows[0] if k not in ("images", "crop")]
    print("\n" + " | ".join(["images", "crop", *keys]))
    for r in rows:
        print(" | ".join([r["images"], str(r["crop"]), *(f"{r[k]:.1f}" for k in keys)]))
    print(f"\ndata_prep ({report['data_prep']['dataset']}) | workers | images | images/s")
    for r in prep:
        print(f"data_prep | {r['workers']} | {r['images']} | {r['images_per_s']:.1f}")
    return report


if __name__ == "__main__":
    main()
