"""data_prep: converters on tiny fakes in the official layouts, validation errors, split lists, CamVid."""
import hashlib
import io
import logging
import os
import pathlib
import shutil
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from csl_jax.data import pipeline, sources
from data_prep import camvid, cityscapes, common, pascal, splits, synthetic

# VOC colour map (bit-interleaved): index 1 -> (128, 0, 0) whose luminance is 38, not 1.
VOC_PALETTE = []
for _i in range(256):
    _r = _g = _b = 0
    _c = _i
    for _j in range(8):
        _r |= ((_c >> 0) & 1) << (7 - _j)
        _g |= ((_c >> 1) & 1) << (7 - _j)
        _b |= ((_c >> 2) & 1) << (7 - _j)
        _c >>= 3
    VOC_PALETTE += [_r, _g, _b]


def _save_rgb(path, rng, h, w, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path, format=fmt)


def _save_index(path, label, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.ascontiguousarray(label, np.uint8)
    im = Image.frombytes("P" if palette else "L", label.shape[::-1], label.tobytes())
    if palette:
        im.putpalette(VOC_PALETTE)
    im.save(path)


def _records(version_dir, split):
    src = tfds.builder_from_directory(str(version_dir)).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def _png_values(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _fake_pascal(root, rng):
    ids = ["2007_000001", "2007_000002", "2008_000003"]
    labels = {}
    for k, i in enumerate(ids):
        _save_rgb(root / "JPEGImages" / f"{i}.jpg", rng, 20, 30, "JPEG")
        lab = rng.integers(0, 21, (20, 30))
        lab[0, :5] = 255
        labels[i] = lab
        if k < 2:
            _save_index(root / "SegmentationClass" / f"{i}.png", lab, palette=True)
        else:
            _save_index(root / "SegmentationClassAug" / f"{i}.png", lab)
    (root / "train.txt").write_text(f"JPEGImages/{ids[0]}.jpg SegmentationClass/{ids[0]}.png\n"
                                    f"JPEGImages/{ids[2]}.jpg SegmentationClass/{ids[2]}.png")
    (root / "val.txt").write_text(f"\nJPEGImages/{ids[1]}.jpg SegmentationClass/{ids[1]}.png\n\n")
    return labels


def test_pascal_palette_indices_and_original_bytes(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    labels = _fake_pascal(raw, rng)
    # The trap: reading the palette PNG as luminance gives other values.
    with Image.open(raw / "SegmentationClass" / "2007_000001.png") as im:
        assert not np.array_equal(np.asarray(im.convert("L")), labels["2007_000001"])
    vdir, _ = common.prepare(pascal.Pascal(data_dir=tmp_path / "out", raw_dir=raw,
                                        train_list=raw / "train.txt", val_list=raw / "val.txt"))
    train = _records(vdir, "train")
    assert [r["id"].decode() for r in train] == ["2007_000001", "2008_000003"]  # list order
    for r in train + _records(vdir, "val"):
        i = r["id"].decode()
        np.testing.assert_array_equal(_png_values(r["label"]), labels[i])
        assert r["image"] == (raw / "JPEGImages" / f"{i}.jpg").read_bytes()  # never re-encoded
        assert (r["height"], r["width"]) == (20, 30)
    meta = tfds.builder_from_directory(str(vdir)).info.metadata
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow
    assert meta["ids"] == {"train": ["2007_000001", "2008_000003"], "val": ["2007_000002"]}
    assert len(meta["class_names"]) == 21


# labelId -> trainId, typed from docs/protocol.md §1 (independent of data_prep.cityscapes).
PROTOCOL_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                      24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_train_id_table_and_train_ids_files(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    values = np.array(list(range(34)) + [255] * 6).reshape(5, 8)  # every labelId, plus 255
    for split, city in (("train", "jena"), ("val", "lindau")):
        _save_rgb(raw / "leftImg8bit" / split / city / f"{city}_000001_000019_leftImg8bit.png", rng, 5, 8, "PNG")
        _save_index(raw / "gtFine" / split / city / f"{city}_000001_000019_gtFine_labelIds.png", values)
    train_ids = rng.choice(list(range(19)) + [255], (5, 8))
    _save_rgb(raw / "leftImg8bit/train/aachen/aachen_000002_000019_leftImg8bit.png", rng, 5, 8, "PNG")
    _save_index(raw / "gtFine/train/aachen/aachen_000002_000019_gtFine_labelTrainIds.png", train_ids)
    vdir, _ = common.prepare(cityscapes.Cityscapes(data_dir=tmp_path / "out", raw_dir=raw))
    expected = np.vectorize(lambda v: PROTOCOL_TRAIN_IDS.get(int(v), 255))(values)
    recs = {r["id"].decode(): r for r in _records(vdir, "train")}
    assert sorted(recs) == ["aachen_000002_000019", "jena_000001_000019"]
    np.testing.assert_array_equal(_png_values(recs["jena_000001_000019"]["label"]), expected)
    np.testing.assert_array_equal(_png_values(recs["aachen_000002_000019"]["label"]), train_ids)
    (val,) = _records(vdir, "val")
    np.testing.assert_array_equal(_png_values(val["label"]), expected)


def test_bad_inputs_are_all_reported_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    ok, missing, corrupt, size, label37 = "a_ok", "b_missing", "c_corrupt", "d_size", "e_37"
    for i in (ok, missing, corrupt, size, label37):
        _save_rgb(raw / "JPEGImages" / f"{i}.jpg", rng, 16, 16, "JPEG")
    for i in (ok, corrupt, label37):
        _save_index(raw / "SegmentationClass" / f"{i}.png", np.zeros((16, 16)), palette=True)
    _save_index(raw / "SegmentationClass" / f"{size}.png", np.zeros((16, 12)), palette=True)
    bad = np.zeros((16, 16))
    bad[3, 3] = 37
    _save_index(raw / "SegmentationClass" / f"{label37}.png", bad, palette=True)
    data = (raw / "JPEGImages" / f"{corrupt}.jpg").read_bytes()
    (raw / "JPEGImages" / f"{corrupt}.jpg").write_bytes(data[: len(data) // 2])
    (raw / "train.txt").write_text("\n".join([ok, missing, corrupt, size, label37]))
    (raw / "val.txt").write_text(ok)
    with pytest.raises(common.DataPrepError) as err:
        common.prepare(pascal.Pascal(data_dir=tmp_path / "out", raw_dir=raw,
                                     train_list=raw / "train.txt", val_list=raw / "val.txt"))
    msg = str(err.value)
    assert "4 invalid" in msg
    assert f"SegmentationClass/{missing}.png: mask missing" in msg
    assert f"JPEGImages/{corrupt}.jpg: image does not decode" in msg
    assert f"SegmentationClass/{size}.png: mask size 12x16" in msg
    assert f"SegmentationClass/{label37}.png: label values [37]" in msg
    assert not any((tmp_path / "out").iterdir())  # nothing partial, not even empty folders


def test_camvid_void_becomes_ignore_and_rgb_mask_is_rejected(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    lab = rng.integers(0, 12, (6, 7))
    for split in ("train", "val"):
        _save_rgb(raw / split / "0001TP_000001.png", rng, 6, 7, "PNG")
        _save_index(raw / f"{split}annot" / "0001TP_000001.png", lab)
        (raw / f"{split}.txt").write_text(f"/SegNet/CamVid/{split}/0001TP_000001.png "
                                          f"/SegNet/CamVid/{split}annot/0001TP_000001.png\n")
    lists = {s: raw / f"{s}.txt" for s in ("train", "val")}
    vdir, _ = common.prepare(camvid.Camvid(data_dir=tmp_path / "out", raw_dir=raw, lists=lists))
    (rec,) = _records(vdir, "train")
    np.testing.assert_array_equal(_png_values(rec["label"]), np.where(lab == 11, 255, lab))
    _save_rgb(raw / "valannot" / "0001TP_000001.png", rng, 6, 7, "PNG")  # an RGB "mask"
    with pytest.raises(common.DataPrepError, match=r"valannot/0001TP_000001.png: mask does not decode "
                                                   r"\(mode RGB"):
        common.prepare(camvid.Camvid(data_dir=tmp_path / "out2", raw_dir=raw, lists=lists))


def test_line_ids_of_every_list_format():
    assert splits.line_id("JPEGImages/2007_000733.jpg SegmentationClass/2007_000733.png") == "2007_000733"
    assert splits.line_id("leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png "
                          "gtFine/train/jena/jena_000078_000019_gtFine_labelTrainIds.png") == "jena_000078_000019"
    assert splits.line_id("/SegNet/CamVid/train/0001TP_006690.png /x/y.png") == "0001TP_006690"
    assert splits.line_id("2007_000733") == "2007_000733"


@pytest.mark.parametrize("family,pool,sizes", [
    ("pascal", "pascal/train_aug.txt", {"92": 92, "1464": 1464, "1_16": 662, "u2pl_1_4": 2646}),
    ("camvid", "camvid/train.txt", {"1_16": 23, "1_8": 46, "1_4": 92, "1_2": 184}),
    ("cityscapes", None, {"1_30": 100, "1_16": 186, "1_2": 1488}),
    ("cityscapes_u2pl", None, {"186": 186, "1488": 1488}),
])
def test_shipped_splits_partition_the_pool(family, pool, sizes):
    total = {"pascal": 10582, "camvid": 367}.get(family, 2975)
    pool_ids = set(splits.shipped_list(pool)) if pool else None
    for name, n in sizes.items():
        lab = splits.shipped_list(f"{family}/{name}/labeled.txt")
        unl = splits.shipped_list(f"{family}/{name}/unlabeled.txt")
        assert len(lab) == n and len(lab) + len(unl) == total
        assert not set(lab) & set(unl)
        if pool_ids is not None:
            assert set(lab) | set(unl) == pool_ids


def test_manifest_detects_a_modified_list(tmp_path, monkeypatch):
    copy = tmp_path / "splits"
    shutil.copytree(splits.SPLITS_DIR, copy)
    path = copy / "camvid" / "1_8" / "labeled.txt"
    path.write_text(path.read_text().replace("0001TP", "0002TP", 1))
    monkeypatch.setattr(splits, "SPLITS_DIR", copy)
    with pytest.raises(ValueError, match="checksum mismatch .*camvid/1_8/labeled.txt"):
        splits.shipped_list("camvid/1_8/labeled.txt")
    assert len(splits.shipped_list("camvid/1_4/labeled.txt")) == 92  # unmodified files still load
    digest = hashlib.sha256((splits.SPLITS_DIR / "camvid/val.txt").read_bytes()).hexdigest()
    assert splits._manifest()["camvid/val.txt"] == digest


def test_synthetic_prepare_is_idempotent_and_labels_are_exact(tmp_path):
    root = synthetic.prepare(tmp_path, num_train=6, num_val=2, image_size=(40, 48), seed=5)
    info_file = root / "synthetic" / "1.0.0" / "dataset_info.json"
    mtime = info_file.stat().st_mtime_ns
    assert synthetic.prepare(tmp_path, num_train=6, num_val=2, image_size=(40, 48), seed=5) == root
    assert info_file.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="parameters"):
        synthetic.prepare(tmp_path, num_train=7, num_val=2, image_size=(40, 48), seed=5)
    recs = _records(root / "synthetic" / "1.0.0", "val")
    rng = np.random.default_rng([5, 1, 1])  # val image 1, generated independently here
    h, w = (int(v) for v in rng.integers(40, 49, 2))
    image, label = synthetic.render(rng, h, w)
    with Image.open(io.BytesIO(recs[1]["image"])) as im:
        np.testing.assert_array_equal(np.asarray(im), image)
    np.testing.assert_array_equal(_png_values(recs[1]["label"]), label)
    assert set(np.unique(label)) <= set(range(5)) | {255} and len(np.unique(label)) >= 3


@pytest.fixture(scope="module")
def camvid_prepared(tmp_path_factory):
    raw = os.environ.get("CSL_CAMVID_DIR")
    if not raw:
        pytest.skip("CSL_CAMVID_DIR is not set (point it at the SegNet CamVid folder to run this test)")
    out = tmp_path_factory.mktemp("camvid")
    return pathlib.Path(raw), common.prepare(camvid.Camvid(data_dir=out, raw_dir=raw, num_workers=2)).version_dir


def test_camvid_real_counts_and_classes(camvid_prepared):
    raw, vdir = camvid_prepared
    info = tfds.builder_from_directory(str(vdir)).info
    assert info.splits["train"].num_examples == 367 and info.splits["val"].num_examples == 101
    assert len(info.metadata["class_names"]) == 11
    src = tfds.builder_from_directory(str(vdir)).as_data_source(
        "val", decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    seen = set()
    for i in range(0, 101, 10):
        r = src[i]
        name = r["id"].decode() + ".png"
        assert r["image"] == (raw / "val" / name).read_bytes()
        raw_label = np.asarray(Image.open(raw / "valannot" / name))
        stored = _png_values(r["label"])
        np.testing.assert_array_equal(stored, np.where(raw_label == 11, 255, raw_label))
        seen |= set(np.unique(stored).tolist())
    assert seen <= set(range(11)) | {255} and len(seen) >= 8


def test_camvid_real_split_selection(camvid_prepared):
    _, vdir = camvid_prepared
    cfg = ml_collections.ConfigDict({"name": "camvid", "root": str(vdir.parent.parent), "split": "1_8"})
    labeled, unlabeled = sources.split_ids(cfg)
    assert (len(labeled), len(unlabeled)) == (46, 321)
    semi = pipeline.StreamSpec(source="labeled", batch="labeled", epoch_of="unlabeled")
    assert pipeline.epoch_length(cfg, semi, 8) == 321 // 8
    assert pipeline.epoch_length(cfg, pipeline.StreamSpec(source="labeled", batch="labeled"), 8) == 46 // 8
    assert len(pipeline.eval_dataset(cfg)) == 101


# --- reruns: fingerprint of the raw inputs, --rebuild ------------------------------------------------


def _fake_cityscapes(raw, rng, cities=("jena", "ulm")):
    for split in ("train", "val"):
        for city in cities:
            _save_rgb(raw / "leftImg8bit" / split / city / f"{city}_000001_000019_leftImg8bit.png", rng, 5, 8, "PNG")
            _save_index(raw / "gtFine" / split / city / f"{city}_000001_000019_gtFine_labelTrainIds.png",
                        rng.integers(0, 19, (5, 8)))


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of `python -m data_prep ARGV`."""
    from data_prep.__main__ import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_rerun_checks_the_fingerprint_of_the_raw_inputs(tmp_path, capsys):
    rng = np.random.default_rng(4)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _fake_cityscapes(raw, rng)
    args = ("cityscapes", "--out", out, "--num-workers", 0)
    assert _run(capsys, *args, "--raw", raw)[:2] == (0, f"prepared cityscapes in {out}/cityscapes/1.0.0\n")
    vdir = out / "cityscapes" / "1.0.0"
    info_mtime = (vdir / "dataset_info.json").stat().st_mtime_ns
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes"]  # no staging or downloads folder left
    fingerprint = common.read_fingerprint(vdir)
    assert len(fingerprint["files"]) == 8 and fingerprint["splits"]["train"]["count"] == 2

    status, stdout, _ = _run(capsys, *args, "--raw", raw)
    assert (status, stdout) == (0, f"cityscapes already prepared (fingerprint matches) in {vdir}\n")
    status, stdout, stderr = _run(capsys, *args, "--raw", tmp_path / "missing")  # an error, also when prepared
    assert (status, stdout) == (1, "") and f"--raw {tmp_path}/missing: not a directory" in stderr
    (tmp_path / "empty").mkdir()
    status, _, stderr = _run(capsys, *args, "--raw", tmp_path / "empty")
    assert status == 1 and "no images matching" in stderr

    # the raw data changed: one mask rewritten, one city added, one image removed
    changed = raw / "gtFine/train/jena/jena_000001_000019_gtFine_labelTrainIds.png"
    new_label = np.full((5, 8), 3)
    _save_index(changed, new_label)
    os.utime(changed, ns=(1, 1))  # also when the size happens to be the same
    _fake_cityscapes(raw, rng, cities=("bonn",))
    (raw / "leftImg8bit/val/ulm/ulm_000001_000019_leftImg8bit.png").unlink()
    (raw / "gtFine/val/ulm/ulm_000001_000019_gtFine_labelTrainIds.png").unlink()
    status, stdout, stderr = _run(capsys, *args, "--raw", raw)
    assert status == 1 and stdout == ""
    assert f"{vdir} holds a cityscapes dataset with split train of other ids (2, now 3); " in stderr
    assert "4 file(s) added since: gtFine/train/bonn/bonn_000001_000019_gtFine_labelTrainIds.png" in stderr
    assert "2 file(s) removed since: gtFine/val/ulm/ulm_000001_000019_gtFine_labelTrainIds.png" in stderr
    assert ("1 file(s) changed since (size or modification time): gtFine/train/jena/jena_000001_000019_gtFine_"
            "labelTrainIds.png") in stderr
    assert "prepared from other inputs" in stderr and "--rebuild" in stderr
    assert (vdir / "dataset_info.json").stat().st_mtime_ns == info_mtime  # the old data is untouched

    # --rebuild with a corrupt file fails and keeps the old dataset whole
    bad = raw / "leftImg8bit/train/bonn/bonn_000001_000019_leftImg8bit.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:20])
    status, _, stderr = _run(capsys, *args, "--raw", raw, "--rebuild")
    assert status == 1 and "bonn_000001_000019_leftImg8bit.png: image does not decode" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes"]
    assert common.read_fingerprint(vdir) == fingerprint and len(_records(vdir, "train")) == 2

    bad.write_bytes(good_bytes)
    status, stdout, _ = _run(capsys, *args, "--raw", raw, "--rebuild")
    assert (status, stdout) == (0, f"rebuilt cityscapes in {vdir}\n")
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes"]
    assert sorted(p.name for p in (out / "cityscapes").iterdir()) == ["1.0.0"]
    recs = {r["id"].decode(): r for r in _records(vdir, "train")}
    assert sorted(recs) == ["bonn_000001_000019", "jena_000001_000019", "ulm_000001_000019"]
    np.testing.assert_array_equal(_png_values(recs["jena_000001_000019"]["label"]), new_label)
    assert _run(capsys, *args, "--raw", raw)[:2] == (0, f"cityscapes already prepared (fingerprint matches) in "
                                                        f"{vdir}\n")


def test_rerun_without_a_stored_fingerprint(tmp_path, capsys):
    rng = np.random.default_rng(5)
    raw, out = tmp_path / "raw", tmp_path / "out"
    _fake_cityscapes(raw, rng)
    args = ("cityscapes", "--out", out, "--raw", raw, "--num-workers", 0)
    assert _run(capsys, *args)[0] == 0
    (out / "cityscapes/1.0.0" / common.FINGERPRINT_FILE).unlink()  # as prepared by an older data_prep
    status, _, stderr = _run(capsys, *args)
    assert status == 1 and "without a fingerprint of its inputs" in stderr and "--rebuild" in stderr
    assert _run(capsys, *args, "--rebuild")[:2] == (0, f"rebuilt cityscapes in {out}/cityscapes/1.0.0\n")
    # synthetic data of that age is checked against the parameters in its metadata
    syn = dict(num_train=3, num_val=1, image_size=(20, 24), seed=1)
    synthetic.prepare(tmp_path / "syn", **syn)
    (tmp_path / "syn/synthetic/1.0.0" / common.FINGERPRINT_FILE).unlink()
    assert synthetic.prepare(tmp_path / "syn", **syn) == tmp_path / "syn"
    with pytest.raises(common.DataPrepError, match=r'synthetic dataset with parameters \{.*"num_train": 3.*\}, '
                                                   r'not \{.*"num_train": 4'):
        synthetic.prepare(tmp_path / "syn", **{**syn, "num_train": 4})


def test_tfds_boilerplate_is_quiet(tmp_path, capsys, caplog):
    from absl import logging as absl_logging

    caplog.set_level(logging.INFO)
    synthetic.prepare(tmp_path, num_train=2, num_val=1, image_size=(16, 16), seed=0)
    cfg = ml_collections.ConfigDict({"name": "synthetic", "root": str(tmp_path), "split": "1_2"})
    sources.dataset_info(cfg)
    sources.train_sources(cfg)
    assert len(sources.eval_source(cfg)) == 1
    absl_logging.info("our own message")
    absl_logging.warning("our own warning")
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    for boilerplate in ("Downloading and preparing", "Unknown size", "Load dataset info", "Generating dataset",
                        "Subsequent calls will reuse"):
        assert boilerplate not in text
    assert "our own message" in caplog.text and "our own warning" in caplog.text


def test_unprepared_root_says_how_to_prepare_it_into_a_new_folder(tmp_path):
    """The hint names the command and a new output folder (never the raw folder the user may have given)."""
    cfg = ml_collections.ConfigDict({"name": "camvid", "root": str(tmp_path / "raw"), "split": "1_8"})
    with pytest.raises(FileNotFoundError) as error:
        sources.version_dir(cfg)
    assert str(error.value) == (
        f"no prepared camvid data at {tmp_path}/raw/camvid/1.0.0 (config.data.root='{tmp_path}/raw'); prepare it "
        "once with `python -m data_prep camvid --raw <the downloaded camvid folder> --out <a new folder>` and pass "
        "that new folder as config.data.root")


# --- progress of long conversions, worker processes -----------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _run_progress(stream, total, seconds_per_image, every=1):
    now = [0.0]
    progress = common.Progress("coco train", total, stream, clock=lambda: now[0])
    for done in range(every, total + 1, every):
        now[0] = done * seconds_per_image
        progress.update(done)
    progress.close()
    return stream.getvalue()


def test_progress_in_a_log_every_tenth_or_30_s():
    lines = _run_progress(_Stream(False), 100, 0.05).splitlines()  # 20 images/s, nothing in the first second
    assert lines[0] == "coco train: 20/100 images, 20.0 images/s, ETA 0:00:04"
    assert [ln.split()[2] for ln in lines[:-1]] == [f"{k}0/100" for k in range(2, 10)]
    assert lines[-1] == "coco train: 100/100 images in 0:00:05, 20.0 images/s"
    slow = _run_progress(_Stream(False), 100_000, 0.01, every=100).splitlines()  # 10 % takes 100 s
    assert [ln.split()[2] for ln in slow[:5]] == ["3000/100000", "6000/100000", "9000/100000", "10000/100000",
                                                  "13000/100000"]
    assert slow[0].endswith("ETA 0:16:10") and len(slow) == 4 * 9 + 3 + 1  # per 100 s: 30, 60, 90 s and the tenth


def test_progress_on_a_terminal_rewrites_one_line():
    text = _run_progress(_Stream(True), 100, 1 / 16)  # 16 images/s: a line per 4 images (0.25 s), then the end
    updates = text.split("\r")[1:]
    assert len(updates) == 26 and text.endswith("\x1b[K\n") and text.count("\n") == 1
    assert updates[0] == "coco train: 4/100 images, 16.0 images/s, ETA 0:00:06\x1b[K"
    assert updates[-1] == "coco train: 100/100 images in 0:00:06, 16.0 images/s\x1b[K\n"


def test_parallel_map_keeps_the_order_with_workers():
    items = list(range(50))
    assert list(common.parallel_map(str, items, 2)) == [str(i) for i in items]
    assert list(common.parallel_map(str, [], 2)) == []
