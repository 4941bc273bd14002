"""data_prep ade20k: --labels raw/reduced, refused values with their hints, missing partners, the CLI's
bad-input lines, the shipped lists and the derived unlabeled lists against the official ones."""
import hashlib
import io
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import ade20k, common, splits

ROOT = splits.SPLITS_DIR.parents[1]


def write_pair(raw, split, stem, label, image=True, mask=True):
    folder = {"train": "training", "val": "validation"}[split]
    if image:
        path = raw / "images" / folder / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(label.shape + (3,), 90, np.uint8)).save(path, format="JPEG")
    if mask:
        path = raw / "annotations" / folder / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(label, np.uint8), "L").save(path)


def labels_of(version_dir, split):
    src = tfds.builder_from_directory(str(version_dir)).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
    out = {}
    for k in range(len(src)):
        with Image.open(io.BytesIO(src[k]["label"])) as im:
            out[src[k]["id"].decode()] = np.asarray(im)
    return out


RAW = np.array([[0, 1, 150, 0], [1, 1, 150, 150], [0, 0, 0, 1], [150, 1, 0, 0]])


def test_raw_labels_are_reduced_and_ids_sorted(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    write_pair(raw, "train", "ADE_train_00000002", RAW)
    write_pair(raw, "train", "ADE_train_00000001", np.full((3, 5), 7))
    write_pair(raw, "val", "ADE_val_00000001", RAW.T)
    vdir, _ = common.prepare(ade20k.Ade20k(data_dir=tmp_path / "out", raw_dir=raw, num_workers=0))
    train = labels_of(vdir, "train")
    assert list(train) == ["ADE_train_00000001", "ADE_train_00000002"]
    expected = np.select([RAW == 0, RAW == 1, RAW == 150], [255, 0, 149])
    np.testing.assert_array_equal(train["ADE_train_00000002"], expected)
    np.testing.assert_array_equal(train["ADE_train_00000001"], np.full((3, 5), 6))
    np.testing.assert_array_equal(labels_of(vdir, "val")["ADE_val_00000001"], expected.T)
    meta = tfds.builder_from_directory(str(vdir)).info.metadata
    names = meta["class_names"]
    assert len(names) == 150 and names[:8] == ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed"]
    assert names[-1] == "flag" and meta["labels"] == "raw" and common.read_fingerprint(vdir)["labels"] == "raw"

    reduced = ade20k.Ade20k(data_dir=tmp_path / "out", raw_dir=raw, labels="reduced")
    with pytest.raises(common.DataPrepError, match=r'labels "raw", not "reduced"'):
        common.prepare(reduced)  # the choice is in the fingerprint


def test_refused_values_name_the_file_with_a_hint(tmp_path):
    raw = tmp_path / "raw"
    write_pair(raw, "train", "ADE_train_00000001", RAW)
    write_pair(raw, "train", "ADE_train_00000002", np.where(RAW == 150, 255, RAW))  # already reduced
    write_pair(raw, "train", "ADE_train_00000003", np.where(RAW == 150, 200, RAW))
    write_pair(raw, "val", "ADE_val_00000001", np.where(RAW == 150, 149, RAW))
    with pytest.raises(common.DataPrepError) as err:
        common.prepare(ade20k.Ade20k(data_dir=tmp_path / "out", raw_dir=raw, num_workers=0))
    assert [ln.strip() for ln in str(err.value).splitlines()[1:]] == [
        f"{raw}/annotations/training/ADE_train_00000002.png: label value 255 is not a raw ADE20K label (0..150): "
        "already reduced? pass --labels reduced",
        f"{raw}/annotations/training/ADE_train_00000003.png: label values [200] are not class indices of this "
        "dataset or 255"]
    with pytest.raises(common.DataPrepError) as err:
        common.prepare(ade20k.Ade20k(data_dir=tmp_path / "out", raw_dir=raw, labels="reduced", num_workers=0))
    assert [ln.strip() for ln in str(err.value).splitlines()[1:]] == [
        f"{raw}/annotations/training/ADE_train_00000001.png: label value 150 is not a reduced ADE20K label "
        "(0..149, 255): raw annotations? pass --labels raw",
        f"{raw}/annotations/training/ADE_train_00000003.png: label values [200] are not class indices of this "
        "dataset or 255"]
    assert not any((tmp_path / "out").iterdir())


def test_cli_names_every_bad_file_on_its_own_line(tmp_path):
    raw = tmp_path / "raw"
    write_pair(raw, "train", "ADE_train_00000001", RAW)
    write_pair(raw, "train", "ADE_train_00000002", RAW, mask=False)
    write_pair(raw, "train", "ADE_train_00000003", RAW, image=False)
    write_pair(raw, "val", "ADE_val_00000001", np.full((4, 4), 255))
    proc = subprocess.run([sys.executable, "-m", "data_prep", "ade20k", "--raw", str(raw), "--out",
                           str(tmp_path / "out"), "--num-workers", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-4:] == [
        "error: ade20k: 3 invalid source file(s); nothing was written:",
        f"  {raw}/annotations/training/ADE_train_00000002.png: mask missing (for image "
        f"{raw}/images/training/ADE_train_00000002.jpg)",
        f"  {raw}/images/training/ADE_train_00000003.jpg: cannot read image (No such file or directory)",
        f"  {raw}/annotations/validation/ADE_val_00000001.png: label value 255 is not a raw ADE20K label (0..150): "
        "already reduced? pass --labels reduced"]


@pytest.mark.parametrize("argv,message", [
    (["ade20k", "--crowd", "skip"], "--crowd applies to coco only"),
    (["coco", "--labels", "raw"], "--labels applies to ade20k only"),
    (["coco", "--overlap", "area_desc"], "--overlap needs --from-instances"),
    (["coco", "--compare-to", "/masks"], "--compare-to needs --from-instances"),
])
def test_flags_of_another_dataset_are_parser_errors(argv, message, capsys):
    from data_prep.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--raw", "/nowhere", "--out", "/nowhere"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_shipped_lists_and_derived_unlabeled_lists_equal_the_official_ones():
    sizes = {"1_64": 316, "1_32": 631, "1_16": 1263, "1_8": 2526, "1_4": 5052, "1_2": 10105}
    assert splits.shipped_splits("ade20k") == sorted(sizes)
    pool = splits.shipped_list("ade20k/all/labeled.txt")  # sha256 checked, as every shipped list
    assert len(pool) == 20210 and pool == sorted(pool) and len(splits.shipped_list("ade20k/val.txt")) == 2000
    previous = set()
    for split, n in sorted(sizes.items(), key=lambda kv: kv[1]):
        labeled = splits.shipped_list(f"ade20k/{split}/labeled.txt")
        assert len(labeled) == n and previous <= set(labeled)  # nested
        previous = set(labeled)
        unlabeled = splits.unlabeled_ids("ade20k", split, pool)  # the count is checked against the manifest
        assert len(unlabeled) == 20210 - n and not set(unlabeled) & set(labeled)
        digest = hashlib.sha256("\n".join(sorted(unlabeled)).encode()).hexdigest()
        assert digest == splits._derived()[f"ade20k/{split}/unlabeled.txt"]["sorted_ids_sha256"] == \
            splits.sorted_ids_sha256(unlabeled)
