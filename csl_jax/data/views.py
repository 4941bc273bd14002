"""View registry: extra augmented views of a sample's weak crop, keyed so that views are independent.

A view is `fn(weak, valid, rng, crop, options) -> {key: array}`: weak (crop, crop, 3) uint8 after the
geometric augmentation (padding 0), valid (crop, crop) bool (False on padding), rng a generator
seeded with (seed, stream id, 2, global sample index, view id), `options` the view's declared
`config.data` keys (with their defaults filled in). Id 0 is the geometry's; view ids are >= 1 and
unique, so adding a view never changes another view's random numbers.
"""
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from csl_jax.data import transforms


class View(NamedTuple):
    """A registered view: `id` seeds its generator, `fn` computes its arrays, `options` maps the
    `config.data` keys it reads to their defaults."""
    id: int
    fn: Callable[..., dict]
    options: Mapping[str, Any]


VIEWS: dict[str, View] = {}


def register_view(name: str, view_id: int, fn: Callable[..., dict], options: Mapping[str, Any] | None = None):
    """Adds view `name` with seed id `view_id` (an integer >= 1); refuses a taken name or id."""
    if name in VIEWS:
        raise ValueError(f"view {name!r} is already registered (id {VIEWS[name].id}); "
                         f"registered: {', '.join(VIEWS)}")
    if not isinstance(view_id, int) or view_id < 1:
        raise ValueError(f"view {name!r}: id {view_id!r} must be an integer >= 1 (0 seeds the geometry)")
    owner = {v.id: n for n, v in VIEWS.items()}.get(view_id)
    if owner is not None:
        raise ValueError(f"view {name!r}: id {view_id} is taken by view {owner!r}; ids in use: "
                         f"{', '.join(f'{n}={v.id}' for n, v in VIEWS.items())}")
    VIEWS[name] = View(view_id, fn, dict(options or {}))


def normalize_valid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Normalised (H, W, 3) float32 view of a uint8 image whose padding (valid False) is reset to black first."""
    return transforms.normalize(np.where(valid[..., None], image, 0).astype(np.uint8))


def _strong_view(suffix: str, weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int,
                 options) -> dict:
    """The strong colour view of the padded crop; its padding reset to black, or kept as the colour
    transforms left it with `keep_jittered_padding` (UniMatch V2's reference jitters the padded crop)."""
    image = transforms.strong_photometric(weak, rng)
    box = transforms.cutmix_box(rng, crop, options["cutmix_prob"])
    view = transforms.normalize(image) if options["keep_jittered_padding"] else normalize_valid(image, valid)
    return {f"strong{suffix}": view, f"cutmix_box{suffix}": box}


def strong(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """UniMatch strong view: 'strong' (crop, crop, 3) float32 (strong colour), 'cutmix_box' (crop, crop) bool."""
    return _strong_view("", weak, valid, rng, crop, options)


def strong2(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """UniMatch's second strong view: 'strong2' (crop, crop, 3) float32, 'cutmix_box2' (crop, crop) bool."""
    return _strong_view("2", weak, valid, rng, crop, options)


def tmp_block_size(crop: int, options) -> float:
    """TMP block side in pixels at `crop` (see `tmp`); raises ValueError on a non-positive size."""
    block, reference = options["block_size"], options["block_size_reference_crop"]
    if block <= 0 or reference < 0:
        raise ValueError(f"config.data.block_size={block} must be > 0 and config.data.block_size_reference_crop="
                         f"{reference} >= 0 (0: block_size is in pixels at every crop)")
    return block * crop / reference if reference else block


def tmp(weak: np.ndarray, valid: np.ndarray, rng: np.random.Generator, crop: int, options) -> dict:
    """CSL TMP view: 'tmp' (crop, crop, 3) float32, 'block_mask' (crop, crop) bool.

    With p = tmp_prob branch (a): mild colour + block mask; else branch (b): strong colour, no mask.
    Block side: `block_size` px, or with `block_size_reference_crop` R > 0, `block_size` px at crop
    R scaled to this crop (block_size * crop / R), so a block covers the same share of the crop.
    """
    if rng.random() < options["tmp_prob"]:
        image = transforms.mild_photometric(weak, rng)
        mask = transforms.block_mask(rng, crop, tmp_block_size(crop, options), options["cover_ratio"])
    else:
        image = transforms.strong_photometric(weak, rng)
        mask = np.zeros((crop, crop), bool)
    return {"tmp": normalize_valid(image, valid), "block_mask": mask}


register_view("strong", 1, strong, {"cutmix_prob": 0.5, "keep_jittered_padding": False})
register_view("strong2", 2, strong2, {"cutmix_prob": 0.5, "keep_jittered_padding": False})
register_view("tmp", 3, tmp, {"tmp_prob": 0.5, "cover_ratio": 0.7, "block_size": 32, "block_size_reference_crop": 0})
