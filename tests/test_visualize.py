"""Palettes, colouring, overlays and the PNG writers."""

import io

import numpy as np
import pytest
from PIL import Image

from csl_jax import visualize as vis


def test_voc_palette_known_classes():
    pal = vis.voc_palette(256)
    assert pal.dtype == np.uint8 and pal.shape == (256, 3)
    assert tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[1]) == (128, 0, 0)  # aeroplane
    assert tuple(pal[2]) == (0, 128, 0)  # bicycle
    assert tuple(pal[15]) == (192, 128, 128)  # person
    assert tuple(pal[20]) == (0, 64, 128)  # tvmonitor
    assert tuple(pal[255]) == (224, 224, 192)  # VOC's boundary colour
    assert len({tuple(c) for c in pal}) == 256


def test_dataset_palettes():
    city = vis.palette_for("cityscapes", 19)
    assert tuple(city[0]) == (128, 64, 128) and tuple(city[13]) == (0, 0, 142) and tuple(city[18]) == (119, 11, 32)
    camvid = vis.palette_for("camvid", 11)
    assert tuple(camvid[0]) == (128, 128, 128) and tuple(camvid[10]) == (0, 128, 192)
    np.testing.assert_array_equal(vis.palette_for("pascal", 21), vis.voc_palette(21))
    gen = vis.palette_for("synthetic", 40)
    assert gen.shape == (40, 3) and len({tuple(c) for c in gen}) == 40
    with pytest.raises(ValueError, match="cityscapes.*19"):
        vis.palette_for("cityscapes", 21)


def test_colorize_and_overlay_numbers():
    pal = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
    mask = np.array([[0, 1], [255, 1]])
    col = vis.colorize(mask, pal)
    np.testing.assert_array_equal(col, [[[10, 20, 30], [200, 100, 0]], [[255, 255, 255], [200, 100, 0]]])
    np.testing.assert_array_equal(vis.colorize(mask, pal, ignore_color=(0, 0, 0))[1, 0], [0, 0, 0])
    image = np.array([[[100, 100, 100], [0, 50, 255]], [[7, 8, 9], [255, 255, 255]]], np.uint8)
    out = vis.overlay(image, mask, pal, alpha=0.25)
    # 0.75 * image + 0.25 * colour, rounded half to even; ignored pixel unchanged
    want = np.array([[[77.5, 80, 82.5], [50, 62.5, 191.25]], [[7, 8, 9], [241.25, 216.25, 191.25]]])
    np.testing.assert_array_equal(out, np.round(want).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[2\]"):
        vis.colorize(np.array([[2]]), pal)


def test_denormalize_inverts_imagenet_normalisation():
    rgb = np.array([[[0, 128, 255]]], np.uint8)
    x = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_array_equal(vis.denormalize(x.astype(np.float32)), rgb)


def _png(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def test_prediction_grid_png_labels_its_rows_and_keeps_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.integers(0, 256, (9, 4, 3), dtype=np.uint8)]
    preds = [rng.integers(0, 3, (5, 7)), rng.integers(0, 3, (9, 4))]
    labels = [np.full((5, 7), 255), rng.integers(0, 3, (9, 4))]
    fig = vis.prediction_figure(images, preds, labels, vis.voc_palette(3))
    assert [t.get_text() for t in fig.texts] == ["image", "prediction", "ground truth"]
    assert all(t.get_rotation() == 90 for t in fig.texts)
    # each label sits left of the grid, at the height of its row (figure y is measured from the bottom)
    height = 3 * 9 + 2 * 4
    for r, t in enumerate(fig.texts):
        x, y = t.get_position()
        assert x * (20 + 2 * 7 + 4) < 20
        assert (1 - y) * height == pytest.approx(r * 13 + 4.5)

    path = tmp_path / "sub" / "grid.png"
    grid = vis.prediction_grid(images, preds, labels, vis.voc_palette(3), str(path))
    assert grid.dtype == np.uint8 and grid.shape == (height, 20 + 2 * 7 + 4, 3)  # margin 2 * 10 px font
    np.testing.assert_array_equal(np.asarray(_png(path.read_bytes())), grid)
    cells = grid[:, 20:]
    np.testing.assert_array_equal(cells[:5, :7], images[0])  # row 0: the image
    np.testing.assert_array_equal(cells[2 * 13 : 2 * 13 + 5, :7], images[0])  # row 2: all-ignore label = image
    np.testing.assert_array_equal(cells[13 : 13 + 9, 11 : 11 + 4], vis.overlay(images[1], preds[1], vis.voc_palette(3)))
    assert (grid[:, :20] != 255).any()  # the labels are drawn in the margin
    assert (vis.prediction_grid(images, preds, labels, vis.voc_palette(3)) == grid).all()  # no path: no file


def test_pseudo_label_panel_png_labels_its_columns(tmp_path):
    rng = np.random.default_rng(1)
    weak = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    tmp = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 6, 8))
    labels[0, 0, 0] = 255
    weights = rng.random((2, 6, 8)).astype(np.float32)
    fig = vis.pseudo_label_figure(weak, labels, weights, tmp, vis.voc_palette(4))
    assert [t.get_text() for t in fig.texts] == ["weak view", "pseudo-label", "weight", "TMP view"]
    no_tmp = vis.pseudo_label_figure(weak, labels, weights, None, vis.voc_palette(4))
    assert [t.get_text() for t in no_tmp.texts] == ["weak view", "pseudo-label", "weight"]

    path = tmp_path / "panel.png"
    panel = vis.pseudo_label_panel(weak, labels, weights, tmp, str(path), vis.voc_palette(4))
    arr = np.asarray(_png(path.read_bytes()))
    np.testing.assert_array_equal(arr, panel)
    assert arr.shape == (20 + 2 * 6 + 4, 4 * 8 + 3 * 4, 3)  # top margin 2 * 10 px font
    assert (arr[:20] != 255).any()
    cells = arr[20:]
    np.testing.assert_array_equal(cells[:6, :8], vis.denormalize(weak[0]))
    np.testing.assert_array_equal(cells[10:16, 12:20], vis.colorize(labels[1], vis.voc_palette(4)))
    np.testing.assert_array_equal(cells[10:16, 36:44], vis.denormalize(tmp[1]))
    np.testing.assert_array_equal(cells[0, 12], [255, 255, 255])  # ignored pseudo-label
    # weight 0 and 1 map to the ends of viridis
    np.testing.assert_array_equal(vis.weight_to_rgb(np.array([[0.0, 1.0]])), [[[68, 1, 84], [253, 231, 37]]])
    assert vis.pseudo_label_panel(weak, labels, weights, None, None, vis.voc_palette(4)).shape == (36, 3 * 8 + 2 * 4, 3)


