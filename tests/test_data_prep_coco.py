"""data_prep coco: the category map, mode B (masks from instances) under every --overlap/--crowd, mode A
(the authors' masks) with its statistics, bad inputs, --compare-to, the shipped and derived split lists."""
import hashlib
import io
import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from csl_jax.data import sources
from data_prep import coco, common, splits

mask_api = pytest.importorskip("pycocotools.mask")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, NumPy 2

# docs/datasets-coco-ade20k.md §2.1, typed as printed there.
SPEC_TABLE = """
| 1→1 2→2 3→3 4→4 5→5 6→6 7→7 8→8 9→9 10→10 |
| 11→11 13→12 14→13 15→14 16→15 17→16 18→17 19→18 20→19 21→20 |
| 22→21 23→22 24→23 25→24 27→25 28→26 31→27 32→28 33→29 34→30 |
| 35→31 36→32 37→33 38→34 39→35 40→36 41→37 42→38 43→39 44→40 |
| 46→41 47→42 48→43 49→44 50→45 51→46 52→47 53→48 54→49 55→50 |
| 56→51 57→52 58→53 59→54 60→55 61→56 62→57 63→58 64→59 65→60 |
| 67→61 70→62 72→63 73→64 74→65 75→66 76→67 77→68 78→69 79→70 |
| 80→71 81→72 82→73 84→74 85→75 86→76 87→77 88→78 89→79 90→80 |
"""


def test_category_map_and_names_are_the_spec_table():
    table = dict(tuple(map(int, cell.split("→"))) for cell in SPEC_TABLE.replace("|", " ").split())
    assert coco.TRAIN_IDS == table and len(table) == 80
    assert set(range(1, 91)) - set(table) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    names = coco.CLASS_NAMES
    assert len(names) == 81 and names[0] == "background" and names[1] == "person" and names[2] == "bicycle"
    assert (names[12], names[61], names[62], names[63], names[80]) == ("stop sign", "dining table", "toilet", "tv",
                                                                       "toothbrush")


# --- a tiny COCO: train 1 (10x12 RGB), 2 (6x8 grayscale), 3 (no annotation); val 4 (8x10) ------------------
def cid(n: int) -> str:
    return f"{n:012d}"


