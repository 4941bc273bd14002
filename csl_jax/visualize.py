"""Palettes, mask colouring and overlays, prediction grids, CSL diagnostic plots (PNG files).

Grids are composed with NumPy and pasted unscaled on a matplotlib Figure that labels their rows or
columns, so every cell keeps its pixels; the confidence-space scatter is a matplotlib plot. Both
use the object-oriented API on the Agg canvas (no display, no pyplot global state) and return their
Figure, whose texts the tests read.
"""

from __future__ import annotations

import colorsys
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from csl_jax.constants import IGNORE_INDEX
from csl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Cityscapes trainId 0..18 (road ... bicycle), official colours.
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# CamVid (SegNet) 0 Sky, 1 Building, 2 Pole, 3 Road, 4 Pavement, 5 Tree, 6 SignSymbol, 7 Fence,
# 8 Car, 9 Pedestrian, 10 Bicyclist.
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """Pascal VOC colours: the bits of the class index are spread over R, G, B, most significant
    bit first (bit 0 -> R bit 7, bit 1 -> G bit 7, bit 2 -> B bit 7, bit 3 -> R bit 6, ...).

    Returns (num_classes, 3) uint8.
    """
    out = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        c, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        out[index] = rgb
    return out


def generic_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for any number of classes: hues stepped by the golden ratio.

    Returns (num_classes, 3) uint8.
    """
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colors = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.75) for i, h in enumerate(hues)]
    return np.round(np.asarray(colors).reshape(num_classes, 3) * 255).astype(np.uint8)


def palette_for(dataset: str, num_classes: int) -> np.ndarray:
    """The palette of a dataset name ('pascal'/'voc', 'cityscapes', 'camvid'; anything else gets
    `generic_palette`). Returns (num_classes, 3) uint8; raises if a fixed palette has another size."""
    name = dataset.lower()
    if name in ("pascal", "voc"):
        return voc_palette(num_classes)
    fixed = {"cityscapes": CITYSCAPES_COLORS, "camvid": CAMVID_COLORS}.get(name)
    if fixed is None:
        return generic_palette(num_classes)
    if len(fixed) != num_classes:
        raise ValueError(f"the {name} palette has {len(fixed)} colours but num_classes={num_classes}")
    return np.asarray(fixed, np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_color: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """(H, W) integer class mask -> (H, W, 3) uint8 colours; IGNORE_INDEX gets `ignore_color`."""
    mask = np.asarray(mask)
    palette = np.asarray(palette, np.uint8)
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= len(palette)))
    if bad.any():
        values = np.unique(mask[bad]).tolist()
        raise ValueError(f"mask values {values} have no colour in a {len(palette)}-colour palette")
    table = np.concatenate([palette, np.asarray([ignore_color], np.uint8)])
    return table[np.where(mask == IGNORE_INDEX, len(palette), mask)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image blended with the colours of an (H, W) mask: (1 - alpha) * image +
    alpha * colour, rounded; IGNORE_INDEX pixels keep the image. Returns (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.shape[:2] != np.shape(mask):
        raise ValueError(f"overlay: image {image.shape[:2]} and mask {np.shape(mask)} differ in size")
    blended = (1.0 - alpha) * image + alpha * colorize(mask, palette).astype(np.float64)
    keep = (np.asarray(mask) == IGNORE_INDEX)[..., None]
    return np.where(keep, image, np.round(blended)).astype(np.uint8)


def denormalize(images: np.ndarray) -> np.ndarray:
    """(..., 3) float32 ImageNet-normalised images -> (..., 3) uint8."""
    x = (np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def weight_to_rgb(weights: np.ndarray) -> np.ndarray:
    """(H, W) weights in [0, 1] -> (H, W, 3) uint8 through matplotlib's viridis colormap."""
    from matplotlib import colormaps

    rgba = colormaps["viridis"](np.clip(np.asarray(weights, np.float64), 0.0, 1.0))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Tiles (h, w, 3) uint8 cells into one image; every cell slot is the size of the largest cell,
    cells sit top-left in their slot, slots are separated by `gap` white pixels.

    Returns (R * Hmax + (R - 1) * gap, K * Wmax + (K - 1) * gap, 3) uint8 for R rows of K cells.
    """
    cells = [c for row in rows for c in row]
    hmax, wmax = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    ncols = max(len(row) for row in rows)
    out = np.full((len(rows) * (hmax + gap) - gap, ncols * (wmax + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for k, cell in enumerate(row):
            y, x = r * (hmax + gap), k * (wmax + gap)
            out[y : y + cell.shape[0], x : x + cell.shape[1]] = cell
    return out


def save_png(array: np.ndarray, path: str | None = None) -> bytes:
    """Encodes an (H, W, 3) uint8 array as PNG; writes it to `path` (folders created) if given.
    Returns the PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return data


