"""PyTorch state dicts -> Flax variables (pure NumPy), and converted-checkpoint files.

Layouts (docs/models.md "Converting PyTorch checkpoints"): ImageNet deep-stem backbones
('deep_backbone', no `backbone.` prefix, maybe `fc.*`), torchvision ResNets ('torchvision'),
UniMatch DeepLabV3Plus checkpoints ('unimatch': top-level `model`, `module.` prefixes), CSL Lightning
checkpoints ('csl': `state_dict` with `model.backbone.*` / `model.decoder.*`) and CCVC two-branch checkpoints ('ccvc':
`branch1.*` / `branch2.*`, read by csl_jax.models.ccvc.from_ccvc) and U2PL checkpoints ('u2pl':
`teacher_state` (converted) / `model_state` with `encoder.*`, `decoder.*`, `auxor.*`; csl_jax.models.u2pl)
and CSS checkpoints ('css': `ema_model` (converted) / `model` with `resnet_*`, `ASPP.*`, `project.*`,
`classifier.*`, `representation.*`; csl_jax.models.css) and CPCL checkpoints ('cpcl': `model` with
`branch1.head.aspp.map_convs.*` ...; csl_jax.models.cpcl.from_cpcl), and with the Xception-65
backbone UniMatch's ImageNet file ('xception', bare `block1.sepconv1.depthwise.weight` ...) and
trained UniMatch models ('unimatch_xception', `backbone.block1.sepconv1.*` ...), and UniMatch V2's
DINOv2 + DPT (csl_jax.models.dpt): official DINOv2 files ('dinov2', bare `blocks.0.attn.qkv.weight`,
`pos_embed` ...) and trained UniMatch V2 models ('unimatch_v2', `model_ema` (converted) / `model`).

Each layout is a Converter (csl_jax.models.converters) registered by the module of its model;
this module holds the generic steps (state-dict selection, key -> Flax path, merging, files), the
auto-detection order (DETECTION_ORDER) and the CLI, and imports no model variant.

    from csl_jax.models.convert import from_unimatch
    model, variables = from_unimatch(state_dict, num_classes=21, depth=101)
    logits, _ = model.apply(variables, images, train=False)  # (logits, out), as every model

CLI (reads the .pth without torch: csl_jax.models.torch_pickle):
    python -m csl_jax.models.convert SRC.pth OUT_DIR [--kind auto] [--format msgpack|npz]
writes OUT_DIR/variables.{msgpack,npz} and OUT_DIR/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from csl_jax.models import torch_pickle
from csl_jax.models.converters import CONVERTERS, RESERVED, Converter, register_converter  # noqa: F401 (public)
from csl_jax.models.deeplabv3plus import DeepLabV3Plus

KINDS = ("auto", "deep_backbone", "torchvision", "unimatch", "csl", "ccvc", "u2pl", "css", "cpcl",
         "xception", "unimatch_xception", "unimatch_v2", "dinov2", "flax")
BACKBONE_KINDS = ("deep_backbone", "torchvision", "xception", "dinov2")
#: The order in which unwrap_state_dict(kind='auto') asks each kind's Converter.detect; the first
#: that accepts the checkpoint names its layout. 'u2pl' and 'css' read the checkpoint as loaded
#: (their files hold two networks, {'teacher_state', 'model_state'} / {'ema_model', 'model'}, and
#: CSS's 'model' entry would otherwise be selected as the state dict); the others read the state dict
#: selected from it (its `state_dict` or `model` entry, `module.` prefixes removed), checked by key
#: prefix from the most specific to the most general: 'csl' (`model.backbone.*`) before 'unimatch'
#: (`backbone.*`); 'cpcl' (`branch1.head.aspp.map_convs.*`) before 'ccvc' (`branch1.backbone.*`,
#: which CPCL files also have); UniMatch V2's kinds before every `backbone.*` and `conv1.weight` rule:
#: 'unimatch_v2' (raw: {'model_ema', 'model'} or a flat dict with `backbone.blocks.0.attn.qkv.weight`)
#: and its bare DINOv2 encoder files 'dinov2' (`blocks.0.attn.qkv.weight` + `pos_embed`);
#: 'unimatch_xception' (`backbone.block1.sepconv1.depthwise.weight`) before 'unimatch'; the other bare
#: backbones last, 'xception' (`block1.sepconv1.depthwise.weight`; its files have `conv1.weight` too)
#: before the ResNets ('deep_backbone' `conv1.0.weight`, 'torchvision' `conv1.weight`). A new kind goes
#: before every kind whose keys its files also have. Every kind here is a registered converter and
#: every registered converter is here (checked at the first conversion), and KINDS lists them all.
DETECTION_ORDER = ("u2pl", "css", "csl", "unimatch_v2", "dinov2", "unimatch_xception", "unimatch", "cpcl", "ccvc",
                   "xception", "deep_backbone", "torchvision")
Path = Tuple[str, ...]  # (collection, module, ..., leaf)

if sorted(KINDS) != sorted(RESERVED + DETECTION_ORDER):
    raise ValueError(f"KINDS {KINDS} must be {RESERVED} and the kinds of DETECTION_ORDER {DETECTION_ORDER}")


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (copied: never aliases torch memory) or array-like as float32 NumPy."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return np.array(value.detach().cpu().float().numpy(), dtype=np.float32, copy=True)
    return np.asarray(value, dtype=np.float32)


def _strip_module(sd: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def converters_in_order() -> Tuple[Converter, ...]:
    """The registered converters in DETECTION_ORDER; ValueError if a kind is placed there but not
    registered, or registered but not placed."""
    missing = [k for k in DETECTION_ORDER if k not in CONVERTERS]
    if missing:
        raise ValueError(f"no converter is registered for {missing} (csl_jax.models.convert.DETECTION_ORDER); "
                         "the module of each model registers its converter at import (register_converter), "
                         "and csl_jax/models/__init__.py imports those modules")
    unplaced = sorted(set(CONVERTERS) - set(DETECTION_ORDER))
    if unplaced:
        raise ValueError(f"converters {unplaced} are registered but not placed in "
                         "csl_jax.models.convert.DETECTION_ORDER (and KINDS): put each before every kind whose "
                         "keys its checkpoints also have")
    return tuple(CONVERTERS[k] for k in DETECTION_ORDER)


def select_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The generic first step: a checkpoint's `state_dict` (Lightning) or `model` (UniMatch, CCVC, CPCL)
    entry when it is a mapping, else the checkpoint itself; `module.` prefixes removed."""
    sd = dict(checkpoint)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):  # Lightning (CSL)
        sd = dict(sd["state_dict"])
    elif "model" in sd and isinstance(sd["model"], Mapping):  # UniMatch {model, optimizer, ...}
        sd = dict(sd["model"])
    return _strip_module(sd)