def rect(x0, y0, x1, y1):
    """Polygon of the axis-aligned rectangle with corners (x0, y0), (x1, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_pixels(shape, x0, y0, x1, y1):
    """The pixels pycocotools fills for `rect(x0, y0, x1, y1)`: columns x0..x1-1, rows y0..y1-1."""
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = True
    return out


def column_major_runs(binary):
    """Uncompressed COCO RLE counts of a 0/1 mask: run lengths in column-major order, starting with zeros."""
    flat, runs, value, n = binary.T.ravel(), [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    return runs + [n]


SHAPES = {1: (10, 12), 2: (6, 8), 3: (10, 10), 4: (8, 10)}
PERSON = rect(1, 1, 7, 6)  # class 1
DOG = rect(4, 3, 10, 9)  # category 18 -> 17; overlaps PERSON at columns 4..6, rows 3..5
BRUSH = [rect(0, 8, 2, 10), rect(10, 0, 12, 2)]  # category 90 -> 80, two parts
CROWD = np.zeros(SHAPES[1], bool)
CROWD[6:10, 8:12] = True  # category 3 (car), overlaps DOG at columns 8..9, rows 6..8
BOTTLE = rect(2, 1, 6, 5)  # category 44 -> 40, on the grayscale image
CHAIR = np.zeros(SHAPES[4], bool)
CHAIR[2:6, 3:8] = True  # category 62 -> 57, a compressed RLE


def region(name):
    """(H, W) bool pixels of one annotation, by hand (the test below checks pycocotools agrees)."""
    s = SHAPES[1]
    return {"person": rect_pixels(s, 1, 1, 7, 6), "dog": rect_pixels(s, 4, 3, 10, 9),
            "brush": rect_pixels(s, 0, 8, 2, 10) | rect_pixels(s, 10, 0, 12, 2), "crowd": CROWD,
            "bottle": rect_pixels(SHAPES[2], 2, 1, 6, 5), "chair": CHAIR}[name]


def write_jpeg(path, shape, mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, shape + ((3,) if mode == "RGB" else ()), np.uint8)
    Image.fromarray(data, mode).save(path, format="JPEG")


def fake_coco(raw, extra_annotation=None):
    """Writes the tiny COCO; returns (raw, val list file)."""
    for n, shape in SHAPES.items():
        write_jpeg(raw / ("val2017" if n == 4 else "train2017") / f"{cid(n)}.jpg", shape, "L" if n == 2 else "RGB", n)
    chair = mask_api.encode(np.asfortranarray(CHAIR.astype(np.uint8)))
    chair["counts"] = chair["counts"].decode()
    train_anns = [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 30.0, "segmentation": [PERSON]},
        {"id": 102, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 36.0, "segmentation": [DOG]},
        {"id": 201, "image_id": 2, "category_id": 44, "iscrowd": 0, "area": 16.0, "segmentation": [BOTTLE]},
        {"id": 103, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 8.0, "segmentation": BRUSH},
        {"id": 104, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 16.0,
         "segmentation": {"counts": column_major_runs(CROWD), "size": list(SHAPES[1])}},
    ] + ([extra_annotation] if extra_annotation else [])
    val_anns = [{"id": 401, "image_id": 4, "category_id": 62, "iscrowd": 0, "area": 20.0, "segmentation": chair}]
    for split, ids, anns in (("train", (1, 2, 3), train_anns), ("val", (4,), val_anns)):
        images = [{"id": n, "file_name": f"{cid(n)}.jpg", "height": SHAPES[n][0], "width": SHAPES[n][1]} for n in ids]
        path = raw / "annotations" / f"instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    (raw / "val.txt").write_text(f"val2017/{cid(4)}.jpg masks/{cid(4)}.png")
    return raw, raw / "val.txt"


def expected_labels(overlap, crowd):
    """{id: (H, W) uint8} composed here by hand: the painting order of each --overlap, then --crowd."""
    order = {"json": ["person", "dog", "brush", "crowd"], "area_desc": ["dog", "person", "crowd", "brush"]}[overlap]
    classes = {"person": 1, "dog": 17, "brush": 80, "crowd": 3}
    one = np.zeros(SHAPES[1], np.uint8)
    for name in order:
        if name != "crowd" or crowd == "class":
            one[region(name)] = classes[name]
    if crowd == "ignore":
        one[CROWD] = 255
    two = np.where(region("bottle"), 40, 0).astype(np.uint8)
    return {cid(1): one, cid(2): two, cid(3): np.zeros(SHAPES[3], np.uint8),
            cid(4): np.where(CHAIR, 57, 0).astype(np.uint8)}


def test_hand_computed_regions_are_what_pycocotools_rasterises():
    h, w = SHAPES[1]
    for name, polygons in (("person", [PERSON]), ("dog", [DOG]), ("brush", BRUSH)):
        decoded = mask_api.decode(mask_api.merge(mask_api.frPyObjects(polygons, h, w)))
        np.testing.assert_array_equal(decoded.astype(bool), region(name), err_msg=name)
    rle = mask_api.frPyObjects({"counts": column_major_runs(CROWD), "size": [h, w]}, h, w)
    np.testing.assert_array_equal(mask_api.decode(rle).astype(bool), CROWD)


def records(version_dir, split):
    src = tfds.builder_from_directory(str(version_dir)).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def png_values(data):
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def builder(raw, out, val_list, **kwargs):
    return coco.Coco(data_dir=out, raw_dir=raw, val_list=val_list, required_train_ids=(), **kwargs)


@pytest.mark.parametrize("overlap,crowd,workers", [("json", "class", 2), ("json", "ignore", 0), ("json", "skip", 0),
                                                   ("area_desc", "class", 0), ("area_desc", "ignore", 0)])
def test_mode_b_labels_under_each_overlap_and_crowd(tmp_path, overlap, crowd, workers):
    raw, val_list = fake_coco(tmp_path / "raw")
    vdir, status = common.prepare(builder(raw, tmp_path / "out", val_list, from_instances=True, overlap=overlap,
                                          crowd=crowd, num_workers=workers))
    assert status == "built"
    expected = expected_labels(overlap, crowd)
    train, val = records(vdir, "train"), records(vdir, "val")
    assert [r["id"].decode() for r in train] == [cid(1), cid(2), cid(3)] and val[0]["id"].decode() == cid(4)
    for r in train + val:
        i = r["id"].decode()
        np.testing.assert_array_equal(png_values(r["label"]), expected[i], err_msg=i)
        folder = "val2017" if i == cid(4) else "train2017"
        assert r["image"] == (raw / folder / f"{i}.jpg").read_bytes()  # the grayscale JPEG too, never re-encoded
    meta = tfds.builder_from_directory(str(vdir)).info.metadata
    assert meta["mask_source"] == {"mode": "instances", "overlap": overlap, "crowd": crowd}
    assert len(meta["class_names"]) == 81
    stats = meta["mask_stats"]["train"]
    assert stats["images"] == 3 and stats["pixels"] == 120 + 48 + 100
    assert stats["ignore_pixels"] == (16 if crowd == "ignore" else 0) and stats["images_without_foreground"] == 1
    assert common.read_fingerprint(vdir)["mask_source"] == meta["mask_source"]


def test_extra_unlabeled_images_are_a_split_without_labels(tmp_path):
    raw, val_list = fake_coco(tmp_path / "raw")
    write_jpeg(raw / "unlabeled2017" / f"{cid(9)}.jpg", (5, 7))
    vdir, _ = common.prepare(builder(raw, tmp_path / "out", val_list, from_instances=True))
    (rec,) = records(vdir, "unlabeled_extra")
    assert rec["id"].decode() == cid(9) and rec["label"] == b""


def test_fingerprint_and_metadata_record_the_crowd_choice(tmp_path):
    raw, val_list = fake_coco(tmp_path / "raw")
    out = tmp_path / "out"
    first = builder(raw, out, val_list, from_instances=True, num_workers=0)
    common.prepare(first)
    other = builder(raw, out, val_list, from_instances=True, crowd="ignore", num_workers=0)
    assert other.fingerprint()["sha256"] != first.fingerprint()["sha256"]
    assert "annotations/instances_train2017.json" in other.fingerprint()["files"]
    with pytest.raises(common.DataPrepError, match=r'mask_source \{"crowd": "class", "mode": "instances", '
                                                   r'"overlap": "json"\}, not \{"crowd": "ignore"'):
        common.prepare(other)
    assert common.prepare(other, rebuild=True).status == "rebuilt"


def test_unknown_category_and_size_mismatch_are_named(tmp_path):
    bad = {"id": 105, "image_id": 3, "category_id": 12, "iscrowd": 0, "area": 4.0, "segmentation": [rect(0, 0, 2, 2)]}
    raw, val_list = fake_coco(tmp_path / "raw", extra_annotation=bad)
    write_jpeg(raw / "train2017" / f"{cid(2)}.jpg", (7, 8), "L")  # the JSON says 6x8
    with pytest.raises(common.DataPrepError) as err:
        common.prepare(builder(raw, tmp_path / "out", val_list, from_instances=True))
    lines = str(err.value).splitlines()
    assert lines[0] == "coco: 2 invalid source file(s); nothing was written:"
    assert lines[1].endswith(f"instances_train2017.json: train2017/{cid(2)}.jpg is 8x6 (WxH) in the JSON, the JPEG "
                             "is 8x7")
    assert lines[2].endswith(f"instances_train2017.json: annotation 105 of train2017/{cid(3)}.jpg has category_id "
                             "12, not one of the 80 COCO categories")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def save_mask(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(label, np.uint8), "L").save(path)


def authors_masks(raw, labels):
    for i, label in labels.items():
        save_mask(raw / "masks" / f"{i}.png", label)


def test_mode_a_takes_the_masks_as_they_are_and_reports_statistics(tmp_path, capsys):
    raw, val_list = fake_coco(tmp_path / "raw")
    labels = expected_labels("json", "ignore")  # 16 pixels 255 in image 1; image 3 all background
    authors_masks(raw, labels)
    vdir, _ = common.prepare(builder(raw, tmp_path / "out", val_list, num_workers=0))
    for r in records(vdir, "train") + records(vdir, "val"):
        np.testing.assert_array_equal(png_values(r["label"]), labels[r["id"].decode()])
    meta = tfds.builder_from_directory(str(vdir)).info.metadata
    assert meta["mask_source"] == {"mode": "authors_masks"}
    train = meta["mask_stats"]["train"]
    assert (train["ignore_pixels"], train["pixels"], train["images_without_foreground"]) == (16, 268, 1)
    assert train["ignore_fraction"] == pytest.approx(16 / 268)
    assert meta["mask_stats"]["val"]["images_without_foreground"] == 0
    out = capsys.readouterr().out
    assert ("coco masks (mode authors_masks): train 5.9701% pixels 255, 1 of 3 images without a foreground pixel; "
            "val 0.0000% pixels 255, 0 of 1 images without a foreground pixel") in out
    assert f"{cid(3)}.png" in str(common.read_fingerprint(vdir)["files"])


def test_mode_a_bad_files_are_all_named_and_nothing_is_written(tmp_path):
    raw, val_list = fake_coco(tmp_path / "raw")
    labels = expected_labels("json", "class")
    labels[cid(2)] = np.zeros((5, 8))  # wrong size
    labels[cid(4)][0, 0] = 81  # not a class
    authors_masks(raw, labels)
    (raw / "masks" / f"{cid(3)}.png").write_bytes(b"not a png")
    jpeg = raw / "train2017" / f"{cid(1)}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:40])
    (raw / "val.txt").write_text(f"val2017/{cid(4)}.jpg\nval2017/{cid(5)}.jpg")  # 5 does not exist
    with pytest.raises(common.DataPrepError) as err:
        common.prepare(builder(raw, tmp_path / "out", val_list))
    lines = str(err.value).splitlines()
    assert lines[0] == "coco: 5 invalid source file(s); nothing was written:"
    assert f"train2017/{cid(1)}.jpg: image does not decode" in lines[1]
    assert f"masks/{cid(2)}.png: mask size 8x5 (WxH) differs from image" in lines[2]
    assert f"masks/{cid(3)}.png: mask does not decode" in lines[3]
    assert f"masks/{cid(4)}.png: label values [81] are not class indices" in lines[4]
    assert f"val2017/{cid(5)}.jpg: cannot read image (No such file or directory)" in lines[5]
    assert not any((tmp_path / "out").iterdir())


def test_mode_a_needs_masks_and_the_labeled_ids(tmp_path):
    raw, val_list = fake_coco(tmp_path / "raw")
    with pytest.raises(common.DataPrepError, match="has no masks/ folder .* pass --from-instances"):
        common.prepare(builder(raw, tmp_path / "out", val_list))
    partial = coco.Coco(data_dir=tmp_path / "out", raw_dir=raw, from_instances=True)  # the shipped lists' ids
    with pytest.raises(common.DataPrepError, match=r"train2017 lacks 6808 images of the shipped labeled lists, "
                                                   r"e\.g\. 000000000009, "):
        common.prepare(partial)


def test_compare_to_reference_masks(tmp_path, capsys, monkeypatch):
    raw, val_list = fake_coco(tmp_path / "raw")
    reference = tmp_path / "reference"
    for i, label in expected_labels("json", "ignore").items():  # the reference: crowd regions 255
        save_mask(reference / f"{i}.png", label)
    from data_prep.__main__ import main

    args = ["coco", "--raw", raw, "--out", tmp_path / "out", "--from-instances", "--compare-to", reference,
            "--num-workers", "0"]
    generated = builder(raw, tmp_path / "out", val_list, from_instances=True, num_workers=0)
    report = coco.compare(generated, reference, tmp_path / "out" / "report.json")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    pixels = 120 + 48 + 100 + 80
    assert (report["images"], report["pixels"]) == (4, pixels)
    assert report["agreement"] == pytest.approx((pixels - 16) / pixels)  # only the crowd region differs
    assert report["per_image"] == {cid(1): pytest.approx(104 / 120), cid(2): 1.0, cid(3): 1.0, cid(4): 1.0}
    confusion = np.array(report["confusion"])
    assert confusion.shape == (81, 81) and confusion.sum() == pixels - 16 and np.trace(confusion) == pixels - 16
    # json order: the dog covers the person's 9 overlap pixels; the crowd's 6 on the dog are 255 in the reference
    assert (confusion[1, 1], confusion[17, 17]) == (region("person").sum() - 9, region("dog").sum() - 6)
    assert report["overlap"] == {"pixels": 15, "disagreeing": 6, "disagreeing_fraction": pytest.approx(6 / 15),
                                 "share_of_all_disagreeing": pytest.approx(6 / 16)}
    assert report["crowd"] == {"pixels": 16, "disagreeing": 16, "disagreeing_fraction": 1.0,
                               "share_of_all_disagreeing": 1.0}
    assert report["ignore"] == {"generated_pixels": 0, "reference_pixels": 16, "both": 0,
                                "generated_where_reference_255": {"3": 16}, "reference_where_generated_255": {},
                                "reference_255_in_crowd_regions": 16}
    assert report["generated"] == {"mode": "instances", "overlap": "json", "crowd": "class"}

    # the CLI reads the shipped val list and labeled ids: stand-ins for the tiny COCO
    monkeypatch.setattr(coco, "labeled_ids", lambda: set())
    monkeypatch.setattr(splits, "shipped_list", lambda rel: [cid(4)] if rel == "coco/val.txt" else [])
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert f"coco compare (mode instances, overlap json, crowd class vs {reference}): 4 images, pixel agreement " \
           f"{(pixels - 16) / pixels:.4%}" in out
    assert f"report: {tmp_path}/out/coco_compare.json" in out
    assert not (tmp_path / "out" / "coco").exists()  # no dataset


def test_pycocotools_is_imported_only_for_mode_b(monkeypatch):
    code = "import sys, data_prep.coco; assert 'pycocotools' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=splits.SPLITS_DIR.parents[1])
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if not installed
    with pytest.raises(common.DataPrepError, match=r"pip install 'csl_jax\[data\]'"):
        coco._mask_api()


# --- split lists -------------------------------------------------------------------------------------------
def test_shipped_coco_lists():
    sizes = {"1_512": 232, "1_256": 463, "1_128": 925, "1_64": 1849, "1_32": 3697}
    assert splits.shipped_splits("coco") == sorted(sizes)
    labeled = {s: splits.shipped_list(f"coco/{s}/labeled.txt") for s in sizes}  # sha256 checked
    assert {s: len(ids) for s, ids in labeled.items()} == sizes
    assert labeled["1_512"][:3] == ["000000177254", "000000210467", "000000468760"]
    assert labeled["1_512"][-2:] == ["000000525636", "000000143516"]
    assert not set(labeled["1_512"]) <= set(labeled["1_256"])  # not nested
    val = splits.shipped_list("coco/val.txt")
    assert len(val) == 5000 and val == sorted(val) and not set(val) & set().union(*map(set, labeled.values()))
    assert len(splits.unlabeled_ids("camvid", "1_8", [])) == 321  # shipped lists: read, whatever the pool
    derived = splits._derived()
    assert {s: derived[f"coco/{s}/unlabeled.txt"]["count"] for s in sizes} == {
        s: 118287 - n for s, n in sizes.items()} == {"1_512": 118055, "1_256": 117824, "1_128": 117362,
                                                     "1_64": 116438, "1_32": 114590}


@pytest.fixture
def fabricated_split(tmp_path, monkeypatch):
    """A `coco/tiny` split: labeled ids p03, p07, p11 of a pool p00..p19, derived unlabeled count 17."""
    folder = tmp_path / "splits"
    (folder / "coco" / "tiny").mkdir(parents=True)
    (folder / "coco" / "tiny" / "labeled.txt").write_text("train2017/p07.jpg\ntrain2017/p03.jpg\ntrain2017/p11.jpg")
    manifest = {"format": 1, "sha256": {**splits._manifest(), "coco/tiny/labeled.txt": hashlib.sha256(
        (folder / "coco/tiny/labeled.txt").read_bytes()).hexdigest()},
        "derived": {"coco/tiny/unlabeled.txt": {"rule": "train pool minus labeled, record order", "count": 17}}}
    monkeypatch.setattr(splits, "SPLITS_DIR", folder)
    monkeypatch.setattr(splits, "_manifest_file", lambda: manifest)
    return [f"p{k:02d}" for k in (19, 0, 5, 3, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)]


def test_derived_unlabeled_list_is_the_pool_minus_labeled_in_record_order(fabricated_split):
    pool = fabricated_split
    unlabeled = splits.unlabeled_ids("coco", "tiny", pool)
    assert unlabeled == [i for i in pool if i not in ("p03", "p07", "p11")] and len(unlabeled) == 17
    assert "tiny" in splits.shipped_splits("coco")
    with pytest.raises(ValueError, match=r"coco split tiny: the prepared train pool \(19 ids\) minus the 3 labeled "
                                         r"ids leaves 16 unlabeled ids, expected 17"):
        splits.unlabeled_ids("coco", "tiny", pool[1:])


def test_split_ids_of_a_prepared_coco_with_a_derived_split(tmp_path, monkeypatch):
    raw, val_list = fake_coco(tmp_path / "raw")
    common.prepare(builder(raw, tmp_path / "out", val_list, from_instances=True, num_workers=0))
    folder = tmp_path / "splits"
    (folder / "coco" / "tiny").mkdir(parents=True)
    (folder / "coco" / "tiny" / "labeled.txt").write_text(f"train2017/{cid(2)}.jpg masks/{cid(2)}.png")
    manifest = {"sha256": {"coco/tiny/labeled.txt": hashlib.sha256(
        (folder / "coco/tiny/labeled.txt").read_bytes()).hexdigest()},
        "derived": {"coco/tiny/unlabeled.txt": {"rule": "train pool minus labeled, record order", "count": 2}}}
    monkeypatch.setattr(splits, "SPLITS_DIR", folder)
    monkeypatch.setattr(splits, "_manifest_file", lambda: manifest)
    cfg = ml_collections.ConfigDict({"name": "coco", "root": str(tmp_path / "out"), "split": "tiny"})
    assert sources.split_ids(cfg) == ([cid(2)], [cid(1), cid(3)])
    assert sources.dataset_info(cfg).num_classes == 81
    manifest["derived"]["coco/tiny/unlabeled.txt"]["count"] = 118055
    with pytest.raises(ValueError, match="leaves 2 unlabeled ids, expected 118055"):
        sources.split_ids(cfg)
