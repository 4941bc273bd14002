"""csl_jax.methods.parts.views (CutMix, TMP) and .teacher (EMA) against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csl_jax.methods.parts import teacher, views


def _rng():
    return np.random.default_rng(0)


def test_trusted_mask_zeroes_exactly_reliable_pixels_inside_blocks():
    rng = _rng()
    images = rng.normal(size=(3, 6, 7, 3)).astype(np.float32) + 5.0  # no pixel is 0 before masking
    reliable = rng.random((3, 6, 7)) < 0.5
    block = rng.random((3, 6, 7)) < 0.5
    block[2] = False  # a sample whose TMP coin picked the strong branch
    out = np.asarray(views.trusted_mask(jnp.asarray(images), jnp.asarray(reliable), jnp.asarray(block)))

    trusted = reliable & block
    assert 0 < trusted.sum() < trusted.size
    np.testing.assert_array_equal(out[trusted], 0.0)  # all three channels
    np.testing.assert_array_equal(out[~trusted], images[~trusted])
    np.testing.assert_array_equal(out[2], images[2])


def test_cutmix_takes_mix_inside_box_and_own_outside_for_images_and_targets():
    rng = _rng()
    box = np.zeros((2, 8, 9), bool)
    box[0, 2:6, 3:8] = True  # sample 1 has no box
    own = {"image": rng.normal(size=(2, 8, 9, 3)).astype(np.float32),
           "label": rng.integers(0, 5, (2, 8, 9)).astype(np.int32),
           "weight": rng.random((2, 8, 9)).astype(np.float32),
           "ignore": np.where(rng.random((2, 8, 9)) < 0.2, 255, 0).astype(np.int32)}
    mix = {"image": rng.normal(size=(2, 8, 9, 3)).astype(np.float32),
           "label": rng.integers(5, 10, (2, 8, 9)).astype(np.int32),
           "weight": rng.random((2, 8, 9)).astype(np.float32),
           "ignore": np.where(rng.random((2, 8, 9)) < 0.2, 255, 0).astype(np.int32)}
    out = views.cutmix(jnp.asarray(box), jax.tree.map(jnp.asarray, mix), jax.tree.map(jnp.asarray, own))

    for key in own:
        got = np.asarray(out[key])
        assert got.dtype == own[key].dtype
        np.testing.assert_array_equal(got[box], mix[key][box], err_msg=key)
        np.testing.assert_array_equal(got[~box], own[key][~box], err_msg=key)


def test_ema_decay_warm_up():
    steps = np.arange(0, 300)
    expected = np.minimum(1.0 - 1.0 / (steps + 1.0), 0.99)
    got = np.asarray(jax.vmap(lambda t: teacher.ema_decay(t, 0.99))(jnp.asarray(steps)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.99, 0.6])
def test_ema_update_follows_warm_up_on_params_and_batch_stats(momentum):
    rng = _rng()
    shapes = {"params": {"w": (3, 4), "b": (4,)}, "batch_stats": {"mean": (4,), "var": (4,)}}
    students = [jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                             is_leaf=lambda x: isinstance(x, tuple)) for _ in range(5)]
    t_jax = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,  # arbitrary start
                         is_leaf=lambda x: isinstance(x, tuple))
    t_ref = None
    update = jax.jit(teacher.ema_update, static_argnums=3)
    for step, student in enumerate(students):
        t_jax = update(t_jax, student, jnp.int32(step), momentum)
        d = min(1.0 - 1.0 / (step + 1.0), momentum)
        t_ref = (jax.tree.map(np.float64, student) if t_ref is None
                 else jax.tree.map(lambda t, s: d * t + (1 - d) * np.float64(s), t_ref, student))
        if step == 0:  # the first update copies the student exactly
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), t_jax, student)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
                     t_jax, t_ref)
