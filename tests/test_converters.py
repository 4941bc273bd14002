"""The checkpoint-converter registry (csl_jax.models.converters) and convert's auto-detection order:
each official layout is detected as its kind, in an explicit order; the registry and the order agree;
the CLI finds the variants' converters when run as `python -m csl_jax.models.convert`."""
import ast
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from csl_jax.models import ccvc, convert, converters, cpcl, css, dpt, registry, u2pl
from csl_jax.models.convert import CONVERTERS, DETECTION_ORDER, unwrap_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
A = np.zeros((1,), np.float32)  # detection and unwrapping read the keys only


def test_the_detection_order_is_explicit_and_agrees_with_the_registry_and_kinds():
    assert DETECTION_ORDER == ("u2pl", "css", "csl", "unimatch_v2", "dinov2", "unimatch_xception", "unimatch", "cpcl",
                               "ccvc", "xception", "deep_backbone", "torchvision")
    assert [c.kind for c in convert.converters_in_order()] == list(DETECTION_ORDER)
    assert sorted(CONVERTERS) == sorted(DETECTION_ORDER)
    assert sorted(convert.KINDS) == sorted(("auto", "flax") + DETECTION_ORDER)
    # read the checkpoint as loaded
    assert [k for k in DETECTION_ORDER if CONVERTERS[k].raw] == ["u2pl", "css", "unimatch_v2"]
    # each variant registers its own module's functions
    assert (CONVERTERS["u2pl"].detect, CONVERTERS["u2pl"].unwrap, CONVERTERS["u2pl"].build) == (
        u2pl.is_u2pl_checkpoint, u2pl.u2pl_state_dict, u2pl.from_u2pl)
    assert (CONVERTERS["css"].detect, CONVERTERS["css"].unwrap, CONVERTERS["css"].build) == (
        css.is_css_checkpoint, css.css_state_dict, css.from_css)
    assert (CONVERTERS["cpcl"].detect, CONVERTERS["cpcl"].build) == (cpcl.is_cpcl_state_dict, cpcl.from_cpcl)
    assert (CONVERTERS["ccvc"].detect, CONVERTERS["ccvc"].build) == (ccvc.is_ccvc_state_dict, ccvc.from_ccvc)
    assert CONVERTERS["csl"].detect is registry.is_csl_state_dict
    assert (CONVERTERS["xception"].detect, CONVERTERS["unimatch_xception"].detect) == (
        registry.is_xception_backbone, registry.is_unimatch_xception_state_dict)
    assert isinstance(CONVERTERS["unimatch"], converters.Converter)
    assert (CONVERTERS["unimatch_v2"].detect, CONVERTERS["unimatch_v2"].unwrap, CONVERTERS["unimatch_v2"].build) == (
        dpt.is_unimatch_v2_checkpoint, dpt.unimatch_v2_state_dict, dpt.from_unimatch_v2)
    assert (CONVERTERS["dinov2"].detect, CONVERTERS["dinov2"].unwrap, CONVERTERS["dinov2"].build) == (
        dpt.is_dinov2_state_dict, dpt.dinov2_state_dict, dpt.from_dinov2)


