"""Xception-65 (csl_jax/models/xception.py, `config.model.backbone='xception65'`) against a PyTorch
transcription of UniMatch's official module; its checkpoint layouts, weights name, config field and
parameter counts (/work/shared/docs/datasets-coco-ade20k.md §4, docs/models.md "Xception-65").

The reference below transcribes LiheYoung/UniMatch at commit 0324f3d:
- `model/backbone/xception.py` lines 9-34 (SeparableConv2d), 37-81 (Block), 84-195 (Xception: its
  constructor and base_forward), with two test options added, `width` (every channel count times
  width / 64) and `middle` (the number of middle-flow blocks, 16 there), so that narrow networks
  exist on both sides; the in-place ReLUs and the in-place `x += skip` are kept, since they are
  behaviour (the middle blocks add relu(x); c1 = block2's hook_layer stays pre-activation);
- `model/semseg/deeplabv3plus.py` lines 9-68 with the Xception branch (ASPP on c4, `reduce` on
  c1, `fuse`, `classifier`, align-corners upsampling), its ASPP (lines 71-118) being
  tests/test_convert_parity.py's TorchASPP.
"""
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common
from csl_jax import workdir
from csl_jax.models import DeepLabV3Plus, build_model, convert, pretrained, xception
from csl_jax.models.convert import from_unimatch, load_pretrained, unwrap_state_dict

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from tests.helpers import torch_reference  # noqa: E402
from tests.helpers.torch_reference import randomise_bn  # noqa: E402
from tests.test_convert_parity import TorchASPP, _cbr  # noqa: E402

BN_MOM = 0.0003  # xception.py:5
CLASSES = 5
#: the narrowed network of the parity tests: every channel count / 8, 2 middle-flow blocks (spec §4.8)
NARROW = dict(width=8, blocks=(2,), head_width=16, reduce_width=8)


# ----------------------------------------------------------------------------- PyTorch reference
class TorchSeparableConv2d(tnn.Module):
    """xception.py:9-34 (kernel 3, padding = dilation, no bias)."""

    def __init__(self, cin, cout, stride=1, dilation=1, activate_first=True, inplace=True):
        super().__init__()
        self.relu0 = tnn.ReLU(inplace=inplace)
        self.depthwise = tnn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False)
        self.bn1 = tnn.BatchNorm2d(cin, momentum=BN_MOM)
        self.relu1 = tnn.ReLU(inplace=True)
        self.pointwise = tnn.Conv2d(cin, cout, 1, 1, 0, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout, momentum=BN_MOM)
        self.relu2 = tnn.ReLU(inplace=True)
        self.activate_first = activate_first

    def forward(self, x):
        if self.activate_first:
            x = self.relu0(x)
        x = self.bn1(self.depthwise(x))
        if not self.activate_first:
            x = self.relu1(x)
        x = self.bn2(self.pointwise(x))
        if not self.activate_first:
            x = self.relu2(x)
        return x


class TorchBlock(tnn.Module):
    """xception.py:37-81 (atrous as one int for the three sepconvs, as every UniMatch block has it)."""

    def __init__(self, cin, cout, stride=1, dilation=1, grow_first=True, inplace=True):
        super().__init__()
        head_relu = True
        if cout != cin or stride != 1:
            self.skip = tnn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = tnn.BatchNorm2d(cout, momentum=BN_MOM)
            head_relu = False
        else:
            self.skip = None
        self.hook_layer = None
        mid = cout if grow_first else cin
        self.sepconv1 = TorchSeparableConv2d(cin, mid, 1, dilation, inplace=head_relu)
        self.sepconv2 = TorchSeparableConv2d(mid, cout, 1, dilation)
        self.sepconv3 = TorchSeparableConv2d(cout, cout, stride, dilation, inplace=inplace)

    def forward(self, inp):
        skip = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        x = self.sepconv1(inp)
        x = self.sepconv2(x)
        self.hook_layer = x
        x = self.sepconv3(x)
        x += skip
        return x


