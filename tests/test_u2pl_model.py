"""The U2PL network and its converter against a PyTorch transcription of the official model
(u2pl/models/{resnet,base,decoder,model_helper}.py), written here at a small width: eval logits,
parameter count, train-mode outputs, `--kind u2pl` conversion of a checkpoint file."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from csl_jax.models import build_model, convert
from csl_jax.models.u2pl import from_u2pl
from tests.test_convert_parity import TorchBottleneck

W = 8          # base width (64 in U2PL)
INNER = 16     # ASPP / head / classifier width (256)
REP = 12       # representation dim (256)
RATES = (2, 3, 4)
BLOCKS = (1, 2, 2, 3)  # 3 in layer4: multi-grid (2, 2, 4) on every block
CLASSES = 5


class ResNet(tnn.Module):
    """The official ResNet (deep stem, ceil-mode max-pool, replace_stride_with_dilation [F, T, T],
    multi_grid, fpn=True), at base width W."""

    def __init__(self):
        super().__init__()
        self.inplanes, self.dilation = 2 * W, 1
        self.conv1 = tnn.Sequential(tnn.Conv2d(3, W, 3, 2, 1, bias=False), tnn.BatchNorm2d(W), tnn.ReLU(),
                                    tnn.Conv2d(W, W, 3, 1, 1, bias=False), tnn.BatchNorm2d(W), tnn.ReLU(),
                                    tnn.Conv2d(W, 2 * W, 3, 1, 1, bias=False))
        self.bn1 = tnn.BatchNorm2d(2 * W)
        self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.layer1 = self._make_layer(W, BLOCKS[0])
        self.layer2 = self._make_layer(2 * W, BLOCKS[1], 2)
        self.layer3 = self._make_layer(4 * W, BLOCKS[2], 2, dilate=True)
        self.layer4 = self._make_layer(8 * W, BLOCKS[3], 2, dilate=True, multi_grid=True)

    def _make_layer(self, planes, blocks, stride=1, dilate=False, multi_grid=False):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                    tnn.BatchNorm2d(planes * 4))
        grids = [2, 2, 4] if multi_grid else [1] * blocks
        layers = [TorchBottleneck(self.inplanes, planes, stride, previous * grids[0], downsample)]
        self.inplanes = planes * 4
        layers += [TorchBottleneck(self.inplanes, planes, 1, self.dilation * grids[i], None) for i in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return [x1, x2, x3, self.layer4(x3)]


def cbr(cin, cout, k, dilation=1, bias=False):
    return [tnn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias),
            tnn.BatchNorm2d(cout), tnn.ReLU()]


class ASPP(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv1 = tnn.Sequential(tnn.AdaptiveAvgPool2d((1, 1)), *cbr(cin, INNER, 1))
        self.conv2 = tnn.Sequential(*cbr(cin, INNER, 1))
        self.conv3, self.conv4, self.conv5 = (tnn.Sequential(*cbr(cin, INNER, 3, r)) for r in RATES)

    def forward(self, x):
        h, w = x.shape[-2:]
        pool = F.interpolate(self.conv1(x), size=(h, w), mode="bilinear", align_corners=True)
        return torch.cat([pool, self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)], 1)


class Decoder(tnn.Module):
    """`dec_deeplabv3_plus` with rep_head."""

    def __init__(self):
        super().__init__()
        self.low_conv = tnn.Sequential(tnn.Conv2d(4 * W, INNER, 1), tnn.BatchNorm2d(INNER), tnn.ReLU())
        self.aspp = ASPP(32 * W)
        self.head = tnn.Sequential(*cbr(5 * INNER, INNER, 3), tnn.Dropout2d(0.1))

        def two_conv(out):
            return tnn.Sequential(*cbr(2 * INNER, INNER, 3, bias=True), tnn.Dropout2d(0.1),
                                  *cbr(INNER, INNER, 3, bias=True), tnn.Dropout2d(0.1), tnn.Conv2d(INNER, out, 1))

        self.classifier = two_conv(CLASSES)
        self.representation = two_conv(REP)

    def forward(self, x):
        x1, _, _, x4 = x
        low = self.low_conv(x1)
        high = F.interpolate(self.head(self.aspp(x4)), size=low.shape[-2:], mode="bilinear", align_corners=True)
        feats = torch.cat([low, high], 1)
        return {"pred": self.classifier(feats), "rep": self.representation(feats)}


class Model(tnn.Module):
    """`ModelBuilder` with aux_loss (aux_plane = layer3's channels)."""

    def __init__(self, aux):
        super().__init__()
        self.encoder, self.decoder = ResNet(), Decoder()
        if aux:
            self.auxor = tnn.Module()
            self.auxor.aux = tnn.Sequential(*cbr(16 * W, INNER, 3, bias=True), tnn.Dropout2d(0.1),
                                            tnn.Conv2d(INNER, CLASSES, 1))
        self.aux = aux

    def forward(self, x):
        feats = self.encoder(x)
        out = self.decoder(feats)
        if self.aux:
            out["aux"] = self.auxor.aux(feats[2])
        return out


def make_torch_model(aux, seed=0):
    torch.manual_seed(seed)
    model = Model(aux)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval().double()


def jax_model_kwargs():
    return dict(depth=101, width=W, blocks=BLOCKS, aspp_rates=RATES, head_width=INNER, low_width=INNER, rep_dim=REP)


@pytest.mark.parametrize("aux", [False, True])
def test_eval_logits_and_parameter_count_match_the_official_model(aux):
    torch_model = make_torch_model(aux)
    checkpoint = {"epoch": 3, "teacher_state": {f"module.{k}": v.float() for k, v in torch_model.state_dict().items()},
                  "model_state": {}, "best_miou": 0.1}
    model, variables = from_u2pl(checkpoint, num_classes=CLASSES, **jax_model_kwargs())
    assert model.aux == aux
    n_torch = sum(p.numel() for p in torch_model.parameters())
    n_jax = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    assert n_jax == n_torch

    x = np.random.default_rng(0).normal(size=(2, 3, 65, 57))
    with torch.no_grad():
        out = torch_model(torch.from_numpy(x))
        want = F.interpolate(out["pred"], size=x.shape[2:], mode="bilinear", align_corners=True)
    logits, extra = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), train=False)
    want = want.permute(0, 2, 3, 1).numpy()
    rel = np.abs(np.asarray(logits) - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
    np.testing.assert_allclose(np.asarray(extra["pred"]), out["pred"].permute(0, 2, 3, 1).numpy(),
                               rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_train_mode_matches_the_reference_without_dropout_and_dropout_is_active():
    torch_model = make_torch_model(True).train()
    for m in torch_model.modules():
        if isinstance(m, tnn.Dropout2d):
            m.p = 0.0
    _, variables = from_u2pl(dict(torch_model.state_dict()), num_classes=CLASSES, **jax_model_kwargs())
    x = np.random.default_rng(1).normal(size=(2, 3, 33, 33))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x))
    images = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
    cfg = dict(name="u2pl", blocks=BLOCKS, width=W, head_width=INNER, reduce_width=INNER, rep_dim=REP,
               aspp_rates=RATES, aux=True, output_stride=8, multi_grid=True, maxpool_ceil=True)
    outs = {}
    for rate in (0.0, 0.1):
        model = build_model(ml_collections.ConfigDict(cfg), CLASSES).clone(dropout_rate=rate)
        (logits, outs[rate]), _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(0)},
                                              mutable=["batch_stats"])
    assert logits.shape == (2, 33, 33, CLASSES)
    assert outs[0.1]["pred"].shape == (2, 9, 9, CLASSES) and outs[0.1]["rep"].shape == (2, 9, 9, REP)
    assert outs[0.1]["aux"].shape == (2, 5, 5, CLASSES)
    for key in ("pred", "rep", "aux"):
        want = ref[key].permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(outs[0.0][key]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert not np.allclose(np.asarray(outs[0.1][key]), want, atol=1e-3)  # Dropout2d(0.1) is on


def test_convert_cli_kind_u2pl(tmp_path):
    torch_model = make_torch_model(False)
    path = tmp_path / "ckpt_best.pth"
    torch.save({"epoch": 80, "model_state": torch_model.float().state_dict(),
                "teacher_state": torch_model.float().state_dict(), "optimizer_state": {}, "best_miou": 0.8}, path)
    report = convert.main([str(path), str(tmp_path / "out"), "--kind", "u2pl", "--num-classes", str(CLASSES),
                           "--width", str(W), "--blocks", ",".join(map(str, BLOCKS))])
    assert report["kind"] == "u2pl" and report["ignored"] == ["best_miou", "epoch", "model_state", "optimizer_state"]
    assert report["params"] == sum(p.numel() for p in torch_model.parameters())
    assert json.load(open(tmp_path / "out" / "report.json"))["params"] == report["params"]
    _, kind, _ = convert.unwrap_state_dict(torch.load(path, weights_only=True))  # detected without --kind
    assert kind == "u2pl"
    loaded = convert.load_variables(str(tmp_path / "out" / "variables.msgpack"))
    assert "decoder" in loaded["params"] and "representation_8" in loaded["params"]["decoder"]
