"""Initial weights by name: a registry of weight files, a user cache, downloads checked by sha256.

`config.model.init_from` (docs/models.md "Initial weights") is one of

    'none' (or '')          random init
    'imagenet'              the ImageNet ResNet of model.depth for model.stem: 'imagenet:resnet{50,101}'
                            (deep stem) or 'torchvision:resnet{50,101}' (torchvision stem);
                            'imagenet:xception65' for model.backbone='xception65';
                            'dinov2:<model.encoder>' for model.name='dpt'
    'imagenet:resnet101'    a registered name (REGISTRY; `register_weights` adds one)
    '/weights/r101.pth'     a file: a PyTorch .pth (read without torch: csl_jax.models.torch_pickle) or a
                            converted .msgpack/.npz (csl_jax.models.convert)

A registered file is downloaded once into $CSL_JAX_WEIGHTS_DIR (default ~/.cache/csl_jax/weights)
as <dir>/<family>/<filename> ('imagenet/resnet101.pth'), through a temporary file renamed into
place only after its checksum passed. Offline, put the file at that path yourself.

Checksums: a published sha256 (or torchvision's 8-hex prefix, from its file names) is checked on
every download and every use of the cached file. Files without a published checksum (the Google
Drive and Baidu Cloud files of the UniMatch, U2PL and CPCL READMEs, the DINOv2 files) are trusted on first use: the
sha256 of the first download (or of a file put into the cache by hand) is printed, kept in
`<file>.sha256` and checked on every later use, but only once the file has been checked to be a
readable checkpoint of its kind (`validation_error`): a web page or another network's file is never
pinned (a download is not kept, a hand-placed file is moved to `<file>.invalid`). A cached file that
fails its check is an error, never replaced silently: delete it to download it again.
`python -m csl_jax.models.pretrained --reset=NAME` forgets a recorded checksum (`--list`: the names
and cache paths). Run records hold the name, path, sha256 and kind (`InitSource.record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request

import ml_collections
import numpy as np
from absl import logging

from csl_jax.models import convert, dpt
from csl_jax.models.convert import KINDS

WEIGHTS_DIR_ENV = "CSL_JAX_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "~/.cache/csl_jax/weights"
NONE = ("", "none")  # init_from values meaning random init
TIMEOUT_S = 60.0  # per socket operation of a download
_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z][\w.-]*:[\w.-]+")


class ChecksumError(ValueError):
    """A downloaded or cached weights file does not have the expected sha256."""


class WeightsUnavailableError(FileNotFoundError):
    """A registered weights file is not in the cache and could not be downloaded."""


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """One registered weights file.

    url: where it is downloaded from (a direct download link); page: the link a person opens
    (for the error message), when it differs; sha256: the full published hex digest, or None;
    sha256_prefix: a published prefix of it (torchvision's file names), or None; kind: its layout
    for `convert.load_pretrained`; filename: its name in the cache.
    """

    name: str
    url: str
    kind: str
    filename: str
    description: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    page: str | None = None

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a run's initial weights come from: `path` (a file), its registered `name` (None for a
    plain path), its sha256 (hex) and its `kind` for `convert.load_pretrained`."""

    path: str
    name: str | None
    sha256: str
    kind: str

    def record(self) -> dict:
        """{'name', 'path', 'sha256', 'kind'}, as run records and final results hold it."""
        return dataclasses.asdict(self)


REGISTRY: dict[str, WeightsRecord] = {}


def register_weights(name: str, url: str, kind: str, filename: str, description: str = "", *,
                     sha256: str | None = None, sha256_prefix: str | None = None, page: str | None = None,
                     replace: bool = False) -> WeightsRecord:
    """Adds (or with `replace`, replaces) the weights file `name` ('family:model'); returns its record."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"weights name must look like 'family:model' (e.g. 'imagenet:resnet101'), got {name!r}")
    if name in REGISTRY and not replace:
        raise ValueError(f"weights {name!r} are already registered (pass replace=True to replace them)")
    if kind not in KINDS or kind == "auto":
        raise ValueError(f"weights {name!r}: kind must be one of {KINDS[1:]}, got {kind!r}")
    for label, digest, length in (("sha256", sha256, 64), ("sha256_prefix", sha256_prefix, None)):
        if digest is not None and not re.fullmatch(r"[0-9a-f]{%s}" % (length or "1,63"), digest):
            raise ValueError(f"weights {name!r}: {label} must be {length or 'at most 63'} lowercase hex digits, "
                             f"got {digest!r}")
    if not filename or os.path.basename(filename) != filename:
        raise ValueError(f"weights {name!r}: filename must be a plain file name, got {filename!r}")
    record = WeightsRecord(name, url, kind, filename, description, sha256, sha256_prefix, page)
    REGISTRY[name] = record
    return record


def _google_drive(file_id: str) -> dict:
    return dict(url=f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t",
                page=f"https://drive.google.com/file/d/{file_id}/view?usp=sharing")


def _dinov2(size: str) -> dict:
    """url and filename of the official DINOv2 ViT-{size}/14 file (no registers)."""
    filename = f"dinov2_vit{size}14_pretrain.pth"
    return dict(url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{filename}", filename=filename)


# The ImageNet deep-stem ResNets linked under "Pretrained Backbone" in the UniMatch README
# (github.com/LiheYoung/UniMatch), which the CSL code loads as pretrained/resnet{50,101}.pth too.
# No checksum is published: trusted on first use.
register_weights("imagenet:resnet50", kind="deep_backbone", filename="resnet50.pth",
                 description="ImageNet ResNet-50, deep stem (UniMatch/CSL backbone)", **_google_drive(
                     "1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS"))
register_weights("imagenet:resnet101", kind="deep_backbone", filename="resnet101.pth",
                 description="ImageNet ResNet-101, deep stem (UniMatch/CSL backbone)", **_google_drive(
                     "1Rx0legsMolCWENpfvE2jUScT3ogalMO8"))
# CPCL's backbones (leofansq/CPCL exp_*/config.py loads DATA/pytorch-weight/resnet50_v1c.pth, as CPS
# does): its README (f0e1800) links the R50 and R101 files on Baidu Cloud only, which has no direct
# download: a run names the page (`?pwd=` fills in the README's extraction code) and the cache path.
# No checksums are published for these or U2PL's file: trusted on first use.
register_weights("imagenet:resnet50_v1c", kind="deep_backbone", filename="resnet50_v1c.pth",
                 url="https://pan.baidu.com/s/1agsf6BSvmVVGTvk23JXxaw?pwd=skrv",
                 description="ImageNet ResNet-50 v1c, deep stem (CPS/CPCL backbone; Baidu Cloud, code skrv)")
register_weights("imagenet:resnet101_v1c", kind="deep_backbone", filename="resnet101_v1c.pth",
                 url="https://pan.baidu.com/s/1PLg22P_Nv9GwR-KEzGdvTA?pwd=0g8u",
                 description="ImageNet ResNet-101 v1c, deep stem (CPS/CPCL backbone; Baidu Cloud, code 0g8u)")
# U2PL's ImageNet ResNet-101 (README "Prepare Pretrained Backbone"; u2pl/models/resnet.py loads it).
register_weights("imagenet:resnet101_u2pl", kind="deep_backbone", filename="resnet101_u2pl.pth",
                 description="ImageNet ResNet-101, deep stem (U2PL backbone)", **_google_drive(
                     "1nzSX8bX3zoRREn6WnoEeAPbKYPPOa-3Y"))
# UniMatch's ImageNet Xception-65 (README "Pretrained Backbone", loaded as pretrained/xception.pth by
# model/backbone/xception.py): TF DeepLab's ImageNet Xception-65 converted by YudeWang/deeplabv3plus-pytorch
# (the same Google Drive id, "xception_pytorch_imagenet"). No checksum is published: trusted on first use.
register_weights("imagenet:xception65", kind="xception", filename="xception.pth",
                 description="ImageNet Xception-65 (UniMatch V1 COCO backbone)", **_google_drive(
                     "1_j_mE07tiV24xXOJw4XDze0-a0NAhNVi"))
# torchvision's IMAGENET1K_V1 weights (torchvision.models.ResNet{50,101}_Weights); the 8 hex
# digits in the file names are the start of their sha256.
register_weights("torchvision:resnet50", kind="torchvision", filename="resnet50-0676ba61.pth",
                 url="https://download.pytorch.org/models/resnet50-0676ba61.pth", sha256_prefix="0676ba61",
                 description="ImageNet ResNet-50, torchvision stem (IMAGENET1K_V1)")
register_weights("torchvision:resnet101", kind="torchvision", filename="resnet101-63fe2227.pth",
                 url="https://download.pytorch.org/models/resnet101-63fe2227.pth", sha256_prefix="63fe2227",
                 description="ImageNet ResNet-101, torchvision stem (IMAGENET1K_V1)")
# The DINOv2 ViT/14 encoders UniMatch V2 starts from (its README links S, B and L; giant has the same
# naming on the DINOv2 server). No checksum is published: trusted on first use.
register_weights("dinov2:small", kind="dinov2", description="DINOv2 ViT-S/14 (UniMatch V2 encoder)", **_dinov2("s"))
register_weights("dinov2:base", kind="dinov2", description="DINOv2 ViT-B/14 (UniMatch V2 encoder)", **_dinov2("b"))
register_weights("dinov2:large", kind="dinov2", description="DINOv2 ViT-L/14 (UniMatch V2 encoder)", **_dinov2("l"))
register_weights("dinov2:giant", kind="dinov2", description="DINOv2 ViT-g/14 (UniMatch V2 encoder)", **_dinov2("g"))


# ---------------------------------------------------------------------------------------------
# Resolving config.model.init_from
# ---------------------------------------------------------------------------------------------
def weights_dir() -> str:
    """The cache: $CSL_JAX_WEIGHTS_DIR, or ~/.cache/csl_jax/weights."""
    return os.path.expanduser(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)


def cache_path(record: WeightsRecord) -> str:
    """Where `record`'s file lives in the cache: <weights_dir>/<family>/<filename>."""
    return os.path.join(weights_dir(), record.family, record.filename)


def imagenet_name(model_cfg: ml_collections.ConfigDict) -> str:
    """The registered name `init_from='imagenet'` stands for: by model.stem and model.depth.

    Refuses a narrowed model (model.width != 64 or model.blocks set), which no ImageNet file fits.
    With model.backbone='xception65': 'imagenet:xception65' (stem and depth are ResNet fields).
    With model.name='dpt': 'dinov2:<model.encoder>', refused when an encoder field is set off the
    encoder's value (`dpt.narrowed_fields`).
    """
    if model_cfg.get("name") == "dpt":
        encoder, narrowed = model_cfg.get("encoder", dpt.DEFAULT_ENCODER), dpt.narrowed_fields(model_cfg)
        if narrowed:
            raise ValueError(f"config.model.init_from='imagenet': the DINOv2 files fit only the official encoders, "
                             f"not model.encoder={encoder!r} with {narrowed}; set --config.model.init_from=none to "
                             "train this model from random weights")
        return f"dinov2:{encoder}"
    xception = model_cfg.get("backbone", "resnet") == "xception65"
    stem, depth = model_cfg.get("stem", "deep"), model_cfg.get("depth", 101)
    family = {"deep": "imagenet", "torchvision": "torchvision"}.get(stem)
    if family is None and not xception:
        raise ValueError(f"config.model.init_from='imagenet' needs model.stem 'deep' or 'torchvision', got {stem!r}")
    width, blocks = model_cfg.get("width", 64), model_cfg.get("blocks", None)
    if width != 64 or blocks is not None:
        raise ValueError(f"config.model.init_from='imagenet': the ImageNet ResNets fit only full-size models "
                         f"(model.width=64, model.blocks=None), not width={width}, blocks={blocks}; set "
                         "--config.model.init_from=none to train this model from random weights")
    if xception:
        return "imagenet:xception65"
    name = f"{family}:resnet{depth}"
    if name not in REGISTRY:
        raise ValueError(f"config.model.init_from='imagenet': no ImageNet weights for model.depth={depth} "
                         f"(registered: {sorted(REGISTRY)})")
    return name


def resolve_init(model_cfg: ml_collections.ConfigDict) -> InitSource | None:
    """The initial weights `model_cfg.init_from` names (module docstring), downloaded when missing.

    Returns None for random init. Raises ValueError for an unregistered 'family:model' name (listing
    the registered ones), FileNotFoundError for a missing file, WeightsUnavailableError when a
    registered file is neither cached nor downloadable, ChecksumError for a file that fails its check.
    """
    value = str(model_cfg.get("init_from", "") or "").strip()
    init_kind = model_cfg.get("init_kind", "auto")
    if value.lower() in NONE:
        return None
    name = imagenet_name(model_cfg) if value == "imagenet" else value
    if name in REGISTRY:
        record = REGISTRY[name]
        if init_kind not in ("auto", record.kind):
            raise ValueError(f"config.model.init_kind={init_kind!r} contradicts the {record.kind!r} weights "
                             f"{name!r}; leave it 'auto'")
        path, sha256 = fetch(record)
        return InitSource(path=path, name=name, sha256=sha256, kind=record.kind)
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        if _NAME.fullmatch(value):
            raise ValueError(f"config.model.init_from={value!r} is not a registered weights name; registered: "
                             f"{sorted(REGISTRY)}, or 'imagenet', 'none' or a file path")
        raise FileNotFoundError(f"config.model.init_from={value!r}: no such file {os.path.abspath(path)}; give "
                                f"'none', 'imagenet', a registered name ({', '.join(sorted(REGISTRY))}) or the "
                                "path of a weights file")
    return InitSource(path=os.path.abspath(path), name=None, sha256=file_sha256(path), kind=init_kind)


def check_available(model_cfg: ml_collections.ConfigDict) -> InitSource | None:
    """`resolve_init`, logged: run before anything is compiled so a missing file fails early."""
    source = resolve_init(model_cfg)
    if source is None:
        logging.info("Initial weights: random (config.model.init_from=%r).", model_cfg.get("init_from", ""))
    else:
        logging.info("Initial weights: %s", source.record())
    return source


def random_init_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a run config with `model.init_from='none'`: for variables that are replaced right
    away (a resumed train state, an evaluation template), so no weights file is read or downloaded."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.init_from = "none"
    return config


def init_record(source: InitSource | None) -> dict:
    """What run records and final results hold: `source.record()`, or {'name': 'none'} for random init."""
    return {"name": "none"} if source is None else source.record()


# ---------------------------------------------------------------------------------------------
# The cache and downloads
# ---------------------------------------------------------------------------------------------
_SHA256_MEMO: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """Hex sha256 of the file at `path` (remembered per path, size and modification time)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]


def fetch(record: WeightsRecord) -> tuple[str, str]:
    """(path, sha256) of `record`'s file in the cache, downloaded first when it is not there."""
    path = cache_path(record)
    if os.path.exists(path):
        return path, _verify_cached(record, path)
    return path, _download(record, path)


def _expected(record: WeightsRecord) -> str:
    return record.sha256 or f"{record.sha256_prefix}..."


def _mismatch(record: WeightsRecord, sha256: str) -> bool:
    """Whether `sha256` contradicts the published checksum (full or prefix) of `record`."""
    if record.sha256 is not None:
        return sha256 != record.sha256
    return record.sha256_prefix is not None and not sha256.startswith(record.sha256_prefix)


#: ResNet blocks per stage, by depth (what a backbone file of a registered 'resnetNN' name must hold).
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
#: Xception-65's blocks (entry 1-3, middle 4-19, exit 20), each with sepconv1-3, and its exit convs.
XCEPTION_BLOCKS = 20
XCEPTION_CONVS = ("conv3", "conv4", "conv5")


def _xception_error(state_dict: dict) -> str | None:
    """What an 'xception' file lacks: blocks 1-20 (keys backbone.block<k>.*, no more), each with the 4-d
    depthwise and pointwise weights of sepconv1-3, and conv3-5's; None when it has them all."""
    found = {int(m[1]) for k in state_dict if (m := re.match(r"backbone\.block(\d+)\.", k))}
    if found != set(range(1, XCEPTION_BLOCKS + 1)):
        return (f"it has blocks {sorted(found)}, an Xception-65 has blocks 1..{XCEPTION_BLOCKS} "
                "(keys backbone.block<k>.*)")
    needed = [f"block{k}.sepconv{j}" for k in range(1, XCEPTION_BLOCKS + 1) for j in (1, 2, 3)]
    for module in needed + list(XCEPTION_CONVS):
        for conv in ("depthwise", "pointwise"):
            if np.ndim(state_dict.get(f"backbone.{module}.{conv}.weight")) != 4:
                return f"backbone.{module}.{conv}.weight is missing or not a 4-d conv kernel"
    return None


def validation_error(record: WeightsRecord, path: str) -> str | None:
    """What is wrong with `path` as `record`'s file, or None when it is a readable checkpoint of its kind.

    Checks: it reads as a torch.save file (no code runs, `torch_pickle`); its state dict has the
    layout of `record.kind`; for a backbone whose name says 'resnet50' / 'resnet101', every block
    of the four stages is there and no more, each with a 4-d conv1 weight; for an 'xception' file,
    Xception-65's 20 blocks and no more, with the 4-d kernels of every separable conv; for a
    'dinov2:<encoder>' file, exactly that encoder's tensors, each of its shape.
    """
    try:
        state_dict, _, _ = convert.unwrap_state_dict(convert.load_file(path), record.kind)
    except (ValueError, OSError, TypeError) as error:
        return str(error)
    if record.kind == "xception":
        return _xception_error(state_dict)
    if record.kind == "dinov2" and record.family == "dinov2":
        return dpt.encoder_error(state_dict, record.name.split(":", 1)[1])
    depth = re.search(r"resnet(\d+)", record.name)
    if record.kind not in ("deep_backbone", "torchvision") or not depth or int(depth[1]) not in RESNET_BLOCKS:
        return None
    for stage, blocks in enumerate(RESNET_BLOCKS[int(depth[1])], start=1):
        found = {int(k.split(".")[2]) for k in state_dict if k.startswith(f"backbone.layer{stage}.")}
        if found != set(range(blocks)):
            return (f"layer{stage} has {len(found)} blocks, a ResNet-{depth[1]} has {blocks} (keys "
                    f"backbone.layer{stage}.<i>.*)")
        weights = [np.ndim(state_dict.get(f"backbone.layer{stage}.{i}.conv1.weight")) for i in range(blocks)]
        if any(ndim != 4 for ndim in weights):
            return f"layer{stage}: a block's conv1.weight is missing or not a 4-d conv kernel"
    return None


def _move_aside(record: WeightsRecord, path: str, reason: str) -> WeightsUnavailableError:
    """Moves an invalid cached file to `<path>.invalid` (never deleted) and returns the error to raise."""
    os.replace(path, path + ".invalid")
    source = record.page or record.url
    return WeightsUnavailableError(f"{path} is not a valid '{record.name}' weights file ({reason}); moved it to "
                                   f"{path}.invalid; put the right file from {source} at {path}")


def reset_pin(name: str) -> str:
    """Removes the trust-on-first-use checksum recorded for registered weights `name`; returns what it did."""
    if name not in REGISTRY:
        raise ValueError(f"{name!r} is not a registered weights name; registered: {', '.join(sorted(REGISTRY))}")
    pin = cache_path(REGISTRY[name]) + ".sha256"
    if not os.path.exists(pin):
        return f"{name}: no recorded checksum ({pin} does not exist)"
    os.remove(pin)
    return f"{name}: removed the recorded checksum {pin}; the next use checks and records the file again"


def _trust_on_first_use(record: WeightsRecord, path: str, sha256: str) -> None:
    with open(path + ".sha256", "w") as f:
        f.write(sha256 + "\n")
    print(f"{record.name}: no full sha256 is published for {os.path.basename(path)}; recorded its sha256 {sha256} "
          f"in {path}.sha256 (trust on first use: later uses are checked against it)", file=sys.stderr, flush=True)


def _verify_cached(record: WeightsRecord, path: str) -> str:
    """The sha256 of the cached file, checked against the published one and its `.sha256` record."""
    sha256 = file_sha256(path)
    expected, origin = None, ""
    if _mismatch(record, sha256):
        expected, origin = _expected(record), "published"
    elif record.sha256 is None and os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            recorded = f.read().strip()
        if sha256 != recorded:
            expected, origin = recorded, f"recorded at its first use in {path}.sha256"
    elif record.sha256 is None:  # a file put there by hand: checked before its checksum is recorded
        reason = validation_error(record, path)
        if reason is not None:
            raise _move_aside(record, path, reason)
        _trust_on_first_use(record, path, sha256)
    if expected is not None:
        reset = (f"; if it is the right file and the recorded one was wrong, run `python -m csl_jax.models.pretrained "
                 f"--reset={record.name}`" if origin != "published" else "")
        raise ChecksumError(f"the cached weights {path} ('{record.name}') are corrupt or not the registered file: "
                            f"sha256 {sha256}, expected {expected} ({origin}); delete the file to download it "
                            f"again from {record.url}, or put the right file there{reset}")
    return sha256


def _unavailable(record: WeightsRecord, path: str, reason: str) -> WeightsUnavailableError:
    by_hand = f" from {record.page}" if record.page and record.page != record.url else ""
    return WeightsUnavailableError(
        f"pretrained weights '{record.name}' are not in the cache and could not be downloaded from {record.url} "
        f"({reason}); download the file yourself{by_hand} and put it at {path}")


class _Progress:
    """Download progress on stderr: a line per 5 % (per 10 MB when the size is unknown)."""

    def __init__(self, name: str, total: int | None):
        self.name, self.total, self.done, self.shown = name, total, 0, -1
        self.overwrite = sys.stderr.isatty() and bool(total)

    def update(self, n: int) -> None:
        self.done += n
        mark = 20 * self.done // self.total if self.total else self.done // (10 << 20)
        if mark != self.shown:
            self.shown = mark
            size = f"{self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB" if self.total else f"{self.done / 1e6:.1f} MB"
            percent = f"{100 * self.done // self.total:3d}% " if self.total else ""
            start = "\r" if self.overwrite else ""
            end = "" if self.overwrite and self.done != self.total else "\n"
            print(f"{start}{self.name}: {percent}({size})", end=end, file=sys.stderr, flush=True)


def _download(record: WeightsRecord, path: str) -> str:
    """Downloads `record.url` to `path` (temp file, checksum, atomic rename); returns its sha256."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    print(f"Downloading {record.name} from {record.url} to {path}", file=sys.stderr, flush=True)
    fd, partial = tempfile.mkstemp(prefix=f".{record.filename}.", suffix=".part", dir=folder)
    try:
        digest, head = hashlib.sha256(), b""
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(record.url, timeout=TIMEOUT_S) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    progress = _Progress(record.name, total)
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        head = head or chunk[:64]
                        progress.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                http_error = isinstance(error, urllib.error.HTTPError)  # 'HTTP Error 404: Not Found'
                reason = str(error) if http_error else str(getattr(error, "reason", None) or error)
                raise _unavailable(record, path, reason) from error
        if total is not None and progress.done != total:
            raise _unavailable(record, path, f"the connection closed after {progress.done} of {total} bytes")
        if head.lstrip().startswith(b"<"):
            raise _unavailable(record, path, "the server sent a web page instead of the file, e.g. a Google Drive "
                                             "confirmation or quota page")
        sha256 = digest.hexdigest()
        if _mismatch(record, sha256):
            raise ChecksumError(f"the download of '{record.name}' from {record.url} has sha256 {sha256}, expected "
                                f"{_expected(record)}; it was not kept (nothing written to {path})")
        reason = validation_error(record, partial)
        if reason is not None:
            raise _unavailable(record, path, f"the downloaded file is not a valid weights file: {reason}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    if record.sha256 is None:
        _trust_on_first_use(record, path, sha256)
    return sha256


def main(argv: list[str] | None = None) -> int:
    """`python -m csl_jax.models.pretrained --reset=NAME`: forget the recorded checksum of registered weights
    NAME (after replacing a wrong file that was trusted on first use); `--list`: the registered names."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m csl_jax.models.pretrained", description=main.__doc__)
    parser.add_argument("--reset", metavar="NAME", help="registered weights name, e.g. imagenet:resnet101")
    parser.add_argument("--list", action="store_true", help="list the registered weights and their cache paths")
    args = parser.parse_args(argv)
    if args.list:
        for name in sorted(REGISTRY):
            print(f"{name}\t{cache_path(REGISTRY[name])}")
    if args.reset:
        try:
            print(reset_pin(args.reset))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if not (args.list or args.reset):
        parser.print_usage(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