class TorchXception(tnn.Module):
    """xception.py:84-195; `width` / `middle` narrow it (64 / 16: the official network)."""

    def __init__(self, os=16, width=64, middle=16):
        super().__init__()
        s = {8: (2, 1, 1), 16: (2, 2, 1)}[os]
        rate = 16 // os

        def ch(c):
            return c * width // 64

        self.conv1 = tnn.Conv2d(3, ch(32), 3, 2, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(ch(32), momentum=BN_MOM)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(ch(32), ch(64), 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(ch(64), momentum=BN_MOM)
        self.block1 = TorchBlock(ch(64), ch(128), 2)
        self.block2 = TorchBlock(ch(128), ch(256), s[0], inplace=False)
        self.block3 = TorchBlock(ch(256), ch(728), s[1])
        self.middle = [f"block{4 + i}" for i in range(middle)]
        for name in self.middle:
            setattr(self, name, TorchBlock(ch(728), ch(728), 1, rate))
        self.exit = f"block{4 + middle}"
        setattr(self, self.exit, TorchBlock(ch(728), ch(1024), s[2], rate, grow_first=False))
        self.conv3 = TorchSeparableConv2d(ch(1024), ch(1536), 1, rate, activate_first=False)
        self.conv4 = TorchSeparableConv2d(ch(1536), ch(1536), 1, rate, activate_first=False)
        self.conv5 = TorchSeparableConv2d(ch(1536), ch(2048), 1, rate, activate_first=False)
        for m in self.modules():  # xception.py:146-152
            if isinstance(m, tnn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def base_forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.block2(self.block1(x))
        c1 = self.block2.hook_layer
        x = self.block3(x)
        for name in self.middle + [self.exit]:
            x = getattr(self, name)(x)
        return c1, self.conv5(self.conv4(self.conv3(x)))


class TorchDeepLabXception(tnn.Module):
    """deeplabv3plus.py:9-68 with `backbone: xception` (high 2048 and low 256 channels, times width / 64)."""

    def __init__(self, num_classes, os=16, width=64, middle=16, head_width=256, reduce_width=48,
                 rates=(6, 12, 18)):
        super().__init__()
        self.backbone = TorchXception(os, width, middle)
        self.head = TorchASPP(2048 * width // 64, head_width, rates)
        self.reduce = _cbr(256 * width // 64, reduce_width, 1)
        self.fuse = tnn.Sequential(*_cbr(reduce_width + head_width, head_width, 3), *_cbr(head_width, head_width, 3))
        self.classifier = tnn.Conv2d(head_width, num_classes, 1, bias=True)

    def forward(self, x):
        h, w = x.shape[-2:]
        c1, c4 = self.backbone.base_forward(x)
        c4 = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)


def torch_kwargs(os=16, width=8, blocks=(2,), head_width=16, reduce_width=8):
    return dict(os=os, width=width, middle=blocks[0], head_width=head_width, reduce_width=reduce_width)


def randomised(seed=0, num_classes=CLASSES, **kw):
    """The reference with the official random init, random BN affine parameters and running statistics,
    in eval mode, its classifier scaled to logits of std 1 on a random 2 x 3 x 65 x 65 batch."""
    return torch_reference.randomised_eval(lambda: TorchDeepLabXception(num_classes, **kw), seed,
                                           lambda model, x: [(model, model(x))])


def nhwc_forward(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


def unimatch_checkpoint(tmodel):
    """What UniMatch's unimatch.py:238-243 saves: {'model': DDP state dict ('module.' keys), ...}."""
    return {"model": {f"module.{k}": v for k, v in tmodel.state_dict().items()}, "optimizer": {}, "epoch": 29,
            "previous_best": 31.86}


def relative_error(got, expected):
    """max |got - expected| / max |expected|."""
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("output_stride,size", [(16, (65, 65)), (16, (97, 61)), (8, (65, 65))])
def test_eval_logits_match_the_official_module(output_stride, size):
    tmodel = randomised(**torch_kwargs(os=output_stride))
    model, variables = from_unimatch(unimatch_checkpoint(tmodel), num_classes=CLASSES,
                                     output_stride=output_stride, **NARROW)
    assert model.backbone_arch == "xception65"  # read from the keys
    x = images(*size)
    expected = nhwc_forward(tmodel, x)
    got, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert out == {} and got.shape == expected.shape == (2, *size, CLASSES) and got.dtype == jnp.float32
    assert expected.std() > 0.3  # not trivially small
    assert relative_error(got, expected) < 1e-4


def test_eval_logits_of_the_full_size_network_match_the_official_module():
    """Full width, 16 middle-flow blocks, 81 classes (the COCO model), OS16, at a small odd input."""
    tmodel = randomised(num_classes=81)
    model, variables = from_unimatch(unimatch_checkpoint(tmodel), num_classes=81)
    assert (model.width, model.blocks, model.head_width, model.reduce_width) == (64, None, 256, 48)
    x = images(65, 65, batch=1)
    got, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    expected = nhwc_forward(tmodel, x)
    assert expected.std() > 0.3 and relative_error(got, expected) < 1e-4


def test_train_mode_logits_and_running_statistics_match_the_official_module():
    """Batch statistics in train mode; running statistics with momentum 0.0003 in the backbone and 0.1 in
    the head (PyTorch convention), unbiased variance."""
    tmodel = randomised(**torch_kwargs())
    model, variables = from_unimatch(unimatch_checkpoint(tmodel), num_classes=CLASSES, **NARROW)
    before = convert.convert_state_dict(tmodel.state_dict())
    x = images(97, 61, batch=4)
    tmodel.train()
    expected = nhwc_forward(tmodel, x)
    (got, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert relative_error(got, expected) < 1e-4
    after = convert.convert_state_dict(tmodel.state_dict())
    flat = traverse_util.flatten_dict({"batch_stats": updates["batch_stats"]})
    assert set(flat) == {p for p in after if p[0] == "batch_stats"}
    for path, value in flat.items():
        moved, official = np.asarray(value) - before[path], after[path] - before[path]
        # the step each statistic took (0.0003 or 0.1 of its distance to the batch statistic)
        np.testing.assert_allclose(moved, official, rtol=2e-3, atol=1e-6 * np.abs(after[path]).max(),
                                   err_msg="/".join(path))
    step = np.abs(after[("batch_stats", "backbone", "block3", "sepconv1", "bn1", "mean")]
                  - before[("batch_stats", "backbone", "block3", "sepconv1", "bn1", "mean")]).max()
    head = np.abs(after[("batch_stats", "fuse_1", "mean")] - before[("batch_stats", "fuse_1", "mean")]).max()
    assert 0 < step < 1e-2 < head  # backbone statistics barely move, the head's by a tenth


def test_syncbn_over_eight_devices_gives_the_one_device_gradients():
    """Train-mode loss and gradients of the whole network with SyncBN over 8 devices (2 images each) equal
    one device's on the 16 images, every leaf to 1e-5 of the gradient's scale. (The input has no pre-ReLU
    value within float32 rounding of zero: at 33 x 33 one conv5 output is -1.2e-7, which 8 devices round
    to the other side of the ReLU, moving the gradient by 0.5% of its scale.)"""
    from jax.sharding import PartitionSpec as P

    from csl_jax import parallel

    model, variables = from_unimatch(unimatch_checkpoint(randomised(**torch_kwargs())), num_classes=CLASSES,
                                     **NARROW)
    x = images(65, 65, batch=16)
    w = np.random.default_rng(1).standard_normal((16, 65, 65, CLASSES)).astype(np.float32)

    def loss(params, model, x, w):
        (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                     mutable=["batch_stats"])
        return jnp.sum(logits * w)

    one = jax.jit(jax.value_and_grad(lambda p: loss(p, model, x, w)))(variables["params"])
    synced = model.clone(bn_axis_name=parallel.AXIS)

    def per_device(params, x, w):
        return jax.lax.psum(jax.value_and_grad(lambda p: loss(p, synced, x, w))(params), parallel.AXIS)

    mesh = parallel.make_mesh(jax.devices()[:8])
    eight = jax.jit(parallel.shard_map(per_device, mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                                       out_specs=P()))(variables["params"], x, w)
    np.testing.assert_allclose(float(eight[0]), float(one[0]), rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(one[1]))
    errors = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), one[1], eight[1])
    assert max(jax.tree.leaves(errors)) < 1e-5 * scale


def test_a_middle_block_adds_relu_of_its_input():
    """The official in-place ReLU of sepconv1 rectifies the identity skip: y = relu(x) + F(x). An x + F(x)
    block would differ wherever x < 0."""
    torch.manual_seed(0)
    tblock = TorchBlock(16, 16)
    randomise_bn(tblock, torch.Generator().manual_seed(1))
    tblock.eval()
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 16)).astype(np.float32)
    with torch.no_grad():
        expected = tblock(torch.from_numpy(x).permute(0, 3, 1, 2).clone()).permute(0, 2, 3, 1).numpy()
    variables = traverse_util.unflatten_dict(convert.convert_state_dict(tblock.state_dict()))
    got, hook = xception.Block(16).apply(variables, x, train=False)
    assert relative_error(got, expected) < 1e-5
    f_x = np.asarray(got) - np.maximum(x, 0)  # F(x)
    assert np.abs((x + f_x) - expected).max() > 0.1  # the not-in-place reading is measurably wrong


def test_the_low_level_feature_is_block2s_pre_activation_output():
    """c1 = block2.hook_layer, not rectified in place (block2 has inplace=False): negative values kept."""
    tmodel = randomised(**torch_kwargs())
    x = images(65, 65)
    with torch.no_grad():
        c1_torch, c4_torch = tmodel.backbone.base_forward(torch.from_numpy(x).permute(0, 3, 1, 2))
    _, variables = from_unimatch(unimatch_checkpoint(tmodel), num_classes=CLASSES, **NARROW)
    backbone = xception.Xception65(width=8, middle_blocks=2)
    c1, c4 = backbone.apply({k: v["backbone"] for k, v in variables.items()}, x, train=False)
    assert c1.shape == (2, 17, 17, 32) and c4.shape == (2, 5, 5, 256)  # stride 4: 65 -> 33 -> 17; OS16: 5
    assert float(jnp.min(c1)) < -0.1 and float(jnp.min(c4)) == 0.0  # c1 pre-activation, c4 post-ReLU
    assert relative_error(c1, c1_torch.permute(0, 2, 3, 1).numpy()) < 1e-5
    assert relative_error(c4, c4_torch.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_feature_perturbation_runs_the_decoder_on_dropped_features():
    """UniMatch's FP with Xception (deeplabv3plus.py:44-50): clean logits equal the plain pass."""
    model, variables = from_unimatch(unimatch_checkpoint(randomised(**torch_kwargs())), num_classes=CLASSES, **NARROW)
    x = images(33, 33)

    @jax.jit
    def passes(variables, x):
        plain, _ = model.apply(variables, x, train=False)
        clean, inactive = model.apply(variables, x, train=False, feature_perturb=True)  # no dropout in eval
        (logits, out), _ = model.apply(variables, x, train=True, feature_perturb=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.PRNGKey(1)})
        return plain, clean, inactive["logits_fp"], logits, out["logits_fp"]

    plain, clean, inactive, logits, fp = passes(variables, x)
    np.testing.assert_allclose(np.asarray(clean), np.asarray(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(inactive), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert fp.shape == logits.shape == (2, 33, 33, CLASSES) and float(jnp.abs(fp - logits).max()) > 1e-3


# ----------------------------------------------------------------------------- full-size layout and counts
def meta_reference(num_classes=81):
    with torch.device("meta"):
        return TorchDeepLabXception(num_classes)


def test_parameter_counts_equal_the_official_module():
    """81 classes (COCO): 54,726,881 = backbone 37,867,312 + ASPP/decoder/classifier 16,859,569 (spec §4.7),
    from an abstract init; the PyTorch transcription counts the same."""
    model = build_model(_xception_cfg(), 81)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    params = traverse_util.flatten_dict(abstract["params"])
    total = sum(v.size for v in params.values())
    backbone = sum(v.size for p, v in params.items() if p[0] == "backbone")
    assert (total, backbone, total - backbone) == (54_726_881, 37_867_312, 16_859_569)
    tmodel = meta_reference()
    assert total == sum(p.numel() for p in tmodel.parameters())
    assert backbone == sum(p.numel() for p in tmodel.backbone.parameters())
    assert sum(isinstance(m, tnn.BatchNorm2d) for m in tmodel.backbone.modules()) == 132
    assert len(traverse_util.flatten_dict(abstract["batch_stats"]["backbone"])) == 2 * 132


def _xception_cfg():
    c = common.get_base_config().model
    c.backbone = "xception65"
    return c


def test_imagenet_key_layout_and_unimatchs_filter():
    """The official backbone's 792 entries (660 without num_batches_tracked, spec §4.5) plus entries UniMatch
    filters out ('itr', 'tmp'): detected as 'xception' (not torchvision, whose `conv1.weight` it also has),
    every backbone variable loaded, the filtered keys reported, the head left at init."""
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
          for k, v in meta_reference().backbone.state_dict().items()}
    assert len(sd) == 792 and sum(not k.endswith("num_batches_tracked") for k in sd) == 660
    assert sd["block4.sepconv1.depthwise.weight"].shape == (728, 1, 3, 3)
    sd["block1.sepconv1.itr"] = np.zeros(1, np.float32)
    sd["tmp.weight"] = np.zeros(1, np.float32)
    abstract = jax.eval_shape(lambda: DeepLabV3Plus(81, backbone_arch="xception65").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)), train=False))
    merged, report = load_pretrained(abstract, sd)
    assert report["kind"] == "xception" and report["ignored"] == ["block1.sepconv1.itr", "tmp.weight"]
    assert report["loaded"] == 660
    assert report["left_at_init"] and all(k.split("/")[1] != "backbone" for k in report["left_at_init"])
    flat = traverse_util.flatten_dict(merged)
    assert flat[("params", "backbone", "block4", "sepconv1", "depthwise", "kernel")].shape == (3, 3, 1, 728)
    assert flat[("batch_stats", "backbone", "block20", "skipbn", "var")].shape == (1024,)
    assert isinstance(flat[("params", "classifier", "kernel")], jax.ShapeDtypeStruct)


