"""CPCL's two-branch network: parameter counts, official checkpoint conversion with eval-logit parity
against a PyTorch transcription of exp_city/network.py (furnace ResNet with `_nostride_dilate` on
layer4, the CPS ASPP with LeakyReLU and the added pooling branch, [aspp, low] concat), the predict
functions, both backbones from one file, the weight-decay mask, the recipes and the benchmark."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import train_step
from configs import common, cpcl_camvid, cpcl_cityscapes, cpcl_pascal
from csl_jax import optim
from csl_jax.methods import build_method
from csl_jax.models import build_model, convert, cpcl, pretrained
from csl_jax.train import TrainState
from tests.helpers import torch_reference
from tests.test_convert_parity import TorchResNet

tnn, F = torch.nn, torch.nn.functional
TINY = dict(width=8, blocks=(1, 1, 2, 3), head_width=16, reduce_width=8)
NUM_CLASSES = 5


def nostride_dilate(m, dilate):
    """`SingleNetwork._nostride_dilate` of the official network.py."""
    if isinstance(m, tnn.Conv2d):
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate, dilate), (dilate, dilate)
        elif m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilate, dilate), (dilate, dilate)


class TorchASPP(tnn.Module):
    """The CPS `ASPP` (training / pooling_size=None path)."""

    def __init__(self, cin, cout, rates):
        super().__init__()
        self.map_convs = tnn.ModuleList([tnn.Conv2d(cin, cout, 1, bias=False)] + [
            tnn.Conv2d(cin, cout, 3, bias=False, dilation=r, padding=r) for r in rates])
        self.map_bn = tnn.BatchNorm2d(cout * 4)
        self.global_pooling_conv = tnn.Conv2d(cin, cout, 1, bias=False)
        self.global_pooling_bn = tnn.BatchNorm2d(cout)
        self.red_conv = tnn.Conv2d(cout * 4, cout, 1, bias=False)
        self.pool_red_conv = tnn.Conv2d(cout, cout, 1, bias=False)
        self.red_bn = tnn.BatchNorm2d(cout)
        self.leak_relu = tnn.LeakyReLU()

    def forward(self, x):
        out = self.red_conv(self.leak_relu(self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1))))
        pool = x.view(x.size(0), x.size(1), -1).mean(dim=-1).view(x.size(0), x.size(1), 1, 1)
        pool = self.pool_red_conv(self.leak_relu(self.global_pooling_bn(self.global_pooling_conv(pool))))
        out = out + pool.repeat(1, 1, x.size(2), x.size(3))
        return self.leak_relu(self.red_bn(out))


class TorchHead(tnn.Module):
    def __init__(self, width, head_width, reduce_width):
        super().__init__()
        self.aspp = TorchASPP(32 * width, head_width, [6, 12, 18])
        self.reduce = tnn.Sequential(tnn.Conv2d(4 * width, reduce_width, 1, bias=False),
                                     tnn.BatchNorm2d(reduce_width), tnn.ReLU())
        self.last_conv = tnn.Sequential(
            tnn.Conv2d(head_width + reduce_width, head_width, 3, padding=1, bias=False), tnn.BatchNorm2d(head_width),
            tnn.ReLU(), tnn.Conv2d(head_width, head_width, 3, padding=1, bias=False), tnn.BatchNorm2d(head_width),
            tnn.ReLU())

    def forward(self, c1, c4):
        f = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((f, self.reduce(c1)), dim=1))


class TorchSingleNetwork(tnn.Module):
    """`SingleNetwork`: a stride-2 layer4 made stride-free by `_nostride_dilate` with D = 2, 4, 8."""

    def __init__(self, width, blocks, head_width, reduce_width):
        super().__init__()
        self.backbone = TorchResNet(blocks, width, "deep", (False, False, False), False, False)
        dilate = 2
        for block in self.backbone.layer4.children():
            block.apply(functools.partial(nostride_dilate, dilate=dilate))
            dilate *= 2
        self.head = TorchHead(width, head_width, reduce_width)
        self.classifier = tnn.Conv2d(head_width, NUM_CLASSES, 1, bias=True)

    def forward(self, x):
        c1, c4 = self.backbone(x)
        pred = self.classifier(self.head(c1, c4))
        return F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=True)


class TorchNetwork(tnn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.branch1, self.branch2 = TorchSingleNetwork(**kw), TorchSingleNetwork(**kw)


def randomised_torch_cpcl(seed=0, **kw):
    """Tiny TorchNetwork in eval mode, random weights and BN statistics, logits of std ~1 per branch."""
    return torch_reference.randomised_eval(lambda: TorchNetwork(**dict(TINY, **kw)), seed,
                                           lambda model, x: ((b, b(x)) for b in (model.branch1, model.branch2)))


def torch_logits(model, images):
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        return [b(x).permute(0, 2, 3, 1).numpy() for b in (model.branch1, model.branch2)]


def relative_error(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def images(size=97, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def official_checkpoint(tmodel):
    """The furnace engine's checkpoint: {'model': state_dict, 'optimizer_1', 'optimizer_2', 'epoch', 'iteration'}."""
    return {"model": tmodel.state_dict(), "optimizer_1": {}, "optimizer_2": {}, "epoch": 34, "iteration": 39338}


