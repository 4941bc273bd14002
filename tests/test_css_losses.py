"""CSS loss pieces against float64 PyTorch transcriptions of the official code (generalframeworks/loss/loss.py
`Attention_Threshold_Loss`, `Contrast_Loss`; `Model_cross.forward`'s targets and q; scheduler/rampscheduler.py),
at representation temperature 0.5 (the launcher: the cross-space loss is identically 0 and the anchor filter
keeps every valid pixel) and 0.1 (`Model_cross`'s default: both act); and the static-shape samplers against
the reference's draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P

from csl_jax import parallel
from csl_jax.methods.css import losses as css_losses
from csl_jax.methods.css import targets as css_targets
from tests.helpers import harness

C, D = 21, 16  # Pascal's classes: the T = 0.5 bound e^2 / (e^2 + 20 e^-2) = 0.732 < 0.8 < 0.97
RNG = np.random.default_rng(0)


def t64(x):
    return torch.from_numpy(np.asarray(x, np.float64))


# -- targets and q ------------------------------------------------------------------------------------
def reference_targets(pred, rep, prototypes, size, temp):
    """`Model_cross.forward`'s no-grad block, float64 torch, NCHW inside: (y_cls, c_cls, y_rep, c_rep)."""
    pred, rep = t64(pred).permute(0, 3, 1, 2), t64(rep).permute(0, 3, 1, 2)
    b, d, h, w = rep.shape
    norm_rep = F.normalize(rep.permute(0, 2, 3, 1), dim=-1).reshape(b * h * w, d)
    norm_proto = F.normalize(t64(prototypes), dim=-1).permute(1, 0)
    sim = torch.mm(norm_rep, norm_proto).reshape(b, h, w, -1).permute(0, 3, 1, 2)
    sim = F.interpolate(sim, size=size, mode="bilinear", align_corners=True)
    c_rep, y_rep = torch.max(F.softmax(sim / temp, dim=1), dim=1)
    large = F.interpolate(pred, size=size, mode="bilinear", align_corners=True)
    c_cls, y_cls = torch.max(torch.softmax(large, dim=1), dim=1)
    return [x.numpy() for x in (y_cls, c_cls, y_rep, c_rep)]


@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_teacher_targets_match_the_reference(temp):
    pred = RNG.standard_normal((2, 5, 6, C)).astype(np.float32) * 3
    rep = RNG.standard_normal((2, 5, 6, D)).astype(np.float32)
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    protos[3] = 0.0  # a class never updated: similarity 0
    valid = np.ones((2, 17, 21), bool)
    got = css_targets.teacher_targets(pred, rep, protos, valid, (17, 21), temp, quantize=False)
    y_cls, c_cls, y_rep, c_rep = reference_targets(pred, rep, protos, (17, 21), temp)
    np.testing.assert_array_equal(got["y_cls"], y_cls)
    np.testing.assert_array_equal(got["y_rep"], y_rep)
    np.testing.assert_allclose(got["c_cls"], c_cls, rtol=1e-5)
    np.testing.assert_allclose(got["c_rep"], c_rep, rtol=1e-5)
    bound = np.exp(1 / temp) / (np.exp(1 / temp) + (C - 1) * np.exp(-1 / temp))
    assert c_rep.max() <= bound
    if temp == 0.5:
        assert bound < 0.8 < 0.97  # L_u's image weight is 0 and every valid pixel is an anchor candidate
    quantized = css_targets.teacher_targets(pred, rep, protos, valid, (17, 21), temp, quantize=True)
    np.testing.assert_allclose(quantized["c_rep"], np.floor(c_rep * 255) / 255, atol=1e-6)


def test_zero_prototypes_give_uniform_confidence_and_class_0():
    got = css_targets.teacher_targets(np.zeros((1, 3, 3, C), np.float32), RNG.standard_normal((1, 3, 3, D)),
                                      np.zeros((C, D), np.float32), np.ones((1, 5, 5), bool), (5, 5), 0.5, False)
    np.testing.assert_allclose(got["c_rep"], 1.0 / C, rtol=1e-6)
    assert (np.asarray(got["y_rep"]) == 0).all()


