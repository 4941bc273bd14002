"""UniMatch V2's evaluation protocols (docs/protocol.md §4): 'whole_resize' against PyTorch's align_corners
resize there and back, 'sliding_shifted' against a transcription of V2's window loop, and both through
`Evaluator.evaluate` against a float64 NumPy computation of the protocol."""

import types

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from csl_jax import config_checks
from csl_jax.evaluation import loop, protocols
from csl_jax.evaluation.evaluator import Evaluator
from csl_jax.evaluation.protocols import get_protocol

C = 5
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RNG = np.random.default_rng(26)
# A fixed 1x1 conv, 3 -> C; class C - 1 has a bias of -100, so it is never predicted.
WEIGHTS = {"w": RNG.normal(size=(3, C)).astype(np.float32),
           "b": np.append(RNG.normal(size=C - 1), -100.0).astype(np.float32)}


def conv_apply(variables, x):
    """(b, h, w, 3) float32 -> (b, h, w, C) float32: the 1x1 conv."""
    return jnp.einsum("bhwc,cd->bhwd", x, variables["w"]) + variables["b"]


def tile_apply(variables, x):
    """The 1x1 conv plus a term of the position inside the input, so that where a tile lies matters."""
    _, h, w, _ = x.shape
    return conv_apply(variables, x) + _position(np, h, w)


def _position(xp, h, w):
    i = xp.arange(h, dtype=xp.float32)[:, None, None]
    j = xp.arange(w, dtype=xp.float32)[None, :, None]
    c = xp.arange(C, dtype=xp.float32)[None, None, :]
    return 2.0 * xp.cos(0.5 * (c + 1) * i + 0.3 * (c + 2) * j)


def np_conv(x):
    """float64 twin of conv_apply for one (h, w, 3) image."""
    return x @ WEIGHTS["w"].astype(np.float64) + WEIGHTS["b"].astype(np.float64)


def np_tile(x):
    """float64 twin of tile_apply for one (h, w, 3) image."""
    return np_conv(x) + _position(np, *x.shape[:2]).astype(np.float64)


def np_normalize(image):
    return (image.astype(np.float64) / 255.0 - MEAN) / STD


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_resize_align_corners(x, out_h, out_w):
    """Bilinear align_corners=True of (h, w, c) float64, one axis after the other, by the pixel formula."""
    for axis, n_out in ((0, out_h), (1, out_w)):
        n_in = x.shape[axis]
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        x = (1 - frac) * np.take(x, lo, axis) + frac * np.take(x, hi, axis)
    return x


def np_whole_resize(x, m):
    """V2's 'original' mode: resize to int(n/m + 0.5)*m, the network, logits resized back."""
    h, w, _ = x.shape
    logits = np_conv(np_resize_align_corners(x, int(h / m + 0.5) * m, int(w / m + 0.5) * m))
    return np_resize_align_corners(logits, h, w)


def v2_starts(n, g):
    """V2's window starts along an axis of length n: 0, then min(prev + s, n - g) until n - g."""
    s = int(2 * g / 3)
    starts = [0]
    while starts[-1] != n - g:
        starts.append(min(starts[-1] + s, n - g))
    return starts


def np_sliding_shifted(x, g):
    """V2's 'sliding_window' mode: g x g windows at v2_starts, softmax probabilities summed."""
    h, w, _ = x.shape
    total = np.zeros((h, w, C))
    for y in v2_starts(h, g):
        for xx in v2_starts(w, g):
            total[y : y + g, xx : xx + g] += np_softmax(np_tile(x[y : y + g, xx : xx + g]))
    return total


def np_confusion(labels, preds):
    keep = labels != 255
    return np.bincount(labels[keep].astype(int) * C + preds[keep], minlength=C * C).reshape(C, C)


def base_config(**eval_fields):
    """The base config with `eval_fields` set in config.eval (replacing a field of another type)."""
    from configs import common

    config = common.get_base_config()
    for key, value in eval_fields.items():
        if key in config.eval:
            del config.eval[key]
        config.eval[key] = value
    return config


