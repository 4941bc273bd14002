"""The 'sliding_cpcl' protocol against a float64 transcription of furnace's `Evaluator.scale_process`
(CPCL's sliding_eval at one scale, no flip), on both of its branches: an image whose long side fits
the window (normalise, pad centred with 0, one forward) and one larger than the window in both
directions (ceil stride, shifted windows, summed logits)."""

import jax
import numpy as np
import pytest

from csl_jax.evaluation.evaluator import Evaluator
from tests.test_evaluate import C, VARIABLES, fake_apply, make_dataset, np_apply, np_normalize


def centred_pad(x, g):
    ph, pw = max(g - x.shape[0], 0), max(g - x.shape[1], 0)
    margin = (ph // 2, ph // 2 + ph % 2, pw // 2, pw // 2 + pw % 2)
    return np.pad(x, ((margin[0], margin[1]), (margin[2], margin[3]), (0, 0))), margin


def crop_margin(score, margin):
    return score[margin[0]:score.shape[0] - margin[1], margin[2]:score.shape[1] - margin[3]]


def reference_scale_process(img, g):
    """scale_process(img, ori_shape, crop_size=g, stride_rate=2/3) on a uint8 image, float64 scores (H, W, C)."""
    rows, cols, _ = img.shape
    if max(rows, cols) <= g:
        data, margin = centred_pad(np_normalize(img), g)
        return crop_margin(np_apply(data), margin)
    stride = int(np.ceil(g * 2 / 3))
    img_pad, margin = centred_pad(img.astype(np.float64), g)  # raw pixels padded with 0 (black)
    pad_rows, pad_cols = img_pad.shape[:2]
    score = np.zeros((pad_rows, pad_cols, C))
    for gy in range(int(np.ceil((pad_rows - g) / stride)) + 1):
        for gx in range(int(np.ceil((pad_cols - g) / stride)) + 1):
            e_x, e_y = min(gx * stride + g, pad_cols), min(gy * stride + g, pad_rows)
            s_x, s_y = e_x - g, e_y - g
            tile, tmargin = centred_pad(np_normalize(img_pad[s_y:e_y, s_x:e_x]), g)
            score[s_y:e_y, s_x:e_x] += crop_margin(np_apply(tile), tmargin)
    return crop_margin(score, margin)


@pytest.mark.parametrize("shape,g", [((7, 9), 12), ((12, 5), 12), ((17, 26), 9), ((29, 13), 12)])
def test_sliding_cpcl_matches_the_reference_evaluator(shape, g):
    data = make_dataset([shape], seed=5)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="sliding_cpcl", crop_size=g, batch_size=8)
    x = np_normalize(data[0]["image"])[None].astype(np.float32)
    got = np.asarray(jax.jit(evaluator.scores)(VARIABLES, x))[0]
    np.testing.assert_allclose(got, reference_scale_process(data[0]["image"], g), rtol=1e-4, atol=1e-4)
    assert evaluator.protocol_info["stride"] == -(-2 * g // 3)
