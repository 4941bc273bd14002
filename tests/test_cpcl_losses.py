"""CPCL loss pieces against float64 PyTorch / NumPy transcriptions of the official code: the unlabeled
part of leofansq/CPCL exp_voc/train.py and exp_city/train.py at HEAD f0e1800 and at the first commit
0bf0c50 (NCHW tensors, sklearn's confusion_matrix written out), the class-weighted
ProbOhemCrossEntropy2d of furnace/seg_opr/loss_opr.py, and the device split of every batch-global
statistic. The recipes' defaults give HEAD's losses; `:SPLIT,first_commit` gives 0bf0c50's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec as P

from configs import cpcl_camvid, cpcl_cityscapes, cpcl_pascal
from csl_jax import parallel
from csl_jax.methods import cpcl
from csl_jax.methods.cpcl import losses as cl
from tests.helpers import harness, torch_reference

C = 5
HEAD, FIRST = "f0e1800", "0bf0c50"  # leofansq/CPCL commits


def confusion_matrix(y_true, y_pred, n):
    """sklearn.metrics.confusion_matrix over labels 0..n-1 (all present), rows y_true, int64."""
    out = np.zeros((n, n), np.int64)
    np.add.at(out, (y_true, y_pred), 1)
    return out


def reference_unsup(logits_tea_1, logits_tea_2, stu_1, stu_2, commit=HEAD, exp="exp_voc"):
    """The official unlabeled part in float64, on mixed teacher logits and student logits (B, C, H, W).

    leofansq/CPCL `exp`/train.py at `commit`: lines 174-201 (0bf0c50's exp_voc: 173-200), the
    criterion from lines 69-71. exp_voc and exp_city have the same statements at each commit except
    the unlabeled criterion of 0bf0c50's exp_voc. The commits differ in three statements:
    - loss_w_k: HEAD `torch.max(F.softmax(z, dim=1), dim=1)[0]` (line 181); 0bf0c50
      `torch.max(F.softmax(z, dim=-1))` (exp_voc line 180, exp_city 181);
    - w: HEAD `w / (np.sum(w) + 1e-6)` (line 186); 0bf0c50 `w / np.sum(w)` (exp_voc 185, exp_city 186);
    - the unlabeled criterion: `criterion_unsup`, CrossEntropyLoss(reduction='none') (HEAD exp_voc
      line 70, exp_city line 71 at both commits); 0bf0c50's exp_voc uses `criterion` (line 69,
      reduction='mean').
    """
    first = commit == FIRST
    label = list(range(C))
    reduction = "mean" if first and exp == "exp_voc" else "none"
    criterion = torch.nn.CrossEntropyLoss(reduction=reduction, ignore_index=255)
    _, ps_label_1 = torch.max(logits_tea_1, dim=1)
    _, ps_label_2 = torch.max(logits_tea_2, dim=1)
    if first:
        loss_w_1 = torch.max(F.softmax(logits_tea_1, dim=-1))
        loss_w_2 = torch.max(F.softmax(logits_tea_2, dim=-1))
    else:
        loss_w_1 = torch.max(F.softmax(logits_tea_1, dim=1), dim=1)[0]
        loss_w_2 = torch.max(F.softmax(logits_tea_2, dim=1), dim=1)[0]
    confusion = confusion_matrix(np.concatenate([ps_label_1.view(-1).numpy(), np.array(label)]),
                                 np.concatenate([ps_label_2.view(-1).numpy(), np.array(label)]), C)
    w = (np.sum(confusion, axis=0) - np.diag(confusion)) / np.sum(confusion, axis=0) + \
        (np.sum(confusion, axis=1) - np.diag(confusion)) / np.sum(confusion, axis=1)
    w = torch.from_numpy(w / np.sum(w) if first else w / (np.sum(w) + 1e-6))
    inter = torch.where(ps_label_1 == ps_label_2, ps_label_1, torch.ones_like(ps_label_1) * 255)
    union = torch.where(w[ps_label_1] > w[ps_label_2], ps_label_1, ps_label_2)
    union = torch.where(ps_label_1 == ps_label_2, ps_label_1, union)
    loss_inter = torch.mean(criterion(stu_1, inter) * (loss_w_1 + loss_w_2) / 2)
    loss_union = torch.mean(criterion(stu_2, union) * torch.where(
        ps_label_1 == ps_label_2, (loss_w_1 + loss_w_2) / 2, torch.where(w[ps_label_1] > w[ps_label_2], loss_w_1,
                                                                         loss_w_2)))
    return {"w": w.numpy(), "inter": inter.numpy(), "union": union.numpy(), "c1": loss_w_1.numpy(),
            "c2": loss_w_2.numpy(), "loss_inter": float(loss_inter), "loss_union": float(loss_union),
            "overlap": np.sum(np.diag(confusion)) / np.sum(confusion)}


def nchw(x):
    return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def teacher_logits(seed, b=4, h=6, w=7):
    """Two correlated teachers (agree on about half of the pixels) and two students, NHWC float32."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(b, h, w, C)) * 2
    z1 = base + rng.normal(size=base.shape) * 1.5
    z2 = base + rng.normal(size=base.shape) * 1.5
    s1, s2 = rng.normal(size=base.shape), rng.normal(size=base.shape)
    return [x.astype(np.float32) for x in (z1, z2, s1, s2)]