def find_eqns(jaxpr, name):
    """Equations called `name` in a jaxpr and in the jaxprs nested in it (jit, einsum)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += find_eqns(sub, name)
    return found


def make_dataset(shapes, seed):
    """Examples with labels in [0, C - 1) (class C - 1 is absent) and 20 % ignored pixels."""
    rng = np.random.default_rng(seed)
    data = []
    for k, (h, w) in enumerate(shapes):
        label = rng.integers(0, C - 1, size=(h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.2] = 255
        data.append({"id": f"img{k}", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label})
    return data


# --- records and registry -----------------------------------------------------------------------


def test_records_of_the_v2_protocols():
    resize, shifted = get_protocol("whole_resize"), get_protocol("sliding_shifted")
    assert resize.tiling == "none" and resize.resizes_to_multiple and not resize.needs_window
    assert resize.covers_image and resize.stride(798) is None
    assert shifted.tiling == "shifted" and shifted.tile_softmax and not shifted.average_overlaps
    assert shifted.stride(798) == 532 and shifted.stride(800) == 533  # floor(2g/3)
    assert shifted.refuses_small and not shifted.pads_to_window and shifted.covers_image
    assert [get_protocol(n).pads_to_window for n in ("sliding_u2pl", "sliding_cpcl")] == [True, True]
    assert not any(get_protocol(n).refuses_small for n in protocols.PROTOCOLS if n != "sliding_shifted")
    with pytest.raises(ValueError, match="pads_to_window needs tiling 'shifted'"):
        protocols.Protocol("bad", tiling="sliding", stride_rounding="floor", pads_to_window=True)
    with pytest.raises(ValueError, match="resizes_to_multiple cannot be combined"):
        protocols.Protocol("bad", tiling="shifted", stride_rounding="floor", resizes_to_multiple=True)
    with pytest.raises(ValueError, match="resizes_to_multiple cannot be combined"):
        protocols.Protocol("bad", crops_center=True, resizes_to_multiple=True)


# --- whole_resize -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m, want", [(500, 14, 504), (375, 14, 378), (333, 14, 336), (517, 14, 518),
                                        (7, 14, 14), (20, 14, 14), (21, 14, 28), (518, 14, 518), (35, 14, 42),
                                        (19, 7, 21), (17, 7, 14), (1, 1, 1)])
def test_resized_shape_rounds_half_up(n, m, want):
    assert protocols.resized_shape(n, n, m) == (want, want)


def test_resized_shape_refuses_a_side_that_rounds_to_zero():
    with pytest.raises(ValueError, match="6x30 rounds to 0x28 at multiples of 14"):
        protocols.resized_shape(6, 30, 14)
    evaluator = Evaluator(conv_apply, num_classes=C, protocol="whole_resize", batch_size=8)
    with pytest.raises(ValueError, match="example img1: an image of 6x9 rounds to 0x14.*'whole_resize'"):
        evaluator.evaluate(WEIGHTS, make_dataset([(14, 14), (6, 9)], seed=1))
    with pytest.raises(ValueError, match="image 0: an image of 6x9"):
        list(evaluator.predict(WEIGHTS, [np.zeros((6, 9, 3), np.uint8)]))


@pytest.mark.parametrize("shape, resized", [((375, 500), (378, 504)), ((333, 517), (336, 518))])
def test_whole_resize_matches_torch_there_and_back(shape, resized):
    """Against F.interpolate(align_corners=True) there and back around the same conv, in float64: < 1e-5 and
    the same argmax. PyTorch's float32 kernel rounds its source coordinates to float32 (up to ~3e-5 pixel at
    500 pixels), which on noise images moves its logits by up to 5e-4, so it is compared at 1e-3."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(shape[0])
    x = np_normalize(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).astype(np.float32)
    seen = []

    def recorded(variables, images):
        seen.append(images.shape)
        return conv_apply(variables, images)

    evaluator = Evaluator(recorded, num_classes=C, protocol="whole_resize", batch_size=8)
    got = np.asarray(jax.jit(evaluator.scores)(WEIGHTS, x[None]))[0]
    assert seen == [(1, *resized, 3)] and got.shape == shape + (C,) and got.dtype == np.float32

    def torch_protocol(dtype):
        t = torch.from_numpy(x).permute(2, 0, 1)[None].to(dtype)
        t = functional.interpolate(t, size=resized, mode="bilinear", align_corners=True)
        kernel = torch.from_numpy(WEIGHTS["w"].T.copy())[:, :, None, None].to(dtype)
        logits = functional.conv2d(t, kernel, torch.from_numpy(WEIGHTS["b"]).to(dtype))
        return functional.interpolate(logits, size=shape, mode="bilinear", align_corners=True)[0].permute(1, 2, 0)

    want = torch_protocol(torch.float64).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, torch_protocol(torch.float32).numpy(), rtol=0, atol=1e-3)


