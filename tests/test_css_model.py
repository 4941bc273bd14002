"""The CSS network and its converter against a PyTorch transcription of the official model
(generalframeworks/networks/deeplabv3/{deeplabv3,aspp}.py `DeepLabv3Plus_with_rep` on a torchvision
ResNet with `_nostride_dilate`), written here at a small width: eval logits of converted official
checkpoints (teacher and student), train-mode outputs, `--kind css` conversion of a file."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from csl_jax.models import build_model, convert
from csl_jax.models.css import from_css
from tests.test_convert_parity import TorchResNet, randomise_bn

W = 8          # base width (64)
INNER = 16     # ASPP / head width (256)
REDUCE = 8     # low-level path (48)
REP = 12       # representation dim (256)
RATES = (2, 3, 4)
BLOCKS = (1, 2, 2, 3)
CLASSES = 5


def nostride_dilate(m, dilate):
    """The official `_nostride_dilate`: strided convs lose their stride (3x3: dilation dilate // 2),
    the other 3x3 convs get dilation `dilate`."""
    if isinstance(m, tnn.Conv2d):
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate // 2,) * 2, (dilate // 2,) * 2
        elif m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilate,) * 2, (dilate,) * 2


def cbr(cin, cout, k, dilation=1):
    return [tnn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
            tnn.BatchNorm2d(cout), tnn.ReLU()]


class ASPP(tnn.Module):
    """aspp.py `ASPP`: convs[0] 1x1, convs[1..3] dilated, convs[4] pooling (bilinear, align_corners=False), project."""

    def __init__(self, cin):
        super().__init__()
        self.convs = tnn.ModuleList([tnn.Sequential(*cbr(cin, INNER, 1))] +
                                    [tnn.Sequential(*cbr(cin, INNER, 3, r)) for r in RATES] +
                                    [tnn.Sequential(tnn.AdaptiveAvgPool2d(1), *cbr(cin, INNER, 1))])
        self.project = tnn.Sequential(*cbr(5 * INNER, INNER, 1))

    def forward(self, x):
        res = [conv(x) for conv in self.convs[:4]]
        res.append(F.interpolate(self.convs[4](x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(res, dim=1))


class DeepLabv3PlusWithRep(tnn.Module):
    """`DeepLabv3Plus_with_rep(orig_resnet, dilate_scale=8)` with the official attribute names."""

    def __init__(self):
        super().__init__()
        r = TorchResNet(BLOCKS, W, "torchvision", (False, False, False), False, False)
        r.layer3.apply(partial(nostride_dilate, dilate=2))
        r.layer4.apply(partial(nostride_dilate, dilate=4))
        self.resnet_conv1, self.resnet_bn1 = r.conv1, r.bn1
        self.resnet_maxpool = r.maxpool
        self.resnet_layer1, self.resnet_layer2, self.resnet_layer3, self.resnet_layer4 = (
            r.layer1, r.layer2, r.layer3, r.layer4)
        self.ASPP = ASPP(32 * W)
        self.project = tnn.Sequential(*cbr(4 * W, REDUCE, 1))
        self.classifier = tnn.Sequential(*cbr(REDUCE + INNER, INNER, 3), tnn.Conv2d(INNER, CLASSES, 1))
        self.representation = tnn.Sequential(*cbr(REDUCE + INNER, INNER, 3), tnn.Conv2d(INNER, REP, 1))

    def forward(self, x):
        x = self.resnet_maxpool(F.relu(self.resnet_bn1(self.resnet_conv1(x))))
        x_low = self.resnet_layer1(x)
        x = self.resnet_layer4(self.resnet_layer3(self.resnet_layer2(x_low)))
        feature = self.ASPP(x)
        x_low = self.project(x_low)
        feature = F.interpolate(feature, size=x_low.shape[2:], mode="bilinear", align_corners=True)
        cat = torch.cat([x_low, feature], dim=1)
        return self.classifier(cat), self.representation(cat)


def randomised(seed):
    torch.manual_seed(seed)
    model = DeepLabv3PlusWithRep()
    randomise_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def checkpoint(seed=0):
    """An official-layout `best_model.pth` dict: student 'model', teacher 'ema_model' (different weights)."""
    return {"epoch": 3, "model": randomised(seed).state_dict(), "ema_model": randomised(seed + 10).state_dict(),
            "optimizer": {}, "lr_scheduler": {}, "prototypes": np.zeros((CLASSES, REP), np.float32)}


def torch_eval_logits(model, x_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        pred, _ = model(x)
        pred = F.interpolate(pred, size=x.shape[2:], mode="bilinear", align_corners=True)  # cross_label.test
        return pred.permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("network,seed_offset", [("teacher", 10), ("student", 0)])
def test_converted_checkpoint_matches_eval_logits(network, seed_offset):
    ckpt = checkpoint()
    model, variables = from_css(ckpt, num_classes=CLASSES, network=network, width=W, blocks=BLOCKS,
                                aspp_rates=RATES)
    x = np.random.default_rng(0).standard_normal((2, 67, 75, 3)).astype(np.float32)
    logits, out = model.apply(variables, jnp.asarray(x), train=False)
    assert out == {}
    want = torch_eval_logits(randomised(seed_offset), x)
    assert rel_err(np.asarray(logits), want) < 1e-4


def test_train_mode_outputs_match_pytorch_and_the_registry_builds_the_same_tree():
    torch_model = randomised(0).train()
    model, variables = from_css(torch_model.state_dict(), num_classes=CLASSES, width=W, blocks=BLOCKS,
                                aspp_rates=RATES)
    x = np.random.default_rng(1).standard_normal((2, 65, 65, 3)).astype(np.float32)
    (_, out), _ = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    with torch.no_grad():
        pred, rep = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert rel_err(np.asarray(out["pred"]), pred.permute(0, 2, 3, 1).numpy()) < 1e-4
    assert rel_err(np.asarray(out["rep"]), rep.permute(0, 2, 3, 1).numpy()) < 1e-4
    cfg = ml_collections.ConfigDict(dict(name="css", stem="torchvision", output_stride=8, aspp_rates=RATES,
                                         width=W, blocks=BLOCKS, head_width=INNER, reduce_width=REDUCE, rep_dim=REP))
    built = build_model(cfg, CLASSES)
    shapes = jax.eval_shape(lambda: built.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)


def test_load_pretrained_detects_the_layout_and_the_cli_converts(tmp_path):
    ckpt = checkpoint()
    model, variables = from_css(ckpt, num_classes=CLASSES, width=W, blocks=BLOCKS, aspp_rates=RATES)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    loaded, report = convert.load_pretrained(abstract, ckpt)
    assert report["kind"] == "css" and report["left_at_init"] == []
    assert report["ignored"] == ["epoch", "lr_scheduler", "model", "optimizer", "prototypes"]
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    src = tmp_path / "best_model.pth"
    torch.save(ckpt, src)  # with the NumPy prototypes, as cross_label.py saves them
    out = convert.main([str(src), str(tmp_path / "out"), "--num-classes", str(CLASSES), "--width", str(W),
                        "--blocks", ",".join(map(str, BLOCKS))])
    assert out["kind"] == "css"
    written = convert.load_variables(str(tmp_path / "out" / "variables.msgpack"))
    jax.tree.map(np.testing.assert_array_equal, written, variables)
    assert json.load(open(tmp_path / "out" / "report.json"))["kind"] == "css"


def test_missing_keys_are_named():
    sd = randomised(0).state_dict()
    del sd["representation.3.weight"]
    with pytest.raises(ValueError, match="representation_3"):
        from_css(sd, num_classes=CLASSES, width=W, blocks=BLOCKS, aspp_rates=RATES)