def our_unsup(z1, z2, s1, s2, confidence, reduction, group_size, axis_name=None):
    y1, y2 = jnp.argmax(z1, -1), jnp.argmax(z2, -1)
    confusion = cl.pair_confusion(y1, y2, C, axis_name=axis_name)
    w = cl.disagreement_weights(confusion)
    t = cl.pseudo_labels(y1, y2, w)
    c1, c2 = (cl.confidence(z, confidence, axis_name=axis_name) for z in (z1, z2))
    w_inter, w_union = cl.loss_weights(c1, c2, t["agree"], t["pick1"])
    kw = dict(reduction=reduction, group_size=group_size, axis_name=axis_name)
    return {"w": w, "inter": t["inter"], "union": t["union"], "c1": c1, "c2": c2, "confusion": confusion,
            "loss_inter": cl.unlabeled_loss(s1, t["inter"], w_inter, **kw),
            "loss_union": cl.unlabeled_loss(s2, t["union"], w_union, **kw)}


#: (commit, experiment) -> the (confidence, unsup_reduction) options that reproduce it.
OPTIONS = {(HEAD, "exp_voc"): ("pixel", "pixel_mean"), (HEAD, "exp_city"): ("pixel", "pixel_mean"),
           (FIRST, "exp_voc"): ("first_commit", "valid_mean"), (FIRST, "exp_city"): ("first_commit", "pixel_mean")}