def unwrap_state_dict(checkpoint: Mapping[str, Any], kind: str = "auto") -> Tuple[Dict[str, Any], str, list]:
    """Select the model's flat state dict inside a checkpoint and name its layout.

    Returns (state_dict, kind, ignored) where state_dict has `backbone.`/`head.`/... keys for
    'unimatch' and 'csl', bare ResNet keys for backbone kinds, and `ignored` lists checkpoint
    entries outside the model (e.g. other Lightning state). kind 'auto' asks the registered
    converters in DETECTION_ORDER.
    """
    if kind not in KINDS or kind == "flax":
        raise ValueError(f"kind must be one of {KINDS[:-1]} for a PyTorch checkpoint, got {kind!r}")
    converters = converters_in_order()
    raw = dict(checkpoint)
    selected = []  # select_state_dict(raw), computed once when a converter reads it

    def view(converter: Converter) -> Dict[str, Any]:
        if converter.raw:
            return raw
        if not selected:
            selected.append(select_state_dict(raw))
        return selected[0]

    if kind == "auto":
        found = next((c for c in converters if c.detect(view(c))), None)
        if found is None:
            tried = "; ".join(f"{c.kind}: {c.layout}" for c in converters)
            raise ValueError(f"cannot recognise the checkpoint layout (expected, in this order: {tried}); "
                             f"first keys: {sorted(select_state_dict(raw))[:8]}")
        kind = found.kind
    converter = CONVERTERS[kind]
    sd, ignored = converter.unwrap(view(converter))
    return sd, kind, list(ignored)


