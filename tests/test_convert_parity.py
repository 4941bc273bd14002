"""PyTorch -> Flax conversion: key layout, numerical parity with a PyTorch DeepLabV3+, file I/O.

The PyTorch reference below follows UniMatch's key layout (docs/models.md §9) and torchvision's
`replace_stride_with_dilation` semantics, with width/blocks options so tiny networks exist on
both sides.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from csl_jax.models import DeepLabV3Plus  # noqa: E402
from csl_jax.models import convert  # noqa: E402
from csl_jax.models.convert import from_unimatch, load_pretrained  # noqa: E402
from tests.helpers import torch_reference  # noqa: E402
from tests.helpers.torch_reference import randomise_bn  # noqa: E402,F401  (used here and by other tests)

TINY = dict(width=8, blocks=(1, 1, 2, 3), head_width=16, reduce_width=8)


# ----------------------------------------------------------------------------- PyTorch reference
class TorchBottleneck(tnn.Module):
    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TorchResNet(tnn.Module):
    def __init__(self, blocks, width, stem, replace_stride_with_dilation, multi_grid, ceil_mode):
        super().__init__()
        if stem == "deep":
            self.conv1 = tnn.Sequential(
                tnn.Conv2d(3, width, 3, 2, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU(),
                tnn.Conv2d(width, width, 3, 1, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU(),
                tnn.Conv2d(width, 2 * width, 3, 1, 1, bias=False))
            self.inplanes = 2 * width
        else:
            self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.inplanes = width
        self.bn1 = tnn.BatchNorm2d(self.inplanes)
        self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
        self.dilation = 1
        self.layer1 = self._make_layer(width, blocks[0], 1, False, None)
        self.layer2 = self._make_layer(2 * width, blocks[1], 2, replace_stride_with_dilation[0], None)
        self.layer3 = self._make_layer(4 * width, blocks[2], 2, replace_stride_with_dilation[1], None)
        self.layer4 = self._make_layer(8 * width, blocks[3], 2, replace_stride_with_dilation[2],
                                       (2, 2, 4) if multi_grid else None)

    def _make_layer(self, planes, n, stride, dilate, grid):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = grid or (1,) * n
        downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                    tnn.BatchNorm2d(planes * 4))
        layers = [TorchBottleneck(self.inplanes, planes, stride, previous * grid[0], downsample)]
        self.inplanes = planes * 4
        layers += [TorchBottleneck(self.inplanes, planes, 1, self.dilation * grid[i], None)
                   for i in range(1, n)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        return c1, self.layer4(self.layer3(self.layer2(c1)))


def _cbr(cin, cout, k, d=1):
    return tnn.Sequential(tnn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False),
                          tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchPooling(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.gap = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Conv2d(cin, cout, 1, bias=False),
                                  tnn.BatchNorm2d(cout), tnn.ReLU())

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class TorchASPP(tnn.Module):
    def __init__(self, cin, cout, rates):
        super().__init__()
        self.b0 = _cbr(cin, cout, 1)
        self.b1, self.b2, self.b3 = (_cbr(cin, cout, 3, r) for r in rates)
        self.b4 = TorchPooling(cin, cout)
        self.project = _cbr(5 * cout, cout, 1)

    def forward(self, x):
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class TorchDeepLab(tnn.Module):
    def __init__(self, num_classes, depth=101, width=64, blocks=None, stem="deep", output_stride=16,
                 multi_grid=False, maxpool_ceil=False, aspp_rates=(6, 12, 18), head_width=256,
                 reduce_width=48):
        super().__init__()
        blocks = blocks or {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        replace = {16: (False, False, True), 8: (False, True, True)}[output_stride]
        self.backbone = TorchResNet(blocks, width, stem, replace, multi_grid, maxpool_ceil)
        self.head = TorchASPP(32 * width, head_width, aspp_rates)
        self.reduce = _cbr(4 * width, reduce_width, 1)
        self.fuse = tnn.Sequential(*_cbr(reduce_width + head_width, head_width, 3),
                                   *_cbr(head_width, head_width, 3))
        self.classifier = tnn.Conv2d(head_width, num_classes, 1, bias=True)

    def forward(self, x):
        h, w = x.shape[-2:]
        c1, c4 = self.backbone(x)
        c4 = F.interpolate(self.head(c4), c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], 1)))
        return F.interpolate(out, (h, w), mode="bilinear", align_corners=True)


def _randomised(num_classes=5, seed=0, **kw):
    """Tiny torch model with random weights, random BN stats and logits of std ~1."""
    return torch_reference.randomised_eval(lambda: TorchDeepLab(num_classes, **kw), seed,
                                           lambda model, x: [(model, model(x))])


def _images(size, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _torch_forward(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("stem,output_stride,size,ceil,multi_grid", [
    ("deep", 16, 321, False, False),
    ("deep", 8, 320, True, True),
    ("torchvision", 8, 320, False, False),
    ("torchvision", 16, 321, True, False),
])
def test_eval_logits_match_pytorch(stem, output_stride, size, ceil, multi_grid):
    kw = dict(TINY, stem=stem, output_stride=output_stride, maxpool_ceil=ceil, multi_grid=multi_grid)
    tmodel = _randomised(**kw)
    model, variables = from_unimatch({"model": tmodel.state_dict()}, num_classes=5, **kw)
    assert model.stem == stem  # inferred from the keys
    x = _images(size)
    expected = _torch_forward(tmodel, x)
    got, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert out == {}
    assert got.shape == expected.shape == (2, size, size, 5)
    assert got.dtype == jnp.float32
    assert expected.std() > 0.3  # the comparison is not trivially small
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


def test_train_mode_output_and_running_stats_match_pytorch():
    tmodel = _randomised(**TINY)
    model, variables = from_unimatch(tmodel.state_dict(), num_classes=5, **TINY)
    x = _images(161)
    tmodel.train()
    expected = _torch_forward(tmodel, x)
    (got, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    # Batch statistics are float32 sums over ~50k values in a different order than PyTorch's,
    # and train-mode BN amplifies their rounding: compare relative to the logit range.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0,
                               atol=5e-5 * np.abs(expected).max())
    # Updated running stats (unbiased var, momentum 0.1), including the 2-sample pooling BN.
    new_stats = convert.convert_state_dict(tmodel.state_dict())
    flat = convert._flatten_variables({"batch_stats": updates["batch_stats"]})
    assert len(flat) == sum(p[0] == "batch_stats" for p in new_stats)
    for path, value in flat.items():
        np.testing.assert_allclose(np.asarray(value), new_stats[path], rtol=1e-4, atol=1e-5,
                                   err_msg="/".join(path))


# ----------------------------------------------------------------------------- full-size layouts
def _meta_state_dict(**kw):
    with torch.device("meta"):
        model = TorchDeepLab(21, **kw)
    # zero-copy stand-ins with the right shapes
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("depth,n_keys,n_params", [(101, 692, 59_468_085), (50, 386, 40_475_957)])
def test_real_unimatch_key_layout(depth, n_keys, n_params):
    sd = _meta_state_dict(depth=depth)
    assert len(sd) == n_keys
    model, variables = from_unimatch({"model": {f"module.{k}": v for k, v in sd.items()}},
                                     num_classes=21, depth=depth)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"])) == n_params
    assert variables["params"]["backbone"]["layer3_5"]["conv2"]["kernel"].shape == (3, 3, 256, 256)
    assert variables["params"]["head"]["b4"]["gap_1"]["kernel"].shape == (1, 1, 2048, 256)


def test_csl_lightning_layout():
    sd = _meta_state_dict(depth=50)
    lightning = {"state_dict": {("model." + k.replace("head.", "decoder.head.", 1)
                                 .replace("reduce.", "decoder.reduce.", 1)
                                 .replace("fuse.", "decoder.fuse.", 1)
                                 .replace("classifier.", "decoder.classifier.", 1)): v
                                for k, v in sd.items()}}
    lightning["state_dict"]["criterion.weight"] = np.zeros(3, np.float32)
    sd_out, kind, ignored = convert.unwrap_state_dict(lightning)
    assert kind == "csl" and ignored == ["criterion.weight"]
    assert sorted(sd_out) == sorted(sd)


def _abstract_variables(**kw):
    model = DeepLabV3Plus(21, **kw)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))


@pytest.mark.parametrize("stem,kind", [("deep", "deep_backbone"), ("torchvision", "torchvision")])
def test_imagenet_backbone_import_leaves_head_at_init(stem, kind):
    sd = {k[len("backbone."):]: v for k, v in _meta_state_dict(depth=50, stem=stem).items()
          if k.startswith("backbone.")}
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    sd["fc.bias"] = np.zeros((1000,), np.float32)
    variables = _abstract_variables(depth=50, stem=stem)
    merged, report = load_pretrained(variables, sd)
    assert report["kind"] == kind
    assert report["ignored"] == ["fc.bias", "fc.weight"]
    assert report["left_at_init"] and all(not k.split("/")[1] == "backbone" for k in report["left_at_init"])
    assert "params/classifier/kernel" in report["left_at_init"]
    assert isinstance(merged["params"]["backbone"]["bn1"]["scale"], np.ndarray)
    assert isinstance(merged["params"]["classifier"]["kernel"], jax.ShapeDtypeStruct)


def test_conversion_errors_name_the_keys():
    variables = _abstract_variables(**TINY)
    sd = {k: v.numpy() for k, v in TorchDeepLab(21, **TINY).state_dict().items()}
    with pytest.raises(ValueError, match="no place in the model.*head/b9_0/kernel"):
        load_pretrained(variables, dict(sd, **{"head.b9.0.weight": np.zeros((1, 1, 1, 1))}))
    missing = {k: v for k, v in sd.items() if not k.startswith("fuse.4.")}
    with pytest.raises(ValueError, match="missing from the checkpoint.*params/fuse_4/scale"):
        load_pretrained(variables, missing)
    with pytest.raises(ValueError, match="cannot recognise the checkpoint layout"):
        load_pretrained(variables, {"foo.weight": np.zeros(3)})


def test_shape_mismatch_reports_both_shapes():
    variables = _abstract_variables(**TINY)
    sd = {k: v.numpy() for k, v in TorchDeepLab(21, **TINY).state_dict().items()}
    sd["classifier.weight"] = np.zeros((19, 16, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"params/classifier/kernel: checkpoint \(1, 1, 16, 19\) "
                                         r"vs model \(1, 1, 16, 21\)"):
        load_pretrained(variables, sd)


# ----------------------------------------------------------------------------- files and CLI
@pytest.mark.parametrize("fmt", ["msgpack", "npz"])
def test_cli_writes_variables_that_load_back(tmp_path, fmt):
    small = dict(width=8, blocks=(1, 1, 1, 1))
    tmodel = _randomised(num_classes=21, **small)
    src = tmp_path / "ckpt.pth"
    torch.save({"model": tmodel.state_dict(), "epoch": 3}, src)
    out = tmp_path / "out"
    report = convert.main([str(src), str(out), "--format", fmt, "--width", "8", "--blocks", "1,1,1,1"])
    assert report["kind"] == "unimatch"
    assert json.loads((out / "report.json").read_text()) == report
    restored = convert.load_variables(str(out / f"variables.{fmt}"))
    _, expected = from_unimatch(tmodel.state_dict(), num_classes=21, **small)
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    # a converted file is a valid init_from source
    _, rep = load_pretrained(_abstract_variables(**small), str(out / f"variables.{fmt}"))
    assert rep["kind"] == "flax" and rep["left_at_init"] == []


def test_load_variables_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.msgpack"):
        convert.load_variables(str(tmp_path / "nope.msgpack"))
    corrupt = tmp_path / "bad.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="bad.npz"):
        convert.load_variables(str(corrupt))
    with pytest.raises(ValueError, match=r"\.msgpack or \.npz"):
        convert.save_variables(str(tmp_path / "x.pkl"), {"params": {}})