def test_parameter_counts_of_the_published_models():
    """Per branch 40,475,957 (R50, 21 classes); both: 80,951,914 (Pascal), 80,950,886 (Cityscapes)."""
    pascal = build_model(cpcl_pascal.get_config("1_8").model, 21)
    assert cpcl.count_params(pascal) == 80_951_914
    assert cpcl.count_params(pascal.branch1) == 40_475_957
    assert cpcl.count_params(build_model(cpcl_cityscapes.get_config("1_8").model, 19)) == 80_950_886
    # ResNet-101 (the README's R101 rows): the transcription's count
    r101 = cpcl_pascal.get_config("1_8")
    r101.model.depth = 101
    torch_r101 = TorchSingleNetwork(64, (3, 4, 23, 3), 256, 48)
    torch_r101.classifier = tnn.Conv2d(256, 21, 1)
    assert cpcl.count_params(build_model(r101.model, 21).branch1) == sum(p.numel() for p in torch_r101.parameters())


def test_converted_official_checkpoint_gives_the_transcription_eval_logits():
    tmodel = randomised_torch_cpcl()
    assert tmodel.branch1.backbone.layer4[0].conv2.dilation == (2, 2)  # the transcription's schedule
    model, variables = cpcl.from_cpcl(official_checkpoint(tmodel), num_classes=NUM_CLASSES, **TINY)
    assert sorted(variables["params"]) == ["branch1", "branch2"]
    x = images()
    expected = torch_logits(tmodel, x)
    logits, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    for k, name in enumerate(("branch1", "branch2")):
        assert relative_error(out[f"logits_{name}"], expected[k]) < 1e-4, name
    assert relative_error(logits, expected[0]) < 1e-4  # the network's output: branch 1
    assert np.abs(expected[0] - expected[1]).mean() > 0.3  # the branches really differ