#: leaves that are parameters of their module under their own name (DINOv2's LayerScale `gamma`,
#: class token and position table)
PARAMETER_LEAVES = ("gamma", "cls_token", "pos_embed")


def flax_path(key: str, ndim: int) -> Path:
    """PyTorch key -> Flax variable path: numeric parts join the previous name with '_'.

    `backbone.layer1.0.conv1.weight` (4-D) -> ('params', 'backbone', 'layer1_0', 'conv1', 'kernel');
    a 2-D (Linear) `weight` -> 'kernel' too; any other `weight` (BN, LayerNorm) -> 'scale';
    `bias`/`running_mean`/`running_var` -> params bias, batch_stats mean/var; PARAMETER_LEAVES as they are.
    """
    parts = key.split(".")
    modules = []
    for p in parts[:-1]:
        if re.fullmatch(r"\d+", p) and modules:
            modules[-1] = f"{modules[-1]}_{p}"
        else:
            modules.append(p)
    leaf = parts[-1]
    if leaf == "weight":
        return ("params", *modules, "kernel" if ndim in (2, 4) else "scale")
    if leaf in PARAMETER_LEAVES:
        return ("params", *modules, leaf)
    if leaf == "bias":
        return ("params", *modules, "bias")
    if leaf == "running_mean":
        return ("batch_stats", *modules, "mean")
    if leaf == "running_var":
        return ("batch_stats", *modules, "var")
    raise ValueError(f"unexpected state-dict key {key!r} (leaf {leaf!r})")


def convert_state_dict(state_dict: Mapping[str, Any]) -> Dict[Path, np.ndarray]:
    """Flat PyTorch state dict -> {Flax path: float32 array}; conv OIHW -> HWIO (ConvTranspose (in, out, k, k)
    -> (k, k, out, in), read with transpose_kernel=True), Linear (out, in) -> (in, out); drops num_batches_tracked."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        arr = _to_numpy(value)
        if arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        elif arr.ndim == 2 and key.endswith(".weight"):
            arr = arr.T
        out[flax_path(key, arr.ndim)] = arr
    return out


def _flatten_variables(variables: Mapping[str, Any]) -> Dict[Path, Any]:
    return traverse_util.flatten_dict(unfreeze(variables))


def _key_names(paths) -> list:
    return sorted("/".join(p) for p in paths)


def merge_variables(variables: Mapping[str, Any], loaded: Mapping[Path, Any],
                    allow_missing_outside_backbone: bool) -> Tuple[Dict[str, Any], list]:
    """Replace leaves of `variables` by `loaded` ({path: array}); returns (variables, left_at_init).

    Raises ValueError listing unknown keys, missing keys (any inside the backbone; outside only
    when not allowed) and every shape mismatch with both shapes.
    """
    target = _flatten_variables(variables)
    unknown = [p for p in loaded if p not in target]
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint keys have no place in the model: {_key_names(unknown)}")
    mismatched = [f"{'/'.join(p)}: checkpoint {tuple(v.shape)} vs model {tuple(target[p].shape)}"
                  for p, v in loaded.items() if tuple(v.shape) != tuple(target[p].shape)]
    if mismatched:
        raise ValueError("shape mismatch: " + "; ".join(mismatched))
    missing = [p for p in target if p not in loaded]
    fatal = [p for p in missing if p[1] == "backbone" or not allow_missing_outside_backbone]
    if fatal:
        raise ValueError(f"{len(fatal)} model variables are missing from the checkpoint: {_key_names(fatal)}")
    target.update({p: np.asarray(v, dtype=np.float32) for p, v in loaded.items()})
    return traverse_util.unflatten_dict(target), _key_names(missing)


def load_file(path: str) -> Any:
    """Read a checkpoint: .msgpack/.npz (converted Flax variables) or a torch.save file (without torch)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith((".msgpack", ".npz")):
        return load_variables(path)
    return torch_pickle.load(path)  # tensors as NumPy, no torch needed; refuses any code in the pickle