# (checkpoint as an official codebase saves it, its kind, the unwrapped keys, the ignored entries)
LAYOUTS = {
    "u2pl": ({"epoch": 80, "best_miou": 0.8, "optimizer_state": {},
              "model_state": {"module.encoder.conv1.0.weight": A, "module.decoder.head.0.weight": A},
              "teacher_state": {"module.encoder.conv1.0.weight": A, "module.decoder.head.0.weight": A}},
             "u2pl", {"backbone.conv1.0.weight", "decoder.head.0.weight"},
             ["best_miou", "epoch", "model_state", "optimizer_state"]),
    "u2pl_supervised": ({"epoch": 80, "model_state": {"encoder.conv1.0.weight": A, "decoder.head.0.weight": A}},
                        "u2pl", {"backbone.conv1.0.weight", "decoder.head.0.weight"}, ["epoch"]),
    "u2pl_flat": ({"module.encoder.conv1.0.weight": A, "module.decoder.head.0.weight": A, "auxor.aux.0.weight": A},
                  "u2pl", {"backbone.conv1.0.weight", "decoder.head.0.weight", "auxor.aux.0.weight"}, []),
    "css": ({"epoch": 3, "optimizer": {}, "lr_scheduler": {}, "prototypes": A,
             "model": {"resnet_conv1.weight": A, "ASPP.convs.4.1.weight": A, "project.0.weight": A},
             "ema_model": {"resnet_conv1.weight": A, "ASPP.convs.0.1.weight": A, "project.0.weight": A}},
            "css", {"backbone.conv1.weight", "head.b0.1.weight", "reduce.0.weight"},
            ["epoch", "lr_scheduler", "model", "optimizer", "prototypes"]),
    "css_flat": ({"module.resnet_conv1.weight": A, "module.ASPP.project.0.weight": A}, "css",
                 {"backbone.conv1.weight", "head.project.0.weight"}, []),
    "csl": ({"epoch": 1, "state_dict": {"model.backbone.conv1.0.weight": A, "model.decoder.head.b0.0.weight": A,
                                        "criterion.weight": A}},
            "csl", {"backbone.conv1.0.weight", "head.b0.0.weight"}, ["criterion.weight"]),
    "unimatch": ({"model": {"module.backbone.conv1.0.weight": A, "module.head.b0.0.weight": A}, "optimizer": {},
                  "epoch": 79, "previous_best": 80.1},
                 "unimatch", {"backbone.conv1.0.weight", "head.b0.0.weight"}, []),
    "cpcl": ({"model": {"branch1.backbone.conv1.0.weight": A, "branch1.head.aspp.map_convs.0.weight": A,
                        "branch2.backbone.conv1.0.weight": A, "branch2.classifier.weight": A},
              "optimizer_1": {}, "optimizer_2": {}, "epoch": 34, "iteration": 39338},
             "cpcl", {"branch1.backbone.conv1.0.weight", "branch1.head.aspp.map_convs.0.weight",
                      "branch2.backbone.conv1.0.weight", "branch2.classifier.weight"}, []),
    "ccvc": ({"module.branch1.backbone.conv1.0.weight": A, "module.branch2.mapping.0.weight": A},
             "ccvc", {"branch1.backbone.conv1.0.weight", "branch2.mapping.0.weight"}, []),
    "deep_backbone": ({"conv1.0.weight": A, "layer1.0.conv1.weight": A, "fc.weight": A, "fc.bias": A},
                      "deep_backbone", {"backbone.conv1.0.weight", "backbone.layer1.0.conv1.weight"},
                      ["fc.bias", "fc.weight"]),
    "torchvision": ({"conv1.weight": A, "bn1.running_var": A, "fc.weight": A}, "torchvision",
                    {"backbone.conv1.weight", "backbone.bn1.running_var"}, ["fc.weight"]),
    # UniMatch's ImageNet xception.pth: bare keys with `conv1.weight` too; UniMatch drops 'itr'/'tmp'/'track' keys
    "xception": ({"conv1.weight": A, "block1.sepconv1.depthwise.weight": A,
                  "block1.sepconv1.bn1.num_batches_tracked": A, "block1.itr": A, "tmp.weight": A}, "xception",
                 {"backbone.conv1.weight", "backbone.block1.sepconv1.depthwise.weight",
                  "backbone.block1.sepconv1.bn1.num_batches_tracked"}, ["block1.itr", "tmp.weight"]),
    "unimatch_xception": ({"model": {"module.backbone.block1.sepconv1.depthwise.weight": A,
                                     "module.backbone.conv1.weight": A, "module.head.b0.0.weight": A},
                           "optimizer": {}, "epoch": 29, "previous_best": 31.86},
                          "unimatch_xception", {"backbone.block1.sepconv1.depthwise.weight", "backbone.conv1.weight",
                                                "head.b0.0.weight"}, []),
    # UniMatch V2 (unimatch_v2.py:265-274): both DDP networks, the EMA teacher converted; the never-used
    # mask_token and refinenet4.resConfUnit1 are reported
    "unimatch_v2": ({"model": {"module.backbone.blocks.0.attn.qkv.weight": A, "module.head.projects.0.weight": A},
                     "model_ema": {"module.backbone.blocks.0.attn.qkv.weight": A, "module.backbone.mask_token": A,
                                   "module.head.scratch.refinenet4.resConfUnit1.conv1.weight": A,
                                   "module.head.scratch.output_conv.2.weight": A},
                     "optimizer": {}, "epoch": 59, "previous_best": 86.0, "previous_best_ema": 86.3, "best_epoch": 50,
                     "best_epoch_ema": 52},
                    "unimatch_v2", {"backbone.blocks.0.attn.qkv.weight", "head.scratch.output_conv.2.weight"},
                    ["best_epoch", "best_epoch_ema", "epoch", "model", "optimizer", "previous_best",
                     "previous_best_ema", "backbone.mask_token", "head.scratch.refinenet4.resConfUnit1.conv1.weight"]),
    "unimatch_v2_flat": ({"module.backbone.blocks.0.attn.qkv.weight": A, "module.head.projects.0.weight": A},
                         "unimatch_v2", {"backbone.blocks.0.attn.qkv.weight", "head.projects.0.weight"}, []),
    # an official dinov2_vit*14_pretrain.pth: bare encoder keys
    "dinov2": ({"cls_token": A, "pos_embed": A, "mask_token": A, "patch_embed.proj.weight": A,
                "blocks.0.attn.qkv.weight": A, "blocks.0.ls1.gamma": A},
               "dinov2", {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
                          "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.ls1.gamma"}, ["mask_token"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_official_layout_is_detected_as_its_kind(name):
    checkpoint, kind, keys, ignored = LAYOUTS[name]
    sd, got, got_ignored = unwrap_state_dict(checkpoint)
    assert (got, set(sd), got_ignored) == (kind, keys, ignored)
    assert unwrap_state_dict(checkpoint, kind) == (sd, kind, ignored)  # the same when named


def _accepting(checkpoint):
    """The kinds whose detect accepts `checkpoint`, in DETECTION_ORDER."""
    selected = convert.select_state_dict(checkpoint)
    return [c.kind for c in convert.converters_in_order() if c.detect(dict(checkpoint) if c.raw else selected)]


#: kind -> the later kinds that accept its files too
OVERLAPS = {"cpcl": ["ccvc"], "unimatch_xception": ["unimatch"], "unimatch_v2": ["unimatch"],
            "xception": ["torchvision"]}


def test_the_order_decides_where_layouts_overlap():
    """CPCL files also have CCVC's `branch1.backbone.*` keys, UniMatch Xception and V2 models UniMatch's
    `backbone.*` and ImageNet Xception files torchvision's `conv1.weight`: the specific kind is asked first. Every other
    layout is accepted by its own kind only. (U2PL and CSS read the file as loaded: they pick the teacher,
    where the generic selection would take CSS's student `model`; LAYOUTS expects the teacher's keys.)"""
    for name, (checkpoint, kind, _, _) in LAYOUTS.items():
        accepted = _accepting(checkpoint)
        assert accepted[0] == kind, name
        assert accepted == [kind] + OVERLAPS.get(kind, []), name


def test_an_unknown_layout_names_the_kinds_in_order_and_its_first_keys():
    checkpoint = {"model": {f"module.k{i}.weight": A for i in range(10)}, "epoch": 3}
    with pytest.raises(ValueError, match="cannot recognise the checkpoint layout") as error:
        unwrap_state_dict(checkpoint)
    message = str(error.value)
    positions = [re.search(rf"(?<!\w){kind}: ", message).start() for kind in DETECTION_ORDER]  # whole names
    assert positions == sorted(positions)
    assert "`model.backbone.*`" in message and "`branch1.head.aspp.map_convs.*`" in message
    assert message.endswith(f"first keys: {[f'k{i}.weight' for i in range(8)]}")  # `module.` prefixes removed
    with pytest.raises(ValueError, match="cannot recognise the checkpoint layout"):
        convert.load_pretrained({"params": {}}, checkpoint)


def _converter(kind):
    return converters.Converter(kind=kind, layout="`encoder.*` keys", detect=lambda sd: False,
                                unwrap=converters.unchanged, build=lambda checkpoint, **kw: (None, {}))


def test_a_registered_kind_must_be_placed_in_the_order(monkeypatch):
    monkeypatch.setitem(CONVERTERS, "segformer", _converter("segformer"))
    with pytest.raises(ValueError, match=re.escape("converters ['segformer'] are registered but not placed in "
                                                   "csl_jax.models.convert.DETECTION_ORDER")):
        unwrap_state_dict(LAYOUTS["unimatch"][0])


def test_a_kind_in_the_order_must_be_registered(monkeypatch):
    monkeypatch.delitem(CONVERTERS, "ccvc")
    with pytest.raises(ValueError, match=re.escape("no converter is registered for ['ccvc']")):
        unwrap_state_dict(LAYOUTS["unimatch"][0])


def test_register_converter_refuses_a_taken_or_reserved_kind():
    before = dict(CONVERTERS)
    for kind, match in (("u2pl", "already registered"), ("auto", "reserved"), ("flax", "reserved")):
        with pytest.raises(ValueError, match=match):
            converters.register_converter(kind, layout="", detect=bool, unwrap=converters.unchanged, build=dict)
    assert CONVERTERS == before


def test_a_registered_converter_is_found_once_placed(monkeypatch):
    """What a new kind does (a SegFormer with `backbone.*` keys goes before 'unimatch')."""
    def is_segformer(sd):
        return any(k.startswith("backbone.block1.") for k in sd)

    monkeypatch.setitem(CONVERTERS, "segformer", converters.Converter(
        kind="segformer", layout="`backbone.block1.*` keys", detect=is_segformer, unwrap=converters.unchanged,
        build=lambda checkpoint, **kw: (None, {})))
    order = list(DETECTION_ORDER)
    order.insert(order.index("unimatch"), "segformer")
    monkeypatch.setattr(convert, "DETECTION_ORDER", tuple(order))
    segformer = {"model": {"backbone.block1.0.attn.q.weight": A, "head.b0.0.weight": A}}
    assert unwrap_state_dict(segformer)[1] == "segformer"
    assert unwrap_state_dict(LAYOUTS["unimatch"][0])[1] == "unimatch"


def test_unimatch_v2_takes_the_teacher_or_the_student_and_dinov2_refuses_register_tokens():
    checkpoint = LAYOUTS["unimatch_v2"][0]
    student, ignored = dpt.unimatch_v2_state_dict(checkpoint, network="student")
    assert set(student) == {"backbone.blocks.0.attn.qkv.weight", "head.projects.0.weight"} and "model_ema" in ignored
    supervised = {"model": checkpoint["model"], "optimizer": {}, "epoch": 3}  # supervised.py saves no EMA
    assert unwrap_state_dict(supervised)[:2] == (student, "unimatch_v2")
    with pytest.raises(ValueError, match="network must be 'teacher' \\(model_ema\\) or 'student' \\(model\\)"):
        dpt.unimatch_v2_state_dict(checkpoint, network="ema")
    reg4 = dict(LAYOUTS["dinov2"][0], register_tokens=A)  # dinov2_vit*14_reg4_pretrain.pth: detected, refused
    with pytest.raises(ValueError, match="has register tokens"):
        unwrap_state_dict(reg4)


def _imports(path):
    """(line, module) of every import in a file, inside functions too (`from m import x` as m.x)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)


def test_convert_imports_no_model_variant_and_converters_nothing_of_csl_jax():
    models = ROOT / "csl_jax" / "models"
    variants = ("u2pl", "css", "cpcl", "ccvc", "dpt", "dinov2")
    assert not [f"{line} {name}" for line, name in _imports(models / "convert.py")
                if any(name == f"csl_jax.models.{v}" or name.startswith(f"csl_jax.models.{v}.") for v in variants)]
    assert not [name for _, name in _imports(models / "converters.py") if name.startswith("csl_jax")]


# ----------------------------------------------------------------------------- the CLI, as users run it
CLASSES, WIDTH, BLOCKS = 3, 8, (1, 1, 1, 1)


def _torch_state_dict(variables, prefixes):
    """Flax variables -> an official-looking state dict (inverse of convert.flax_path / convert_state_dict)."""
    leaves = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
    out = {}
    for path, value in traverse_util.flatten_dict(variables).items():
        modules = [re.sub(r"_(\d+)$", r".\1", m) for m in path[1:-1]]
        modules[0] = prefixes.get(modules[0], modules[0])
        out[".".join(modules + [leaves[path[0], path[-1]]])] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    return out


def test_the_cli_run_as_a_module_finds_a_variant_converter(tmp_path):
    """`python -m csl_jax.models.convert` on an official U2PL file (no --kind): detected, converted, and
    every variable equals the file's; no runpy warning (the package did not import convert first)."""
    torch = pytest.importorskip("torch")
    model = u2pl.U2PLDeepLabV3Plus(num_classes=CLASSES, width=WIDTH, blocks=BLOCKS, head_width=16, low_width=8,
                                   rep_dim=8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract)
    sd = _torch_state_dict(variables, {"backbone": "encoder"})
    assert set(convert.convert_state_dict(u2pl.u2pl_state_dict(sd)[0])) == set(
        traverse_util.flatten_dict(variables))  # the inverse mapping is right
    network = {f"module.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    src = tmp_path / "ckpt_best.pth"
    torch.save({"epoch": 80, "model_state": {k: v * 0 for k, v in network.items()}, "teacher_state": network,
                "optimizer_state": {}, "best_miou": 0.8}, src)

    result = subprocess.run([sys.executable, "-m", "csl_jax.models.convert", str(src), str(tmp_path / "out"),
                             "--num-classes", str(CLASSES), "--width", str(WIDTH),
                             "--blocks", ",".join(map(str, BLOCKS))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "u2pl" and report["ignored"] == ["best_miou", "epoch", "model_state", "optimizer_state"]
    written = traverse_util.flatten_dict(convert.load_variables(str(tmp_path / "out" / "variables.msgpack")))
    expected = traverse_util.flatten_dict(variables)
    assert set(written) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(written[path], value, err_msg="/".join(path))  # the teacher, not zeros


def test_a_fresh_process_importing_convert_sees_every_converter():
    """`import csl_jax.models` registers every converter without importing convert: `python -m
    csl_jax.models.convert` runs convert.py as a script after importing the package, and a package that
    had imported it already would make runpy warn and leave two copies of the module."""
    code = ("import sys, csl_jax.models; print('csl_jax.models.convert' in sys.modules); "
            "from csl_jax.models import convert; print(','.join(c.kind for c in convert.converters_in_order()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", ",".join(DETECTION_ORDER)]