def assert_matches(ours, ref):
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)
    np.testing.assert_array_equal(ours["inter"], ref["inter"])
    np.testing.assert_array_equal(ours["union"], ref["union"])
    np.testing.assert_allclose(ours["c1"], ref["c1"], rtol=1e-6)
    np.testing.assert_allclose(ours["c2"], ref["c2"], rtol=1e-6)
    np.testing.assert_allclose(ours["loss_inter"], ref["loss_inter"], rtol=1e-5)
    np.testing.assert_allclose(ours["loss_union"], ref["loss_union"], rtol=1e-5)
    confusion = np.asarray(ours["confusion"])
    np.testing.assert_allclose(np.trace(confusion) / confusion.sum(), ref["overlap"], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("commit,exp", list(OPTIONS))
def test_labels_weights_and_losses_match_the_reference(seed, commit, exp):
    z1, z2, s1, s2 = teacher_logits(seed)
    ref = reference_unsup(nchw(z1), nchw(z2), nchw(s1), nchw(s2), commit, exp)
    assert_matches(our_unsup(z1, z2, s1, s2, *OPTIONS[commit, exp], group_size=4), ref)
    assert 0.2 < (ref["inter"] != 255).mean() < 0.9  # both agreement and disagreement are exercised
    assert (ref["union"] != ref["inter"]).any() and (ref["union"][ref["inter"] == 255] != np.argmax(z2, -1)[
        ref["inter"] == 255]).any()  # the union takes branch 1's label somewhere


@pytest.mark.parametrize("module,arg,commit,exp", [
    (None, None, HEAD, "exp_voc"), (cpcl_pascal, "1_8", HEAD, "exp_voc"), (cpcl_camvid, "1_8", HEAD, "exp_voc"),
    (cpcl_cityscapes, "1_8", HEAD, "exp_city"), (cpcl_pascal, "1_8,first_commit", FIRST, "exp_voc"),
    (cpcl_camvid, "1_8,first_commit", FIRST, "exp_voc"), (cpcl_cityscapes, "1_8,first_commit", FIRST, "exp_city")])
def test_recipe_options_give_their_commits_losses(module, arg, commit, exp):
    """`cpcl.default_options()` (module None) and every recipe are HEAD's code; `,first_commit` is 0bf0c50's."""
    opts = cpcl.default_options() if module is None else module.get_config(arg).method
    z1, z2, s1, s2 = teacher_logits(4)
    ref = reference_unsup(nchw(z1), nchw(z2), nchw(s1), nchw(s2), commit, exp)
    assert_matches(our_unsup(z1, z2, s1, s2, opts.confidence, opts.unsup_reduction, group_size=4), ref)


def test_reference_is_the_old_name_of_first_commit_and_unknown_names_are_refused():
    z = np.random.default_rng(0).normal(size=(2, 3, 4, C)).astype(np.float32)
    np.testing.assert_array_equal(cl.confidence(z, "reference"), cl.confidence(z, "first_commit"))
    with pytest.raises(ValueError, match="config.method.confidence"):
        cl.confidence(z, "max")


def test_union_ties_take_branch_2s_label():
    y1, y2 = jnp.array([[0, 1, 2, 2]]), jnp.array([[1, 0, 2, 0]])
    t = cl.pseudo_labels(y1, y2, jnp.array([0.3, 0.3, 0.4]))
    np.testing.assert_array_equal(t["union"], [[1, 0, 2, 2]])  # w[0] == w[1]: branch 2; w[2] > w[0]: branch 1
    np.testing.assert_array_equal(t["inter"], [[255, 255, 2, 255]])


def sharded(fn, n_devices, n_in):
    return harness.sharded(fn, n_devices, in_specs=(P(parallel.AXIS),) * n_in)


@pytest.mark.parametrize("confidence,reduction", [("pixel", "pixel_mean"), ("first_commit", "valid_mean")])
def test_batch_global_statistics_do_not_depend_on_the_device_count(confidence, reduction):
    """N, w and the scalar confidences psum / pmax over devices; the per-device losses average to the batch loss."""
    z1, z2, s1, s2 = teacher_logits(3, b=8)
    one = our_unsup(z1, z2, s1, s2, confidence, reduction, group_size=8)

    def per_device(z1, z2, s1, s2):
        out = our_unsup(z1, z2, s1, s2, confidence, reduction, group_size=8, axis_name=parallel.AXIS)
        out["c1"], out["c2"] = jnp.mean(out["c1"]), jnp.mean(out["c2"])
        return jax.lax.pmean({k: out[k] for k in ("loss_inter", "loss_union", "c1", "c2", "w")}, parallel.AXIS)

    four = sharded(per_device, 4, 4)(z1, z2, s1, s2)
    one["c1"], one["c2"] = np.mean(one["c1"]), np.mean(one["c2"])
    for key, value in four.items():
        np.testing.assert_allclose(value, one[key], rtol=1e-5, err_msg=key)


# -- class-weighted OHEM -------------------------------------------------------------------------
def reference_ohem(pred, target, thresh, min_kept, weight):
    """`ProbOhemCrossEntropy2d` with use_weight in float64 on (B, C, H, W) logits: leofansq/CPCL
    furnace/seg_opr/loss_opr.py lines 159-201 at HEAD f0e1800 (unchanged since ed98ba8), the class
    weights passed in (`torch_reference.prob_ohem`)."""
    return float(torch_reference.prob_ohem(pred, target, thresh, min_kept, weight))


def ohem_inputs(seed, b=4, h=9, w=11):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, h, w, C)) * 2).astype(np.float32)
    labels = rng.integers(0, C, size=(b, h, w)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    return logits, labels


WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166)