def load_pretrained(variables: Mapping[str, Any], source: Union[str, Mapping[str, Any]],
                    kind: str = "auto") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Load weights into an existing {'params', 'batch_stats'} tree (config `model.init_from`).

    Args:
      variables: the model's initialised variables (arrays or ShapeDtypeStructs).
      source: a path (.pth/.pt, or a converted .msgpack/.npz) or an already loaded checkpoint:
        a PyTorch state dict / wrapper, or a nested Flax variables dict (kind 'flax').
      kind: one of KINDS; 'auto' detects it.
    Returns:
      (variables with the loaded leaves replaced by float32 NumPy arrays, report) where report = {kind, loaded, ignored,
      left_at_init}. A backbone-only source leaves the head at init and lists it in the report;
      a full-model source must cover every variable.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    checkpoint = load_file(source) if isinstance(source, (str, os.PathLike)) else source
    is_flax = isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("params"), Mapping)
    if kind == "flax" or (kind == "auto" and is_flax):
        if not is_flax:
            raise ValueError("kind 'flax' expects a variables dict with a 'params' entry")
        loaded = {p: _to_numpy(v) for p, v in _flatten_variables(checkpoint).items()}
        kind, ignored = "flax", []
        backbone_only = all(p[1] == "backbone" for p in loaded)
    else:
        sd, kind, ignored = unwrap_state_dict(checkpoint, kind)
        loaded = convert_state_dict(sd)
        backbone_only = kind in BACKBONE_KINDS
    merged, left = merge_variables(variables, loaded, allow_missing_outside_backbone=backbone_only)
    report = {"kind": kind, "loaded": len(loaded), "ignored": ignored, "left_at_init": left}
    return merged, report


def _infer_stem(state_dict: Mapping[str, Any]) -> str:
    return "torchvision" if "backbone.conv1.weight" in state_dict else "deep"


def from_unimatch(state_dict: Mapping[str, Any], num_classes: int = 21, depth: int = 101,
                  output_stride: int = 16, aspp_rates: Tuple[int, ...] = (6, 12, 18),
                  **model_kwargs) -> Tuple[DeepLabV3Plus, Dict[str, Any]]:
    """Build a DeepLabV3Plus and its variables from a UniMatch/CSL checkpoint (or its state dict).

    The backbone (ResNet, or Xception-65 for a 'unimatch_xception' checkpoint) and the ResNet stem
    ('deep' / 'torchvision') are read from the keys; other DeepLabV3Plus fields (width, blocks,
    multi_grid, maxpool_ceil, dtype, ...) can be passed as keyword arguments.
    Returns (model, {'params', 'batch_stats'}) of float32 NumPy arrays (the model's apply gives
    (logits, out)); every variable must be present. Output stride and ASPP rates do not change
    the variables, only the model.
    """
    sd, kind, _ = unwrap_state_dict(state_dict)
    if kind not in ("unimatch", "csl", "unimatch_xception"):
        raise ValueError(f"from_unimatch expects a full DeepLabV3Plus checkpoint, got a {kind!r} "
                         "backbone file; use load_pretrained to load it into initialised variables")
    if kind == "unimatch_xception":
        model_kwargs.setdefault("backbone_arch", "xception65")
    else:
        model_kwargs.setdefault("stem", _infer_stem(sd))
    model = DeepLabV3Plus(num_classes=num_classes, depth=depth, output_stride=output_stride,
                          aspp_rates=tuple(aspp_rates), **model_kwargs)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3)), train=False))
    variables, _ = merge_variables(abstract, convert_state_dict(sd),
                                   allow_missing_outside_backbone=False)
    return model, variables