def test_a_missing_key_of_the_imagenet_file_is_an_error_not_a_random_init():
    """UniMatch keeps a key missing from xception.pth at its random init without a word; here it is an error."""
    sd = {k: v.numpy() for k, v in TorchXception(width=8, middle=2).state_dict().items()
          if k != "block5.sepconv2.bn2.running_var"}
    abstract = jax.eval_shape(lambda: DeepLabV3Plus(CLASSES, backbone_arch="xception65", **NARROW).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 33, 33, 3)), train=False))
    with pytest.raises(ValueError, match="missing from the checkpoint.*batch_stats/backbone/block5/sepconv2/bn2/var"):
        load_pretrained(abstract, sd)


# ----------------------------------------------------------------------------- converters
def test_a_unimatch_checkpoint_round_trips_through_the_cli(tmp_path):
    """torch.save of a trained UniMatch Xception model -> `python -m csl_jax.models.convert` (kind detected)
    -> variables -> the same logits as the PyTorch model; the file is a valid init_from source."""
    tmodel = randomised(num_classes=81, **torch_kwargs(head_width=256, reduce_width=48))  # the CLI's head
    src = tmp_path / "best.pth"
    torch.save(unimatch_checkpoint(tmodel), src)
    assert unwrap_state_dict(convert.load_file(str(src)))[1] == "unimatch_xception"
    report = convert.main([str(src), str(tmp_path / "out"), "--num-classes", "81", "--width", "8", "--blocks", "2"])
    assert report["kind"] == "unimatch_xception" and report["ignored"] == []
    variables = convert.load_variables(str(tmp_path / "out" / "variables.msgpack"))
    model = DeepLabV3Plus(81, backbone_arch="xception65", width=8, blocks=(2,))
    x = images(65, 65)
    got, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert relative_error(got, nhwc_forward(tmodel, x)) < 1e-4
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 33, 33, 3)), train=False))
    _, rep = load_pretrained(abstract, str(src))
    assert rep["kind"] == "unimatch_xception" and rep["left_at_init"] == []