def test_train_mode_logits_and_running_statistics_match_pytorch():
    tmodel = randomised_torch_cpcl(seed=3)
    model, variables = cpcl.from_cpcl(official_checkpoint(tmodel), num_classes=NUM_CLASSES, **TINY)
    x = images(size=49, batch=3, seed=1)
    branch = tmodel.branch1.train()
    with torch.no_grad():
        expected = branch(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    own = {"params": variables["params"]["branch1"], "batch_stats": variables["batch_stats"]["branch1"]}
    (logits, _), updated = model.branch1.apply(own, x, train=True, mutable=["batch_stats"])
    assert relative_error(logits, expected) < 1e-4
    red_bn = updated["batch_stats"]["head"]["aspp"]["red_bn"]
    np.testing.assert_allclose(red_bn["mean"], branch.head.aspp.red_bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(red_bn["var"], branch.head.aspp.red_bn.running_var.numpy(), rtol=1e-4, atol=1e-5)


def cpcl_config(**model):
    c = cpcl_camvid.get_config("1_8")
    common.tiny_model(c, **{k: v for k, v in TINY.items() if k != "blocks"})
    c.model.update(blocks=TINY["blocks"], **model)
    return c


def test_predict_functions_and_imported_checkpoint(tmp_path):
    tmodel = randomised_torch_cpcl()
    path = tmp_path / "epoch-33.pth"
    torch.save(official_checkpoint(tmodel), path)
    method = build_method(cpcl_config(), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    template = method.eval_variables(TrainState(step=0, params=params, opt_state=None, state=state), "branch1")
    variables, report = convert.load_pretrained(template, str(path))
    assert report["kind"] == "cpcl" and report["left_at_init"] == []
    assert sorted(method.predict_fns()) == ["branch1", "branch2"] and method.best_predict == "branch1"
    x = images()
    expected = torch_logits(tmodel, x)
    for k, (name, fn) in enumerate(sorted(method.predict_fns().items())):
        assert relative_error(jax.jit(fn)(variables, x), expected[k]) < 1e-4, name


def test_converter_cli_writes_the_two_branch_variables(tmp_path):
    tmodel = randomised_torch_cpcl(head_width=256, reduce_width=48)  # the CLI's decoder widths
    src = tmp_path / "cpcl.pth"
    torch.save(official_checkpoint(tmodel), src)
    report = convert.main([str(src), str(tmp_path / "out"), "--num-classes", str(NUM_CLASSES), "--width", "8",
                           "--blocks", "1,1,2,3"])
    assert report["kind"] == "cpcl"
    loaded = convert.load_variables(report["output"])
    for path, value in convert.convert_state_dict(tmodel.state_dict()).items():
        tree = loaded
        for p in path:
            tree = tree[p]
        np.testing.assert_array_equal(tree, value, err_msg=str(path))


def test_both_backbones_load_the_same_file_the_heads_differ_and_follow_the_init(tmp_path, monkeypatch):
    """The backbone file by a registered name of the recipes' kind ('imagenet:resnet50_v1c' is a
    'deep_backbone'), put into the cache by hand: a furnace deep-stem ResNet state dict (resnet.py keys
    conv1.{0,1,3,4,6}, bn1, layer*). The tiny test network has one block per stage, which the real name
    refuses (a ResNet-50 file has 3-4-6-3), so the test registers its own name for the same kind."""
    tmodel = randomised_torch_cpcl()
    backbone = {k[len("branch1.backbone."):]: v for k, v in tmodel.state_dict().items()
                if k.startswith("branch1.backbone.")}
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(pretrained, "REGISTRY", dict(pretrained.REGISTRY))
    real = pretrained.REGISTRY["imagenet:resnet50_v1c"]
    pretrained.register_weights("test:tiny_v1c", url=real.url, kind=real.kind, filename=real.filename)
    (tmp_path / "test").mkdir()
    torch.save(backbone, tmp_path / "test" / "resnet50_v1c.pth")
    assert cpcl_pascal.get_config().model.init_from == "imagenet:resnet50_v1c" and real.kind == "deep_backbone"
    method = build_method(cpcl_config(init_from="test:tiny_v1c"), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    expected = convert.convert_state_dict({f"backbone.{k}": v for k, v in backbone.items()})
    for branch in ("branch1", "branch2"):
        tree = {"params": params[branch], "batch_stats": state["batch_stats"][branch]}
        for p, value in expected.items():
            got = tree
            for key in p:
                got = got[key]
            np.testing.assert_array_equal(got, value, err_msg=f"{branch} {p}")
    assert not np.allclose(params["branch1"]["classifier"]["kernel"], params["branch2"]["classifier"]["kernel"])

    # head init: kaiming-normal fan_in (std sqrt(2 / fan_in)), classifier bias U(+-1/sqrt(fan_in))
    big = build_method(cpcl_config(init_from="none", head_width=256, reduce_width=48), NUM_CLASSES)
    head = big.init(jax.random.PRNGKey(1), (33, 33, 3))[0]["branch1"]
    kernel = np.asarray(head["head"]["last_conv_3"]["kernel"])
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 256)), rtol=0.02)
    assert abs(kernel.mean()) < 1e-3 and np.abs(kernel).max() > 3 * kernel.std()  # untruncated
    bias = np.asarray(head["classifier"]["bias"])
    assert np.abs(bias).max() <= 1 / 16 and np.abs(bias).max() > 0


def test_weight_decay_on_conv_kernels_only():
    config = cpcl_config()
    method = build_method(config, NUM_CLASSES)
    params, _ = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    config.optim.update(lr=0.5, momentum=0.0, weight_decay=0.1, total_steps=100)
    tx = optim.make_optimizer(config.optim, total_steps=100, param_labels=method.param_labels)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        value = params
        for entry in path:
            value = value[entry.key]
        decayed = -0.5 * 0.1 * np.asarray(value) if path[-1].key == "kernel" else np.zeros_like(value)
        np.testing.assert_allclose(update, decayed, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert "bias" in updates["branch1"]["classifier"] and "scale" in updates["branch2"]["head"]["aspp"]["red_bn"]


def test_recipes():
    pascal, city, camvid = cpcl_pascal.get_config("1_8"), cpcl_cityscapes.get_config("1_16"), cpcl_camvid.get_config()
    for c in (pascal, city, camvid):
        assert (c.model.name, c.model.depth, c.model.output_stride, c.model.multi_grid) == ("cpcl", 50, 16, True)
        assert (c.optim.lr_multi, c.optim.weight_decay, c.optim.weight_decay_on) == (1.0, 1e-4, "kernels")
        assert (c.method.variant, c.method.confidence, c.method.unsup_reduction) == ("cpcl", "pixel", "pixel_mean")
    assert (pascal.data.crop_size, pascal.batch.labeled, pascal.loss.group_size, pascal.optim.lr,
            pascal.optim.total_steps, pascal.eval.protocol) == (512, 8, 8, 0.005, 39338, "sliding_cpcl")
    assert (pascal.method.unsup_weight, pascal.loss.labeled) == (1.0, "ce")
    assert (city.data.crop_size, city.batch.unlabeled, city.loss.group_size, city.optim.lr, city.optim.total_steps,
            city.loss.ohem_min_kept, city.method.unsup_weight) == (800, 16, 16, 0.01, 22272, 800000, 5.0)
    assert city.loss.labeled == "ohem_weighted" and len(city.method.class_weights) == 19
    # exp_city/config.py: nepochs x (max(L, U) // batch), L = 2975 // ratio (spec §5)
    assert [cpcl_cityscapes.get_config(s).optim.total_steps for s in ("1_8", "1_4", "1_2")] == [22194, 22240, 22320]
    assert (pascal.model.init_from, city.model.init_from, camvid.model.init_from) == (
        "imagenet:resnet50_v1c", "imagenet:resnet50_v1c", "none")
    # the first commit 0bf0c50: width-softmax confidence; exp_voc's 'mean' criterion; exp_city's batch of 3
    old_pascal, old_city = cpcl_pascal.get_config("1_8,first_commit"), cpcl_cityscapes.get_config("1_16,first_commit")
    assert (old_pascal.method.variant, old_pascal.method.confidence, old_pascal.method.unsup_reduction,
            old_pascal.batch.labeled, old_pascal.optim.total_steps) == (
        "cpcl_first_commit", "first_commit", "valid_mean", 8, 39338)
    assert (old_city.method.confidence, old_city.method.unsup_reduction, old_city.batch.labeled,
            old_city.batch.unlabeled, old_city.loss.group_size, old_city.loss.ohem_min_kept,
            old_city.optim.total_steps) == ("first_commit", "pixel_mean", 3, 3, 3, 150000, 128 * (2790 // 3))
    assert cpcl_camvid.get_config("1_4,first_commit").data.split == "1_4"
    with pytest.raises(ValueError, match="valid: 1_16, 1_8"):
        cpcl_cityscapes.get_config("744")
    with pytest.raises(ValueError, match="variant 'latest'; valid: head, first_commit"):
        cpcl_pascal.get_config("1_8,latest")


def test_train_step_benchmark_knows_cpcl(tmp_path):
    # two networks: 2 x (x and x_mix train passes 3 (B_l + B_u) + no-grad u0 and u1 train passes 2 B_u)
    assert train_step.forward_passes(cpcl_pascal.get_config().method, 8, 8, head_share=0.3) == 2 * (24 + 40)
    config = train_step.make_config("cpcl", 50, 16, 513, "bfloat16", 8, 8)
    assert config.model.name == "cpcl" and config.loss.group_size == 8
    assert train_step.reference_tflops(config) == pytest.approx(128 * 159 / 1e3)  # 128 passes x 159 GFLOP
    report = train_step.main(["--tiny", "--method", "cpcl", "--out", str(tmp_path / "train_step.json")])
    (result,) = report["results"]
    assert result["method"] == "cpcl" and result["ms_per_step"] > 0
