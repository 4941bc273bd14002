"""The checkpoint-converter registry: one Converter per PyTorch checkpoint layout ("kind").

A model module registers the converter of its official checkpoints at import, beside its model
(docs/models.md "Converting PyTorch checkpoints"):

    from csl_jax.models.converters import register_converter

    register_converter("u2pl", layout="{'teacher_state', 'model_state'} or `encoder.*` + `decoder.*` keys",
                       detect=is_u2pl_checkpoint, unwrap=u2pl_state_dict, build=from_u2pl, raw=True)

csl_jax.models.convert (unwrap_state_dict, load_pretrained, the CLI) looks the kinds up here and
tries them in its explicit `DETECTION_ORDER`; a kind must be registered here and placed there.
The DeepLabV3Plus kinds (deep_backbone, torchvision, unimatch, csl, and for the Xception-65 backbone
xception, unimatch_xception) are registered in
csl_jax.models.registry, each variant's in its module (u2pl.py, css.py, cpcl.py, ccvc.py), all at
`import csl_jax.models`.

This module imports nothing of csl_jax, and the modules that register never import
csl_jax.models.convert at module level: `python -m csl_jax.models.convert` runs that file as a
script after importing the package, so the package must not have imported it already.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Tuple

StateDict = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Converter:
    """How to recognise, read and build one checkpoint layout.

    kind: its name (`--kind`, `model.init_kind`, `report['kind']`).
    layout: what its files look like, for error messages and docs.
    detect(mapping) -> bool: whether a checkpoint has this layout.
    unwrap(mapping) -> (flat state dict with the model's PyTorch-style keys, ignored entries); the
      keys then map to Flax paths by csl_jax.models.convert.flax_path.
    build(checkpoint, *, num_classes, depth, width, blocks) -> (model, variables): the model and its
      {'params', 'batch_stats'} read from the checkpoint as loaded (what the CLI writes; a backbone
      kind gives the model's `backbone` subtree).
    raw: detect and unwrap read the checkpoint as loaded (True), or (False) the state dict that
      csl_jax.models.convert selects first: its `state_dict` or `model` entry if any, `module.`
      prefixes removed.
    """

    kind: str
    layout: str
    detect: Callable[[Mapping[str, Any]], bool]
    unwrap: Callable[[Mapping[str, Any]], Tuple[StateDict, List[str]]]
    build: Callable[..., Tuple[Any, Dict[str, Any]]]
    raw: bool = False


#: kind -> Converter, filled at import of the model modules.
CONVERTERS: Dict[str, Converter] = {}
#: kinds of csl_jax.models.convert.KINDS that are not PyTorch layouts.
RESERVED = ("auto", "flax")


def register_converter(kind: str, *, layout: str, detect: Callable, unwrap: Callable, build: Callable,
                       raw: bool = False) -> Converter:
    """Add the converter of layout `kind` (ValueError if the kind is taken or reserved); returns it.

    The kind must also be placed in csl_jax.models.convert.DETECTION_ORDER (and KINDS); a kind
    registered but not placed, or placed but not registered, is an error at the first conversion.
    """
    if kind in RESERVED:
        raise ValueError(f"converter kind {kind!r} is reserved ({RESERVED})")
    if kind in CONVERTERS:
        raise ValueError(f"converter {kind!r} is already registered")
    converter = Converter(kind=kind, layout=layout, detect=detect, unwrap=unwrap, build=build, raw=raw)
    CONVERTERS[kind] = converter
    return converter


def unchanged(state_dict: Mapping[str, Any]) -> Tuple[StateDict, List[str]]:
    """`unwrap` of layouts whose keys are already the model's: (the state dict, no ignored entries)."""
    return dict(state_dict), []
