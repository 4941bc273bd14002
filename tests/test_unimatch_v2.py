"""csl_jax.methods.unimatch_v2: one step against a NumPy reference written from
docs/methods/unimatch_v2.md §5 (UniMatch-V2 `unimatch_v2.py:163-226` at f6afb4d), Complementary
Dropout masks (§3), the EMA teacher (§6), a frozen encoder (§7) and the V2 recipes (§8, §10).
Device-count independence and exact resume: tests/test_method_contract.py (unimatch_v2, fixmatch_v2,
unimatch_v2:csl, supervised:dpt)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import (common, supervised_v2_ade20k, supervised_v2_camvid, supervised_v2_cityscapes,
                     supervised_v2_coco, supervised_v2_pascal, unimatch_v2_ade20k, unimatch_v2_camvid,
                     unimatch_v2_cityscapes, unimatch_v2_coco, unimatch_v2_pascal)
from csl_jax import config_checks, optim, parallel
from csl_jax.methods import StepContext, build_method, unimatch_v2
from csl_jax.methods.parts import pseudo_labels
from csl_jax.methods.unimatch_v2 import comp_drop
from tests.helpers import harness

NUM_CLASSES = 3
CROP = harness.DPT_CROP
N, GROUP = 4, 2  # global (= local) unlabeled batch, reference per-GPU batch


def make_config(name="unimatch_v2", variant="", **options):
    c = harness.tiny_v2(common.get_base_config(), name, variant)
    c.data.crop_size = CROP
    c.batch.update(labeled=N, unlabeled=N)
    c.loss.group_size = GROUP
    c.method.update(options)
    return c


def make_batch(seed):
    rng = np.random.default_rng(seed)

    def images():
        return rng.normal(size=(N, CROP, CROP, 3)).astype(np.float32)

    def box():
        out = np.zeros((N, CROP, CROP), bool)
        for i in range(1, N, 2):  # every other sample has no box
            y, x = rng.integers(0, CROP // 2, 2)
            out[i, y:y + rng.integers(4, CROP // 2), x:x + rng.integers(4, CROP // 2)] = True
        return out

    ignore = np.zeros((N, CROP, CROP), np.int32)
    ignore[0, -7:] = 255  # crop padding
    ignore[3, :, -5:] = 255
    label = rng.integers(0, NUM_CLASSES, (N, CROP, CROP)).astype(np.int32)
    blocks = np.kron(rng.random((N, 4, 4)) < 0.7, np.ones((7, 7))).astype(bool)
    unlabeled = {"weak": images(), "ignore": ignore, "label": label, "strong": images(), "cutmix_box": box(),
                 "strong2": images(), "cutmix_box2": box(), "tmp": images(), "block_mask": blocks}
    lab_label = rng.integers(0, NUM_CLASSES, (N, CROP, CROP)).astype(np.int32)
    lab_label[:, :3] = 255
    return {"labeled": {"image": images(), "label": lab_label}, "unlabeled": unlabeled}


def ctx(rng):
    return StepContext(rng=rng, step=jnp.int32(0), device_index=jax.lax.axis_index(parallel.AXIS), num_devices=1,
                       steps_per_epoch=1, stream_offsets={"labeled": 0, "unlabeled": N})


def method_step(method, params, state, batch, rng):
    """method.loss on a 1-device mesh: (loss, metrics)."""
    def per_device(params, state, batch):
        loss, (_, metrics) = method.loss(params, state, batch, ctx(rng))
        return loss, metrics

    return harness.sharded(per_device, 1, in_specs=(P(), P(), P(parallel.AXIS)))(params, state, batch)


def np_grouped_ce(logits, labels, weights, valid):
    """sum w CE over valid pixels / their count, per group of GROUP images; mean over groups (float64)."""
    z = np.float64(logits)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = np.take_along_axis(z, labels[..., None], -1)[..., 0]
    ce = np.where(valid, (lse - picked) * weights, 0.0)
    num = ce.reshape(-1, GROUP * CROP * CROP).sum(1)
    return float(np.mean(num / valid.reshape(-1, GROUP * CROP * CROP).sum(1)))


def reference_step(method, params, teacher, batch, rng):
    """Loss terms of one step, following §5 literally: teacher targets, reversed-batch CutMix, comp-drop."""
    o, model = method.opts, method.model
    lab, unl = batch["labeled"], batch["unlabeled"]
    t = np.asarray(model.apply({"params": teacher}, unl["weak"], train=False)[0], np.float64)
    probs = np.exp(t - t.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    valid = unl["ignore"] != 255
    if o.selector == "threshold":
        weight = (valid & (probs.max(-1) >= o.tau)).astype(np.float64)
    elif o.selector == "u2pl_entropy":  # U2PL at epoch 0: keep entropies below the group's 80th percentile
        h = -np.sum(probs * np.log(probs + 1e-10), axis=-1)
        thresholds = [np.percentile(h[g:g + GROUP][valid[g:g + GROUP]], 100 - (100 - o.drop_percent))
                      for g in range(0, N, GROUP)]
        weight = (valid & (h < np.repeat(thresholds, GROUP)[:, None, None])).astype(np.float64)
    else:
        weight = np.float64(pseudo_labels.csl_weights(jax.nn.softmax(jnp.asarray(t, jnp.float32)), valid)[0])
    label = probs.argmax(-1)
    partner = np.concatenate([np.arange(g, g + GROUP)[::-1] for g in range(0, N, GROUP)])  # flip(0) per GPU

    def paste(box, own):
        return np.where(box.reshape(box.shape + (1,) * (own.ndim - 3)), own[partner], own)

    views = [(paste(unl["cutmix_box"], unl["strong"]), *(paste(unl["cutmix_box"], x) for x in (label, weight, valid)))]
    if o.second_view == "cutmix":
        views.append((paste(unl["cutmix_box2"], unl["strong2"]),
                      *(paste(unl["cutmix_box2"], x) for x in (label, weight, valid))))
    elif o.second_view == "tmp":
        reliable = valid & (weight == 1.0)
        views.append((np.where((reliable & unl["block_mask"])[..., None], 0.0, unl["tmp"]), label, weight, valid))
    scale = None
    if o.comp_drop and len(views) == 2:
        ids = N + np.arange(N)
        m1, m2 = comp_drop.masks(jax.random.fold_in(rng, unimatch_v2._COMP_DROP_KEY), ids, ids - N,
                                 params["backbone"]["cls_token"].shape[-1], GROUP)
        scale = np.concatenate([m1, m2])
    z_x = np.asarray(model.apply({"params": params}, lab["image"], train=True)[0])
    z_s = np.asarray(model.apply({"params": params}, np.concatenate([v[0] for v in views]), train=True,
                                 feature_scale=scale)[0])
    terms = {"loss_x": np_grouped_ce(z_x, np.where(lab["label"] == 255, 0, lab["label"]), 1.0, lab["label"] != 255)}
    for k, (_, lbl, w, v) in enumerate(views):
        terms[f"loss_s{k + 1}"] = np_grouped_ce(z_s[k * N:(k + 1) * N], lbl, w, v)
    terms["loss"] = (terms["loss_x"] + sum(terms[f"loss_s{k + 1}"] for k in range(len(views))) / len(views)) / 2
    terms["mask_ratio"] = float((valid & (weight == 1.0)).sum() / valid.sum())
    return terms


CASES = {"unimatch_v2": ("unimatch_v2", "", {}), "fixmatch_v2": ("fixmatch_v2", "", {}),
         "csl": ("unimatch_v2", "csl", {}), "u2pl_entropy": ("unimatch_v2", "u2pl_entropy", {}),
         "tmp": ("unimatch_v2", "", {"second_view": "tmp"}),
         "no_comp_drop": ("unimatch_v2", "", {"comp_drop": False})}


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_numpy_reference(case):
    name, variant, options = CASES[case]
    method = build_method(make_config(name, variant, **options), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (CROP, CROP, 3))
    teacher, _ = method.init(jax.random.PRNGKey(1), (CROP, CROP, 3))  # differs: the test sees which one is used
    state = dict(state, teacher={"params": teacher, "batch_stats": {}})
    batch, rng = make_batch(3), jax.random.PRNGKey(5)
    # tau at the median teacher confidence: about half the pixels pass (a random tiny model is near uniform)
    conf = jax.nn.softmax(method.model.apply({"params": teacher}, batch["unlabeled"]["weak"], train=False)[0]).max(-1)
    method.opts.tau = float(np.median(np.asarray(conf)))
    loss, metrics = method_step(method, params, state, batch, rng)
    ref = reference_step(method, params, teacher, batch, rng)
    assert 0.0 < ref["mask_ratio"] < 1.0, "degenerate case: every or no pixel is reliable"
    for key, value in ref.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
    assert ("loss_s2" in metrics) == (name != "fixmatch_v2")


def test_complementary_dropout_masks():
    key, d, g = jax.random.PRNGKey(0), 64, 4
    ids = jnp.arange(100, 164)
    m1, m2 = map(np.asarray, comp_drop.masks(key, ids, jnp.arange(64), d, g))
    untouched = np.all(m1 == 1, axis=1)
    np.testing.assert_array_equal(np.all(m2 == 1, axis=1), untouched)
    assert untouched.reshape(-1, g).sum(1).tolist() == [g // 2] * 16  # floor(g/2) per group
    drawn = m1[~untouched]
    assert set(np.unique(drawn)) <= {0.0, 2.0} and np.all(m1[~untouched] + m2[~untouched] == 2.0)
    assert abs(drawn.mean() / 2 - 0.5) < 0.05  # Bernoulli(0.5) over 32 images x 64 channels
    # keyed by global ids and positions: any split of the batch over devices draws the same masks
    half = comp_drop.masks(key, ids[32:], jnp.arange(32, 64), d, g)
    np.testing.assert_array_equal(np.asarray(half[0]), m1[32:])
    other = comp_drop.masks(jax.random.PRNGKey(1), ids, jnp.arange(64), d, g)[0]
    assert np.any(np.asarray(other) != m1)


def test_ema_teacher_copies_then_follows_at_0996():
    method = build_method(make_config(), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (CROP, CROP, 3))
    student = jax.tree.map(lambda x: x + 1.0, params)
    copied = method.after_update(state, student, jnp.int32(0))["teacher"]["params"]
    harness.assert_trees_equal(copied, student)
    later = method.after_update(state, student, jnp.int32(1000))["teacher"]["params"]
    harness.assert_trees_close(later, jax.tree.map(lambda t, s: 0.996 * t + 0.004 * s, params, student),
                               rtol=1e-6, atol=1e-6)


def test_locked_backbone_is_frozen_and_gets_no_gradient():
    method = build_method(make_config(lock_backbone=True), NUM_CLASSES)
    params, state = method.init(jax.random.PRNGKey(0), (CROP, CROP, 3))
    labels = method.param_labels(params)
    assert set(jax.tree.leaves(labels["backbone"])) == {"frozen"} and set(jax.tree.leaves(labels["head"])) == {"head"}
    batch = make_batch(4)

    def per_device(params, state, batch):
        return jax.grad(lambda p: method.loss(p, state, batch, ctx(jax.random.PRNGKey(0)))[0])(params)

    grads = harness.sharded(per_device, 1, in_specs=(P(), P(), P(parallel.AXIS)))(params, state, batch)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["head"]))
    c = make_config(lock_backbone=True)
    tx = optim.make_optimizer(c.optim, 10, method.param_labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["backbone"]))


# UniMatch-V2 configs/*.yaml at f6afb4d and the logs' config dumps (spec §8, §10), written out:
# (crop, global labeled = unlabeled batch, loss group, epochs, L_x, protocol, supervised samples per epoch)
V2_TABLE = {"pascal": (518, 16, 4, 60, "ce", "whole_resize", 3000),
            "cityscapes": (798, 8, 2, 180, "ohem", "sliding_shifted", 3000),
            "ade20k": (518, 8, 2, 60, "ce", "whole_resize", 6000),
            "coco": (518, 16, 4, 20, "ce", "whole_resize", 30000),
            # csl_jax's own: Pascal's recipe at V1 CamVid's crop (321 -> 322, 23 patches) and 240 epochs, one GPU
            "camvid": (322, 8, 8, 240, "ce", "whole_resize", 640)}
SEMI = {"pascal": unimatch_v2_pascal, "cityscapes": unimatch_v2_cityscapes, "ade20k": unimatch_v2_ade20k,
        "coco": unimatch_v2_coco, "camvid": unimatch_v2_camvid}
SUPERVISED = {"pascal": supervised_v2_pascal, "cityscapes": supervised_v2_cityscapes, "ade20k": supervised_v2_ade20k,
              "coco": supervised_v2_coco, "camvid": supervised_v2_camvid}


@pytest.mark.parametrize("dataset", list(V2_TABLE))
def test_v2_recipes(dataset):
    crop, batch, group, epochs, loss, protocol, samples = V2_TABLE[dataset]
    for config in (SEMI[dataset].get_config(), SUPERVISED[dataset].get_config()):
        config_checks.check(config)
        assert (config.model.name, config.model.encoder, config.model.init_from) == ("dpt", "small", "imagenet")
        assert config.data.keep_jittered_padding
        assert (config.data.crop_size, config.loss.group_size, config.optim.epochs, config.loss.labeled,
                config.eval.protocol) == (crop, group, epochs, loss, protocol)
        o = config.optim
        assert (o.name, o.lr, o.lr_multi, o.weight_decay, o.weight_decay_on, o.lr_after_step) == (
            "adamw", 5e-6, 40.0, 0.01, "all", True)
    semi = SEMI[dataset].get_config("1_8,base,csl" if dataset != "pascal" else "1_8,base,csl")
    assert (semi.batch.labeled, semi.batch.unlabeled, semi.model.encoder) == (batch, batch, "base")
    assert (semi.method.name, semi.method.variant, semi.method.selector, semi.method.ema_momentum,
            semi.method.comp_drop) == ("unimatch_v2", "csl", "csl", 0.996, True)
    assert SEMI[dataset].get_config("u2pl_entropy").method.selector == "u2pl_entropy"
    fix = SEMI[dataset].get_config("fixmatch_v2").method
    assert (fix.name, fix.second_view, fix.comp_drop, fix.selector, fix.tau) == ("fixmatch_v2", "none", False,
                                                                                 "threshold", 0.95)
    sup = SUPERVISED[dataset].get_config("large")
    assert (sup.batch.labeled, sup.data.epoch_samples, sup.method.name, sup.model.encoder) == (
        2 * batch, samples, "supervised", "large")
    with pytest.raises(ValueError, match="SPLIT\\[,ENCODER\\]\\[,VARIANT\\]"):
        SEMI[dataset].get_config("1_8,huge,extra")


def test_v2_configs_narrow_the_dpt_from_the_command_line():
    """`common.DPT_NARROWING`: every DPT field can be set by `--config.model.X=...` (typed placeholders, unset =
    the encoder's value), and the model built from them is that DPT."""
    from csl_jax.models import dpt
    from csl_jax.models import registry
    from csl_jax.models.registry import build_model

    assert set(common.DPT_NARROWING) == set(dpt.ENCODER_FIELDS + dpt.HEAD_FIELDS)
    assert all(registry.LATER_FIELDS[f] is None for f in common.DPT_NARROWING)  # V2 runs saved before resume
    config = unimatch_v2_camvid.get_config()
    assert all(config.model[f] is None for f in common.DPT_NARROWING)
    assert build_model(config.model, 11).embed_dim == 384  # ViT-S: nothing narrowed
    import json

    from tests.test_cli import run_main

    code, out, err = run_main(["--config=configs/unimatch_v2_camvid.py:1_8", "--mode=config",
                               "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
                               "--config.model.taps=(0,1,1,1)", "--config.model.out_channels=(4,8,8,8)",
                               "--config.model.ffn=swiglu", "--config.model.features=16"])
    assert code == 0, err
    narrowed = ml_collections.ConfigDict(json.loads(out)["model"])
    model = build_model(narrowed, 11)
    assert (model.embed_dim, model.depth, model.num_heads, model.taps, model.out_channels, model.ffn,
            model.features) == (32, 2, 2, (0, 1, 1, 1), (4, 8, 8, 8), "swiglu", 16)
    assert dpt.narrowed_fields(narrowed) == dict(embed_dim=32, depth=2, num_heads=2, ffn="swiglu")
    other = unimatch_v2_camvid.get_config()  # a fresh config: no placeholder is shared between configs
    assert other.model.embed_dim is None


def test_v2_options_are_checked():
    opts = unimatch_v2.default_options()
    unimatch_v2.check_options(opts)
    for key, value in (("tau", 1.5), ("comp_drop", 1), ("second_view", "mix"), ("selector", "entropy"),
                       ("comp_drop_keep", -0.1)):
        bad = ml_collections.ConfigDict({**opts.to_dict(), key: value})
        with pytest.raises(ValueError, match=f"config.method.{key}="):
            unimatch_v2.check_options(bad)


# ------------------------------------------------- one step against the PyTorch transcription (spec §16 item 6)
def test_step_loss_and_gradients_match_torch():
    """Teacher, student and the step in float64 torch (tests/helpers/torch_dinov2_dpt.py, written from the spec):
    the teacher's threshold targets, the reversed-partner CutMix, the Complementary Dropout masks (the
    method's, injected), L_x, L_s1, L_s2, L and every parameter gradient agree with csl_jax's step."""
    torch = pytest.importorskip("torch")
    from csl_jax.models import dpt
    from tests.helpers import torch_dinov2_dpt as ref

    size, classes, fields = 56, 5, dict(dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), features=8,
                                        out_channels=(4, 8, 16, 32), pos_grid=4)
    nets = []
    for seed in (0, 3):  # student, teacher
        torch.manual_seed(seed)
        net = ref.DPT(classes, **fields)
        ref.randomise(net, torch.Generator().manual_seed(seed + 1))
        nets.append(net)
    student, teacher_net = (net.double() for net in nets)  # the transcription in float64
    checkpoint = {"model": {f"module.{k}": v.float() for k, v in student.state_dict().items()},
                  "model_ema": {f"module.{k}": v.float() for k, v in teacher_net.state_dict().items()}}
    given = dict(num_heads=2, taps=(0, 1, 2, 3), attention="einsum")
    _, t_vars = dpt.from_unimatch_v2(checkpoint, **given)
    _, s_vars = dpt.from_unimatch_v2(checkpoint, network="student", **given)

    c = make_config()
    c.model.update(embed_dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), pos_grid=4, features=8,
                   out_channels=(4, 8, 16, 32))
    c.data.crop_size = size
    rng_np = np.random.default_rng(9)
    batch = make_batch(9)
    for stream in batch.values():  # the same batch at crop 56
        for key, value in stream.items():
            stream[key] = np.kron(value, np.ones((1, 2, 2) + (1,) * (value.ndim - 3), value.dtype))
    batch["labeled"]["label"] = rng_np.integers(0, classes, (N, size, size)).astype(np.int32)
    batch["unlabeled"]["label"] = batch["labeled"]["label"]
    method = build_method(c, classes)
    to_torch = lambda x: torch.from_numpy(np.float64(x)).permute(0, 3, 1, 2)  # noqa: E731
    unl, lab, rng = batch["unlabeled"], batch["labeled"], jax.random.PRNGKey(2)
    with torch.no_grad():
        probs = torch.softmax(teacher_net(to_torch(unl["weak"])), 1)
    conf, pseudo = probs.max(1)
    # tau in the widest gap between teacher confidences near the median: float32 and float64 agree on every pixel
    ordered = np.sort(conf.numpy().ravel())
    k = len(ordered) // 2 - 50 + int(np.argmax(np.diff(ordered[len(ordered) // 2 - 50:len(ordered) // 2 + 51])))
    method.opts.tau = float(ordered[k] + ordered[k + 1]) / 2

    # torch: the step of spec §5 with the method's masks
    ids = N + np.arange(N)
    m1, m2 = comp_drop.masks(jax.random.fold_in(rng, unimatch_v2._COMP_DROP_KEY), ids, ids - N, 32, GROUP)
    partner = torch.tensor([1, 0, 3, 2])
    ignore = torch.from_numpy(unl["ignore"])
    weight = ((conf >= method.opts.tau) & (ignore != 255)).double()
    strong, targets = [], []
    for view, box in (("strong", "cutmix_box"), ("strong2", "cutmix_box2")):
        b = torch.from_numpy(unl[box])
        s = to_torch(unl[view])
        strong.append(torch.where(b[:, None], s[partner], s))
        targets.append([torch.where(b, t[partner], t) for t in (pseudo, weight, ignore)])
    logits_x = student(to_torch(lab["image"]))
    logits_s = student(torch.cat(strong), feature_scale=torch.from_numpy(np.float64(np.concatenate([m1, m2]))))

    def grouped(ce, valid):  # per group of GROUP images: sum / valid count; mean over groups
        return torch.stack([ce[g:g + GROUP].sum() / valid[g:g + GROUP].sum() for g in range(0, N, GROUP)]).mean()

    y = torch.from_numpy(lab["label"]).long()
    terms = {"loss_x": grouped(F_ce(torch, logits_x, y.clamp(max=classes - 1)) * (y != 255), y != 255)}
    for k, (lbl, w, ig) in enumerate(targets):
        valid = ig != 255
        terms[f"loss_s{k + 1}"] = grouped(F_ce(torch, logits_s[k * N:(k + 1) * N], lbl) * w * valid, valid)
    terms["loss"] = (terms["loss_x"] + (terms["loss_s1"] + terms["loss_s2"]) / 2) / 2
    terms["loss"].backward()

    # csl_jax: the same step, gradients by jax.grad
    state = {"batch_stats": {}, "teacher": {"params": t_vars["params"], "batch_stats": {}}}

    def per_device(params, batch):
        return jax.value_and_grad(lambda p: method.loss(p, state, batch, ctx(rng)), has_aux=True)(params)

    (loss, (_, metrics)), grads = harness.sharded(per_device, 1, in_specs=(P(), P(parallel.AXIS)))(
        s_vars["params"], batch)
    for key, value in terms.items():
        np.testing.assert_allclose(float(metrics[key]), float(value.detach()), rtol=1e-5, err_msg=key)
    torch_grads = {f"module.{k}": (p.grad if p.grad is not None else torch.zeros_like(p)).float()
                   for k, p in student.named_parameters()}
    _, expected = dpt.from_unimatch_v2({"model": torch_grads}, network="student", **given)
    flat_got = jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected["params"]))
    scale = max(float(np.abs(g).max()) for _, g in flat_got)
    for path, g in flat_got:
        np.testing.assert_allclose(g, np.asarray(flat_expected[path]), rtol=1e-3, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def F_ce(torch, logits, labels):
    """Per-pixel cross-entropy (B, H, W) of (B, C, H, W) logits."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


data_root = harness.data_root


def test_mode_eval_of_an_official_checkpoint_gives_the_transcriptions_miou(data_root, tmp_path):
    """`--mode=eval --checkpoint=V2.pth` (modes.evaluate_checkpoint) on random weights saved in UniMatch V2's
    layout (`unimatch_v2.py:264-277`: DDP `module.` keys, model and model_ema) evaluates the EMA network
    with 'whole_resize' exactly as the float64 transcription does: x14 resize with align_corners, the
    network, back, argmax; mIoU over all classes from the set's confusion matrix."""
    torch = pytest.importorskip("torch")
    from csl_jax import data
    from csl_jax.data.transforms import normalize
    from csl_jax.evaluation import modes
    from tests.helpers import torch_dinov2_dpt as ref

    fields = dict(dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), features=8, out_channels=(4, 8, 16, 32),
                  pos_grid=4)
    nets = []
    for seed in (0, 3):
        torch.manual_seed(seed)
        net = ref.DPT(harness.NUM_CLASSES, **fields)
        ref.randomise(net, torch.Generator().manual_seed(seed + 1))
        nets.append(net.eval())
    student, ema = nets
    path = tmp_path / "v2.pth"
    torch.save({"model": {f"module.{k}": v for k, v in student.state_dict().items()},
                "model_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}, "epoch": 3}, path)

    c = harness.tiny_v2(common.get_base_config())
    c.model.update(embed_dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), pos_grid=4, features=8,
                   out_channels=(4, 8, 16, 32))
    c.data.update(name="synthetic", root=data_root, crop_size=harness.DPT_CROP, split="1_2")
    c.eval.update(batch_size=8, max_images=0)
    results = modes.evaluate_checkpoint(c, str(tmp_path), str(path), save=False)

    ema = ema.double()
    conf = np.zeros((harness.NUM_CLASSES,) * 2, np.int64)
    for example in data.eval_dataset(c.data):
        image, label = np.asarray(example["image"]), np.asarray(example["label"])
        h, w = label.shape
        x = torch.from_numpy(np.float64(normalize(image))).permute(2, 0, 1)[None]
        size = (int(h / 14 + 0.5) * 14, int(w / 14 + 0.5) * 14)
        resize = torch.nn.functional.interpolate
        with torch.no_grad():
            logits = resize(ema(resize(x, size, mode="bilinear", align_corners=True)), (h, w), mode="bilinear",
                            align_corners=True)
        pred = logits[0].argmax(0).numpy()
        keep = label != 255
        np.add.at(conf, (label[keep], pred[keep]), 1)
    inter = np.diag(conf)
    expected = np.mean(inter / (conf.sum(0) + conf.sum(1) - inter + 1e-10))
    assert results["predict"] == "teacher" and results["protocol"]["name"] == "whole_resize"
    assert results["num_images"] == len(data.eval_dataset(c.data))
    np.testing.assert_allclose(results["miou"], expected, atol=2e-4)


def test_strong_views_keep_their_jittered_padding_on_request():
    """UniMatch V2's reference jitters the zero-padded crop (§4): with keep_jittered_padding the padding
    is what the colour transforms made of black; by default it is reset to black (0 before normalising)."""
    from csl_jax.data import transforms, views

    rng = np.random.default_rng(0)
    weak = rng.integers(0, 256, (20, 20, 3), np.uint8)
    weak[14:] = 0
    valid = np.ones((20, 20), bool)
    valid[14:] = False
    for name in ("strong", "strong2"):
        draws = {}
        for keep in (False, True):
            options = {"cutmix_prob": 0.5, "keep_jittered_padding": keep}
            view = views.VIEWS[name]
            draws[keep] = view.fn(weak, valid, np.random.default_rng(1), 20, options)[name]
        image = transforms.strong_photometric(weak, np.random.default_rng(1))  # the same draws, first
        np.testing.assert_array_equal(draws[True], transforms.normalize(image))
        np.testing.assert_array_equal(draws[False][:14], draws[True][:14])
        assert np.abs(draws[True][14:] - draws[False][14:]).max() > 0.1  # this draw's jitter coloured the padding
        np.testing.assert_array_equal(draws[False][14:], np.broadcast_to(transforms.normalize(np.zeros(3, np.uint8)),
                                                                         (6, 20, 3)))
