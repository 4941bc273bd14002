"""csl_jax.data pipelines on the synthetic dataset: shapes, determinism, workers, resume, sharding."""
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from csl_jax import data
from csl_jax.data import pipeline, transforms
from data_prep import synthetic

NORM_BLACK = transforms.normalize(np.zeros(3, np.uint8))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.prepare(tmp_path_factory.mktemp("syn"), num_train=24, num_val=4,
                             image_size=(40, 56), seed=0)


def _cfg(root, **kw):
    return ml_collections.ConfigDict({"name": "synthetic", "root": str(root), "split": "1_4",
                                      "crop_size": 48, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_info_epochs_and_batch_structure(root):
    cfg = _cfg(root)
    assert data.dataset_info(cfg) == data.DatasetInfo("synthetic", 5, synthetic.CLASS_NAMES, 255)
    assert data.iterations_per_epoch(cfg, 4, semi=True) == 18 // 4  # |U| = 24 - 24 // 4
    assert data.iterations_per_epoch(cfg, 4, semi=False) == 6 // 4
    (lab,) = _take(data.labeled_iterator(cfg, seed=0, global_batch=4), 1)
    assert lab["image"].shape == (4, 48, 48, 3) and lab["image"].dtype == np.float32
    assert lab["label"].shape == (4, 48, 48) and lab["label"].dtype == np.int32
    assert set(np.unique(lab["label"])) <= set(range(5)) | {255}
    (u,) = _take(data.unlabeled_iterator(cfg, seed=0, global_batch=4, views=("strong", "strong2", "tmp")), 1)
    shapes = {k: (v.shape, v.dtype) for k, v in u.items()}
    img, mask = ((4, 48, 48, 3), np.float32), ((4, 48, 48), np.bool_)
    assert shapes == {"weak": img, "strong": img, "strong2": img, "tmp": img, "ignore": ((4, 48, 48), np.int32),
                      "label": ((4, 48, 48), np.int32), "cutmix_box": mask, "cutmix_box2": mask,
                      "block_mask": mask}


def test_padding_is_ignore_and_black_in_every_view(root):
    cfg = _cfg(root, crop_size=128)  # images <= 56 px, rescaled <= 112 px: always padded
    (u,) = _take(data.unlabeled_iterator(cfg, seed=1, global_batch=4, views=("strong", "tmp")), 1)
    pad = u["ignore"] == 255
    assert pad.any() and (~pad).any() and set(np.unique(u["ignore"])) == {0, 255}
    assert (u["label"][pad] == 255).all() and (u["label"][~pad] != 255).mean() > 0.9
    for view in ("weak", "strong", "tmp"):
        np.testing.assert_allclose(u[view][pad], np.broadcast_to(NORM_BLACK, u[view][pad].shape), atol=1e-6)
    (lab,) = _take(data.labeled_iterator(cfg, seed=1, global_batch=4), 1)
    lpad = (lab["image"] == NORM_BLACK).all(-1)
    assert (lab["label"][lpad] == 255).all() and lpad.any()


def test_views_share_geometry_and_are_independent_of_other_views(root):
    cfg = _cfg(root)
    (a,) = _take(data.unlabeled_iterator(cfg, seed=2, global_batch=4, views=("strong",)), 1)
    (b,) = _take(data.unlabeled_iterator(cfg, seed=2, global_batch=4, views=("tmp", "strong")), 1)
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
    main = _take(data.unlabeled_iterator(cfg, seed=3, global_batch=4, views=()), 1)[0]["weak"]
    mix = _take(data.unlabeled_iterator(cfg, seed=3, global_batch=4, views=(), stream="mix"), 1)[0]["weak"]
    other = _take(data.unlabeled_iterator(cfg, seed=4, global_batch=4, views=()), 1)[0]["weak"]
    assert not np.array_equal(main, mix) and not np.array_equal(main, other)


def test_deterministic_across_workers_and_processes(root):
    cfg = _cfg(root)
    views = ("strong", "tmp")
    ref = _take(data.unlabeled_iterator(cfg, seed=5, global_batch=4, views=views), 3)
    _assert_same(ref, _take(data.unlabeled_iterator(cfg, seed=5, global_batch=4, views=views), 3))
    mp = data.unlabeled_iterator(_cfg(root, num_workers=2), seed=5, global_batch=4, views=views)
    _assert_same(ref, _take(mp, 3))
    halves = [_take(data.unlabeled_iterator(cfg, seed=5, global_batch=4, views=views, process_index=p,
                                            process_count=2), 3) for p in range(2)]
    merged = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
    _assert_same(ref, merged)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_iterator_state(root, workers):
    cfg = _cfg(root, num_workers=workers)
    it = data.labeled_iterator(cfg, seed=6, global_batch=4)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.labeled_iterator(cfg, seed=6, global_batch=4)
    fresh.set_state(state)
    _assert_same(expected, _take(fresh, 3))


def test_epoch_orders():
    base = pipeline._labeled_base(n_labeled=4, n_unlabeled=10, semi=True)
    np.testing.assert_array_equal(np.bincount(base), [3, 3, 2, 2])  # ceil(10/4) = 3 repeats, truncated
    assert len(pipeline._labeled_base(4, 10, semi=False)) == 4
    order = pipeline._EpochOrder(np.arange(7), seed=0, stream=1)
    epochs = [[order(e * 7 + p) for p in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2]
    again = pipeline._EpochOrder(np.arange(7), seed=0, stream=1)  # pure function of the index
    assert [again(p) for p in range(13, 6, -1)] == epochs[1][::-1]


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
    with pytest.raises(ValueError, match="valid: pascal, cityscapes, camvid, synthetic, custom"):
        data.dataset_info(_cfg(root, name="voc"))
    with pytest.raises(ValueError, match=r"^unknown synthetic split '1_3'; valid: 1_2, 1_4, 1_8$"):
        data.labeled_iterator(_cfg(root, split="1_3"), seed=0, global_batch=4)
    with pytest.raises(ValueError, match="valid: strong, strong2, tmp"):
        data.unlabeled_iterator(_cfg(root), seed=0, global_batch=4, views=("cutmix",))
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.labeled_iterator(_cfg(root), seed=0, global_batch=3, process_count=2)
    with pytest.raises(FileNotFoundError, match="python -m data_prep camvid"):
        data.dataset_info(_cfg(root, name="camvid"))
    with pytest.raises(ValueError, match="unknown split '1_5' for family 'pascal'; valid: .*1_16"):
        data.iterations_per_epoch(_cfg(root, name="pascal", split="1_5"), 8, semi=True)


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
    (lab,) = _take(data.labeled_iterator(cfg, seed=0, global_batch=2), 1)
    assert set(np.unique(lab["label"])) <= {0, 1, 2, 255}
    (u,) = _take(data.unlabeled_iterator(cfg, seed=0, global_batch=2, views=("strong",)), 1)
    assert (u["label"] == 255).all()  # no masks for unlabeled images
    item = data.eval_dataset(cfg)[0]
    with Image.open(io.BytesIO((tmp_path / "mask" / "3.png").read_bytes())) as m:
        np.testing.assert_array_equal(item["label"], np.asarray(m))
    _write_png(tmp_path / "mask" / "0.png", np.full((30, 40), 9, np.uint8))
    with pytest.raises(ValueError, match=r"mask of img/0.png: values \[9\]"):
        _take(data.labeled_iterator(cfg, seed=0, global_batch=2, semi=False), 1)


def test_tmp_view_branches():
    """One coin per sample: branch (a) with p = tmp_prob has a block mask (G = 2 here), branch (b)
    an all-False mask; P(all False) = (1 - p) + p * 0.3**4."""
    sample = pipeline._Sample(None, None, num_classes=5, crop=64, seed=0, stream=1, local_batch=1,
                              global_batch=1, process_index=0,
                              options={"tmp_prob": 0.5, "cover_ratio": 0.7, "block_size": 32})
    weak = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    valid = np.ones((64, 64), bool)
    empty = [not sample._view("tmp", weak, valid, np.random.default_rng([9, i]))["block_mask"].any()
             for i in range(400)]
    p_empty = 0.5 + 0.5 * 0.3**4
    assert abs(np.mean(empty) - p_empty) < 4 * np.sqrt(p_empty * (1 - p_empty) / 400)
