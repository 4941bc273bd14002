"""CCVC's two-branch network: parameter counts, official checkpoint conversion with eval-logit parity
against a PyTorch transcription of `Discrepancy_DeepLabV3Plus`, the branch-2 mapping and dropout,
initialisation of both backbones from one file, optimiser groups and the predict functions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import train_step
from configs import ccvc_camvid, ccvc_cityscapes, ccvc_pascal, common
from csl_jax import optim
from csl_jax.methods import build_method
from csl_jax.models import build_model, ccvc, convert
from csl_jax.train import TrainState
from data_prep.splits import shipped_list, shipped_splits
from tests.helpers import torch_reference
from tests.test_convert_parity import TorchDeepLab

tnn, F = torch.nn, torch.nn.functional
TINY = dict(width=8, blocks=(1, 1, 2, 3), head_width=16, reduce_width=8)
NUM_CLASSES = 5


class TorchCCVCBranch(TorchDeepLab):
    """The official `DeepLabV3Plus(args, cfg, use_MLP)` with use_norm and use_dropout: forward -> (feature, pred)."""

    def __init__(self, use_mlp, **kw):
        super().__init__(NUM_CLASSES, **kw)
        self.use_mlp = use_mlp
        if use_mlp:
            c = kw["head_width"] + kw["reduce_width"]
            self.mapping = tnn.Sequential(tnn.Conv2d(c, c, 1, bias=False), tnn.BatchNorm2d(c), tnn.ReLU(True))
            self.dropout = tnn.Dropout2d(p=0.5)

    def forward(self, x):
        h, w = x.shape[-2:]
        c1, c4 = self.backbone(x)
        c4 = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        feature = torch.cat([self.reduce(c1), c4], dim=1)
        if self.use_mlp:
            feature = self.dropout(self.mapping(feature))
        pred = self.classifier(self.fuse(feature))
        return feature, F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=True)


class TorchCCVC(tnn.Module):
    """`Discrepancy_DeepLabV3Plus` with mode_mapping='else': branch 2 alone has the mapping."""

    def __init__(self, **kw):
        super().__init__()
        self.branch1 = TorchCCVCBranch(False, **kw)
        self.branch2 = TorchCCVCBranch(True, **kw)

    def forward(self, x):
        feature1, pred1 = self.branch1(x)
        feature2, pred2 = self.branch2(x)
        return {"pred1": pred1, "feature1": feature1, "pred2": pred2, "feature2": feature2}


def randomised_torch_ccvc(seed=0, **kw):
    """Tiny TorchCCVC in eval mode, random weights and BN statistics, logits of std ~1 per branch."""
    def branch_logits(model, x):
        out = model(x)
        return [(model.branch1, out["pred1"]), (model.branch2, out["pred2"])]

    return torch_reference.randomised_eval(lambda: TorchCCVC(**dict(TINY, **kw)), seed, branch_logits)


def torch_outputs(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


def relative_error(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def images(size=97, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def test_parameter_counts_of_the_published_models():
    """81,043,910 for the logged R50 model (19 classes; the log prints 81.0M), 119,029,194 for R101 on Pascal."""
    city = ccvc_cityscapes.get_config("1_16")
    assert ccvc.count_params(build_model(city.model, 19)) == 81_043_910
    pascal = ccvc_pascal.get_config("366")
    assert ccvc.count_params(build_model(pascal.model, 21)) == 119_029_194


@pytest.mark.parametrize("output_stride,multi_grid", [(16, False), (8, True)])
def test_converted_official_checkpoint_gives_the_transcription_eval_logits(output_stride, multi_grid):
    tmodel = randomised_torch_ccvc(output_stride=output_stride, multi_grid=multi_grid)
    state_dict = {f"module.{k}": v for k, v in tmodel.state_dict().items()}  # as saved under DDP
    model, variables = ccvc.from_ccvc(state_dict, num_classes=NUM_CLASSES, output_stride=output_stride,
                                      multi_grid=multi_grid, **TINY)
    assert sorted(variables["params"]) == ["branch1", "branch2"]
    assert "mapping_0" in variables["params"]["branch2"] and "mapping_0" not in variables["params"]["branch1"]
    x = images()
    expected = torch_outputs(tmodel, x)
    average, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    for ours, theirs in [(out["logits_branch1"], "pred1"), (out["logits_branch2"], "pred2"),
                         (out["features_branch1"], "feature1"), (out["features_branch2"], "feature2")]:
        assert relative_error(ours, expected[theirs]) < 1e-4, theirs
    assert relative_error(average, (expected["pred1"] + expected["pred2"]) / 2) < 1e-4
    assert np.abs(expected["pred1"] - expected["pred2"]).mean() > 0.3  # the branches really differ


def ccvc_config(**model):
    c = ccvc_camvid.get_config("1_8")
    common.tiny_model(c, **{k: v for k, v in TINY.items() if k != "blocks"})
    c.model.update(blocks=TINY["blocks"], depth=50, **model)
    return c


def test_predict_functions_and_imported_checkpoint(tmp_path):
    """The three predict functions on variables loaded by `load_pretrained` (kind 'ccvc', detected)."""
    tmodel = randomised_torch_ccvc()
    path = tmp_path / "ave_resnet101_75.19.pth"
    torch.save(tmodel.state_dict(), path)
    method = build_method(ccvc_config(), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    template = method.eval_variables(TrainState(step=0, params=params, opt_state=None, state=state), "average")
    variables, report = convert.load_pretrained(template, str(path))
    assert report["kind"] == "ccvc" and report["left_at_init"] == []
    x = images()
    expected = torch_outputs(tmodel, x)
    fns = method.predict_fns()
    assert sorted(fns) == ["average", "branch1", "branch2"] and method.best_predict == "average"
    got = {name: jax.jit(fn)(variables, x) for name, fn in fns.items()}
    assert relative_error(got["branch1"], expected["pred1"]) < 1e-4
    assert relative_error(got["branch2"], expected["pred2"]) < 1e-4
    assert relative_error(got["average"], (expected["pred1"] + expected["pred2"]) / 2) < 1e-4


def test_converter_cli_writes_the_two_branch_variables(tmp_path):
    tmodel = randomised_torch_ccvc(head_width=256, reduce_width=48)  # the CLI's decoder widths
    src = tmp_path / "ccvc.pth"
    torch.save(tmodel.state_dict(), src)
    report = convert.main([str(src), str(tmp_path / "out"), "--num-classes", str(NUM_CLASSES), "--width", "8",
                           "--blocks", "1,1,2,3"])
    assert report["kind"] == "ccvc"
    loaded = convert.load_variables(report["output"])
    expected = convert.convert_state_dict(tmodel.state_dict())
    for path, value in expected.items():
        np.testing.assert_array_equal(_get(loaded, path), value, err_msg=str(path))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_branch2_mapping_dropout_is_per_sample_channel_dropout_in_training_only():
    model = build_model(ccvc_config(width=4, head_width=8, reduce_width=4).model, NUM_CLASSES)
    x = jnp.asarray(images(33, batch=4))
    variables = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)

    def features(train, ids, key=0):
        (_, out), _ = model.apply(variables, x, train=train, sample_ids=ids, rngs={"dropout": jax.random.PRNGKey(key)},
                                  mutable=["batch_stats"])
        return np.asarray(out["features_branch1"]), np.asarray(out["features_branch2"])

    f1, f2 = features(True, jnp.arange(4))
    g1, g2 = features(True, jnp.arange(4), key=1)
    np.testing.assert_array_equal(f1, g1)  # branch 1: no dropout
    dropped = np.all(f2 == 0, axis=(1, 2))  # (B, C) whole channels zeroed per sample
    assert 0.2 < dropped.mean() < 0.8 and not np.all(dropped == dropped[0])
    assert np.any(dropped != np.all(g2 == 0, axis=(1, 2)))  # another key, other channels
    kept = ~dropped & ~np.all(g2 == 0, axis=(1, 2))
    np.testing.assert_array_equal(np.where(kept[:, None, None], f2, 0), np.where(kept[:, None, None], g2, 0))
    # the mask depends on the global sample id, not on the position in the batch
    _, f2_ids = features(True, jnp.array([7, 1, 2, 3]))
    np.testing.assert_array_equal(np.all(f2_ids[1:] == 0, axis=(1, 2)), dropped[1:])
    # inference: no dropout
    np.testing.assert_array_equal(features(False, jnp.arange(4))[1], features(False, jnp.arange(4), key=1)[1])


def test_both_backbones_load_the_same_file_and_the_heads_differ(tmp_path):
    tmodel = randomised_torch_ccvc()
    backbone = {k[len("branch1.backbone."):]: v for k, v in tmodel.state_dict().items()
                if k.startswith("branch1.backbone.")}
    path = tmp_path / "resnet50.pth"
    torch.save(backbone, path)
    method = build_method(ccvc_config(init_from=str(path)), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    expected = convert.convert_state_dict({f"backbone.{k}": v for k, v in backbone.items()})
    for branch in ("branch1", "branch2"):
        tree = {"params": params[branch], "batch_stats": state["batch_stats"][branch]}
        for p, value in expected.items():
            np.testing.assert_array_equal(_get(tree, p), value, err_msg=f"{branch} {p}")
    assert not np.allclose(params["branch1"]["classifier"]["kernel"], params["branch2"]["classifier"]["kernel"])

    random_init = build_method(ccvc_config(), NUM_CLASSES).init(jax.random.PRNGKey(0), (33, 33, 3))[0]
    b1, b2 = (random_init[b]["backbone"]["conv1_0"]["kernel"] for b in ("branch1", "branch2"))
    assert not np.allclose(b1, b2)  # no pretrained file: each branch drawn on its own


def test_optimiser_groups_per_branch():
    method = build_method(ccvc_config(), NUM_CLASSES)
    params, _ = method.init(jax.random.PRNGKey(0), (33, 33, 3))
    labels = method.param_labels(params)
    for branch in ("branch1", "branch2"):
        assert set(jax.tree.leaves(labels[branch]["backbone"])) == {"backbone"}
        rest = {k: v for k, v in labels[branch].items() if k != "backbone"}
        assert set(jax.tree.leaves(rest)) == {"head"}
    assert "mapping_0" in labels["branch2"]
    config = ccvc_config()
    config.optim.update(lr=0.1, lr_multi=10.0, momentum=0.0, weight_decay=0.0, total_steps=100)
    tx = optim.make_optimizer(config.optim, total_steps=100, param_labels=method.param_labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["branch2"]["backbone"]["conv1_0"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["branch2"]["mapping_0"]["kernel"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["branch1"]["classifier"]["bias"], -1.0, rtol=1e-6)


def test_recipes():
    city, pascal = ccvc_cityscapes.get_config("1_16"), ccvc_pascal.get_config("366")
    checks = {
        "cityscapes": (city, dict(crop=712, protocol="sliding", depth=50, os=8, grid=True, rates=(12, 24, 36),
                                  labeled="ce", lr=5e-3, multi=1.0, epochs=250, batch=8, group=2, mix=2,
                                  w=(1.0, 1.0, 1.0, 2.0), tau=0.0)),
        "pascal": (pascal, dict(crop=512, protocol="whole", depth=101, os=16, grid=False, rates=(6, 12, 18),
                                labeled="ce", lr=1e-3, multi=10.0, epochs=40, batch=16, group=4, mix=4,
                                w=(5.0, 2.0, 1.0, 1.5), tau=0.9)),
    }
    for name, (c, e) in checks.items():
        got = dict(crop=c.data.crop_size, protocol=c.eval.protocol, depth=c.model.depth, os=c.model.output_stride,
                   grid=c.model.multi_grid, rates=tuple(c.model.aspp_rates), labeled=c.loss.labeled, lr=c.optim.lr,
                   multi=c.optim.lr_multi, epochs=c.optim.epochs, batch=c.batch.labeled, group=c.loss.group_size,
                   mix=c.method.mix_group, w=(c.method.w_ce, c.method.w_con, c.method.w_dis, c.method.w_confident),
                   tau=c.method.tau)
        assert got == e, name
        assert (c.model.name, c.model.init_from, c.data.cutmix_prob, c.method.confidence) == ("ccvc", "imagenet", 1.0,
                                                                                              "logit")


def test_labeled_list_rule_and_configs_saved_before_it():
    """CCVC's labeled list is drawn from the repeated list (`StreamSpec.repeat='sample'`); a config saved
    before `labeled_repeat` existed keeps the tiled list it trained with, so its resume is exact."""
    c = ccvc_pascal.get_config("366")
    assert build_method(c, 21).streams()["labeled"].repeat == "sample"
    del c.method["labeled_repeat"]
    assert build_method(c, 21).streams()["labeled"].repeat == "tile"
    c.method.labeled_repeat = "shuffle"
    with pytest.raises(ValueError, match="config.method.labeled_repeat='shuffle'"):
        build_method(c, 21)


def test_recipe_steps_are_the_reference_totals():
    """STEPS = epochs x floor(ceil(|U| / 4) / per-GPU batch): the iterations of the official loader
    (xiaoyao3302/CCVC `CCVC_aug.py` lines 157-186 at 274672cca69e9aec809b3f0ecd86ed9885d2a0a5:
    `DistributedSampler` over 4 GPUs, `drop_last=True`, `total_iters = len(trainloader_u) * epochs`;
    4 GPUs x 4 on Pascal (README), x 2 on Cityscapes (`tools/train.sh`)), on csl_jax's lists."""
    for module, family, per_gpu, epochs in ((ccvc_pascal, "pascal", 4, 40), (ccvc_cityscapes, "cityscapes", 2, 250)):
        offered = {s for s in shipped_splits(family) if not s.startswith("u2pl_")}
        assert set(module.STEPS) == offered, family
        for split, steps in module.STEPS.items():
            n_unlabeled = len(shipped_list(f"{family}/{split}/unlabeled.txt"))
            assert steps == epochs * (math.ceil(n_unlabeled / 4) // per_gpu), (family, split)
            config = module.get_config(split)
            assert config.optim.total_steps == steps and config.optim.lr_after_step, (family, split)
    # the totals quoted from the official runs
    assert (ccvc_cityscapes.STEPS["1_16"], ccvc_cityscapes.STEPS["1_4"]) == (87250, 69750)
    assert (ccvc_pascal.STEPS["183"], ccvc_pascal.STEPS["1464"]) == (26000, 22800)
    with pytest.raises(ValueError, match="split 'u2pl_1_4' has no CCVC schedule; valid: 92, 183"):
        ccvc_pascal.get_config("u2pl_1_4")
    assert ccvc_camvid.get_config("1_8").optim.total_steps == 0  # csl_jax's own recipe: 240 epochs


def test_train_step_benchmark_knows_ccvc(tmp_path):
    # two networks: 2 x (labeled train pass 3 B_l + eval pass B_u + mixed and raw train passes 2 x 3 B_u)
    assert train_step.forward_passes(ccvc_pascal.get_config().method, 8, 8, head_share=0.3) == 2 * (24 + 8 + 48)
    config = train_step.make_config("ccvc", 101, 16, 513, "bfloat16", 8, 8)
    assert config.model.name == "ccvc" and config.method.mix_group == config.loss.group_size == 4
    assert train_step.reference_tflops(config) == pytest.approx(160 * 200 / 1e3)  # 160 passes x 200 GFLOP
    report = train_step.main(["--tiny", "--method", "ccvc", "--out", str(tmp_path / "train_step.json")])
    (result,) = report["results"]
    assert result["method"] == "ccvc" and result["ms_per_step"] > 0