@pytest.mark.parametrize("min_kept", [1, 37, 150, 10_000])  # 10_000 > valid pixels: all valid pixels kept
@pytest.mark.parametrize("thresh", [0.7, 0.05])
def test_weighted_ohem_matches_probohem_with_class_weights(min_kept, thresh):
    logits, labels = ohem_inputs(min_kept)
    groups = [reference_ohem(nchw(logits[g:g + 2]), torch.from_numpy(labels[g:g + 2]).long(), thresh, min_kept,
                             torch.tensor(WEIGHTS, dtype=torch.float64)) for g in (0, 2)]
    got = cl.weighted_ohem_loss(logits, labels, class_weights=WEIGHTS, group_size=2, thresh=thresh,
                                min_kept=min_kept)
    np.testing.assert_allclose(got, np.mean(groups), rtol=1e-5)


def test_weighted_ohem_over_the_whole_batch_on_several_devices_is_exact():
    """One group of 8 images over 4 devices: the min_kept-th smallest q over all of them (bisection, psum)."""
    logits, labels = ohem_inputs(7, b=8)
    want = reference_ohem(nchw(logits), torch.from_numpy(labels).long(), 0.2, 300,
                          torch.tensor(WEIGHTS, dtype=torch.float64))
    kw = dict(class_weights=WEIGHTS, group_size=8, thresh=0.2, min_kept=300)
    np.testing.assert_allclose(cl.weighted_ohem_loss(logits, labels, **kw), want, rtol=1e-5)

    def per_device(z, y):
        return jax.lax.pmean(cl.weighted_ohem_loss(z, y, num_devices=4, axis_name=parallel.AXIS, **kw),
                             parallel.AXIS)

    np.testing.assert_allclose(sharded(per_device, 4, 2)(logits, labels), want, rtol=1e-5)
    grads_one = jax.grad(lambda z: cl.weighted_ohem_loss(z, labels, **kw))(logits)
    grads_four = sharded(lambda z, y: jax.lax.all_gather(jax.grad(
        lambda z: cl.weighted_ohem_loss(z, y, num_devices=4, axis_name=parallel.AXIS, **kw))(z) / 4,
        parallel.AXIS, tiled=True), 4, 2)(logits, labels)
    np.testing.assert_allclose(grads_four, grads_one, rtol=1e-4, atol=1e-7)  # d(mean over devices)/dz


def test_weighted_ohem_rejects_bad_groups_and_weights():
    logits, labels = ohem_inputs(0, b=3)
    with pytest.raises(ValueError, match="config.loss.group_size=2"):
        cl.weighted_ohem_loss(logits, labels, class_weights=WEIGHTS, group_size=2, thresh=0.7, min_kept=10)
    with pytest.raises(ValueError, match="3 values for 5 classes"):
        cl.weighted_ohem_loss(logits, labels, class_weights=WEIGHTS[:3], group_size=1, thresh=0.7, min_kept=10)


def test_kth_smallest_by_bisection():
    q = np.random.default_rng(0).random((3, 50)).astype(np.float32)
    q[1, :20] = q[1, 20]  # ties
    q[2, 40:] = np.inf
    for k in (1, 7, 20, 21, 40):
        np.testing.assert_array_equal(cl._kth_smallest(jnp.asarray(q), k, None), np.sort(q, axis=1)[:, k - 1])
