"""Shipped split lists (`data_prep/splits/<family>/...`): reading, ids, checksum manifest.

Layout: `<family>/<split>/{labeled,unlabeled}.txt` plus `<family>/val.txt` (and pool lists such as
`pascal/train_aug.txt`, `camvid/train.txt`, `ade20k/all/labeled.txt`). Every file is listed with its
sha256 in `splits/manifest.json` (`sha256`) and verified when read.

COCO's unlabeled lists are not published and ADE20K's are not shipped: `unlabeled_ids` derives them as
the prepared train pool minus the labeled list, in record order, checked against the count recorded in
the manifest (`derived`). For ADE20K the manifest also keeps `sorted_ids_sha256`, the sha256 of the
official unlabeled list's ids sorted and joined by newlines, which the derivation reproduces.
"""
import functools
import hashlib
import json
import pathlib

SPLITS_DIR = pathlib.Path(__file__).resolve().parent / "splits"
MANIFEST = SPLITS_DIR / "manifest.json"
FAMILIES = ("pascal", "cityscapes", "cityscapes_u2pl", "camvid", "coco", "ade20k")


def line_id(line: str) -> str:
    """Image id of one list line (any of the formats of docs/protocol.md §2).

    `JPEGImages/2007_000733.jpg SegmentationClass/2007_000733.png` -> `2007_000733`;
    `leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png` -> `jena_000078_000019`;
    `/SegNet/CamVid/train/0001TP_006690.png ...` -> `0001TP_006690`; a bare id is kept.
    """
    name = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
    if "." in name:
        name = name.rsplit(".", 1)[0]
    return name.removesuffix("_leftImg8bit")


def read_list(path) -> list[str]:
    """Non-blank lines of a list file (stripped); the last line may lack a newline."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_ids(path) -> list[str]:
    """Ids of a list file, in file order. Raises on duplicates (naming the file and ids)."""
    ids = [line_id(ln) for ln in read_list(path)]
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise ValueError(f"split list {path} repeats ids {dups[:10]}")
    return ids


@functools.cache
def _manifest_file() -> dict:
    return json.loads(MANIFEST.read_text())


def _manifest() -> dict[str, str]:
    """{relpath: sha256} of the shipped lists."""
    return _manifest_file()["sha256"]


def _derived() -> dict[str, dict]:
    """{relpath: {'rule', 'count'[, 'sorted_ids_sha256']}} of the lists derived instead of shipped."""
    return _manifest_file().get("derived", {})


def sorted_ids_sha256(ids: list[str]) -> str:
    """sha256 of `ids` sorted and joined by newlines (the `sorted_ids_sha256` of the manifest)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def shipped_list(relpath: str) -> list[str]:
    """Ids of a shipped list, e.g. `shipped_list('pascal/1_8/labeled.txt')`, after its sha256 check."""
    path = SPLITS_DIR / relpath
    expected = _manifest().get(relpath)
    if expected is None:
        raise KeyError(f"{relpath} is not a shipped split list (see {MANIFEST})")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"checksum mismatch for {path}: sha256 {actual}, manifest {expected}; "
                         "the shipped split list was modified")
    return read_ids(path)


def shipped_splits(family: str) -> list[str]:
    """Names of the semi-supervised splits of a family (folders with labeled.txt), sorted."""
    if family not in FAMILIES:
        raise ValueError(f"unknown split family {family!r}; valid: {', '.join(FAMILIES)}")
    names = {k.split("/")[1] for k in _manifest() if k.startswith(family + "/") and k.endswith("/labeled.txt")}
    return sorted(names - {"all"})


def unlabeled_ids(family: str, split: str, pool: list[str]) -> list[str]:
    """Unlabeled ids of a split: the shipped `<family>/<split>/unlabeled.txt`, or else (COCO, ADE20K) the ids
    of `pool` (the prepared train ids, record order) not in the labeled list, in pool order.

    A derived list must have the count recorded in the manifest; otherwise ValueError naming the split,
    the count found and the expected one (e.g. a partially prepared train set).
    """
    relpath = f"{family}/{split}/unlabeled.txt"
    if relpath in _manifest():
        return shipped_list(relpath)
    rule = _derived().get(relpath)
    if rule is None:
        raise KeyError(f"{relpath} is neither a shipped nor a derived split list (see {MANIFEST})")
    labeled = set(shipped_list(f"{family}/{split}/labeled.txt"))
    ids = [i for i in pool if i not in labeled]
    if len(ids) != rule["count"]:
        raise ValueError(f"{family} split {split}: the prepared train pool ({len(pool)} ids) minus the {len(labeled)} "
                         f"labeled ids leaves {len(ids)} unlabeled ids, expected {rule['count']} ({rule['rule']}); "
                         f"prepare the complete {family} train set")
    return ids