def test_whole_resize_keeps_its_resizes_at_full_precision():
    """Under a lower default precision (TF32 on a GPU) both resizes still run at HIGHEST."""
    evaluator = Evaluator(lambda v, x: x * v, num_classes=3, protocol="whole_resize", batch_size=8)
    with jax.default_matmul_precision("default"):
        jaxpr = jax.make_jaxpr(evaluator.scores)(jnp.float32(2.0), jnp.zeros((1, 20, 30, 3), jnp.float32))
    dots = find_eqns(jaxpr.jaxpr, "dot_general")
    assert len(dots) == 4  # two axes, there and back
    assert all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


def test_whole_resize_evaluate_equals_numpy_and_counts_absent_classes():
    """Shape buckets key by the original size (20 x 30 and 19 x 31 both run at 21 x 28 with m = 7, as two
    programs); the mIoU is the mean over all C classes, the absent class C - 1 counting 0."""
    data = make_dataset([(20, 30), (19, 31), (20, 30), (9, 41)], seed=2)
    want = sum(np_confusion(d["label"], np_whole_resize(np_normalize(d["image"]), 7).argmax(-1)) for d in data)
    evaluator = Evaluator(conv_apply, num_classes=C, protocol="whole_resize", batch_size=8, resize_multiple=7)
    res = evaluator.evaluate(WEIGHTS, data, num_samples=4)
    np.testing.assert_array_equal(res["confusion"], want)
    assert res["protocol"] == {"name": "whole_resize", "window": None, "stride": None, "resize_multiple": 7,
                               "num_images": 4}
    assert res["batching"]["programs"] == 3 and res["batching"]["batches"] == 3
    inter = np.diag(want)
    iou = inter / (want.sum(0) + want.sum(1) - inter + 1e-10)
    assert iou[C - 1] == 0 and res["iou"][C - 1] == 0
    assert res["miou"] == pytest.approx(iou.sum() / C, rel=1e-12)
    for (_, pred, _), d in zip(res["samples"], data):
        np.testing.assert_array_equal(pred, np_whole_resize(np_normalize(d["image"]), 7).argmax(-1))
    for pred, d in zip(evaluator.predict(WEIGHTS, (d["image"] for d in data)), data):
        np.testing.assert_array_equal(pred, np_whole_resize(np_normalize(d["image"]), 7).argmax(-1))


def test_whole_resize_multiple_from_the_config_and_refusals():
    config = base_config()
    method = types.SimpleNamespace(predict_fns=lambda: {"model": conv_apply})
    info = types.SimpleNamespace(num_classes=C, class_names=None)
    evaluation = loop.parse_evaluation("model:whole_resize", "whole")
    if "resize_multiple" in config.eval:
        del config.eval["resize_multiple"]
    assert loop.make_evaluator(config, info, None, method, evaluation, 8).protocol_info["resize_multiple"] == 14
    config = base_config(resize_multiple=28)
    assert loop.make_evaluator(config, info, None, method, evaluation, 8).protocol_info["resize_multiple"] == 28
    whole = loop.make_evaluator(config, info, None, method, loop.parse_evaluation("model", "whole"), 8)
    assert "resize_multiple" not in whole.protocol_info  # the other protocols ignore it
    for bad in (0, -14, 14.0, True):
        with pytest.raises(ValueError, match="'whole_resize' needs resize_multiple"):
            Evaluator(conv_apply, num_classes=C, protocol="whole_resize", resize_multiple=bad)
    with pytest.raises(ValueError, match="pad_to_multiple applies to protocol 'whole' only, not 'whole_resize'"):
        Evaluator(conv_apply, num_classes=C, protocol="whole_resize", pad_to_multiple=32)


# --- sliding_shifted ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape, g, rows, cols", [
    ((1024, 2048), 798, [0, 226], [0, 532, 1064, 1250]),
    ((798, 798), 798, [0], [0]),
    ((800, 1600), 798, [0, 2], [0, 532, 802]),
    ((13, 8), 6, [0, 4, 7], [0, 2]),
])
def test_sliding_shifted_tiles_follow_v2s_loop(shape, g, rows, cols):
    assert (v2_starts(shape[0], g), v2_starts(shape[1], g)) == (rows, cols)
    tiles = protocols.shifted_tiles(*shape, g, get_protocol("sliding_shifted").stride(g))
    assert tiles == [(y, y + g, x, x + g) for y in rows for x in cols]