PREDICTION_ROWS = ("image", "prediction", "ground truth")
PSEUDO_LABEL_COLUMNS = ("weak view", "pseudo-label", "weight", "TMP view")


def grid_figure(rows: Sequence[Sequence[np.ndarray]], *, row_labels: Sequence[str] = (),
                col_labels: Sequence[str] = (), gap: int = 4, dpi: int = 100):
    """`image_grid(rows, gap)` pasted unscaled on a white matplotlib Figure (Agg canvas) with a left
    margin naming each row (text turned 90 degrees) and a top margin naming each column.

    A margin is there only when its labels are given; its width is twice the font height,
    max(10, min(Hmax, Wmax) // 16) pixels. `fig.texts` holds the row labels, then the column labels.
    Render it with `figure_to_array`: (grid H + top margin, grid W + left margin, 3) uint8, the
    cells' pixels unchanged.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = image_grid(rows, gap)
    cells = [c for row in rows for c in row]
    hmax, wmax = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    font_px = max(10, min(hmax, wmax) // 16)
    left, top = 2 * font_px * bool(row_labels), 2 * font_px * bool(col_labels)
    height, width = grid.shape[0] + top, grid.shape[1] + left
    # half a pixel more: Agg truncates the canvas size in pixels, and (W / dpi) * dpi may fall just below W
    fig = Figure(figsize=((width + 0.5) / dpi, (height + 0.5) / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    fig.figimage(grid, xo=left, yo=0, origin="upper")
    size = font_px * 72.0 / dpi
    for r, label in enumerate(row_labels):
        y = height - top - r * (hmax + gap) - hmax / 2
        fig.text(left / 2 / width, y / height, label, rotation=90, ha="center", va="center", fontsize=size)
    for k, label in enumerate(col_labels):
        x = left + k * (wmax + gap) + wmax / 2
        fig.text(x / width, 1 - top / 2 / height, label, ha="center", va="center", fontsize=size)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Draws a matplotlib Figure on its Agg canvas -> (H, W, 3) uint8 (alpha dropped)."""
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba())[..., :3]


def prediction_figure(
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    palette: np.ndarray,
    alpha: float = 0.5,
):
    """`grid_figure` of one column per sample, rows `PREDICTION_ROWS` (labelled): image / prediction
    overlay / ground-truth overlay. images: (H_i, W_i, 3) uint8; preds, labels: (H_i, W_i) integer
    masks (255 = ignore); palette: (C, 3) uint8."""
    rows = [
        list(images),
        [overlay(i, p, palette, alpha) for i, p in zip(images, preds)],
        [overlay(i, t, palette, alpha) for i, t in zip(images, labels)],
    ]
    return grid_figure(rows, row_labels=PREDICTION_ROWS)