def from_backbone(checkpoint: Mapping[str, Any], kind: str = "auto", num_classes: int = 21, depth: int = 101,
                  width: int = 64, blocks: Optional[Tuple[int, ...]] = None) -> Tuple[DeepLabV3Plus, Dict[str, Any]]:
    """(DeepLabV3Plus, its `backbone` variables) from an ImageNet ResNet file ('deep_backbone' or
    'torchvision', the stem of the same name) or UniMatch's Xception-65 file ('xception'); every
    backbone variable must be present and of the shape of a model of this depth/width/blocks.
    What the CLI writes for a backbone kind."""
    sd, kind, _ = unwrap_state_dict(checkpoint, kind)
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"from_backbone expects an ImageNet backbone file ({BACKBONE_KINDS}), got a {kind!r} one")
    model = DeepLabV3Plus(num_classes=num_classes, depth=depth, width=width, blocks=blocks,
                          stem="torchvision" if kind == "torchvision" else "deep",
                          backbone_arch="xception65" if kind == "xception" else "resnet")
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    backbone = {k: v for k, v in _flatten_variables(abstract).items() if k[1] == "backbone"}
    variables, _ = merge_variables(traverse_util.unflatten_dict(backbone), convert_state_dict(sd), False)
    return model, variables


def save_variables(path: str, variables: Mapping[str, Any]) -> None:
    """Write a variables tree to `path` (.msgpack via flax.serialization, or .npz with '/' keys)."""
    tree = jax.tree.map(np.asarray, unfreeze(variables))
    if path.endswith(".msgpack"):
        with open(path, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(tree))
    elif path.endswith(".npz"):
        np.savez(path, **{"/".join(p): v for p, v in traverse_util.flatten_dict(tree).items()})
    else:
        raise ValueError(f"variables file must end in .msgpack or .npz, got {path}")


def load_variables(path: str) -> Dict[str, Any]:
    """Read a tree written by save_variables: nested dict of NumPy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"variables file not found: {path}")
    try:
        if path.endswith(".msgpack"):
            with open(path, "rb") as f:
                return flax.serialization.msgpack_restore(f.read())
        if path.endswith(".npz"):
            with np.load(path) as data:
                return traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})
    except Exception as e:
        raise ValueError(f"cannot read variables file {path} (corrupt or not written by "
                         f"save_variables): {e}") from e
    raise ValueError(f"variables file must end in .msgpack or .npz, got {path}")


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    """CLI: convert SRC.pth into OUT_DIR/variables.<format> and OUT_DIR/report.json."""
    parser = argparse.ArgumentParser(prog="python -m csl_jax.models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="PyTorch checkpoint (.pth/.pt)")
    parser.add_argument("out_dir")
    parser.add_argument("--kind", default="auto", choices=KINDS[:-1])
    parser.add_argument("--format", default="msgpack", choices=("msgpack", "npz"))
    parser.add_argument("--num-classes", type=int, default=21, help="full models only")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--width", type=int, default=64, help="base width (64; smaller for test models)")
    parser.add_argument("--blocks", type=lambda t: tuple(int(b) for b in t.split(",")), default=None,
                        help="blocks per layer, e.g. 3,4,23,3 (overrides --depth); Xception: middle-flow blocks")
    args = parser.parse_args(argv)

    checkpoint = load_file(args.src)
    _, kind, ignored = unwrap_state_dict(checkpoint, args.kind)
    # The kind's registered build: a full model (every variable checked), or for a backbone kind the
    # model's `backbone` subtree, shapes checked against a model of the given depth so that a wrong
    # file fails here, not at training time.
    _, variables = CONVERTERS[kind].build(checkpoint, num_classes=args.num_classes, depth=args.depth,
                                          width=args.width, blocks=args.blocks)
    os.makedirs(args.out_dir, exist_ok=True)
    out_path = os.path.join(args.out_dir, f"variables.{args.format}")
    save_variables(out_path, variables)
    def count(collection):
        return int(sum(np.prod(v.shape) for v in jax.tree.leaves(variables.get(collection, {}))))

    report = {"source": os.path.abspath(args.src), "kind": kind, "output": out_path,
              "depth": args.depth, "width": args.width, "blocks": list(args.blocks) if args.blocks else None,
              "ignored": ignored, "params": count("params"), "batch_stats": count("batch_stats")}
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # a missing or unreadable file, an unknown layout
        if os.environ.get("CSL_JAX_TRACEBACK"):
            raise
        raise SystemExit(f"error: {error}") from None  # exit 1, one line