def test_sliding_shifted_starts_equal_v2s_loop_on_many_sizes():
    stride = get_protocol("sliding_shifted").stride
    for g in (6, 7, 14, 798):
        for n in range(g, 3 * g + 5):
            starts = sorted({t[0] for t in protocols.shifted_tiles(n, g, g, stride(g))})
            assert starts == v2_starts(n, g), (n, g)


def test_sliding_shifted_runs_one_call_of_eight_unpadded_windows_at_cityscapes_size():
    seen = []

    def shape_fake(variables, x):  # only shapes are traced
        seen.append(x.shape)
        return jnp.zeros(x.shape[:3] + (19,), jnp.float32)

    evaluator = Evaluator(shape_fake, num_classes=19, protocol="sliding_shifted", crop_size=798, batch_size=8)
    out = jax.eval_shape(lambda x: evaluator.scores(None, x), jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32))
    assert out.shape == (1, 1024, 2048, 19) and seen == [(8, 798, 798, 3)]
    assert evaluator.protocol_info == {"name": "sliding_shifted", "window": 798, "stride": 532}


@pytest.mark.parametrize("shape", [(13, 8), (6, 6), (10, 17)])
def test_sliding_shifted_scores_match_numpy(shape):
    x = np_normalize(make_dataset([shape], seed=3)[0]["image"])
    evaluator = Evaluator(tile_apply, num_classes=C, protocol="sliding_shifted", crop_size=6, batch_size=8)
    got = np.asarray(jax.jit(evaluator.scores)(WEIGHTS, x[None].astype(np.float32)))[0]
    np.testing.assert_allclose(got, np_sliding_shifted(x, 6), rtol=1e-5, atol=1e-5)


def test_sliding_shifted_evaluate_equals_numpy():
    data = make_dataset([(8, 13), (6, 6), (8, 13), (10, 7)], seed=4)
    want = sum(np_confusion(d["label"], np_sliding_shifted(np_normalize(d["image"]), 6).argmax(-1)) for d in data)
    evaluator = Evaluator(tile_apply, num_classes=C, protocol="sliding_shifted", crop_size=6, batch_size=8)
    res = evaluator.evaluate(WEIGHTS, data)
    np.testing.assert_array_equal(res["confusion"], want)
    assert res["protocol"] == {"name": "sliding_shifted", "window": 6, "stride": 4, "num_images": 4}
    for pred, d in zip(evaluator.predict(WEIGHTS, (d["image"] for d in data)), data):
        np.testing.assert_array_equal(pred, np_sliding_shifted(np_normalize(d["image"]), 6).argmax(-1))


def test_sliding_shifted_refuses_an_image_smaller_than_the_window():
    evaluator = Evaluator(tile_apply, num_classes=C, protocol="sliding_shifted", crop_size=6, batch_size=8)
    with pytest.raises(ValueError, match="example img1: 5x9 is smaller than the 6x6 window of protocol "
                                         "'sliding_shifted', which does not pad"):
        evaluator.evaluate(WEIGHTS, make_dataset([(6, 6), (5, 9)], seed=5))
    with pytest.raises(ValueError, match="image 1: 9x5 is smaller than the 6x6 window"):
        list(evaluator.predict(WEIGHTS, [np.zeros((6, 6, 3), np.uint8), np.zeros((9, 5, 3), np.uint8)]))
    with pytest.raises(ValueError, match="at least 6x6"):  # called directly, the tiling refuses it too
        jax.eval_shape(lambda x: evaluator.scores(WEIGHTS, x), jax.ShapeDtypeStruct((1, 5, 9, 3), jnp.float32))


# --- config checks ------------------------------------------------------------------------------


def test_config_checks_accept_the_v2_protocols_and_check_resize_multiple():
    spec = "teacher,student:whole_resize,model@test:sliding_shifted"
    config_checks.check(base_config(protocol="sliding_shifted", evaluations=spec, resize_multiple=14))
    config_checks.check(base_config(protocol="whole_resize", resize_multiple=1))
    for bad in (0, -14, 14.5, True, "14"):
        config = base_config(resize_multiple=bad)
        with pytest.raises(ValueError, match=rf"^config.eval.resize_multiple={bad!r}: must be an int > 0"):
            config_checks.check(config)