def test_an_imagenet_file_converts_to_the_backbone_subtree(tmp_path):
    tmodel = TorchXception(width=8, middle=2)
    src = tmp_path / "xception.pth"
    torch.save(tmodel.state_dict(), src)
    report = convert.main([str(src), str(tmp_path / "out"), "--width", "8", "--blocks", "2"])
    assert report["kind"] == "xception"
    written = traverse_util.flatten_dict(convert.load_variables(str(tmp_path / "out" / "variables.msgpack")))
    expected = convert.convert_state_dict({f"backbone.{k}": v for k, v in tmodel.state_dict().items()})
    assert set(written) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(written[path], value)


# ----------------------------------------------------------------------------- config, weights name, resume
def test_the_config_field_selects_the_backbone_and_old_configs_build_the_resnet():
    config = common.get_base_config()
    assert config.model.backbone == "resnet"
    resnet = build_model(config.model, 21)
    old = config.model.to_dict()
    del old["backbone"]
    assert build_model(type(config)(old), 21) == resnet and resnet.backbone_arch == "resnet"
    config.model.backbone = "xception65"
    assert build_model(config.model, 81).backbone_arch == "xception65"
    config.model.backbone = "xception"
    with pytest.raises(ValueError, match=r"config.model.backbone must be one of \['resnet', 'xception65'\]"):
        build_model(config.model, 21)
    config.model.update(backbone="xception65", name="u2pl")
    with pytest.raises(ValueError, match="model 'u2pl' does not read it"):
        build_model(config.model, 21)
    config.model.update(name="deeplabv3plus", blocks=(3, 4, 6, 3))
    model = build_model(config.model, 21)
    with pytest.raises(ValueError, match=r"blocks=None \(16 middle-flow blocks\) or \(n,\)"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 33, 33, 3)), train=False))


