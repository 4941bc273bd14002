"""csl_jax.data.transforms: normalisation, geometry and alignment, CutMix boxes, TMP block masks."""
import numpy as np
import pytest
from PIL import Image

from csl_jax.data import transforms

PALETTE = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 20]], np.uint8)


def test_normalize_matches_float64():
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), np.uint8)
    ref = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = transforms.normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_geometry_draws_follow_unimatch():
    rng = np.random.default_rng(1)
    flips = 0
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        g = transforms.sample_geometry(rng, h, w, crop=64)
        long_in, short_in = max(h, w), min(h, w)
        long_out = max(g.resized_h, g.resized_w) if h != w else g.resized_w
        assert int(0.5 * long_in) <= long_out <= int(2.0 * long_in)
        short_out = g.resized_w if h > w else g.resized_h
        assert short_out == int(np.floor(short_in * long_out / long_in + 0.5))
        assert 0 <= g.y <= max(g.resized_h, 64) - 64 and 0 <= g.x <= max(g.resized_w, 64) - 64
        flips += g.flip
    assert 160 < flips < 240  # p = 0.5, 4 sigma


@pytest.mark.parametrize("seed", range(6))
def test_scale_crop_flip_keep_image_and_label_aligned(seed):
    """Label = function of colour: 16 px blocks of class colours; after the transform every interior
    pixel's colour must still be the colour of its label, and padding must be black / 255."""
    rng = np.random.default_rng(seed)
    h, w, crop = 64, 96, 80
    cells = rng.integers(0, len(PALETTE), (h // 16, w // 16))
    label = np.kron(cells, np.ones((16, 16), np.int64)).astype(np.uint8)
    image = PALETTE[label]
    g = transforms.sample_geometry(rng, h, w, crop)
    out, lab, valid = transforms.apply_geometry(Image.fromarray(image), label, g, crop)
    assert out.shape == (crop, crop, 3) and lab.shape == valid.shape == (crop, crop)
    # Valid region: the part of the resized image inside the crop, flipped with the rest.
    vh, vw = min(g.resized_h - g.y, crop), min(g.resized_w - g.x, crop)
    expect_valid = np.zeros((crop, crop), bool)
    expect_valid[:vh, :vw] = True
    if g.flip:
        expect_valid = expect_valid[:, ::-1]
    np.testing.assert_array_equal(valid, expect_valid)
    assert (out[~valid] == 0).all() and (lab[~valid] == 255).all() and (lab[valid] != 255).all()
    # Interior pixels: the 5x5 label neighbourhood (inside the valid area) is constant.
    pad = np.pad(np.where(valid, lab, 255).astype(np.int16), 2, constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
    interior = valid & (windows == lab[..., None, None]).all(axis=(-1, -2))
    assert interior.sum() > 0.2 * valid.sum()
    diff = np.abs(out[interior].astype(int) - PALETTE[lab[interior]].astype(int))
    assert diff.max() <= 1


def test_unlabeled_geometry_without_mask_is_all_ignore():
    g = transforms.Geometry(resized_h=30, resized_w=40, y=0, x=0, flip=False)
    img = Image.fromarray(np.full((15, 20, 3), 7, np.uint8))
    out, lab, valid = transforms.apply_geometry(img, None, g, 32)
    assert (lab == 255).all() and valid[:30, :32].all() and not valid[30:].any()
    assert (out[:30] == 7).all() and (out[30:] == 0).all()


def test_cutmix_box_statistics():
    rng = np.random.default_rng(2)
    crop, n = 64, 3000
    areas, ratios, present = [], [], 0
    for _ in range(n):
        box = transforms.cutmix_box(rng, crop, p=0.5)
        if not box.any():
            continue
        present += 1
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        hh, ww = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert box.sum() == hh * ww  # one rectangle, inside the crop by construction of the mask
        areas.append(hh * ww / crop**2)
        ratios.append(hh / ww)
    assert abs(present / n - 0.5) < 4 * np.sqrt(0.25 / n)
    areas, ratios = np.array(areas), np.array(ratios)
    # w = int(sqrt(A/r)), h = int(sqrt(A r)): area <= A <= 0.4, and >= (sqrt(A/r)-1)(sqrt(A r)-1).
    assert areas.max() <= 0.4 and areas.min() >= 0.02 - 2 * np.sqrt(0.02 * 3.4) / crop
    assert ratios.min() >= 0.25 and ratios.max() <= 1 / 0.25
    assert areas.mean() < 0.21  # rejection of boxes that do not fit favours small areas (E[A] = 0.21)
    assert (transforms.cutmix_box(rng, crop, p=0.0) == 0).all()


@pytest.mark.parametrize("crop,grid", [(321, 10), (801, 25), (64, 2), (513, 16)])
def test_block_mask_grid_and_cover_ratio(crop, grid):
    rng = np.random.default_rng(3)
    n_masks = 40
    masks = np.stack([transforms.block_mask(rng, crop, 32, 0.7) for _ in range(n_masks)])
    cell = np.floor((np.arange(crop, dtype=np.float64) + 0.5) * grid / crop).astype(int)
    # Each mask is constant on every cell and equals a G x G grid upsampled by the cell map.
    starts = np.flatnonzero(np.diff(cell, prepend=-1))  # cell is non-decreasing
    assert len(starts) == grid
    cells = np.add.reduceat(np.add.reduceat(masks.astype(np.int64), starts, axis=1), starts, axis=2)
    counts = np.bincount(cell, minlength=grid)
    frac = cells / np.outer(counts, counts)
    assert set(np.unique(frac)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks, frac[:, cell[:, None], cell[None, :]] == 1)
    n = n_masks * grid * grid
    assert abs(frac.mean() - 0.7) < 4 * np.sqrt(0.21 / n)


def test_photometric_views_keep_shape_and_change_colours():
    rng = np.random.default_rng(4)
    img = np.random.default_rng(5).integers(0, 256, (40, 40, 3), np.uint8)
    strong = [transforms.strong_photometric(img, rng) for _ in range(50)]
    mild = [transforms.mild_photometric(img, rng) for _ in range(50)]
    for out in strong + mild:
        assert out.shape == img.shape and out.dtype == np.uint8
    gray = sum(bool((s[..., 0] == s[..., 1]).all() and (s[..., 1] == s[..., 2]).all()) for s in strong)
    assert 2 <= gray <= 22  # grayscale with p = 0.2 in strong, never in mild
    assert not any((m[..., 0] == m[..., 1]).all() and (m[..., 1] == m[..., 2]).all() for m in mild)
    dev_strong = np.mean([np.abs(s.astype(int) - img).mean() for s in strong])
    dev_mild = np.mean([np.abs(m.astype(int) - img).mean() for m in mild])
    assert dev_strong > dev_mild > 0


def test_hue_shift_matches_colorsys_reference():
    import colorsys
    img = np.random.default_rng(6).integers(0, 256, (8, 8, 3), np.uint8)
    out = np.asarray(transforms._adjust_hue(Image.fromarray(img), 0.25)).astype(int)
    for (y, x) in [(0, 0), (3, 5), (7, 7)]:
        hh, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255.0))
        ref = np.array(colorsys.hsv_to_rgb((hh + 63 / 255) % 1.0, s, v)) * 255
        assert np.abs(out[y, x] - ref).max() <= 8  # PIL's HSV is 8-bit per channel


def _padded_window_reference(resized: np.ndarray, y: int, x: int, crop: int, fill) -> np.ndarray:
    """The crop window [y, y+crop) x [x, x+crop) of `resized` (H, W, ...), `fill` outside it."""
    out = np.empty((crop, crop) + resized.shape[2:], resized.dtype)
    out[...] = fill
    for i in range(crop):
        for j in range(crop):
            if 0 <= y + i < resized.shape[0] and 0 <= x + j < resized.shape[1]:
                out[i, j] = resized[y + i, x + j]
    return out


@pytest.mark.parametrize("size,window", [((23, 31), (-3, 5)), ((9, 14), (-4, -2)), ((40, 17), (12, -6)),
                                         ((20, 20), (1, 1))])
def test_torch_resample_matches_torch_interpolate_in_any_window(size, window):
    """'torch' resample = torch F.interpolate bilinear (align_corners=False, no antialias) for the
    image, legacy nearest for the label; windows start before or end past the resized image."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(sum(size))
    h, w, crop = 17, 25, 20
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (h, w), dtype=np.uint8)
    g = transforms.Geometry(size[0], size[1], window[0], window[1], False, fill=transforms.MEAN_FILL,
                            label_fill=0, resample="torch")
    out, lab, valid = transforms.apply_geometry(Image.fromarray(image), label, g, crop)
    t = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    ref = ref.numpy()
    ref_label = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].float(), size=size,
                                                mode="nearest")[0, 0].numpy().astype(np.uint8)
    # uint8 output: the float64 reference rounded (a tie may round either way).
    expected = _padded_window_reference(ref, *window, crop, transforms.MEAN_FILL)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(lab, _padded_window_reference(ref_label, *window, crop, 0))
    np.testing.assert_array_equal(valid, _padded_window_reference(np.ones(size, bool), *window, crop, False))


def test_pil_resample_window_with_negative_offset_and_flip():
    """A window starting before the image pads before it (fill, label_fill, invalid); flip is last."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (12, 10), dtype=np.uint8)
    g = transforms.Geometry(12, 10, -2, -3, True, fill=(9, 8, 7))
    out, lab, valid = transforms.apply_geometry(Image.fromarray(image), label, g, 16)
    np.testing.assert_array_equal(out, _padded_window_reference(image, -2, -3, 16, (9, 8, 7))[:, ::-1])
    np.testing.assert_array_equal(lab, _padded_window_reference(label, -2, -3, 16, 255)[:, ::-1])
    assert valid.sum() == 120 and valid[2, 16 - 1 - 3] and not valid[1].any()


def test_mean_fill_normalises_to_almost_zero():
    assert np.abs(transforms.normalize(np.array(transforms.MEAN_FILL, np.uint8))).max() < 0.01


def test_geometry_rejects_unknown_resample():
    with pytest.raises(ValueError, match="resample"):
        transforms.Geometry(4, 4, 0, 0, False, resample="cubic")


@pytest.mark.parametrize("resample", ["pil", "torch"])
@pytest.mark.parametrize("window", [(0, 3), (-4, -2), (5, 9), (-20, 0)])
def test_reflect_padding_is_numpy_reflect(resample, window):
    """`reflect`: the image outside the resized one is np.pad(mode='reflect') of it (bouncing when the
    padding is longer than the side); labels still get label_fill and the valid map False."""
    rng = np.random.default_rng(7)
    h, w, crop = 9, 12, 16
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (h, w), dtype=np.uint8)
    y, x = window
    g = transforms.Geometry(h, w, y, x, False, reflect=True, resample=resample)  # same size: no resampling
    out, lab, valid = transforms.apply_geometry(Image.fromarray(image), label, g, crop)
    pad = 40
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out, padded[pad + y:pad + y + crop, pad + x:pad + x + crop])
    np.testing.assert_array_equal(lab, _padded_window_reference(label, y, x, crop, 255))
    np.testing.assert_array_equal(valid, _padded_window_reference(np.ones((h, w), bool), y, x, crop, False))