def test_grid_figure_font_scales_with_the_cells():
    cells = [[np.zeros((320, 480, 3), np.uint8)] * 2]
    fig = vis.grid_figure(cells, row_labels=["a"], col_labels=["x", "y"])
    assert vis.figure_to_array(fig).shape == (40 + 320, 40 + 2 * 480 + 4, 3)  # font 320 // 16 = 20 px
    assert fig.texts[0].get_fontsize() == pytest.approx(20 * 72 / 100)
    assert vis.figure_to_array(vis.grid_figure(cells)).shape == (320, 964, 3)  # no labels, no margins


def test_confidence_space_plot_png(tmp_path):
    rng = np.random.default_rng(2)
    n = 7000  # above max_points: subsampled
    conf, var = rng.random(n), rng.random(n) * 0.1
    correct, reliable = rng.random(n) < 0.7, conf > 0.8
    path = tmp_path / "conf.png"
    fig = vis.confidence_space_plot(conf, var, correct, reliable, conf * (1 - var), str(path),
                                    cluster_means=np.array([[0.9, 0.01], [0.4, 0.05]]), figsize=(4, 3), dpi=50)
    assert _png(path.read_bytes()).size == (200, 150)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("max confidence", "residual variance")
    assert ax.get_title() == "confidence space (5000 pixels)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["correct", "wrong", "reliable cluster", "cluster means"]
    vis.confidence_space_plot(conf[:10], var[:10], correct[:10], reliable[:10], None, str(path))
    assert _png(path.read_bytes()).size == (600, 500)
    with pytest.raises(ValueError, match="length"):
        vis.confidence_space_plot(conf, var[:5], correct, reliable, None, str(path))
