"""Evaluation protocols (records and registry), confusion matrix and mIoU against NumPy float64 references;
folder prediction."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csl_jax import evaluation, parallel
from csl_jax.evaluation import folder, metrics, protocols
from csl_jax.evaluation.evaluator import Evaluator, spread_indices
from csl_jax.evaluation.protocols import Protocol, get_protocol

C = 4
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RNG = np.random.default_rng(0)
VARIABLES = {"A": RNG.normal(size=(3, C)).astype(np.float32)}


def fake_apply(variables, x):
    """Per-pixel logits depending on the pixel, its position in the tile and the tile size."""
    fake_apply.traces += 1
    _, h, w, _ = x.shape
    i = jnp.arange(h, dtype=jnp.float32)[:, None, None]
    j = jnp.arange(w, dtype=jnp.float32)[None, :, None]
    c = jnp.arange(C, dtype=jnp.float32)[None, None, :]
    pos = jnp.sin(0.7 * (c + 1) * i / h + 0.3 * j * (c + 2) / w + 0.1 * h - 0.05 * w)
    return x @ variables["A"] + 2.0 * pos


fake_apply.traces = 0


def np_apply(x):
    """float64 twin of fake_apply for one (h, w, 3) normalised image."""
    h, w, _ = x.shape
    i = np.arange(h, dtype=np.float64)[:, None, None]
    j = np.arange(w, dtype=np.float64)[None, :, None]
    c = np.arange(C, dtype=np.float64)[None, None, :]
    pos = np.sin(0.7 * (c + 1) * i / h + 0.3 * j * (c + 2) / w + 0.1 * h - 0.05 * w)
    return x @ VARIABLES["A"].astype(np.float64) + 2.0 * pos


def np_normalize(image):
    return (image.astype(np.float64) / 255.0 - MEAN) / STD


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_unimatch_sliding(x, g):
    """UniMatch: stride int(2g/3), starts < H, truncated tiles, summed softmax."""
    h, w, _ = x.shape
    s = int(2 * g / 3)
    total = np.zeros((h, w, C))
    for y in range(0, h, s):
        for xx in range(0, w, s):
            tile = x[y : min(y + g, h), xx : min(xx + g, w)]
            total[y : y + tile.shape[0], xx : xx + tile.shape[1]] += np_softmax(np_apply(tile))
    return total


def np_u2pl_sliding(x, g, average):
    """U2PL eval.py scale_crop_process, transcribed: centred zero pad, ceil stride, shifted windows."""
    h, w, _ = x.shape
    pad_h, pad_w = max(g - h, 0), max(g - w, 0)
    ph, pw = int(pad_h / 2), int(pad_w / 2)
    x = np.pad(x, ((ph, pad_h - ph), (pw, pad_w - pw), (0, 0)))
    nh, nw = x.shape[:2]
    stride = int(np.ceil(g * 2 / 3))
    grid_h = int(np.ceil(float(nh - g) / stride) + 1)
    grid_w = int(np.ceil(float(nw - g) / stride) + 1)
    pred, count = np.zeros((nh, nw, C)), np.zeros((nh, nw))
    for a in range(grid_h):
        for b in range(grid_w):
            e_h = min(a * stride + g, nh)
            e_w = min(b * stride + g, nw)
            s_h, s_w = e_h - g, e_w - g
            pred[s_h:e_h, s_w:e_w] += np_apply(x[s_h:e_h, s_w:e_w])
            count[s_h:e_h, s_w:e_w] += 1
    if average:
        pred /= count[..., None]
    return pred[ph : ph + h, pw : pw + w]


def np_confusion(labels, preds, c, ignore=255):
    conf = np.zeros((c, c), np.int64)
    for t, p in zip(labels.ravel(), preds.ravel()):
        if t != ignore:
            conf[t, p] += 1
    return conf


def make_dataset(shapes, seed=1):
    rng = np.random.default_rng(seed)
    data = []
    for k, (h, w) in enumerate(shapes):
        label = rng.integers(0, C, size=(h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.2] = 255
        data.append({"id": f"img{k}", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label})
    return data


# --- confusion matrix and metrics --------------------------------------------------------------


def test_confusion_matrix_matches_numpy_with_ignore():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, size=(3, 17, 11)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.3] = 255
    preds = rng.integers(0, 6, size=labels.shape).astype(np.int32)
    got = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, 6))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_confusion(labels, preds, 6))


def test_segmentation_metrics_vs_hand_computed_and_absent_class_warns(caplog):
    # class 2 never appears in ground truth nor prediction
    conf = np.array([[5, 1, 0, 2], [0, 3, 0, 1], [0, 0, 0, 0], [1, 0, 0, 4]], np.int64)
    with caplog.at_level(logging.WARNING):
        m = metrics.segmentation_metrics(conf, class_names=["a", "b", "c", "d"])
    iou = [5 / (8 + 6 - 5), 3 / (4 + 4 - 3), 0.0, 4 / (5 + 7 - 4)]
    np.testing.assert_allclose(m["iou"], iou, rtol=1e-9)
    assert m["miou"] == pytest.approx(np.mean(iou), rel=1e-9)
    assert m["pixel_acc"] == pytest.approx(12 / 17)
    assert m["mean_acc"] == pytest.approx(np.mean([5 / 8, 3 / 4, 4 / 5]))
    assert any("c" in r.getMessage() and "IoU" in r.getMessage() for r in caplog.records)


# --- window geometry -----------------------------------------------------------------------------


def test_cityscapes_801_gives_8_tiles_of_4_shapes():
    assert get_protocol("sliding").stride(801) == 534
    assert get_protocol("sliding_u2pl").stride(769) == 513
    assert get_protocol("sliding_cpcl").stride(800) == 534
    tiles = protocols.sliding_tiles(1024, 2048, 801, 534)
    assert len(tiles) == 8
    assert {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in tiles} == {(801, 801), (801, 446), (490, 801), (490, 446)}

    seen = []

    def shape_fake(variables, x):  # cheap: only shapes are traced
        seen.append(x.shape)
        return jnp.zeros(x.shape[:3] + (19,), jnp.float32)

    evaluator = Evaluator(shape_fake, num_classes=19, protocol="sliding", crop_size=801, batch_size=8)
    out = jax.eval_shape(lambda x: evaluator.scores(None, x), jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32))
    assert out.shape == (1, 1024, 2048, 19)
    assert sum(s[0] for s in seen) == 8  # 8 tiles, one apply per distinct shape
    assert sorted(s[1:3] for s in seen) == [(490, 446), (490, 801), (801, 446), (801, 801)]


def test_u2pl_tiles_at_cityscapes_size():
    tiles = protocols.shifted_tiles(1024, 2048, 769, 513)
    # rows: ceil(255/513)+1 = 2 -> starts 0, 255; cols: ceil(1279/513)+1 = 4 -> 0, 513, 1026, 1279
    assert [t[0] for t in tiles[::4]] == [0, 255]
    assert [t[2] for t in tiles[:4]] == [0, 513, 1026, 1279]
    assert all(t[1] - t[0] == 769 and t[3] - t[2] == 769 for t in tiles)


# --- protocol records and registry ----------------------------------------------------------------


def test_registry_names_and_unknown_name_lists_them():
    assert list(protocols.PROTOCOLS) == ["whole", "sliding", "sliding_u2pl", "sliding_cpcl", "center_crop",
                                         "whole_resize", "sliding_shifted"]
    assert evaluation.PROTOCOLS is protocols.PROTOCOLS and evaluation.get_protocol is get_protocol
    assert all(get_protocol(name).name == name for name in protocols.PROTOCOLS)
    valid = "whole, sliding, sliding_u2pl, sliding_cpcl, center_crop, whole_resize, sliding_shifted"
    with pytest.raises(ValueError, match=f"'slide' is not one of {valid}$"):
        get_protocol("slide")
    with pytest.raises(ValueError, match="'slide' is not one of whole, sliding"):
        Evaluator(fake_apply, num_classes=C, protocol="slide")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_protocol("whole").tiling = "sliding"


def test_record_fields():
    # tests/test_protocols_v2.py checks 'whole_resize' and 'sliding_shifted'
    records = whole, sliding, u2pl, cpcl, crop = [get_protocol(n) for n in protocols.PROTOCOLS][:5]
    assert [p.tiling for p in records] == ["none", "sliding", "shifted", "shifted", "none"]
    assert [p.stride(7) for p in records] == [None, 4, 5, 5, None]  # floor/ceil(14/3)
    assert not any(p.resizes_to_multiple for p in records)
    assert sliding.tile_softmax and not u2pl.tile_softmax and not cpcl.tile_softmax
    assert u2pl.average_overlaps and not cpcl.average_overlaps and not sliding.average_overlaps
    assert [p.needs_window for p in records] == [False, True, True, True, True]
    assert [p.covers_image for p in records] == [True, True, True, True, False]
    with pytest.raises(ValueError, match="stride_rounding"):
        Protocol("bad", tiling="sliding")
    with pytest.raises(ValueError, match="tiling 'grid'"):
        Protocol("bad", tiling="grid", stride_rounding="floor")
    with pytest.raises(ValueError, match="need a tiling"):
        Protocol("bad", average_overlaps=True)
    with pytest.raises(ValueError, match="crops_center"):
        Protocol("bad", tiling="shifted", stride_rounding="ceil", crops_center=True)


def test_sliding_vs_shifted_tiles_by_hand():
    # 5 x 7 image, window 4. Sliding: stride int(8/3) = 2, starts < n, truncated:
    # rows [0,4) [2,5) [4,5); columns [0,4) [2,6) [4,7) [6,7).
    tiles = protocols.sliding_tiles(5, 7, 4, 2)
    rows, cols = [(0, 4), (2, 5), (4, 5)], [(0, 4), (2, 6), (4, 7), (6, 7)]
    assert tiles == [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]
    # Shifted: stride ceil(8/3) = 3; rows ceil(1/3)+1 = 2 -> 0, min(3+4, 5)-4 = 1; columns ceil(3/3)+1 = 2 -> 0, 3.
    assert protocols.shifted_tiles(5, 7, 4, 3) == [(0, 4, 0, 4), (0, 4, 3, 7), (1, 5, 0, 4), (1, 5, 3, 7)]
    with pytest.raises(ValueError, match="at least 4x4"):
        protocols.shifted_tiles(3, 7, 4, 3)


def test_record_fields_drive_the_scores():
    """Constant logits make the scores the per-pixel tile count (logits summed), count / C (softmax
    summed) or 1 (averaged); a custom record that is in no registry is honoured field by field."""

    def ones(variables, x):
        return jnp.ones(x.shape[:3] + (C,), jnp.float32)

    def scores(protocol, h, w, g=4):
        evaluator = Evaluator(ones, num_classes=C, protocol=protocol, crop_size=g, batch_size=8)
        out = np.asarray(jax.jit(evaluator.scores)(None, jnp.zeros((1, h, w, 3), jnp.float32)))[0]
        np.testing.assert_array_equal(out, out[..., :1].repeat(C, -1))
        return out[..., 0]

    sliding_count = np.outer([1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 2, 2])  # tiles of the test above
    shifted_count = np.outer([1, 2, 2, 2, 1], [1, 1, 1, 2, 1, 1, 1])
    np.testing.assert_allclose(scores("sliding", 5, 7), sliding_count / C, rtol=1e-6)
    np.testing.assert_array_equal(scores("sliding_cpcl", 5, 7), shifted_count)
    np.testing.assert_array_equal(scores("sliding_u2pl", 5, 7), np.ones((5, 7)))
    # 3 x 7 is padded to 4 x 7 (0 rows above, 1 below): one row of windows, cropped back to 3 rows.
    np.testing.assert_array_equal(scores("sliding_cpcl", 3, 7), np.outer([1, 1, 1], [1, 1, 1, 2, 1, 1, 1]))
    averaged_logits = Protocol("sliding_mean", tiling="sliding", stride_rounding="floor", average_overlaps=True)
    np.testing.assert_array_equal(scores(averaged_logits, 5, 7), np.ones((5, 7)))
    summed_logits = Protocol("sliding_sum", tiling="sliding", stride_rounding="floor")
    np.testing.assert_array_equal(scores(summed_logits, 5, 7), sliding_count)
    shifted_softmax = Protocol("shifted_softmax", tiling="shifted", stride_rounding="ceil", tile_softmax=True)
    np.testing.assert_allclose(scores(shifted_softmax, 5, 7), shifted_count / C, rtol=1e-6)
    info = Evaluator(ones, num_classes=C, protocol=summed_logits, crop_size=4).protocol_info
    assert info == {"name": "sliding_sum", "window": 4, "stride": 2}


# --- sliding-window stitching vs NumPy -------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol,shape,g",
    [
        ("sliding", (13, 17), 7),  # stride 4: windows do not divide the image
        ("sliding", (5, 6), 7),  # image smaller than the window
        ("sliding_u2pl", (13, 17), 7),  # stride 5, shifted border windows
        ("sliding_u2pl", (5, 9), 7),  # padded in height only
        ("sliding_cpcl", (11, 4), 6),
    ],
)
def test_sliding_scores_match_numpy(protocol, shape, g):
    data = make_dataset([shape], seed=3)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol=protocol, crop_size=g, batch_size=8)
    x = np_normalize(data[0]["image"])
    got = np.asarray(jax.jit(evaluator.scores)(VARIABLES, x[None].astype(np.float32)))[0]
    if protocol == "sliding":
        want = np_unimatch_sliding(x, g)
    else:
        want = np_u2pl_sliding(x, g, average=protocol == "sliding_u2pl")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protocol", ["sliding", "sliding_u2pl"])
def test_sliding_evaluate_confusion_matches_numpy(protocol):
    g = 7
    data = make_dataset([(13, 17), (13, 17), (5, 6)], seed=4)
    want = np.zeros((C, C), np.int64)
    for d in data:
        x = np_normalize(d["image"])
        scores = np_unimatch_sliding(x, g) if protocol == "sliding" else np_u2pl_sliding(x, g, True)
        want += np_confusion(d["label"], scores.argmax(-1), C)
    res = Evaluator(fake_apply, num_classes=C, protocol=protocol, crop_size=g, batch_size=8).evaluate(VARIABLES, data)
    np.testing.assert_array_equal(res["confusion"], want)
    stride = 4 if protocol == "sliding" else 5
    assert res["protocol"] == {"name": protocol, "window": g, "stride": stride, "num_images": 3}


# --- whole image, batching and padding over 8 devices ---------------------------------------------


def test_whole_image_different_sizes_and_batch_padding():
    shapes = [(10, 12), (10, 12), (10, 12), (7, 9), (10, 12), (10, 12)]
    data = make_dataset(shapes, seed=5)
    want = np.zeros((C, C), np.int64)
    for d in data:
        want += np_confusion(d["label"], np_apply(np_normalize(d["image"])).argmax(-1), C)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="whole", batch_size=16)
    before = fake_apply.traces
    res = evaluator.evaluate(VARIABLES, data, num_samples=4)
    np.testing.assert_array_equal(res["confusion"], want)
    assert fake_apply.traces - before == 2  # one compile per distinct image shape
    assert res["num_images"] == 6
    # samples: (image, pred, label) of 4 images spread over the 6, in order
    assert res["sample_indices"] == [0, 2, 3, 5] and len(res["samples"]) == 4
    for (image, pred, label), d in zip(res["samples"], [data[i] for i in res["sample_indices"]]):
        np.testing.assert_array_equal(image, d["image"])
        np.testing.assert_array_equal(label, d["label"])
        np.testing.assert_array_equal(pred, np_apply(np_normalize(d["image"])).argmax(-1))
    want_metrics = metrics.segmentation_metrics(want)
    assert res["miou"] == pytest.approx(want_metrics["miou"])
    # a second call reuses the compiled programs; max_images truncates
    res2 = evaluator.evaluate(VARIABLES, data, max_images=3, num_samples=2)
    assert res2["sample_indices"] == [0, 2]  # spread over the evaluated images only
    assert fake_apply.traces - before == 2
    want3 = sum(np_confusion(d["label"], np_apply(np_normalize(d["image"])).argmax(-1), C) for d in data[:3])
    np.testing.assert_array_equal(res2["confusion"], want3)


# --- shape buckets: many sizes in any order (COCO, ADE20K) ----------------------------------------

# 21 images of 5 shapes, interleaved; (9, 31) appears once, (17, 23) fills one batch of 8 and one more
BUCKET_SHAPES = [(17, 23), (23, 17), (17, 23), (20, 20), (13, 29), (17, 23), (23, 17), (20, 20), (17, 23),
                 (9, 31), (23, 17), (17, 23), (13, 29), (17, 23), (23, 17), (17, 23), (20, 20), (23, 17),
                 (17, 23), (23, 17), (17, 23)]


def tiny_deeplab():
    """(apply_fn that counts its traces, random float32 variables) of a tiny DeepLabV3+ with C classes."""
    from benchmarks.model_forward import random_variables
    from configs import common
    from csl_jax.models import DeepLabV3Plus

    model = DeepLabV3Plus(C, **dict(common.TINY_MODEL, width=4, head_width=8, reduce_width=4))

    def apply_fn(variables, x):
        apply_fn.traces += 1
        return model.apply(variables, x, train=False)[0]

    apply_fn.traces = 0
    return apply_fn, random_variables(model, (1, 33, 33, 3))


def test_shape_buckets_match_each_image_alone_exactly():
    """Batch 8 on 8 devices, images grouped by shape across the stream: the same confusion matrix
    (integers), samples and predictions as each image alone at batch 1; one program per shape."""
    apply_fn, variables = tiny_deeplab()
    data = make_dataset(BUCKET_SHAPES, seed=9)
    alone = Evaluator(apply_fn, num_classes=C, batch_size=1, mesh=parallel.make_mesh(jax.devices()[:1]))
    want = alone.evaluate(variables, data)
    want_preds = list(alone.predict(variables, (d["image"] for d in data)))
    assert want["batching"]["batches"] == 21 and len(np.unique(np.concatenate([p.ravel() for p in want_preds]))) > 1

    evaluator = Evaluator(apply_fn, num_classes=C, batch_size=8)
    before = apply_fn.traces
    res = evaluator.evaluate(variables, data, num_samples=5)
    assert res["confusion"].dtype == np.int64
    np.testing.assert_array_equal(res["confusion"], want["confusion"])
    # (17, 23) x 9 -> 8 + 1, the four other shapes one batch each: 6 batches of 8 slots for 21 images
    assert res["batching"] == {"grouping": "shape_buckets", "batch_size": 8, "batches": 6,
                               "dummy_fraction": pytest.approx(1 - 21 / 48), "programs": 5, "compiled": 5}
    assert evaluator.num_programs == 5 and apply_fn.traces - before == 5  # no per-image compile
    assert res["sample_indices"] == [0, 5, 10, 15, 20]
    for index, (image, pred, label) in zip(res["sample_indices"], res["samples"]):
        np.testing.assert_array_equal(image, data[index]["image"])
        np.testing.assert_array_equal(label, data[index]["label"])
        np.testing.assert_array_equal(pred, want_preds[index])
    # predict: consecutive grouping, in input order, with the programs already compiled
    for pred, want_pred in zip(evaluator.predict(variables, (d["image"] for d in data)), want_preds, strict=True):
        np.testing.assert_array_equal(pred, want_pred)
    again = evaluator.evaluate(variables, data)
    assert again["batching"]["compiled"] == 0 and apply_fn.traces - before == 5
    np.testing.assert_array_equal(again["confusion"], want["confusion"])


def test_consecutive_grouping_runs_one_image_per_batch_here_with_the_same_result():
    data = make_dataset(BUCKET_SHAPES, seed=9)
    res = Evaluator(fake_apply, num_classes=C, batch_size=8, shape_buckets=False).evaluate(VARIABLES, data)
    assert res["batching"]["grouping"] == "consecutive" and res["batching"]["batches"] == 21  # no neighbours alike
    buckets = Evaluator(fake_apply, num_classes=C, batch_size=8).evaluate(VARIABLES, data)
    np.testing.assert_array_equal(res["confusion"], buckets["confusion"])


def test_buckets_run_the_fullest_group_when_the_memory_cap_is_reached():
    """Pending lists per shape; over the cap the fullest runs partial (of equals, the one started first);
    the rest at the end in the order their lists started."""
    shapes = [(2, 2), (3, 3), (2, 2), (4, 4), (3, 3), (3, 3), (5, 5), (2, 2), (2, 2), (2, 2)]
    examples = [(i, np.zeros(s + (3,), np.uint8), np.zeros(s, np.uint8)) for i, s in enumerate(shapes)]
    # bytes (image + label): (2, 2) 16, (3, 3) 36, (4, 4) 64, (5, 5) 100
    evaluator = Evaluator(fake_apply, num_classes=C, batch_size=8, max_pending_bytes=136)
    batches = [[e[0] for e in batch] for batch in evaluator._buckets(examples)]
    # image 4: 16x2 + 36x2 + 64 = 168 > 136 -> (2, 2) [0, 2] (first of the two fullest), 136 left;
    # image 5: 172 -> (3, 3) [1, 4, 5]; image 6: 64 + 100 -> (4, 4) [3] (first of equals);
    # image 9: 100 + 16x3 = 148 -> (2, 2) [7, 8, 9]; the end: (5, 5) [6]
    assert batches == [[0, 2], [1, 4, 5], [3], [7, 8, 9], [6]]
    assert [[e[0] for e in b] for b in evaluator._buckets(examples)] == batches  # deterministic


def test_host_confusion_accumulates_in_int64(monkeypatch):
    """Batches of 2^30 counts per cell (a COCO-scale set sums past 2^31) do not wrap around."""
    evaluator = Evaluator(fake_apply, num_classes=C, batch_size=8)
    monkeypatch.setattr(evaluator, "_step", lambda variables, images, labels: (
        np.full((C, C), 2**30, np.int32), np.zeros(images.shape[:3], np.int32)))
    res = evaluator.evaluate(VARIABLES, make_dataset([(4, 4), (5, 5), (6, 6)]))
    assert res["confusion"].dtype == np.int64 and (res["confusion"] == 3 * 2**30).all()


def test_iou_table_names_each_class_with_its_iou():
    conf = np.array([[5, 1, 0, 2], [0, 3, 0, 1], [0, 0, 0, 0], [1, 0, 0, 4]], np.int64)
    iou = metrics.segmentation_metrics(conf)["iou"]  # 5/9, 3/5, 0, 4/8
    names = ["background", "person", "traffic light", "a class name of 30 characters!"]
    table = metrics.iou_table(iou, names, columns=3)
    assert table.splitlines() == ["  background        55.6  person            60.0  traffic light      0.0",
                                  "  a class name of~  50.0"]
    many = metrics.iou_table(np.linspace(0, 1, 150), [f"class {i}" for i in range(150)])
    assert len(many.splitlines()) == 30 and max(len(line) for line in many.splitlines()) <= 120
    with pytest.raises(ValueError, match="3 class names for 4 IoU values"):
        metrics.iou_table(iou, names[:3])


def test_spread_indices_cover_the_set_evenly():
    assert spread_indices(100, 4) == [0, 33, 66, 99]  # not the first four (near-identical CamVid frames)
    assert spread_indices(6, 4) == [0, 2, 3, 5]
    assert spread_indices(3, 4) == [0, 1, 2]
    assert spread_indices(10, 1) == [0]
    assert spread_indices(10, 0) == spread_indices(0, 4) == []


def test_samples_of_an_iterator_are_its_first_images():
    data = make_dataset([(6, 5)] * 5, seed=3)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="whole", batch_size=8)
    res = evaluator.evaluate(VARIABLES, iter(data), num_samples=2)  # no len(): the spread is unknown
    assert res["sample_indices"] == [0, 1]
    np.testing.assert_array_equal(res["samples"][1][0], data[1]["image"])


def test_pad_to_multiple_compiles_once_and_crops_back():
    shapes = [(10, 12), (13, 9), (9, 11), (16, 16)]
    data = make_dataset(shapes, seed=7)
    fill = np.round(np.asarray(MEAN) * 255).astype(np.uint8)

    def padded_prediction(image):
        canvas = np.empty((16, 16, 3), np.uint8)
        canvas[...] = fill
        canvas[: image.shape[0], : image.shape[1]] = image
        return np_apply(np_normalize(canvas)).argmax(-1)[: image.shape[0], : image.shape[1]]

    want = sum(np_confusion(d["label"], padded_prediction(d["image"]), C) for d in data)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="whole", batch_size=8, pad_to_multiple=8)
    before = fake_apply.traces
    res = evaluator.evaluate(VARIABLES, data, num_samples=4)
    assert fake_apply.traces - before == 1  # every image pads to 16 x 16: one program
    np.testing.assert_array_equal(res["confusion"], want)
    assert res["protocol"]["pad_to_multiple"] == 8
    for (_, pred, label), d in zip(res["samples"], data):
        assert pred.shape == label.shape
        np.testing.assert_array_equal(pred, padded_prediction(d["image"]))
    for pred, d in zip(evaluator.predict(VARIABLES, (d["image"] for d in data)), data):
        np.testing.assert_array_equal(pred, padded_prediction(d["image"]))
    with pytest.raises(ValueError, match="pad_to_multiple applies to protocol 'whole' only"):
        Evaluator(fake_apply, num_classes=C, protocol="sliding", crop_size=4, pad_to_multiple=8)


def test_predict_yields_whole_image_predictions_in_order():
    data = make_dataset([(6, 5), (8, 3), (8, 3)], seed=6)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="sliding", crop_size=4, batch_size=8)
    preds = list(evaluator.predict(VARIABLES, (d["image"] for d in data)))
    for pred, d in zip(preds, data):
        np.testing.assert_array_equal(pred, np_unimatch_sliding(np_normalize(d["image"]), 4).argmax(-1))
    assert len(preds) == 3


# --- centre crop ---------------------------------------------------------------------------------


def test_center_crop_geometry():
    image = np.arange(9 * 13 * 3, dtype=np.uint8).reshape(9, 13, 3)
    label = (np.arange(9 * 13) % 7).astype(np.uint8).reshape(9, 13)
    img, lbl = protocols.center_crop(image, label, 6)
    np.testing.assert_array_equal(img, image[1:7, 3:9])  # start ((9-6)//2, (13-6)//2) = (1, 3)
    np.testing.assert_array_equal(lbl, label[1:7, 3:9])
    # 4 x 5 -> pad 2 rows (1 above, 1 below) and 1 column (0 left, 1 right)
    img, lbl = protocols.center_crop(image[:4, :5], label[:4, :5], 6, pad_label=0)
    np.testing.assert_array_equal(lbl[1:5, 0:5], label[:4, :5])
    np.testing.assert_array_equal(img[1:5, 0:5], image[:4, :5])
    assert (lbl[0] == 0).all() and (lbl[5] == 0).all() and (lbl[:, 5] == 0).all()
    np.testing.assert_array_equal(img[0, 0], [124, 116, 104])  # ImageNet mean x 255, rounded


def test_center_crop_evaluate():
    data = make_dataset([(9, 13), (4, 5)], seed=7)
    want = np.zeros((C, C), np.int64)
    for d in data:
        img, lbl = protocols.center_crop(d["image"], d["label"], 6)
        want += np_confusion(lbl, np_apply(np_normalize(img)).argmax(-1), C)
    evaluator = Evaluator(fake_apply, num_classes=C, protocol="center_crop", crop_size=6, batch_size=8)
    res = evaluator.evaluate(VARIABLES, data)
    np.testing.assert_array_equal(res["confusion"], want)
    assert res["protocol"]["window"] == 6 and res["protocol"]["stride"] is None


@pytest.mark.parametrize("pad_label", [255, 0])
def test_center_crop_pad_label_from_the_config(pad_label):
    """config.eval.center_crop_pad_label reaches the evaluator: with 0 the padding counts as class 0."""
    import types

    from configs import common
    from csl_jax.evaluation import loop

    config = common.get_base_config()
    config.data.crop_size = 6
    config.eval.center_crop_pad_label = pad_label
    method = types.SimpleNamespace(predict_fns=lambda: {"model": fake_apply})
    info = types.SimpleNamespace(num_classes=C, class_names=None)
    evaluation = loop.parse_evaluation("model:center_crop", "whole")
    evaluator = loop.make_evaluator(config, info, None, method, evaluation, batch_size=8)
    data = make_dataset([(4, 5), (9, 13)], seed=8)
    want = np.zeros((C, C), np.int64)
    for d in data:
        img, lbl = protocols.center_crop(d["image"], d["label"], 6, pad_label=pad_label)
        want += np_confusion(lbl, np_apply(np_normalize(img)).argmax(-1), C)
    got = evaluator.evaluate(VARIABLES, data)["confusion"]
    np.testing.assert_array_equal(got, want)
    labelled = (data[0]["label"] != 255).sum() + (data[1]["label"][1:7, 3:9] != 255).sum()
    assert got.sum() == labelled + (0 if pad_label == 255 else 36 - 4 * 5)  # + the 4x5 image's padding
    config.eval.center_crop_pad_label = 9
    with pytest.raises(ValueError, match="center_crop_pad_label"):
        loop.make_evaluator(config, info, None, method, evaluation, batch_size=8)


# --- user errors --------------------------------------------------------------------------------


def test_user_errors_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        Evaluator(fake_apply, num_classes=C, batch_size=3)
    with pytest.raises(ValueError, match="crop_size"):
        Evaluator(fake_apply, num_classes=C, protocol="sliding")
    with pytest.raises(ValueError, match="protocol"):
        Evaluator(fake_apply, num_classes=C, protocol="slide")
    data = make_dataset([(4, 4)])
    data[0]["label"][0, 0] = 7
    with pytest.raises(ValueError, match=r"img0.*\[7\]"):
        Evaluator(fake_apply, num_classes=C).evaluate(VARIABLES, data)
    assert get_protocol("sliding").stride(712) == 474


# --- folder prediction (csl_jax/evaluation/folder.py) -------------------------------------------


def test_predict_folder(tmp_path):
    from PIL import Image

    from csl_jax import visualize

    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    rng = np.random.default_rng(8)
    images = {"a": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)}
    Image.fromarray(images["a"]).save(in_dir / "a.png")
    Image.fromarray(images["b"]).save(in_dir / "b.BMP")
    (in_dir / "notes.txt").write_text("not an image")
    palette = visualize.voc_palette(C)
    written = folder.predict_folder(fake_apply, VARIABLES, str(in_dir), str(out_dir), palette=palette, num_classes=C)
    assert written == [str(out_dir / "a_mask.png"), str(out_dir / "b_mask.png")]
    for name, image in images.items():
        want = np_apply(np_normalize(image)).argmax(-1)
        mask = np.asarray(Image.open(out_dir / f"{name}_mask.png"))
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, want)
        np.testing.assert_array_equal(np.asarray(Image.open(out_dir / f"{name}_color.png")), palette[want])
        overlay = np.asarray(Image.open(out_dir / f"{name}_overlay.png"))
        np.testing.assert_array_equal(overlay, np.round(0.5 * image + 0.5 * palette[want]).astype(np.uint8))

    (in_dir / "c.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"c\.jpg"):
        folder.predict_folder(fake_apply, VARIABLES, str(in_dir), str(out_dir), palette=palette, num_classes=C)
    with pytest.raises(FileNotFoundError, match="missing"):
        folder.predict_folder(fake_apply, VARIABLES, str(tmp_path / "missing"), str(out_dir), palette=palette,
                               num_classes=C)
    with pytest.raises(ValueError, match="center_crop"):
        folder.predict_folder(fake_apply, VARIABLES, str(in_dir), str(out_dir), palette=palette, num_classes=C,
                               protocol="center_crop", crop_size=4)


def test_folder_prediction_refuses_protocols_that_do_not_cover_the_image(tmp_path):
    from PIL import Image

    from csl_jax import visualize

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    kwargs = dict(palette=visualize.voc_palette(C), num_classes=C, crop_size=4)
    args = (fake_apply, VARIABLES, str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="protocol 'center_crop' predicts only the centre; use 'whole' or a sliding"):
        folder.predict_folder(*args, protocol="center_crop", **kwargs)
    # the record field decides, not the name
    with pytest.raises(ValueError, match="protocol 'my_crop' predicts only the centre"):
        folder.predict_folder(*args, protocol=Protocol("my_crop", crops_center=True), **kwargs)
    assert not (tmp_path / "out" / "a_mask.png").exists()
    assert folder.predict_folder(*args, protocol=get_protocol("sliding_cpcl"), **kwargs) == [
        str(tmp_path / "out" / "a_mask.png")
    ]