def prediction_grid(
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    palette: np.ndarray,
    path: str | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """`prediction_figure` rendered; written as a PNG to `path` when given.

    Returns:
      (3 * Hmax + 8, 2 * font + K * Wmax + (K - 1) * 4, 3) uint8 for K samples (see `grid_figure`),
      e.g. for TensorBoard.
    """
    grid = figure_to_array(prediction_figure(images, preds, labels, palette, alpha))
    if path is not None:
        save_png(grid, path)
    return grid


def pseudo_label_figure(
    weak_images: np.ndarray,
    pseudo_labels: np.ndarray,
    weight_maps: np.ndarray,
    tmp_images: np.ndarray | None,
    palette: np.ndarray,
):
    """`grid_figure` of CSL pseudo-label diagnostics, one row per sample, columns `PSEUDO_LABEL_COLUMNS`
    (labelled): weak view / pseudo-label / weight map (viridis, 0..1) / TMP-masked view (that column
    is left out when `tmp_images` is None).

    Args:
      weak_images, tmp_images: (B, H, W, 3) float32 ImageNet-normalised views.
      pseudo_labels: (B, H, W) integer classes (255 = ignore, drawn white).
      weight_maps: (B, H, W) float32 in [0, 1].
      palette: (C, 3) uint8.
    """
    weak = denormalize(weak_images)
    rows = [[weak[b], colorize(pseudo_labels[b], palette), weight_to_rgb(weight_maps[b])] for b in range(len(weak))]
    if tmp_images is not None:
        for row, tmp in zip(rows, denormalize(tmp_images)):
            row.append(tmp)
    return grid_figure(rows, col_labels=PSEUDO_LABEL_COLUMNS[: len(rows[0])])


def pseudo_label_panel(
    weak_images: np.ndarray,
    pseudo_labels: np.ndarray,
    weight_maps: np.ndarray,
    tmp_images: np.ndarray | None,
    path: str | None,
    palette: np.ndarray,
) -> np.ndarray:
    """`pseudo_label_figure` rendered; written as a PNG to `path` when given.

    Returns:
      (2 * font + B * H + (B - 1) * 4, n * W + (n - 1) * 4, 3) uint8 for n columns (see `grid_figure`).
    """
    panel = figure_to_array(pseudo_label_figure(weak_images, pseudo_labels, weight_maps, tmp_images, palette))
    if path is not None:
        save_png(panel, path)
    return panel


def confidence_space_plot(
    conf: np.ndarray,
    var: np.ndarray,
    correct: np.ndarray,
    reliable: np.ndarray,
    weights: np.ndarray | None,
    path: str,
    *,
    cluster_means: np.ndarray | None = None,
    max_points: int = 5000,
    seed: int = 0,
    figsize: tuple[float, float] = (6.0, 5.0),
    dpi: int = 100,
):
    """CSL confidence space: max confidence (x) vs residual variance (y) of sampled pixels.

    Correct pseudo-labels are green and wrong ones red; pixels in the reliable cluster get a black
    ring; `weights` (if given) are drawn as contours over the sampled points; `cluster_means` (K, 2)
    as crosses. At most `max_points` pixels (a fixed random sample) are drawn.

    Args:
      conf, var: (N,) float; correct, reliable: (N,) bool; weights: (N,) float or None.
      path: PNG file written, (figsize * dpi) pixels.

    Returns:
      The matplotlib Figure (axes labelled 'max confidence' and 'residual variance', with a legend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conf, var = np.ravel(conf).astype(np.float64), np.ravel(var).astype(np.float64)
    correct, reliable = np.ravel(correct).astype(bool), np.ravel(reliable).astype(bool)
    sizes = {len(conf), len(var), len(correct), len(reliable)} | ({np.size(weights)} if weights is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"confidence_space_plot: conf, var, correct, reliable, weights differ in length: {sizes}")
    if len(conf) > max_points:
        keep = np.random.default_rng(seed).choice(len(conf), max_points, replace=False)
        conf, var, correct, reliable = conf[keep], var[keep], correct[keep], reliable[keep]
        weights = None if weights is None else np.ravel(weights)[keep]

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(conf[correct], var[correct], s=4, c="tab:green", alpha=0.5, label="correct")
    ax.scatter(conf[~correct], var[~correct], s=4, c="tab:red", alpha=0.5, label="wrong")
    ax.scatter(conf[reliable], var[reliable], s=12, facecolors="none", edgecolors="black", linewidths=0.3,
               alpha=0.35, label="reliable cluster")  # fmt: skip
    if weights is not None and len(conf) >= 3 and np.ptp(conf) > 0 and np.ptp(var) > 0:
        contours = ax.tricontour(conf, var, np.ravel(weights), levels=5, cmap="viridis", linewidths=1.0)
        fig.colorbar(contours, ax=ax, label="weight")
    if cluster_means is not None:
        means = np.asarray(cluster_means, np.float64).reshape(-1, 2)
        ax.scatter(means[:, 0], means[:, 1], marker="x", s=50, c="blue", label="cluster means")
    ax.set_xlabel("max confidence")
    ax.set_ylabel("residual variance")
    ax.set_title(f"confidence space ({len(conf)} pixels)")
    ax.legend(loc="best", fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return fig