# -- L_u ------------------------------------------------------------------------------------------------
def reference_attention_loss(pred, label, conf, threshold):
    """`Attention_Threshold_Loss.forward` on one device batch, float64 (label -1 = ignore)."""
    pred, label, conf = t64(pred).permute(0, 3, 1, 2), torch.from_numpy(label).long(), t64(conf)
    b = pred.shape[0]
    valid = (label >= 0).double()
    weighting = conf.view(b, -1).ge(threshold).sum(-1) / valid.view(b, -1).sum(-1)
    loss = F.cross_entropy(pred, label, reduction="none", ignore_index=-1)
    return torch.mean(torch.masked_select(weighting[:, None, None] * loss, loss > 0)).item()


@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_attention_threshold_loss_matches_the_reference(temp):
    g, groups = 2, 2
    logits = RNG.standard_normal((g * groups, 6, 7, C)).astype(np.float32) * 2
    rep = RNG.standard_normal((g * groups, 3, 4, D)).astype(np.float32)
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    # sharpen some features towards their prototype so that T = 0.1 yields confident pixels
    rep[:, :2] = 4 * protos[RNG.integers(0, C, (g * groups, 2, 4))] + 0.05 * rep[:, :2]
    valid = RNG.random((g * groups, 6, 7)) > 0.2
    t = css_targets.teacher_targets(logits[..., :C] * 0, rep, protos, valid, (6, 7), temp, False)
    label, conf = np.asarray(t["y_rep"]), np.asarray(t["c_rep"])
    got, weights = css_losses.attention_threshold_loss(logits, label, conf, 0.97, g)
    ref_label = np.where(label == 255, -1, label)
    want = np.mean([reference_attention_loss(logits[k * g:(k + 1) * g], ref_label[k * g:(k + 1) * g],
                                             conf[k * g:(k + 1) * g], 0.97) for k in range(groups)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if temp == 0.5:
        assert float(got) == 0.0 and not np.asarray(weights).any()
    else:
        assert float(got) > 0.0 and np.asarray(weights).all()


def test_attention_threshold_loss_without_valid_pixels_is_zero():
    logits = RNG.standard_normal((2, 3, 3, C)).astype(np.float32)
    got, weights = css_losses.attention_threshold_loss(logits, np.full((2, 3, 3), 255), np.zeros((2, 3, 3)), 0.97, 2)
    assert float(got) == 0.0 and not np.asarray(weights).any()


# -- prototypes -----------------------------------------------------------------------------------------
def reference_prototype_update(prototypes, rep, classes, alpha):
    """`Contrast_Loss`'s update loop (all devices' features at once), float64: for present class i,
    P_i = mean if P_i sums to 0 else alpha P_i + (1 - alpha) mean."""
    prototypes, rep = t64(prototypes).clone(), t64(rep)
    for i in range(prototypes.shape[0]):
        mask = torch.from_numpy(classes == i)
        if mask.sum() == 0:
            continue
        mean = torch.mean(rep[mask], dim=0, keepdim=True)
        if prototypes[i].sum() == torch.tensor(0.0):
            prototypes[i] = mean
        else:
            prototypes[i] = alpha * prototypes[i] + (1 - alpha) * mean
    return prototypes.numpy()


def test_prototype_update_matches_the_reference():
    rep = RNG.standard_normal((300, D)).astype(np.float32)
    classes = RNG.integers(0, C + 1, 300)  # C = not valid
    classes[classes == 5] = C              # an absent class
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    protos[[2, 5]] = 0.0                   # class 2: first update copies the mean; 5: absent, stays 0
    sums, counts = css_losses.class_sums(jnp.asarray(rep), jnp.asarray(classes), C)
    got = css_losses.update_prototypes(jnp.asarray(protos), sums, counts, 0.99)
    np.testing.assert_allclose(got, reference_prototype_update(protos, rep, classes, 0.99), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[5], 0.0)


def test_prototype_sums_over_devices_equal_one_device():
    rep = RNG.standard_normal((8, 40, D)).astype(np.float32)
    classes = RNG.integers(0, C + 1, (8, 40))

    def per_device(r, c):
        return jax.lax.psum(css_losses.class_sums(r[0], c[0], C), parallel.AXIS)

    fn = harness.sharded(per_device, 8, in_specs=(P(parallel.AXIS), P(parallel.AXIS)))
    sums8, counts8 = fn(*parallel.to_global((rep, classes), harness.mesh(8)))
    sums1, counts1 = css_losses.class_sums(rep.reshape(-1, D), classes.reshape(-1), C)
    np.testing.assert_allclose(sums8, sums1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts8, counts1)


# -- L_c ------------------------------------------------------------------------------------------------
def reference_contrast_from_draws(rep, classes, prototypes, anchors, negatives, temp):
    """`Contrast_Loss.forward`'s loss with the anchors and negatives fixed to the given pixel indices
    (the reference draws them with torch.randint / Categorical / negative_index_sampler), float64.
    `prototypes` are the updated ones; a present class without anchor candidates is skipped but counted."""
    rep = t64(rep).requires_grad_(True)
    present = [i for i in range(prototypes.shape[0]) if (classes == i).any()]
    if len(present) <= 1:
        return 0.0, np.zeros(rep.shape)
    loss = torch.tensor(0.0, dtype=torch.float64)
    for i in present:
        if anchors[i] is None:
            continue
        anchor_rep = rep[torch.tensor(anchors[i])]
        with torch.no_grad():
            negative_rep = rep.detach()[torch.tensor(negatives[i])]
            positive_rep = t64(prototypes[i])[None, None].repeat(len(anchors[i]), 1, 1)
            all_rep = torch.cat((positive_rep, negative_rep), dim=1)
        logits = torch.cosine_similarity(anchor_rep.unsqueeze(1), all_rep, dim=2)
        loss = loss + F.cross_entropy(logits / temp, torch.zeros(len(anchors[i])).long())
    loss = loss / len(present)
    loss.backward()
    return loss.item(), rep.grad.numpy()


@pytest.mark.parametrize("rep_temp", [0.5, 0.1])
def test_contrast_loss_and_gradient_match_the_reference_on_fixed_draws(rep_temp):
    n, q, k = 400, 32, 24
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    classes = RNG.integers(0, 6, n)  # 6 present classes
    classes[RNG.random(n) < 0.2] = C
    rep = (protos[np.minimum(classes, C - 1)] + 0.8 * RNG.standard_normal((n, D))).astype(np.float32)
    sim = np.asarray(css_losses.prototype_similarity(rep, protos))
    prob = np.exp(sim / rep_temp) / np.exp(sim / rep_temp).sum(-1, keepdims=True)
    own = prob[np.arange(n), np.minimum(classes, C - 1)]
    anchor_ok = (classes < C) & (own < 0.8)
    if rep_temp == 0.5:
        assert (anchor_ok == (classes < C)).all()  # the filter is void at T = 0.5
    else:
        assert 0 < anchor_ok.sum() < (classes < C).sum()
    draws = jax.tree.map(np.asarray, css_losses.sample_contrast(
        jax.random.PRNGKey(1), jnp.asarray(classes), jnp.asarray(anchor_ok), jnp.asarray(protos), C, q, k, 0.5))
    got, grad = jax.value_and_grad(lambda r: css_losses.contrast_loss(r, protos, draws, 0.5))(jnp.asarray(rep))
    anchors = [draws["anchors"][c] if draws["has_anchor"][c] else None for c in range(C)]
    want, want_grad = reference_contrast_from_draws(rep, classes, protos, anchors, draws["negatives"], 0.5)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_contrast_loss_is_zero_with_one_present_class():
    classes = np.full(50, C)
    classes[:20] = 4
    rep = RNG.standard_normal((50, D)).astype(np.float32)
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    draws = css_losses.sample_contrast(jax.random.PRNGKey(0), jnp.asarray(classes), jnp.asarray(classes < C),
                                       jnp.asarray(protos), C, 8, 4, 0.5)
    loss, grad = jax.value_and_grad(lambda r: css_losses.contrast_loss(r, protos, draws, 0.5))(jnp.asarray(rep))
    assert float(loss) == 0.0 and np.isfinite(np.asarray(grad)).all()


def test_draws_follow_the_reference_distributions():
    """Anchors: uniform over the candidates of their class; negative classes: softmax(cos(P_c, P_j) / 0.5)
    over the other present classes (the reference's Categorical); negative pixels: uniform in their class."""
    n, q, k = 120, 400, 500
    classes = RNG.integers(0, 4, n)
    classes[:10] = C
    anchor_ok = (classes < C) & (RNG.random(n) < 0.5)
    protos = RNG.standard_normal((C, D)).astype(np.float32)
    draws = jax.tree.map(np.asarray, css_losses.sample_contrast(
        jax.random.PRNGKey(3), jnp.asarray(classes), jnp.asarray(anchor_ok), jnp.asarray(protos), C, q, k, 0.5))
    np.testing.assert_array_equal(draws["present"], np.isin(np.arange(C), [0, 1, 2, 3]))
    unit = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    for c in range(4):
        cand = np.flatnonzero(anchor_ok & (classes == c))
        assert np.isin(draws["anchors"][c], cand).all()
        hist = np.bincount(np.searchsorted(cand, draws["anchors"][c]), minlength=len(cand)) / q
        assert np.abs(hist - 1 / len(cand)).max() < 0.06
        neg_cls = classes[draws["negatives"][c]]
        others = [j for j in range(4) if j != c]
        assert np.isin(neg_cls, others).all()
        logits = unit[c] @ unit[others].T / 0.5
        want = np.exp(logits) / np.exp(logits).sum()
        freq = np.array([(neg_cls == j).mean() for j in others])
        np.testing.assert_allclose(freq, want, atol=0.01)
        pix = draws["negatives"][c][neg_cls == others[0]]
        members = np.flatnonzero(classes == others[0])
        hist = np.bincount(np.searchsorted(members, pix), minlength=len(members)) / len(pix)
        assert np.abs(hist - 1 / len(members)).max() < 0.02


# -- ramp-down, warp, mix and flip ---------------------------------------------------------------------
def test_rampdown_is_the_reference_scheduler():
    def reference(epoch):  # RampdownScheduler(begin 0, max 200, max_value 1, min_value 0, mult -5).value
        return 0.0 if epoch >= 200 else float(np.exp(-5.0 * (epoch / 200) ** 2))

    for e in (0, 1, 37, 199, 200, 450):
        np.testing.assert_allclose(float(css_losses.rampdown(e)), reference(e), rtol=1e-6)


def test_warp_mix_and_flip_follow_the_reference_order():
    b, h, w, g = 4, 5, 6, 2
    maps = {"y_cls": RNG.integers(0, C, (b, h, w)).astype(np.int32),
            "c_rep": RNG.random((b, h, w)).astype(np.float32)}
    index = RNG.integers(-1, h * w, (b, h, w)).astype(np.int32)
    warped = jax.tree.map(np.asarray, css_targets.warp(maps, index))
    for key, fill in (("y_cls", 255), ("c_rep", 0.0)):
        want = np.where(index >= 0, np.take_along_axis(maps[key].reshape(b, -1), np.maximum(index, 0).reshape(b, -1),
                                                       1).reshape(b, h, w), fill)
        np.testing.assert_array_equal(warped[key], want)
    image = RNG.standard_normal((b, h, w, 3)).astype(np.float32)
    box = RNG.random((b, h, w)) < 0.5
    flip = np.array([True, False, False, True])
    got_image, got = css_targets.mix_and_flip(image, warped, box, flip, g)
    for i in range(b):
        j = (i // g) * g + (i + 1) % g  # generate_cut_gather_3: partner (i + 1) mod per-GPU batch
        mixed = np.where(box[i][..., None], image[j], image[i])
        mixed_y = np.where(box[i], warped["y_cls"][j], warped["y_cls"][i])
        if flip[i]:
            mixed, mixed_y = mixed[:, ::-1], mixed_y[:, ::-1]
        np.testing.assert_array_equal(np.asarray(got_image)[i], mixed)
        np.testing.assert_array_equal(np.asarray(got["y_cls"])[i], mixed_y)
