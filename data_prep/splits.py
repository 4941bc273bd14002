"""Shipped split lists (`data_prep/splits/<family>/...`): reading, ids, checksum manifest.

Layout: `<family>/<split>/{labeled,unlabeled}.txt` plus `<family>/val.txt` (and pool lists such as
`pascal/train_aug.txt`, `camvid/train.txt`). Every file is listed with its sha256 in
`splits/manifest.json` and verified when read.
"""
import functools
import hashlib
import json
import pathlib

SPLITS_DIR = pathlib.Path(__file__).resolve().parent / "splits"
MANIFEST = SPLITS_DIR / "manifest.json"
FAMILIES = ("pascal", "cityscapes", "cityscapes_u2pl", "camvid")


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
def _manifest() -> dict[str, str]:
    return json.loads(MANIFEST.read_text())["sha256"]


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
    names = {k.split("/")[1] for k in _manifest() if k.startswith(family + "/") and k.count("/") == 2}
    return sorted(names)
