"""CSS's data views and geometries (csl_jax/methods/css/data.py) against the reference transforms
(VOC.py `transform` / `transform_3`): PIL bilinear / nearest resize, reflect padding, inclusive random crop,
the labeled and unlabeled geometries, and the arrays the streams deliver."""

import numpy as np
import pytest
from PIL import Image

from configs import common, demo
from csl_jax import train
from csl_jax.data import transforms
from csl_jax.methods import build_method, css
from csl_jax.methods.css import data as css_data
from data_prep import synthetic


@pytest.mark.parametrize("size_in,size_out", [(33, 17), (33, 49), (129, 64), (129, 193)])
def test_nearest_source_is_pils_nearest_resize(size_in, size_out):
    index = np.arange(size_in * size_in, dtype=np.int32).reshape(size_in, size_in)
    pil = np.asarray(Image.fromarray(index, mode="I").resize((size_out, size_out), Image.NEAREST))
    src = css_data.nearest_source(size_in, size_out)
    np.testing.assert_array_equal(pil, src[:, None] * size_in + src[None, :])


@pytest.mark.parametrize("seed", range(6))
def test_warp_is_resize_reflect_pad_then_crop(seed):
    crop = 33
    weak = np.random.default_rng(seed).integers(0, 256, (crop, crop, 3), dtype=np.uint8)
    image, index = css_data.warp(weak, np.random.default_rng(seed), crop, (0.5, 1.5))
    rng = np.random.default_rng(seed)  # replay the draws: scale, then the crop offsets
    n = int(crop * rng.uniform(0.5, 1.5))
    resized = np.asarray(Image.fromarray(weak).resize((n, n), Image.BILINEAR))
    labels = np.asarray(Image.fromarray(np.arange(crop * crop, dtype=np.int32).reshape(crop, crop), mode="I")
                        .resize((n, n), Image.NEAREST))
    pad = max(crop - n, 0)
    padded = np.pad(resized, ((0, pad), (0, pad), (0, 0)), mode="reflect")   # transforms_f.pad(reflect)
    padded_index = np.pad(labels, ((0, pad), (0, pad)), constant_values=-1)  # targets: ignore / confidence 0
    y = rng.integers(0, max(n, crop) - crop + 1)
    x = rng.integers(0, max(n, crop) - crop + 1)
    np.testing.assert_array_equal(image, padded[y:y + crop, x:x + crop])
    np.testing.assert_array_equal(index, padded_index[y:y + crop, x:x + crop])


def test_geometries_draw_the_reference_ranges():
    rescaled = [css_data.labeled_rescale_geometry(np.random.default_rng(i), 100, 200, 65) for i in range(2000)]
    scales = np.array([g.resized_w / 200 for g in rescaled])
    assert 0.5 <= scales.min() < 0.52 and 1.48 < scales.max() <= 1.5
    assert all(abs(g.resized_h / 100 - g.resized_w / 200) < 0.02 for g in rescaled)  # one scale, both sides
    assert 0.45 < np.mean([g.flip for g in rescaled]) < 0.55
    assert all(0 <= g.y <= max(g.resized_h, 65) - 65 and 0 <= g.x <= max(g.resized_w, 65) - 65 for g in rescaled)
    plain = [css_data.labeled_geometry(np.random.default_rng(i), 100, 200, 65) for i in range(500)]
    assert {(g.resized_h, g.resized_w) for g in plain} == {(100, 200)} and 0.4 < np.mean([g.flip for g in plain]) < 0.6
    unlabeled = [css_data.unlabeled_geometry(np.random.default_rng(i), 100, 200, 65) for i in range(500)]
    assert {(g.resized_h, g.resized_w, g.flip) for g in unlabeled} == {(100, 200, False)}
    assert {g.y for g in unlabeled} == set(range(36)) and {g.x for g in unlabeled} == set(range(136))


def test_strong_view_rejects_a_bad_scale_range():
    with pytest.raises(ValueError, match="css_scale_low"):
        css_data.css_strong(np.zeros((9, 9, 3), np.uint8), np.ones((9, 9), bool), np.random.default_rng(0), 9,
                            {"css_scale_low": 1.5, "css_scale_high": 0.5})


def test_streams_deliver_the_css_views(tmp_path):
    synthetic.prepare(tmp_path, num_train=16, num_val=2, image_size=(40, 40), seed=0)
    c = css.configure(demo.get_config("supervised"))
    c.data.update(root=str(tmp_path), crop_size=32, split="1_2")
    common.tiny_model(c, width=4, head_width=8, reduce_width=4)
    c.batch.update(labeled=4, unlabeled=4)
    method = build_method(c, 5)
    batch = train.make_streams(c, method).next()
    lab, unl = batch["labeled"], batch["unlabeled"]
    assert lab["css_image"].shape == (4, 32, 32, 3) and lab["css_image"].dtype == np.float32
    assert unl["css_strong"].shape == (4, 32, 32, 3) and unl["warp_index"].dtype == np.int32
    assert unl["css_flip"].shape == (4,) and unl["css_flip"].dtype == bool
    assert unl["css_box"].shape == (4, 32, 32) and np.allclose(unl["css_box"].mean(axis=(1, 2)), 0.5, atol=0.05)
    assert unl["warp_index"].min() >= -1 and unl["warp_index"].max() < 32 * 32


@pytest.mark.parametrize("name", ["css_labeled_rescale", "css_labeled", "css_unlabeled"])
def test_loader_geometries_reflect_pad_bottom_right(name):
    """The loaders pad bottom/right by reflection (transforms_f.pad(reflect)), label ignore."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (10, 14), dtype=np.uint8)
    g = transforms.GEOMETRIES[name](np.random.default_rng(1), 10, 14, 32)
    assert g.reflect and g.y == 0 and g.x == 0  # shorter than the crop: no offset, padding after
    out, lab, valid = transforms.apply_geometry(Image.fromarray(image), label, g, 32)
    resized = np.asarray(Image.fromarray(image).resize((g.resized_w, g.resized_h), Image.BILINEAR))
    expected = np.pad(resized, ((0, 32 - g.resized_h), (0, 32 - g.resized_w), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out, expected[:, ::-1] if g.flip else expected)
    assert (lab[~valid] == 255).all() and valid.sum() == g.resized_h * g.resized_w
