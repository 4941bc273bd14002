"""CCVC's losses against float64 PyTorch transcriptions of the official `CCVC_aug.py` / `util/utils.py`.

- the pieces: cosine discrepancy (value and the gradients its stop-gradients leave), the conflict
  rule `vote_threshold_label_selection` (logit and softmax confidence), the per-GPU `flip(0)`
  partner (`reverse_groups`, also across devices);
- the whole step: `CCVC.loss` on a small network (1x1 conv, BN, ReLU features; 1x1 classifier per
  branch) against the official iteration written out in PyTorch (labeled pass, eval-mode pass
  with the updated BN statistics, CutMix with the reversed batch, mixed and raw passes, CE, conflict
  weights, discrepancy), for the reference defaults and each option (softmax confidence,
  box-aligned conflict masks, OHEM): loss terms, BN statistics after the step and the gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P

from configs import common
from csl_jax import parallel
from csl_jax.methods import ccvc as ccvc_method
from csl_jax.methods.base import StepContext
from csl_jax.methods.ccvc import losses as ccvc_losses
from csl_jax.models.ccvc import CCVCNet
from csl_jax.models.layers import BatchNorm
from tests.helpers import harness, torch_reference

NUM_CLASSES, FEATURES, SIZE, BATCH = 4, 6, 8, 4


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_discrepancy_value_and_stop_gradients_match_torch():
    rng = np.random.default_rng(0)
    f1 = np.maximum(rng.normal(size=(2, 5, 5, 7)), 0)
    f2 = np.maximum(rng.normal(size=(2, 5, 5, 7)), 0)
    f2[0, 0, 0] = 0.0  # an all-zero feature vector (ReLU + dropout): cosine 0 through eps
    value, (g1, g2) = jax.value_and_grad(ccvc_losses.discrepancy, argnums=(0, 1))(
        jnp.asarray(f1, jnp.float32), jnp.asarray(f2, jnp.float32))

    t1 = torch.tensor(f1.transpose(0, 3, 1, 2), requires_grad=True)
    t2 = torch.tensor(f2.transpose(0, 3, 1, 2), requires_grad=True)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    ref = ((1 + cos(t1.detach(), t2).mean()) + (1 + cos(t2.detach(), t1).mean())) / 2
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), t1.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g2), t2.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-7)
    # each term moves only its non-detached side: f1's gradient is that of cos(sg f2, f1) alone
    only = torch.tensor(f1.transpose(0, 3, 1, 2), requires_grad=True)
    (cos(t2.detach(), only).mean() / 2).backward()
    np.testing.assert_allclose(np.asarray(g1), only.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-7)


def torch_vote_threshold(pred1, pred2, threshold):
    """`util/utils.py` vote_threshold_label_selection on (B, C, H, W) tensors."""
    conf1, label1 = pred1.max(dim=1)
    conf2, label2 = pred2.max(dim=1)
    different = label1 != label2
    different1_confident = different * (conf1 > threshold)
    different2_confident = different * (conf2 > threshold)
    return different, different1_confident, different2_confident


@pytest.mark.parametrize("kind,tau", [("logit", 0.9), ("logit", 0.0), ("prob", 0.5)])
def test_conflict_weights_match_the_official_rule(kind, tau):
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 3, 6, 6, 5)) * 1.5
    conflict, w1, w2 = ccvc_losses.conflict_weights(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                                    tau=tau, w_confident=2.0, kind=kind)
    t1, t2 = (torch.tensor(z.transpose(0, 3, 1, 2)) for z in (z1, z2))
    if kind == "prob":  # the paper's wording: softmax confidence
        t1, t2 = t1.softmax(dim=1), t2.softmax(dim=1)
    different, conf1, conf2 = torch_vote_threshold(t1, t2, tau)
    np.testing.assert_array_equal(np.asarray(conflict), different.numpy())
    # loss_else + w_confident * loss_cc = weight * CE, weight 1 on "else" pixels
    np.testing.assert_array_equal(np.asarray(w1), np.where(conf1.numpy(), 2.0, 1.0))
    np.testing.assert_array_equal(np.asarray(w2), np.where(conf2.numpy(), 2.0, 1.0))
    assert 0 < conf1.sum() <= different.sum() < different.numel()  # agreeing and up-weighted pixels occur
    if tau > 0:  # and conflicts left at weight 1 (tau = 0 with logits up-weights every conflict here)
        assert conf1.sum() < different.sum()


def test_reverse_groups_is_the_per_gpu_flip_on_any_device_count():
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    for group in (1, 2, 4, 8, 16):
        expected = np.concatenate([torch.tensor(c).flip(0).numpy() for c in np.split(x, 16 // group)])
        np.testing.assert_array_equal(np.asarray(ccvc_losses.reverse_groups(jnp.asarray(x), group)), expected)
        for devices in (2, 8):  # local batches of 8 and 2: groups inside a device or across devices
            fn = harness.sharded(lambda v, g=group, d=devices: ccvc_losses.reverse_groups(v, g, parallel.AXIS, d),
                                 devices, in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS))
            np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x))), expected, err_msg=f"{group=} {devices=}")
    with pytest.raises(ValueError, match="mix_group = 3"):
        ccvc_losses.reverse_groups(jnp.asarray(x), 3)


# ------------------------------------------------------------------------------------------------
# the whole step
# ------------------------------------------------------------------------------------------------
class SmallBranch(nn.Module):
    """features = ReLU(BN(conv1x1(x))) (B, H, W, F); logits = conv1x1(features) + b; the CCVC branch API."""

    @nn.compact
    def __call__(self, x, train, feature_perturb=False, sample_ids=None):
        del feature_perturb, sample_ids
        y = nn.Conv(FEATURES, (1, 1), use_bias=False, name="conv")(x)
        features = nn.relu(BatchNorm(axis_name=parallel.AXIS, name="bn")(y, not train))
        logits = nn.Conv(NUM_CLASSES, (1, 1), name="classifier")(features)
        return logits, {"features": features}


def step_config(**method):
    c = common.get_base_config()
    ccvc_method.configure(c)
    c.method.update(method)
    c.loss.group_size = 2  # two "GPUs" of 2 images (Cityscapes' per-GPU batch)
    c.loss.ohem_min_kept = 60
    return c


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (BATCH, SIZE, SIZE)).astype(np.int32)
    labels[0, :2] = 255
    ignore = np.zeros((BATCH, SIZE, SIZE), np.int32)
    ignore[1, 5:] = 255  # crop padding
    ignore[3, :, 6:] = 255
    box = np.zeros((BATCH, SIZE, SIZE), bool)
    for i, (y, x, h, w) in enumerate([(1, 2, 4, 5), (0, 0, 8, 3), (3, 3, 5, 5), (2, 1, 3, 6)]):
        box[i, y:y + h, x:x + w] = True
    img = rng.normal(size=(3, BATCH, SIZE, SIZE, 3)).astype(np.float32)
    return {"labeled": {"image": img[0], "label": labels},
            "unlabeled": {"weak": img[1], "strong": img[2], "ignore": ignore, "cutmix_box": box,
                          "label": np.full((BATCH, SIZE, SIZE), 255, np.int32)}}


def jax_step(config, batch, devices=1):
    """(loss, metrics, new batch_stats, grads, params, state) of CCVC.loss on `devices` devices,
    averaged over devices as the trainer does (pmean)."""
    method = ccvc_method.CCVC(config, NUM_CLASSES)
    method.model = CCVCNet(branch1=SmallBranch(), branch2=SmallBranch())
    params, state = method.init(jax.random.PRNGKey(3), (SIZE, SIZE, 3))
    params = jax.tree.map(lambda p: p * 3.0, params)  # logits spread enough for every confidence case

    def per_device(params, state, batch):
        ctx = StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), device_index=jax.lax.axis_index(parallel.AXIS),
                          num_devices=devices, steps_per_epoch=1, stream_offsets={"labeled": 0, "unlabeled": BATCH})
        (loss, (new_state, metrics)), grads = jax.value_and_grad(method.loss, has_aux=True)(params, state, batch, ctx)
        return jax.lax.pmean((loss, metrics, new_state, grads), parallel.AXIS)

    fn = harness.sharded(per_device, devices, in_specs=(P(), P(), P(parallel.AXIS)))
    loss, metrics, new_state, grads = jax.device_get(fn(params, state, batch))
    return loss, metrics, new_state["batch_stats"], grads, jax.device_get(params), jax.device_get(state)


class TorchBranch(torch.nn.Module):
    def __init__(self, params, stats):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, FEATURES, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(FEATURES)  # momentum 0.1, unbiased running variance
        self.classifier = torch.nn.Conv2d(FEATURES, NUM_CLASSES, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(np.asarray(params["conv"]["kernel"]).transpose(3, 2, 0, 1)))
            self.bn.weight.copy_(torch.tensor(np.asarray(params["bn"]["scale"])))
            self.bn.bias.copy_(torch.tensor(np.asarray(params["bn"]["bias"])))
            self.bn.running_mean.copy_(torch.tensor(np.asarray(stats["bn"]["mean"])))
            self.bn.running_var.copy_(torch.tensor(np.asarray(stats["bn"]["var"])))
            self.classifier.weight.copy_(torch.tensor(np.asarray(params["classifier"]["kernel"]).transpose(3, 2, 0, 1)))
            self.classifier.bias.copy_(torch.tensor(np.asarray(params["classifier"]["bias"])))

    def forward(self, x):
        feature = F.relu(self.bn(self.conv(x)))
        return feature, self.classifier(feature)


class TorchDiscrepancyNet(torch.nn.Module):
    """`Discrepancy_DeepLabV3Plus.forward`: both branches, {'pred1', 'feature1', 'pred2', 'feature2'}."""

    def __init__(self, params, stats):
        super().__init__()
        self.branch1 = TorchBranch(params["branch1"], stats["branch1"])
        self.branch2 = TorchBranch(params["branch2"], stats["branch2"])

    def forward(self, x):
        feature1, pred1 = self.branch1(x)
        feature2, pred2 = self.branch2(x)
        return {"pred1": pred1, "feature1": feature1, "pred2": pred2, "feature2": feature2}


def torch_step(params, state, batch, opts, labeled_loss, gpu_batch=2):
    """One official CCVC_aug.py iteration (4 GPUs' DDP as GPU chunks of `gpu_batch`, SyncBN over all).

    Returns ({'loss_ce', 'loss_con', 'loss_dis', 'loss'}, model) after backward; the DDP loss is
    the mean of the per-GPU losses.
    """
    model = TorchDiscrepancyNet(params, state["batch_stats"]).double()  # float32 values, float64 arithmetic

    def nchw(a):
        return torch.tensor(np.asarray(a, np.float64).transpose(0, 3, 1, 2))

    x, y = nchw(batch["labeled"]["image"]), torch.tensor(batch["labeled"]["label"]).long()
    u_w, u_s = nchw(batch["unlabeled"]["weak"]), nchw(batch["unlabeled"]["strong"])
    ign, box = torch.tensor(batch["unlabeled"]["ignore"]).long(), torch.tensor(batch["unlabeled"]["cutmix_box"]).long()

    model.train()
    labeled_logits = model(x)
    with torch.no_grad():
        model.eval()
        unlabeled_logits = model(u_w)
        pl1 = unlabeled_logits["pred1"].softmax(dim=1).max(dim=1)[1].long()
        pl2 = unlabeled_logits["pred2"].softmax(dim=1).max(dim=1)[1].long()
        up1, up2 = unlabeled_logits["pred1"], unlabeled_logits["pred2"]

    def flip_per_gpu(t):
        return torch.cat([c.flip(0) for c in t.split(gpu_batch)])

    def mix(t):
        out = t.clone()
        m = (box.unsqueeze(1).expand(t.shape) == 1) if t.dim() == 4 else box == 1
        out[m] = flip_per_gpu(t)[m]
        return out

    img_m, ign_m, pl1_m, pl2_m, up1_m, up2_m = (mix(t) for t in (u_s, ign, pl1, pl2, up1, up2))
    model.train()
    mixed_logits = model(img_m)
    raw_logits = model(u_w)

    criterion_u = torch.nn.CrossEntropyLoss(reduction="none")
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)

    def conf(t):
        return t.softmax(dim=1) if opts["confidence"] == "prob" else t

    gpu_losses = []
    for g in range(x.shape[0] // gpu_batch):
        s = slice(g * gpu_batch, (g + 1) * gpu_batch)
        if labeled_loss == "ce":
            ce1 = F.cross_entropy(labeled_logits["pred1"][s], y[s], ignore_index=255)
            ce2 = F.cross_entropy(labeled_logits["pred2"][s], y[s], ignore_index=255)
        else:
            ce1 = torch_reference.prob_ohem(labeled_logits["pred1"][s], y[s], 0.7, 60)  # UniMatch/CCVC's
            ce2 = torch_reference.prob_ohem(labeled_logits["pred2"][s], y[s], 0.7, 60)
        loss_ce = (ce1 + ce2) / 2 * opts["w_ce"]

        if opts["mask_alignment"] == "reference":
            _, d1, d2 = torch_vote_threshold(conf(up1[s]), conf(up2[s]), opts["tau"])
        else:
            _, d1, d2 = torch_vote_threshold(conf(up1_m[s]), conf(up2_m[s]), opts["tau"])
        valid_m = ign_m[s] != 255
        mp1, mp2 = mixed_logits["pred1"][s], mixed_logits["pred2"][s]
        con1 = (criterion_u(mp2, pl1_m[s]) * (~d1 & valid_m)
                + opts["w_confident"] * criterion_u(mp2, pl1_m[s]) * (d1 & valid_m)).sum() / valid_m.sum().item()
        con2 = (criterion_u(mp1, pl2_m[s]) * (~d2 & valid_m)
                + opts["w_confident"] * criterion_u(mp1, pl2_m[s]) * (d2 & valid_m)).sum() / valid_m.sum().item()
        rp1, rp2 = raw_logits["pred1"][s], raw_logits["pred2"][s]
        _, r1, r2 = torch_vote_threshold(conf(rp1), conf(rp2), opts["tau"])
        valid = ign[s] != 255
        rl1 = rp1.softmax(dim=1).max(dim=1)[1].detach().long()
        rl2 = rp2.softmax(dim=1).max(dim=1)[1].detach().long()
        raw1 = (criterion_u(rp2, rl1) * (~r1 & valid)
                + opts["w_confident"] * criterion_u(rp2, rl1) * (r1 & valid)).sum() / valid.sum().item()
        raw2 = (criterion_u(rp1, rl2) * (~r2 & valid)
                + opts["w_confident"] * criterion_u(rp1, rl2) * (r2 & valid)).sum() / valid.sum().item()
        loss_con = (con1 + con2 + raw1 + raw2) / 4 * opts["w_con"]

        def dis(logits):
            f1, f2 = logits["feature1"][s], logits["feature2"][s]
            return ((1 + cos(f1.detach(), f2).mean()) + (1 + cos(f2.detach(), f1).mean())) / 2

        loss_dis = (dis(labeled_logits) + (dis(mixed_logits) + dis(raw_logits)) / 2) / 2 * opts["w_dis"]
        gpu_losses.append({"loss_ce": loss_ce, "loss_con": loss_con, "loss_dis": loss_dis,
                           "loss": loss_ce + loss_con + loss_dis})
    mean = {k: sum(g[k] for g in gpu_losses) / len(gpu_losses) for k in gpu_losses[0]}
    mean["loss"].backward()
    return {k: v.item() for k, v in mean.items()}, model


OPTIONS = {
    "reference": ({}, "ce"),
    "prob_confidence": ({"confidence": "prob", "tau": 0.5}, "ce"),
    "mixed_masks": ({"mask_alignment": "mixed"}, "ce"),
    "ohem": ({}, "ohem"),
    "cityscapes_weights": ({"w_ce": 1.0, "w_con": 1.0, "w_confident": 2.0, "tau": 0.0}, "ce"),
}


_STEPS = {}


def option_step(option):
    """(config, batch, jax_step results) of an OPTIONS entry, computed once per module."""
    if option not in _STEPS:
        method_opts, labeled_loss = OPTIONS[option]
        config = step_config(mix_group=2, **method_opts)
        config.loss.labeled = labeled_loss
        batch = make_batch()
        _STEPS[option] = config, batch, jax_step(config, batch)
    return _STEPS[option]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_the_whole_step_matches_the_official_iteration(option):
    config, batch, (loss, metrics, stats, grads, params, state) = option_step(option)
    ref, model = torch_step(params, state, batch, dict(config.method), config.loss.labeled)

    for key in ("loss_ce", "loss_con", "loss_dis", "loss"):
        np.testing.assert_allclose(float(metrics[key]), ref[key], rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
    assert 0 < metrics["conflict_ratio"] < 1 and 0 < metrics["upweighted_ratio"] <= 1
    for b in ("branch1", "branch2"):
        tb = getattr(model, b)
        # three train-mode passes (labeled, mixed, raw) updated the running statistics in turn
        np.testing.assert_allclose(stats[b]["bn"]["mean"], tb.bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[b]["bn"]["var"], tb.bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
        g = grads[b]
        pairs = [(g["conv"]["kernel"], tb.conv.weight.grad.numpy().transpose(2, 3, 1, 0)),
                 (g["bn"]["scale"], tb.bn.weight.grad.numpy()), (g["bn"]["bias"], tb.bn.bias.grad.numpy()),
                 (g["classifier"]["kernel"], tb.classifier.weight.grad.numpy().transpose(2, 3, 1, 0)),
                 (g["classifier"]["bias"], tb.classifier.bias.grad.numpy())]
        for ours, theirs in pairs:
            np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-6, err_msg=f"{option} {b}")


def test_options_change_the_loss():
    """Each option alters the step on these inputs (so the parity above covers a different path)."""
    values = {name: float(option_step(name)[2][1]["loss_con"]) for name in ("reference", "prob_confidence",
                                                                           "mixed_masks")}
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_bad_options_are_refused_by_name():
    for key, value, match in [("confidence", "max", "config.method.confidence"),
                              ("mask_alignment", "box", "config.method.mask_alignment"),
                              ("mix_group", 0, "config.method.mix_group")]:
        config = step_config(**{key: value})
        with pytest.raises(ValueError, match=match):
            ccvc_method.check_options(config.method)
    config = step_config()
    del config.method["w_dis"]
    with pytest.raises(ValueError, match="config.method.w_dis is missing"):
        ccvc_method.check_options(config.method)


@pytest.mark.parametrize("mix_group", [2, 4])
def test_two_devices_equal_one_when_partner_groups_span_devices(mix_group):
    """mix_group 4 over 2 devices of 2 unlabeled images: the partner comes from the other device."""
    config = step_config(mix_group=mix_group)
    batch = make_batch()
    one, two = jax_step(config, batch, devices=1), jax_step(config, batch, devices=2)
    np.testing.assert_allclose(two[0], one[0], rtol=1e-5)
    for key in ("loss_con", "conflict_ratio", "upweighted_ratio"):
        np.testing.assert_allclose(two[1][key], one[1][key], rtol=1e-5, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(two[3]), jax.tree.leaves(one[3])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    if mix_group == 4:  # and it is another partner than the per-device reversal
        assert abs(float(one[1]["loss_con"]) - float(option_step("reference")[2][1]["loss_con"])) > 1e-4