def test_a_run_saved_before_the_field_existed_resumes_as_a_resnet():
    saved, now = common.get_base_config(), common.get_base_config()
    del saved.model["backbone"]
    assert workdir.resume_differences(saved, now) == []
    now.model.backbone = "xception65"
    assert workdir.resume_differences(saved, now) == [
        "config.model.backbone: saved (absent: 'resnet'), now 'xception65'"]


def xception_skeleton(blocks=20) -> bytes:
    """torch.save bytes of the ImageNet file's layout with 1x1x1x1 kernels (what `validation_error` reads)."""
    keys = ["conv1.weight", "bn1.weight", "conv2.weight", "block1.skip.weight"]
    keys += [f"block{k}.sepconv{j}.{c}.weight" for k in range(1, blocks + 1) for j in (1, 2, 3)
             for c in ("depthwise", "pointwise")]
    keys += [f"conv{i}.{c}.weight" for i in (3, 4, 5) for c in ("depthwise", "pointwise")]
    buffer = io.BytesIO()
    torch.save({k: torch.zeros(1, 1, 1, 1) for k in keys}, buffer)
    return buffer.getvalue()


def test_the_imagenet_weights_name_resolves_and_checks_its_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    record = pretrained.REGISTRY["imagenet:xception65"]
    assert (record.kind, record.filename, record.sha256) == ("xception", "xception.pth", None)
    assert "1_j_mE07tiV24xXOJw4XDze0-a0NAhNVi" in record.url
    model_cfg = _xception_cfg()
    model_cfg.init_from = "imagenet"
    assert pretrained.imagenet_name(model_cfg) == "imagenet:xception65"
    path = tmp_path / "weights" / "imagenet" / "xception.pth"
    path.parent.mkdir(parents=True)
    for wrong, reason in ((xception_skeleton(19), "an Xception-65 has blocks 1..20"),
                          (b"<html>quota</html>", "cannot read")):
        path.write_bytes(wrong)
        assert reason in pretrained.validation_error(record, str(path))
    path.write_bytes(xception_skeleton())
    assert pretrained.validation_error(record, str(path)) is None
    source = pretrained.resolve_init(model_cfg)  # trusted on first use
    assert (source.name, source.kind, source.path) == ("imagenet:xception65", "xception", str(path))
