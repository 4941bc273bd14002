"""csl_jax.data pipelines on the synthetic dataset: shapes, determinism, workers, resume, sharding,
stream specs and the view/geometry registries (checked against a direct computation of the seeding rule)."""
import io
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from csl_jax import data
from csl_jax.data import pipeline, sources, transforms, views
from data_prep import synthetic

NORM_BLACK = transforms.normalize(np.zeros(3, np.uint8))
SEMI_LABELED = data.StreamSpec("labeled", "labeled", epoch_of="unlabeled")
SUP_LABELED = data.StreamSpec("labeled", "labeled")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.prepare(tmp_path_factory.mktemp("syn"), num_train=24, num_val=4,
                             image_size=(40, 56), seed=0)


def _cfg(root, **kw):
    return ml_collections.ConfigDict({"name": "synthetic", "root": str(root), "split": "1_4",
                                      "crop_size": 48, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _labeled(cfg, seed, global_batch, spec=SEMI_LABELED, **kw):
    return data.stream_iterator(cfg, spec, name="labeled", seed=seed, global_batch=global_batch, **kw)


def _unlabeled(cfg, seed, global_batch, views, name="unlabeled", **kw):
    spec = data.StreamSpec("unlabeled", "unlabeled", views=views)
    return data.stream_iterator(cfg, spec, name=name, seed=seed, global_batch=global_batch, **kw)


@pytest.fixture
def registries():
    """Restores the view and geometry registries after a test that registers."""
    saved_views, saved_geometries = dict(views.VIEWS), dict(transforms.GEOMETRIES)
    yield
    views.VIEWS.clear()
    views.VIEWS.update(saved_views)
    transforms.GEOMETRIES.clear()
    transforms.GEOMETRIES.update(saved_geometries)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_info_epochs_and_batch_structure(root):
    cfg = _cfg(root)
    assert data.dataset_info(cfg) == data.DatasetInfo("synthetic", 5, synthetic.CLASS_NAMES, 255)
    assert data.epoch_length(cfg, SEMI_LABELED, 4) == 18 // 4  # |U| = 24 - 24 // 4
    assert data.epoch_length(cfg, data.StreamSpec("unlabeled", "unlabeled"), 4) == 18 // 4
    assert data.epoch_length(cfg, SUP_LABELED, 4) == 6 // 4
    (lab,) = _take(_labeled(cfg, seed=0, global_batch=4), 1)
    assert lab["image"].shape == (4, 48, 48, 3) and lab["image"].dtype == np.float32
    assert lab["label"].shape == (4, 48, 48) and lab["label"].dtype == np.int32
    assert set(np.unique(lab["label"])) <= set(range(5)) | {255}
    (u,) = _take(_unlabeled(cfg, seed=0, global_batch=4, views=("strong", "strong2", "tmp")), 1)
    shapes = {k: (v.shape, v.dtype) for k, v in u.items()}
    img, mask = ((4, 48, 48, 3), np.float32), ((4, 48, 48), np.bool_)
    assert shapes == {"weak": img, "strong": img, "strong2": img, "tmp": img, "ignore": ((4, 48, 48), np.int32),
                      "label": ((4, 48, 48), np.int32), "cutmix_box": mask, "cutmix_box2": mask,
                      "block_mask": mask}


def test_padding_is_ignore_and_black_in_every_view(root):
    cfg = _cfg(root, crop_size=128)  # images <= 56 px, rescaled <= 112 px: always padded
    (u,) = _take(_unlabeled(cfg, seed=1, global_batch=4, views=("strong", "tmp")), 1)
    pad = u["ignore"] == 255
    assert pad.any() and (~pad).any() and set(np.unique(u["ignore"])) == {0, 255}
    assert (u["label"][pad] == 255).all() and (u["label"][~pad] != 255).mean() > 0.9
    for view in ("weak", "strong", "tmp"):
        np.testing.assert_allclose(u[view][pad], np.broadcast_to(NORM_BLACK, u[view][pad].shape), atol=1e-6)
    (lab,) = _take(_labeled(cfg, seed=1, global_batch=4), 1)
    lpad = (lab["image"] == NORM_BLACK).all(-1)
    assert (lab["label"][lpad] == 255).all() and lpad.any()


def test_views_share_geometry_and_are_independent_of_other_views(root):
    cfg = _cfg(root)
    (a,) = _take(_unlabeled(cfg, seed=2, global_batch=4, views=("strong",)), 1)
    (b,) = _take(_unlabeled(cfg, seed=2, global_batch=4, views=("tmp", "strong")), 1)
    for k in ("weak", "ignore", "label", "strong", "cutmix_box"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Strong views keep the weak view's geometry: gradients of the grayscale images correlate.
    w = a["weak"].mean(-1)
    s = a["strong"].mean(-1)
    for i in range(4):
        gx_w, gx_s = np.diff(w[i], axis=1).ravel(), np.diff(s[i], axis=1).ravel()
        assert np.corrcoef(gx_w, gx_s)[0, 1] > 0.3


def test_streams_and_seeds_differ(root):
    cfg = _cfg(root)
    main = _take(_unlabeled(cfg, seed=3, global_batch=4, views=()), 1)[0]["weak"]
    mix = _take(_unlabeled(cfg, seed=3, global_batch=4, views=(), name="mix"), 1)[0]["weak"]
    other = _take(_unlabeled(cfg, seed=4, global_batch=4, views=()), 1)[0]["weak"]
    assert not np.array_equal(main, mix) and not np.array_equal(main, other)


def test_deterministic_across_workers_and_processes(root):
    cfg = _cfg(root)
    views = ("strong", "tmp")
    ref = _take(_unlabeled(cfg, seed=5, global_batch=4, views=views), 3)
    _assert_same(ref, _take(_unlabeled(cfg, seed=5, global_batch=4, views=views), 3))
    mp = _unlabeled(_cfg(root, num_workers=2), seed=5, global_batch=4, views=views)
    _assert_same(ref, _take(mp, 3))
    halves = [_take(_unlabeled(cfg, seed=5, global_batch=4, views=views, process_index=p, process_count=2), 3)
              for p in range(2)]
    merged = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
    _assert_same(ref, merged)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_iterator_state(root, workers):
    cfg = _cfg(root, num_workers=workers)
    it = _labeled(cfg, seed=6, global_batch=4)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = _labeled(cfg, seed=6, global_batch=4)
    fresh.set_state(state)
    _assert_same(expected, _take(fresh, 3))


SAMPLED = data.StreamSpec("labeled", "labeled", epoch_of="unlabeled", repeat="sample")


def test_epoch_orders():
    rng = np.random.default_rng(0)
    base = pipeline._epoch_base(n_source=4, n_unlabeled=10, spec=SEMI_LABELED, rng=rng)
    np.testing.assert_array_equal(base, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # 'tile': 3 repeats, the first 10
    np.testing.assert_array_equal(pipeline._epoch_base(4, 10, SUP_LABELED, rng), [0, 1, 2, 3])
    order = pipeline._EpochOrder(np.arange(7), seed=0, stream=1)
    epochs = [[order(e * 7 + p) for p in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2]
    again = pipeline._EpochOrder(np.arange(7), seed=0, stream=1)  # pure function of the index
    assert [again(p) for p in range(13, 6, -1)] == epochs[1][::-1]


def test_sampled_repeat_rule():
    """repeat='sample' (U2PL `random.sample(list * ceil(|U|/|L|), |U|)`): |U| of the k |L| entries
    without replacement, a pure function of the generator; `tile` is the same list cut at |U|."""
    n, u = 7, 30  # k = ceil(30/7) = 5: 35 entries, 5 dropped
    bases = [pipeline._epoch_base(n, u, SAMPLED, np.random.default_rng([seed, 0, 3])) for seed in range(400)]
    for base in bases:
        counts = np.bincount(base, minlength=n)
        assert len(base) == u and counts.max() <= 5 and counts.sum() == u  # each item 5 times, 5 entries dropped
    np.testing.assert_array_equal(bases[1], pipeline._epoch_base(n, u, SAMPLED, np.random.default_rng([1, 0, 3])))
    assert len({b.tobytes() for b in bases}) == len(bases)  # the seeds draw different lists
    # Every entry is dropped with probability 5/35, so item i appears 5 * 30/35 = 30/7 times on average
    # (tile: items 0 and 1 five times, the rest four).
    np.testing.assert_allclose(np.mean([np.bincount(b, minlength=n) for b in bases], 0), 30 / 7, atol=0.1)
    # |L| > |U| (k = 1): a random subset of distinct items, where 'tile' always keeps the first |U|
    subsets = {tuple(sorted(pipeline._epoch_base(4, 3, SAMPLED, np.random.default_rng(seed)))) for seed in range(20)}
    assert all(len(set(s)) == 3 for s in subsets) and len(subsets) == 4
    with pytest.raises(ValueError, match="repeat='sample' needs epoch_of='unlabeled'"):
        data.StreamSpec("labeled", "labeled", repeat="sample")
    with pytest.raises(ValueError, match="StreamSpec.repeat='shuffle'; valid: tile, sample"):
        data.StreamSpec("labeled", "labeled", epoch_of="unlabeled", repeat="shuffle")


@pytest.fixture(scope="module")
def root_uneven(tmp_path_factory):
    """Split 1_4 with 5 labeled and 17 unlabeled images: 4 repeats of the labeled list are 20 entries."""
    return synthetic.prepare(tmp_path_factory.mktemp("syn22"), num_train=22, num_val=4, image_size=(40, 56), seed=0)


@pytest.mark.parametrize("spec", [SEMI_LABELED, SAMPLED], ids=["tile", "sample"])
def test_labeled_repeat_rules_in_the_stream(root_uneven, spec):
    """Two epochs of the labeled stream (6 batches of 4 > 17) against the seeding rule; every epoch
    permutes the same list (drawn once per seed with 'sample')."""
    cfg = _cfg(root_uneven)
    _assert_same(_reference(cfg, spec, 0, 3, 4, 6), _take(_labeled(cfg, seed=3, global_batch=4, spec=spec), 6))
    order = pipeline._EpochOrder(pipeline._epoch_base(5, 17, spec, np.random.default_rng([3, 0, 3])), seed=3, stream=0)
    epochs = [sorted(order(e * 17 + p) for p in range(17)) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]


FIXED = data.StreamSpec("labeled", "labeled", epoch_of="fixed")


def test_fixed_epoch_base_repeats_to_n_only_when_shorter():
    """epoch_of='fixed' (UniMatch V2 `dataset/semi.py:25-27`): N > |L| repeats the list ceil(N/|L|)
    times and keeps the first N, so each image appears ceil or floor(N/|L|) times (the first N mod |L|
    ceil times); N <= |L| (0 included) keeps the list as it is; no unlabeled images are needed."""
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(pipeline._epoch_base(4, 0, FIXED, rng, epoch_samples=10),
                                  [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    q, r = divmod(3000, 7)  # Pascal's 3000 samples from 7 images
    counts = np.bincount(pipeline._epoch_base(7, 0, FIXED, rng, epoch_samples=3000), minlength=7)
    np.testing.assert_array_equal(counts, [q + 1] * r + [q] * (7 - r))
    for n in (0, 3, 4):
        np.testing.assert_array_equal(pipeline._epoch_base(4, 0, FIXED, rng, epoch_samples=n), np.arange(4))
    sampled = data.StreamSpec("labeled", "labeled", epoch_of="fixed", repeat="sample")
    counts = np.bincount(pipeline._epoch_base(7, 0, sampled, rng, epoch_samples=3000), minlength=7)
    assert counts.sum() == 3000 and counts.max() <= q + 1


def test_fixed_epoch_length(root):
    """An epoch of a 'fixed' stream is floor(max(N, |L|) / B) batches (|L| = 6 here); other streams
    do not read data.epoch_samples."""
    cfg = _cfg(root, epoch_samples=10)
    assert data.epoch_length(cfg, FIXED, 4) == 10 // 4
    assert data.epoch_length(cfg, SUP_LABELED, 4) == 6 // 4
    assert data.epoch_length(cfg, SEMI_LABELED, 4) == 18 // 4
    assert data.epoch_length(_cfg(root, epoch_samples=3), FIXED, 4) == 6 // 4  # kept as it is
    assert data.epoch_length(_cfg(root), FIXED, 2) == data.epoch_length(_cfg(root), SUP_LABELED, 2) == 6 // 2
    with pytest.raises(ValueError, match=r"^config.data.epoch_samples=7 is fewer than global_batch=8$"):
        data.epoch_length(_cfg(root, epoch_samples=7), FIXED, 8)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_fixed_stream_follows_the_seeding_rule(root, process_index, process_count):
    """Three epochs and a bit (8 batches of 4, N = 10 from |L| = 6) against the rule, sharded; each
    epoch is a new permutation of the same repeated list (images 0-3 twice, 4 and 5 once)."""
    cfg = _cfg(root, epoch_samples=10)
    it = _labeled(cfg, seed=5, global_batch=4, spec=FIXED, process_index=process_index,
                  process_count=process_count)
    _assert_same(_reference(cfg, FIXED, 0, 5, 4, 8, process_index, process_count), _take(it, 8))
    order = pipeline._EpochOrder(pipeline._epoch_base(6, 18, FIXED, None, epoch_samples=10), seed=5, stream=0)
    epochs = [[order(e * 10 + p) for p in range(10)] for e in range(3)]
    assert all(np.bincount(e, minlength=6).tolist() == [2, 2, 2, 2, 1, 1] for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_fixed_stream_without_epoch_samples_is_the_own_stream(root):
    """N = 0: sample for sample the stream of epoch_of='own' (a supervised method may always use 'fixed')."""
    cfg = _cfg(root)
    _assert_same(_take(_labeled(cfg, seed=2, global_batch=4, spec=SUP_LABELED), 3),
                 _take(_labeled(cfg, seed=2, global_batch=4, spec=FIXED), 3))


def test_fixed_stream_resumes_exactly(root):
    cfg = _cfg(root, epoch_samples=10)
    it = _labeled(cfg, seed=6, global_batch=4, spec=FIXED)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)  # across the epoch boundary at sample 10
    fresh = _labeled(cfg, seed=6, global_batch=4, spec=FIXED)
    fresh.set_state(state)
    _assert_same(expected, _take(fresh, 3))


def test_runs_saved_before_epoch_samples_resume_with_its_later_default():
    from configs import demo
    from csl_jax import workdir

    saved, now = demo.get_config(), demo.get_config()
    del saved.data["epoch_samples"]
    assert workdir.resume_differences(saved, now) == []
    now.data.epoch_samples = 3000
    assert workdir.resume_differences(saved, now) == ["config.data.epoch_samples: saved (absent: 0), now 3000"]


def test_eval_dataset_is_original_and_exact(root):
    ev = data.eval_dataset(_cfg(root))
    assert len(ev) == 4
    item = ev[2]
    rng = np.random.default_rng([0, 1, 2])  # synthetic val image 2, regenerated independently
    h, w = (int(v) for v in rng.integers(40, 57, 2))
    image, label = synthetic.render(rng, h, w)
    assert item["id"] == "val_00002"
    np.testing.assert_array_equal(item["image"], image)
    np.testing.assert_array_equal(item["label"], label)


def test_config_errors_name_the_valid_choices(root):
    with pytest.raises(ValueError, match="valid: pascal, cityscapes, camvid, coco, ade20k, synthetic, custom"):
        data.dataset_info(_cfg(root, name="voc"))
    with pytest.raises(ValueError, match=r"^unknown synthetic split '1_3'; valid: 1_2, 1_4, 1_8$"):
        _labeled(_cfg(root, split="1_3"), seed=0, global_batch=4)
    with pytest.raises(ValueError, match="valid: strong, strong2, tmp"):
        _unlabeled(_cfg(root), seed=0, global_batch=4, views=("cutmix",))
    with pytest.raises(ValueError, match="multiple of process_count"):
        _labeled(_cfg(root), seed=0, global_batch=3, process_count=2)
    with pytest.raises(FileNotFoundError, match="python -m data_prep camvid"):
        data.dataset_info(_cfg(root, name="camvid"))
    with pytest.raises(ValueError, match="unknown split '1_5' for family 'pascal'; valid: .*1_16"):
        data.epoch_length(_cfg(root, name="pascal", split="1_5"), SEMI_LABELED, 8)


def test_synthetic_data_is_generated_by_process_0_only(tmp_path, monkeypatch):
    params = dict(num_train=8, num_val=2, image_size=(24, 24), seed=3)
    cfg = _cfg(tmp_path / "syn", synthetic=params)
    barriers = []

    # Another process of two: it waits for process 0 and never writes; a root it cannot see is an error.
    def no_generation(*args, **kwargs):
        raise AssertionError("only process 0 generates the synthetic set")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "prepare", no_generation)
        with pytest.raises(FileNotFoundError, match=r"^process 1: no synthetic data at .* config.data.root must be "
                                                    r"a directory every process sees"):
            data.ensure_prepared(cfg, process_index=1, process_count=2, barrier=barriers.append)
    assert barriers == ["csl_jax: synthetic data prepared"] and not (tmp_path / "syn").exists()

    # Process 0 generates (the config's parameters), then waits for the others.
    data.ensure_prepared(cfg, process_index=0, process_count=2, barrier=barriers.append)
    assert len(barriers) == 2
    assert data.dataset_info(cfg).num_classes == 5 and len(data.eval_dataset(cfg)) == 2
    # Process 1 now finds it; a single process needs no barrier; a second call keeps the data.
    with monkeypatch.context() as m:
        m.setattr(synthetic, "prepare", no_generation)
        data.ensure_prepared(cfg, process_index=1, process_count=2, barrier=barriers.append)
    data.ensure_prepared(cfg, process_index=0, process_count=1, barrier=barriers.append)
    assert len(barriers) == 3
    with pytest.raises(ValueError, match="holds a synthetic dataset with parameters"):
        data.ensure_prepared(_cfg(tmp_path / "syn", synthetic=dict(params, seed=4)), process_index=0, process_count=1)
    # Prepared datasets are left to `python -m data_prep`.
    data.ensure_prepared(_cfg(tmp_path / "none", name="camvid"), process_index=0, process_count=1)
    assert not (tmp_path / "none").exists()


def test_run_records_do_not_generate_data(tmp_path):
    from configs import demo
    from csl_jax import run_info

    config = demo.get_config()
    config.data.root = str(tmp_path / "data")
    run_info.prepare(config, str(tmp_path / "run"), "train")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "run_train.json"]
    assert not (tmp_path / "data").exists()  # the data is csl_jax.data.ensure_prepared's


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_custom_dataset_from_list_files(tmp_path):
    rng = np.random.default_rng(7)
    for i in range(4):
        _write_png(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (30, 40, 3), np.uint8))
        _write_png(tmp_path / "mask" / f"{i}.png", rng.integers(0, 3, (30, 40), np.uint8))
    (tmp_path / "l.txt").write_text("img/0.png mask/0.png\nimg/1.png mask/1.png\n")
    (tmp_path / "u.txt").write_text("img/2.png\nimg/3.png\n")
    (tmp_path / "v.txt").write_text("img/3.png mask/3.png")
    cfg = ml_collections.ConfigDict({"name": "custom", "root": str(tmp_path), "crop_size": 32,
                                     "num_classes": 3, "labeled_list": str(tmp_path / "l.txt"),
                                     "unlabeled_list": str(tmp_path / "u.txt"),
                                     "val_list": str(tmp_path / "v.txt")})
    assert data.dataset_info(cfg).class_names == ("class_0", "class_1", "class_2")
    (lab,) = _take(_labeled(cfg, seed=0, global_batch=2), 1)
    assert set(np.unique(lab["label"])) <= {0, 1, 2, 255}
    (u,) = _take(_unlabeled(cfg, seed=0, global_batch=2, views=("strong",)), 1)
    assert (u["label"] == 255).all()  # no masks for unlabeled images
    item = data.eval_dataset(cfg)[0]
    with Image.open(io.BytesIO((tmp_path / "mask" / "3.png").read_bytes())) as m:
        np.testing.assert_array_equal(item["label"], np.asarray(m))
    _write_png(tmp_path / "mask" / "0.png", np.full((30, 40), 9, np.uint8))
    with pytest.raises(ValueError, match=r"mask of img/0.png: values \[9\]"):
        _take(_labeled(cfg, seed=0, global_batch=2, spec=SUP_LABELED), 1)


def test_tmp_view_branches():
    """One coin per sample: branch (a) with p = tmp_prob has a block mask (G = 2 here), branch (b)
    an all-False mask; P(all False) = (1 - p) + p * 0.3**4."""
    options = {"tmp_prob": 0.5, "cover_ratio": 0.7, "block_size": 32, "block_size_reference_crop": 0}
    assert views.VIEWS["tmp"].options == options  # the defaults
    weak = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    valid = np.ones((64, 64), bool)
    empty = [not views.tmp(weak, valid, np.random.default_rng([9, i]), 64, options)["block_mask"].any()
             for i in range(400)]
    p_empty = 0.5 + 0.5 * 0.3**4
    assert abs(np.mean(empty) - p_empty) < 4 * np.sqrt(p_empty * (1 - p_empty) / 400)


@pytest.mark.parametrize("crop", [64, 129, 321, 513])
def test_tmp_block_scales_with_the_crop(crop):
    """block_size_reference_crop=321: 32 px at 321 becomes 32 * crop / 321 px, a 10 x 10 grid at every
    crop (each block 1/100 of the crop); 0 keeps 32 px (a round(crop / 32) grid)."""
    scaled = {"tmp_prob": 1.0, "cover_ratio": 0.5, "block_size": 32, "block_size_reference_crop": 321}
    assert views.tmp_block_size(crop, scaled) == pytest.approx(32 * crop / 321)
    assert views.tmp_block_size(crop, dict(scaled, block_size_reference_crop=0)) == 32
    weak = np.zeros((crop, crop, 3), np.uint8)
    mask = views.tmp(weak, np.ones((crop, crop), bool), np.random.default_rng(3), crop, scaled)["block_mask"]
    cell = np.floor((np.arange(crop) + 0.5) * 10 / crop).astype(int)  # pixel -> cell of a 10 x 10 grid
    cells = np.zeros((10, 10), int)
    np.add.at(cells, (cell[:, None], cell[None, :]), 1)
    assert (cells > 0).all()
    for i, j in [(0, 0), (crop - 1, crop - 1), (crop // 2, 3)]:  # constant over each grid cell
        assert (mask[cell == cell[i]][:, cell == cell[j]] == mask[i, j]).all()
    with pytest.raises(ValueError, match="block_size_reference_crop"):
        views.tmp_block_size(crop, dict(scaled, block_size_reference_crop=-1))


# ------------------------------------------------------------------ streams against the seeding rule
def _reference(cfg, spec, stream, seed, global_batch, num_batches, process_index=0, process_count=1,
               geometry=transforms.sample_geometry):
    """Batches computed directly from the documented rule (not through the pipeline): epoch e of the
    stream's list (when epoch_of='unlabeled': repeated k = ceil(n/|list|) times with n = |U|, then its
    first n entries, or with repeat='sample' those at the first n positions of the permutation of
    (seed, stream, 3); the same with n = max(data.epoch_samples, |list|) when epoch_of='fixed') is
    permuted by (seed, stream, 1, e); sample i's geometry is drawn from (seed, stream, 2, i, 0) and
    view v's from (seed, stream, 2, i, id_v)."""
    labeled, unlabeled = sources.train_sources(cfg)
    records = labeled if spec.source == "labeled" else unlabeled
    base = np.arange(len(records))
    if spec.epoch_of != "own":
        n = len(unlabeled) if spec.epoch_of == "unlabeled" else max(cfg.get("epoch_samples", 0), len(records))
        base = np.resize(base, -(-n // len(records)) * len(records))
        keep = np.random.default_rng([seed, stream, 3]).permutation(len(base)) if spec.repeat == "sample" else \
            np.arange(len(base))
        base = base[keep[:n]]
    crop, b = cfg.crop_size, global_batch // process_count
    batches = []
    for k in range(num_batches):
        samples = []
        for i in range(k * global_batch + process_index * b, k * global_batch + (process_index + 1) * b):
            epoch, pos = divmod(i, len(base))
            perm = np.random.default_rng([seed, stream, 1, epoch]).permutation(len(base))
            image, label = sources.decode(records[base[perm[pos]]], 5)
            g = geometry(np.random.default_rng([seed, stream, 2, i, 0]), image.height, image.width, crop)
            weak, label, valid = transforms.apply_geometry(image, label, g, crop)
            if spec.source == "labeled":
                out = {"image": transforms.normalize(weak), "label": label.astype(np.int32)}
            else:
                out = {"weak": transforms.normalize(weak), "label": label.astype(np.int32),
                       "ignore": np.where(valid, 0, 255).astype(np.int32)}

            def black_pad(x):
                return transforms.normalize(np.where(valid[..., None], x, 0).astype(np.uint8))

            for view, view_id in (("strong", 1), ("strong2", 2), ("tmp", 3)):
                if view not in spec.views:
                    continue
                rng = np.random.default_rng([seed, stream, 2, i, view_id])
                suffix = view[len("strong"):]
                if view != "tmp":
                    out[view] = black_pad(transforms.strong_photometric(weak, rng))
                    out["cutmix_box" + suffix] = transforms.cutmix_box(rng, crop, cfg.cutmix_prob)
                elif rng.random() < cfg.tmp_prob:
                    out["tmp"] = black_pad(transforms.mild_photometric(weak, rng))
                    out["block_mask"] = transforms.block_mask(rng, crop, cfg.block_size, cfg.cover_ratio)
                else:
                    out["tmp"] = black_pad(transforms.strong_photometric(weak, rng))
                    out["block_mask"] = np.zeros((crop, crop), bool)
            samples.append(out)
        batches.append({key: np.stack([s[key] for s in samples]) for key in samples[0]})
    return batches


ALL_VIEWS = data.StreamSpec("unlabeled", "unlabeled", views=("strong", "strong2", "tmp"))


@pytest.mark.parametrize("name,spec,stream", [
    ("labeled", SEMI_LABELED, 0), ("labeled", SUP_LABELED, 0), ("unlabeled", ALL_VIEWS, 1), ("mix", ALL_VIEWS, 2),
    ("css_flip", ALL_VIEWS, zlib.crc32(b"css_flip") + 3),
    ("labeled", data.StreamSpec("labeled", "labeled", views=("strong",), epoch_of="unlabeled"), 0)])
@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_streams_follow_the_seeding_rule(root, name, spec, stream, process_index, process_count):
    """The labeled, unlabeled and mix streams are today's (ids 0, 1, 2) sample for sample, across epochs,
    views and process shards; non-default view options are read from the config."""
    cfg = _cfg(root, cutmix_prob=0.7, tmp_prob=0.3, cover_ratio=0.6, block_size=16)
    it = data.stream_iterator(cfg, spec, name=name, seed=7, global_batch=4, process_index=process_index,
                              process_count=process_count)
    _assert_same(_reference(cfg, spec, stream, 7, 4, 6, process_index, process_count), _take(it, 6))


def test_labeled_stream_with_a_strong_view(root):
    cfg = _cfg(root, crop_size=128)  # always padded
    spec = data.StreamSpec("labeled", "labeled", views=("strong",), epoch_of="unlabeled")
    (lab,) = _take(data.stream_iterator(cfg, spec, name="labeled", seed=1, global_batch=4), 1)
    assert sorted(lab) == ["cutmix_box", "image", "label", "strong"]
    (plain,) = _take(_labeled(cfg, seed=1, global_batch=4), 1)
    _assert_same([plain], [{k: lab[k] for k in ("image", "label")}])  # the view changes no base array
    pad = (lab["image"] == NORM_BLACK).all(-1)
    assert pad.any() and (lab["label"][pad] == 255).all()
    np.testing.assert_allclose(lab["strong"][pad], np.broadcast_to(NORM_BLACK, lab["strong"][pad].shape), atol=1e-6)


def _probe(weak, valid, rng, crop, options):
    """A test view that draws many numbers first: 'probe' (crop, crop) float32."""
    rng.random(1000)
    return {"probe": (options["probe_scale"] * rng.random((crop, crop))).astype(np.float32)}


def test_a_registered_view_changes_no_other_view(root, registries):
    data.register_view("probe", 9, _probe, {"probe_scale": 2.0})
    cfg = _cfg(root, probe_scale=3.0)
    (a,) = _take(_unlabeled(cfg, seed=2, global_batch=4, views=("strong", "tmp")), 1)
    (b,) = _take(_unlabeled(cfg, seed=2, global_batch=4, views=("probe", "strong", "tmp")), 1)
    _assert_same([a], [{k: b[k] for k in a}])
    rng = np.random.default_rng([2, 1, 2, 3, 9])  # sample 3 of stream 'unlabeled' (1), view id 9
    rng.random(1000)
    np.testing.assert_array_equal(b["probe"][3], (3.0 * rng.random((48, 48))).astype(np.float32))


def test_a_registered_geometry_is_used(root, registries):
    def top_left_flipped(rng, height, width, crop):
        return transforms.Geometry(height, width, 0, 0, True)

    data.register_geometry("top_left_flipped", top_left_flipped)
    spec = data.StreamSpec("unlabeled", "unlabeled", views=("strong",), geometry="top_left_flipped")
    expected = _reference(_cfg(root, cutmix_prob=0.5), spec, 1, 3, 4, 2, geometry=top_left_flipped)
    it = data.stream_iterator(_cfg(root), spec, name="unlabeled", seed=3, global_batch=4)  # default cutmix_prob
    _assert_same(expected, _take(it, 2))


def test_custom_stream_names_get_distinct_stable_ids(root, monkeypatch):
    assert [data.stream_id(n) for n in ("labeled", "unlabeled", "mix")] == [0, 1, 2]
    assert data.stream_id("css_flip") == data.stream_id("css_flip") == zlib.crc32(b"css_flip") + 3
    assert data.stream_id("css_warp") not in (0, 1, 2, data.stream_id("css_flip"))
    (a,) = _take(_unlabeled(_cfg(root), seed=3, global_batch=4, views=()), 1)
    (b,) = _take(_unlabeled(_cfg(root), seed=3, global_batch=4, views=(), name="css_flip"), 1)
    assert not np.array_equal(a["weak"], b["weak"])
    monkeypatch.setattr(pipeline, "_STREAM_NAMES", dict(pipeline._STREAM_NAMES))
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    data.stream_id("plumless")
    with pytest.raises(ValueError, match=r"^stream names 'plumless' and 'buckeroo' have the same id \d+"):
        data.stream_id("buckeroo")


def test_registry_and_spec_errors_name_the_valid_choices(root, registries):
    # the built-in registries only (methods imported elsewhere in this process register their own)
    for name in set(views.VIEWS) - {"strong", "strong2", "tmp"}:
        del views.VIEWS[name]
    for name in set(transforms.GEOMETRIES) - {"unimatch"}:
        del transforms.GEOMETRIES[name]
    with pytest.raises(ValueError, match=r"^view 'strong' is already registered \(id 1\); registered: strong, "
                                         r"strong2, tmp$"):
        data.register_view("strong", 7, _probe)
    with pytest.raises(ValueError, match=r"^view 'flip': id 3 is taken by view 'tmp'; ids in use: strong=1, "
                                         r"strong2=2, tmp=3$"):
        data.register_view("flip", 3, _probe)
    with pytest.raises(ValueError, match=r"must be an integer >= 1 \(0 seeds the geometry\)"):
        data.register_view("flip", 0, _probe)
    assert sorted(data.VIEWS) == ["strong", "strong2", "tmp"]
    with pytest.raises(ValueError, match=r"^geometry 'unimatch' is already registered; registered: unimatch$"):
        data.register_geometry("unimatch", transforms.sample_geometry)
    with pytest.raises(ValueError, match=r"^StreamSpec.source='train'; valid: labeled, unlabeled$"):
        data.StreamSpec("train", "labeled")
    with pytest.raises(ValueError, match=r"^StreamSpec.batch='mix'; valid: labeled, unlabeled$"):
        data.StreamSpec("unlabeled", "mix")
    with pytest.raises(ValueError, match=r"^StreamSpec.epoch_of='labeled'; valid: own, unlabeled, fixed$"):
        data.StreamSpec("labeled", "labeled", epoch_of="labeled")
    with pytest.raises(ValueError, match="strong requested more than once"):
        data.StreamSpec("unlabeled", "unlabeled", views=("strong", "tmp", "strong"))
    with pytest.raises(ValueError, match=r"^StreamSpec.geometry='u2pl'; valid: unimatch$"):
        data.stream_iterator(_cfg(root), data.StreamSpec("unlabeled", "unlabeled", geometry="u2pl"), name="unlabeled",
                             seed=0, global_batch=4)
    data.register_view("reweak", 8, lambda weak, valid, rng, crop, options: {"weak": weak})
    with pytest.raises(ValueError, match=r"view 'reweak' returns \['weak'\], already in the sample"):
        next(_unlabeled(_cfg(root), seed=0, global_batch=4, views=("reweak",)))
    with pytest.raises(ValueError, match=r"^labeled set of split '1_4' has 6 images, fewer than global_batch=8$"):
        data.epoch_length(_cfg(root), SUP_LABELED, 8)
