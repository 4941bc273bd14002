"""Losses vs NumPy float64 references: CE with ignore, grouped normalisation, OHEM, weighted CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from csl_jax import parallel
from csl_jax.methods.parts import losses

IGNORE = 255


# ---------------------------------------------------------------- NumPy float64 reference


def ref_softmax(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_pixel_ce(logits, labels):
    """-log softmax[label] per pixel, 0 on ignored pixels; float64."""
    probs = ref_softmax(logits)
    safe = np.where(labels == IGNORE, 0, labels)
    picked = np.take_along_axis(probs, safe[..., None], axis=-1)[..., 0]
    return np.where(labels == IGNORE, 0.0, -np.log(picked))


def ref_grouped_mean(values, counted, group_size):
    """mean over groups of consecutive images of sum(values) / max(number counted, 1)."""
    out = []
    for g in range(0, len(values), group_size):
        out.append(values[g:g + group_size].sum() / max(counted[g:g + group_size].sum(), 1))
    return np.mean(out)


def ref_ohem(logits, labels, group_size, thresh, min_kept):
    """UniMatch ProbOhemCrossEntropy2d semantics, one group at a time; float64."""
    ce, probs = ref_pixel_ce(logits, labels), ref_softmax(logits)
    out = []
    for g in range(0, len(labels), group_size):
        y, c = labels[g:g + group_size].ravel(), ce[g:g + group_size].ravel()
        p = probs[g:g + group_size].reshape(len(y), -1)
        valid = y != IGNORE
        q = p[np.arange(len(y)), np.where(valid, y, 0)]
        kept = valid.copy()
        if valid.sum() >= min_kept:
            theta = max(thresh, np.sort(q[valid])[min_kept - 1])
            kept &= q <= theta
        out.append(c[kept].mean() if kept.any() else 0.0)
    return np.mean(out)


def random_batch(seed, batch=4, size=4, num_classes=5, ignore_frac=0.3, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(batch, size, size, num_classes))).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < ignore_frac] = IGNORE
    return logits, labels


# ---------------------------------------------------------------- per-pixel CE


def test_pixel_cross_entropy_matches_float64_and_ignores_255():
    logits, labels = random_batch(0)
    logits[0, 0, 0] = (80.0, -80.0, 0.0, 5.0, -3.0)  # large margins: still finite and exact
    labels[0, 0, 0] = 1
    ce = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert ce.shape == labels.shape and ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), ref_pixel_ce(logits, labels), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ce)[labels == IGNORE] == 0)


def test_pixel_cross_entropy_bf16_logits_give_float32():
    logits, labels = random_batch(1)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    ce = losses.pixel_cross_entropy(bf16, jnp.asarray(labels))
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), ref_pixel_ce(np.asarray(bf16, np.float32), labels), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- grouped CE


def test_ce_loss_grouped_normalisation():
    logits, labels = random_batch(2, batch=4)
    labels[2:] = IGNORE
    labels[2, 0, :2] = (1, 3)  # group 2 has only 2 valid pixels: grouping changes the result
    ce_ref = ref_pixel_ce(logits, labels)
    for group_size in (1, 2, 4):
        got = losses.ce_loss(jnp.asarray(logits), jnp.asarray(labels), group_size=group_size)
        want = ref_grouped_mean(ce_ref, labels != IGNORE, group_size)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert abs(ref_grouped_mean(ce_ref, labels != IGNORE, 2) - ref_grouped_mean(ce_ref, labels != IGNORE, 4)) > 1e-2


def test_ce_loss_with_no_valid_pixel_is_zero():
    logits, labels = random_batch(3, batch=2)
    labels[:] = IGNORE
    assert float(losses.ce_loss(jnp.asarray(logits), jnp.asarray(labels), group_size=2)) == 0.0


def test_grouped_losses_do_not_depend_on_device_count():
    """Per-device losses on 4 devices, pmean-ed, equal the single-call value."""
    logits, labels = random_batch(4, batch=8)
    labels[4:6, 1:] = IGNORE
    weights = np.random.default_rng(4).uniform(size=labels.shape).astype(np.float32)
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    spec = PartitionSpec("data")

    def per_device(z, y, w):
        ce = losses.ce_loss(z, y, group_size=2)
        ohem = losses.ohem_loss(z, y, group_size=2, thresh=0.5, min_kept=10)
        wce = losses.weighted_unlabeled_ce(z, y, w, y, group_size=2)
        return jax.lax.pmean(jnp.stack([ce, ohem, wce]), "data")

    sharded = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec), out_specs=PartitionSpec()))
    got = sharded(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    z, y, w = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights)
    want = [losses.ce_loss(z, y, group_size=2), losses.ohem_loss(z, y, group_size=2, thresh=0.5, min_kept=10),
            losses.weighted_unlabeled_ce(z, y, w, y, group_size=2)]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("num_devices,group_size", [(8, 8), (8, 4), (4, 8), (2, 2)])
def test_groups_spanning_devices_match_float64(num_devices, group_size):
    """A group larger than the local batch (CSL: 8 images, 1 per device) is normalised over its
    images on all devices: the pmean of the per-device shares equals the float64 grouped mean, and
    so do the gradients w.r.t. the logits (the trainer pmeans gradients)."""
    logits, labels = random_batch(7, batch=8)
    labels[2, 1:] = IGNORE
    labels[5] = IGNORE  # an image with no valid pixel in a group
    weights = np.random.default_rng(7).uniform(size=labels.shape).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    spec = PartitionSpec("data")

    def per_device(z, y, w):
        ce = losses.ce_loss(z, y, group_size=group_size, axis_name="data")
        wce = losses.weighted_unlabeled_ce(z, y, w, y, group_size=group_size, axis_name="data")
        return ce[None], wce[None]

    def global_loss(z, y, w):  # the trainer's pmean of per-device values, as one function of all logits
        ce, wce = parallel.shard_map(per_device, mesh, (spec, spec, spec), (spec, spec))(z, y, w)
        return jnp.mean(ce), jnp.mean(wce)

    z, y, w = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights)
    ce, wce = jax.jit(lambda z: global_loss(z, y, w))(z)
    pixel = ref_pixel_ce(logits, labels)
    valid = labels != IGNORE
    np.testing.assert_allclose(float(ce), ref_grouped_mean(pixel, valid, group_size), rtol=1e-5)
    np.testing.assert_allclose(float(wce), ref_grouped_mean(weights * pixel, valid, group_size), rtol=1e-5)
    # gradient of the CE: softmax - onehot on valid pixels, over the pixel count of the image's group
    grad = jax.jit(jax.grad(lambda z: global_loss(z, y, w)[0]))(z)
    probs = ref_softmax(logits)
    onehot = np.eye(logits.shape[-1])[np.where(valid, labels, 0)]
    counts = valid.reshape(-1, group_size, *valid.shape[1:]).sum(axis=(1, 2, 3))
    per_image = np.maximum(np.repeat(counts, group_size), 1)[:, None, None, None]
    want = np.where(valid[..., None], probs - onehot, 0.0) / per_image / (len(labels) // group_size)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-7)


def test_group_larger_than_the_global_batch_is_refused():
    logits, labels = random_batch(8, batch=4)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    spec = PartitionSpec("data")
    fn = parallel.shard_map(lambda z, y: losses.ce_loss(z, y, group_size=8, axis_name="data")[None], mesh,
                            (spec, spec), spec)
    with pytest.raises(ValueError, match=r"group_size \(config.loss.group_size\) = 8 must be >= 1 and divide "
                                         r"the global batch of 4 images \(4 devices x 1\)"):
        jax.jit(fn)(jnp.asarray(logits), jnp.asarray(labels))


@pytest.mark.parametrize("loss", ["ce", "ohem", "weighted"])
def test_bad_group_size_raises(loss):
    logits, labels = random_batch(5, batch=3)
    z, y = jnp.asarray(logits), jnp.asarray(labels)
    call = {
        "ce": lambda g: losses.ce_loss(z, y, group_size=g),
        "ohem": lambda g: losses.ohem_loss(z, y, group_size=g),
        "weighted": lambda g: losses.weighted_unlabeled_ce(z, y, jnp.ones(y.shape), y, group_size=g),
    }[loss]
    for group_size in (2, 0):
        with pytest.raises(ValueError, match="group_size"):
            call(group_size)


# ---------------------------------------------------------------- OHEM


@pytest.mark.parametrize(
    "thresh, min_kept",
    [
        (0.7, 10),     # theta = thresh (the 10th smallest q is 0.013 in group 0)
        (0.005, 10),   # theta = the 10th smallest q
        (0.7, 1),      # min_kept = 1: theta = max(thresh, min q)
        (0.7, 20),     # group 0 has >= 20 valid pixels, group 1 fewer: plain CE there
        (0.3, 20),     # as above with theta = the 20th smallest q of group 0 (0.65)
        (0.7, 1000),   # min_kept above the pixel count: plain CE everywhere
    ],
)
def test_ohem_matches_reference(thresh, min_kept):
    logits, labels = random_batch(6, batch=4, size=4, ignore_frac=0.1)
    labels[2:, 2:] = IGNORE  # group 1: at most 16 valid pixels
    valid_per_group = (labels != IGNORE).reshape(2, -1).sum(1)
    assert valid_per_group[0] >= 20 > valid_per_group[1]
    got = losses.ohem_loss(jnp.asarray(logits), jnp.asarray(labels), group_size=2, thresh=thresh, min_kept=min_kept)
    np.testing.assert_allclose(float(got), ref_ohem(logits, labels, 2, thresh, min_kept), rtol=1e-5)


def test_ohem_branches_differ_from_plain_ce():
    """The selective branch really drops easy pixels (guards against a reference that always keeps all)."""
    logits, labels = random_batch(7, batch=2, size=4, ignore_frac=0.0)
    plain = ref_grouped_mean(ref_pixel_ce(logits, labels), labels != IGNORE, 2)
    assert abs(ref_ohem(logits, labels, 2, 0.005, 10) - plain) > 1e-3
    got = losses.ohem_loss(jnp.asarray(logits), jnp.asarray(labels), group_size=2, thresh=0.005, min_kept=10)
    assert abs(float(got) - plain) > 1e-3


def test_ohem_gradient_is_that_of_ce_over_kept_pixels():
    logits, labels = random_batch(8, batch=2, size=4)
    z, y = jnp.asarray(logits), jnp.asarray(labels)
    probs = ref_softmax(logits)
    valid = labels != IGNORE
    q = np.take_along_axis(probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    kept = valid & (q <= max(0.7, np.sort(q[valid])[9]))
    grad = jax.grad(lambda z: losses.ohem_loss(z, y, group_size=2, thresh=0.7, min_kept=10))(z)
    # d/dz of mean CE over the kept pixels: (softmax - onehot) / #kept on kept pixels.
    onehot = np.eye(logits.shape[-1])[np.where(valid, labels, 0)]
    want = np.where(kept[..., None], probs - onehot, 0.0) / kept.sum()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-7)
    assert kept.any() and not kept[valid].all()  # OHEM drops some valid pixels here


def test_ohem_rejects_non_positive_min_kept():
    logits, labels = random_batch(9, batch=2)
    with pytest.raises(ValueError, match="min_kept"):
        losses.ohem_loss(jnp.asarray(logits), jnp.asarray(labels), group_size=2, min_kept=0)


# ---------------------------------------------------------------- weighted unlabeled CE


def test_weighted_unlabeled_ce_divides_by_valid_count():
    logits, pseudo = random_batch(10, batch=4, ignore_frac=0.0)
    rng = np.random.default_rng(10)
    weights = rng.uniform(size=pseudo.shape).astype(np.float32)
    ignore = np.where(rng.uniform(size=pseudo.shape) < 0.3, IGNORE, 0).astype(np.int32)
    ignore[0] = IGNORE  # group 0 keeps only image 1's valid pixels
    ignore[1, 0, 0] = 0
    ce = np.where(ignore != IGNORE, ref_pixel_ce(logits, pseudo), 0.0)
    want = ref_grouped_mean(weights * ce, ignore != IGNORE, 2)
    got = losses.weighted_unlabeled_ce(jnp.asarray(logits), jnp.asarray(pseudo), jnp.asarray(weights),
                                       jnp.asarray(ignore), group_size=2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Not the sum of weights: the two normalisations differ on this input.
    by_weight = ref_grouped_mean(weights * ce, np.where(ignore != IGNORE, weights, 0.0), 2)
    assert abs(by_weight - want) > 1e-2
