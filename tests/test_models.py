"""DeepLabV3+ / ResNet / layers: sizes, parameter counts, numerics against NumPy references."""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csl_jax.models import layers
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from csl_jax.models import MODELS, DeepLabV3Plus, ResNet, build_model, register_model
from csl_jax.models.layers import BatchNorm, Dropout2d, resize_align_corners
from csl_jax.models.resnet import block_schedule

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
    from jax.experimental.shard_map import shard_map

TINY = dict(width=8, blocks=(1, 1, 2, 3), head_width=16, reduce_width=8)
KEY = jax.random.PRNGKey(0)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size=64):
    return jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, size, size, 3)), train=False))


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("depth,classes,total,backbone,stats", [
    (101, 21, 59_468_085, 42_623_936, 109_920),
    (101, 19, 59_467_571, 42_623_936, 109_920),
    (50, 21, 40_475_957, 23_631_808, 57_696),
])
def test_parameter_counts_match_unimatch(depth, classes, total, backbone, stats):
    v = _abstract_init(DeepLabV3Plus(classes, depth=depth))
    assert _count(v["params"]) == total
    assert _count(v["params"]["backbone"]) == backbone
    assert _count(v["batch_stats"]) == stats
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))


def test_dilation_schedule_matches_models_md():
    r101 = (3, 4, 23, 3)
    os16 = block_schedule(r101, 16)
    assert os16[2] == ((2, 1),) + ((1, 1),) * 22
    assert os16[3] == ((1, 1), (1, 2), (1, 2))
    os8 = block_schedule(r101, 8)
    assert os8[1] == ((2, 1),) + ((1, 1),) * 3
    assert os8[2] == ((1, 1),) + ((1, 2),) * 22
    assert os8[3] == ((1, 2), (1, 4), (1, 4))
    assert block_schedule(r101, 8, multi_grid=True)[3] == ((1, 4), (1, 8), (1, 16))
    assert block_schedule(r101, 16)[0] == ((1, 1),) * 3
    with pytest.raises(ValueError, match="output_stride"):
        block_schedule(r101, 32)


# (input h, w) -> (c1 floor, c1 ceil, c4 OS8 floor, OS8 ceil, OS16 floor, OS16 ceil): models.md §1.
FEATURE_SIZES = {
    (321, 321): (81, 81, 41, 41, 21, 21),
    (513, 513): (129, 129, 65, 65, 33, 33),
    (801, 801): (201, 201, 101, 101, 51, 51),
    (512, 512): (128, 129, 64, 65, 32, 33),
    (712, 712): (178, 179, 89, 90, 45, 45),
    (800, 800): (200, 201, 100, 101, 50, 51),
}


@pytest.mark.parametrize("hw", sorted(FEATURE_SIZES))
@pytest.mark.parametrize("stem", ["deep", "torchvision"])
def test_feature_sizes_match_table(hw, stem):
    c1f, c1c, c4_8f, c4_8c, c4_16f, c4_16c = FEATURE_SIZES[hw]
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    for ceil, c1, c4_8, c4_16 in [(False, c1f, c4_8f, c4_16f), (True, c1c, c4_8c, c4_16c)]:
        for os_, c4 in [(8, c4_8), (16, c4_16)]:
            net = ResNet(stem=stem, output_stride=os_, maxpool_ceil=ceil, width=8, blocks=(1, 1, 1, 1))
            (out1, out3, out4), _ = jax.eval_shape(
                lambda x: net.init_with_output(KEY, x, train=False), x)
            assert out1.shape == (1, c1, c1, 32), (os_, ceil)
            assert out4.shape == (1, c4, c4, 256), (os_, ceil)
            assert out3.shape == (1, c4, c4, 128)  # layer3 is at the output stride too


def test_cityscapes_frame_sizes_and_logits_shape():
    x = jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32)
    for ceil, c1_hw, c4_hw in [(False, (256, 512), (128, 256)), (True, (257, 513), (129, 257))]:
        net = ResNet(output_stride=8, maxpool_ceil=ceil, width=8, blocks=(1, 1, 1, 1))
        (c1, _, c4), _ = jax.eval_shape(lambda x: net.init_with_output(KEY, x, train=False), x)
        assert c1.shape[1:3] == c1_hw and c4.shape[1:3] == c4_hw
    model = DeepLabV3Plus(19, output_stride=8, maxpool_ceil=True, **TINY)
    (logits, out), _ = jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)
    assert logits.shape == (1, 1024, 2048, 19) and logits.dtype == jnp.float32 and out == {}


# ----------------------------------------------------------------------------- resize
def _resize_reference(x, out_h, out_w):
    """Per-pixel bilinear align_corners=True in float64 (direct gather, no matrices)."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (9, 13)), ((6, 4), (11, 10)), ((9, 13), (4, 5)),
                                          ((7, 6), (1, 1)), ((1, 1), (3, 4)), ((8, 8), (8, 3))])
def test_resize_align_corners_matches_reference(in_hw, out_hw):
    x = np.random.default_rng(0).standard_normal((2, *in_hw, 3))
    got = resize_align_corners(jnp.asarray(x, jnp.float32), out_hw)
    assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _resize_reference(x, *out_hw), atol=1e-5)
    got16 = resize_align_corners(jnp.asarray(x, jnp.bfloat16), out_hw)
    assert got16.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- BatchNorm
def _bn_reference(x, scale, bias, mean0, var0):
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    mean, var = x.mean(0), x.var(0)
    n = x.shape[0]
    y = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    return y, 0.9 * mean0 + 0.1 * mean, 0.9 * var0 + 0.1 * var * n / (n - 1)


def _random_bn_variables(c, seed=1):
    r = np.random.default_rng(seed)
    return {"params": {"scale": r.uniform(0.5, 1.5, c).astype(np.float32),
                       "bias": r.normal(size=c).astype(np.float32)},
            "batch_stats": {"mean": r.normal(size=c).astype(np.float32),
                            "var": r.uniform(0.5, 1.5, c).astype(np.float32)}}


def test_batchnorm_train_matches_pytorch_semantics():
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 5, 3, 6)).astype(np.float32)
    v = _random_bn_variables(6)
    y, upd = BatchNorm().apply(v, x, use_running_average=False, mutable=["batch_stats"])
    ref_y, ref_mean, ref_var = _bn_reference(x, v["params"]["scale"], v["params"]["bias"],
                                            v["batch_stats"]["mean"], v["batch_stats"]["var"])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), ref_y, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref_mean, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-6)
    # eval mode uses the running statistics
    y_eval = BatchNorm().apply(v, x, use_running_average=True)
    s = v["params"]["scale"] / np.sqrt(v["batch_stats"]["var"] + 1e-5)
    np.testing.assert_allclose(y_eval, (x - v["batch_stats"]["mean"]) * s + v["params"]["bias"],
                               atol=1e-5)


def test_batchnorm_bf16_keeps_float32_statistics():
    x = np.random.default_rng(0).normal(100.0, 1.0, (2, 8, 8, 4)).astype(np.float32)
    v = _random_bn_variables(4)
    y, upd = BatchNorm().apply(v, jnp.asarray(x, jnp.bfloat16), use_running_average=False,
                               mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["var"].dtype == jnp.float32
    # x is rounded to bf16 (spacing 0.5 near 100), the statistics of those values are exact-ish
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    _, ref_mean, ref_var = _bn_reference(xb, 1.0, 0.0, v["batch_stats"]["mean"], v["batch_stats"]["var"])
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref_mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-4)


def test_batchnorm_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm().init(KEY, jnp.ones((1, 1, 1, 3)), use_running_average=False)


@layers.kernels("reference")  # the two-pass BN's rounding; the fused BN's: tests/test_batchnorm.py, tests/test_semi.py
def test_sync_batchnorm_over_8_devices_equals_full_batch():
    assert jax.device_count() >= 8
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = np.random.default_rng(0).normal(1.0, 3.0, (16, 3, 2, 5)).astype(np.float32)
    v = _random_bn_variables(5)

    @functools.partial(shard_map, mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=(P("data"), P()))
    def sharded(v, x):
        return BatchNorm(axis_name="data").apply(v, x, use_running_average=False,
                                                 mutable=["batch_stats"])

    y, upd = jax.jit(sharded)(v, x)
    y1, upd1 = BatchNorm().apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y1, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), upd, upd1)
    _, ref_mean, ref_var = _bn_reference(x, 1.0, 0.0, v["batch_stats"]["mean"], v["batch_stats"]["var"])
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-6)  # n = 16*3*2


# ----------------------------------------------------------------------------- Dropout2d
def test_dropout2d_masks_depend_only_on_sample_ids():
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (8, 3, 3, 64)), jnp.float32)
    ids = jnp.arange(100, 108, dtype=jnp.int32)
    drop = Dropout2d(0.5)
    rngs = {"dropout": jax.random.PRNGKey(7)}
    apply = jax.jit(lambda x, ids: drop.apply({}, x, False, ids, rngs=rngs))
    full = apply(x, ids)
    halves = [apply(x[s], ids[s]) for s in (slice(0, 3), slice(3, 8))]
    np.testing.assert_array_equal(full, jnp.concatenate(halves))
    ratio = np.asarray(full / x)
    assert set(np.unique(ratio)) <= {0.0, 2.0}
    assert (ratio == ratio[:, :1, :1, :]).all()  # whole channels
    assert 0.3 < (ratio == 0).mean() < 0.7
    # different samples get different masks; deterministic mode is the identity
    assert not np.array_equal(ratio[0], ratio[1])
    np.testing.assert_array_equal(drop.apply({}, x, True, ids), x)


def test_dropout2d_under_shard_map_equals_single_device():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = jnp.ones((16, 2, 2, 32))
    ids = jnp.arange(16, dtype=jnp.int32)
    key = jax.random.PRNGKey(3)

    @functools.partial(shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    def sharded(x, ids):
        return Dropout2d(0.5).apply({}, x, False, ids, rngs={"dropout": key})

    np.testing.assert_array_equal(jax.jit(sharded)(x, ids),
                                  Dropout2d(0.5).apply({}, x, False, ids, rngs={"dropout": key}))


# ----------------------------------------------------------------------------- model passes
def _random_variables(model, x, seed=0):
    """Random float32 variables from NumPy (model.init's ~60 RNG calls take 20-40 s of XLA:CPU
    compile, which the tests do not need)."""
    r = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return r.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return r.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return r.normal(0, 0.1, leaf.shape).astype(np.float32)

    abstract = jax.eval_shape(lambda: model.init(KEY, x, train=False))
    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def tiny():
    model = DeepLabV3Plus(5, output_stride=8, multi_grid=True, **TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 33, 33, 3)), jnp.float32)
    return model, _random_variables(model, x), x


@pytest.fixture(scope="module")
def tiny_eval_logits(tiny):
    model, v, x = tiny
    logits, out = _apply(model, v, x, train=False)
    assert out == {}
    return np.asarray(logits)


def _apply(model, v, x, **kw):
    """Jitted model.apply (eager op-by-op execution is slow on CPU)."""
    return jax.jit(lambda v, x: model.apply(v, x, **kw))(v, x)


@pytest.fixture(scope="module")
def tiny_fp_train(tiny):
    """Train-mode FP pass: ((logits, out), {'batch_stats', 'intermediates'})."""
    model, v, x = tiny
    return _apply(model, v, x, train=True, feature_perturb=True, rngs={"dropout": jax.random.PRNGKey(1)},
                  mutable=["batch_stats", "intermediates"], capture_intermediates=True)


def test_feature_perturbation(tiny, tiny_eval_logits, tiny_fp_train):
    model, v, x = tiny
    # eval mode: dropout is off, both outputs equal the plain pass
    clean, out = _apply(model, v, x, train=False, feature_perturb=True)
    pert = out["logits_fp"]
    np.testing.assert_allclose(clean, tiny_eval_logits, atol=1e-5)
    np.testing.assert_allclose(pert, tiny_eval_logits, atol=1e-5)

    (clean, out), state = tiny_fp_train
    pert = out["logits_fp"]
    assert clean.shape == pert.shape == (2, 33, 33, 5) and clean.dtype == jnp.float32
    inter = state["intermediates"]
    c1, _, c4 = inter["backbone"]["__call__"][0]
    d1 = inter["fp_dropout_c1"]["__call__"][0]
    d4 = inter["fp_dropout_c4"]["__call__"][0]
    m1 = np.asarray(d1 != 0).any(axis=(1, 2))  # (B, C) kept channels (among non-zero ones)
    m4 = np.asarray(d4 != 0).any(axis=(1, 2))[:, :m1.shape[1]]
    np.testing.assert_allclose(np.where(m1[:, None, None], 2 * c1, 0), d1, atol=1e-6)
    assert not np.array_equal(m1, m4)  # independent masks for c1 and c4
    # the decoder sees 2B samples; its per-sample first conv on the clean half equals a
    # train-mode pass without FP (same backbone features, BN statistics differ after it)
    red = inter["reduce_0"]["__call__"][0]
    assert red.shape[0] == 4
    (_, plain_out), plain_state = _apply(model, v, x, train=True, mutable=["batch_stats", "intermediates"],
                                         capture_intermediates=True)
    assert plain_out == {}
    np.testing.assert_allclose(red[:2], plain_state["intermediates"]["reduce_0"]["__call__"][0],
                               atol=1e-6)
    assert not np.allclose(clean, pert, atol=1e-3)


def test_out_dict_keys_and_logits_fp_is_the_decoder_on_dropped_features(tiny, tiny_fp_train):
    model, v, x = tiny
    (clean, out), state = tiny_fp_train
    assert set(out) == {"logits_fp"}  # without FP out is {} (tiny_eval_logits, test_feature_perturbation)
    # Reference: one train-mode decoder pass (BN statistics over 2B samples) on the captured clean
    # features stacked over the captured Dropout2d outputs; clean logits are its first half,
    # logits_fp its second.
    inter = state["intermediates"]
    c1, _, c4 = inter["backbone"]["__call__"][0]
    d1 = inter["fp_dropout_c1"]["__call__"][0]
    d4 = inter["fp_dropout_c4"]["__call__"][0]

    class DecoderOnly(DeepLabV3Plus):
        @nn.compact
        def __call__(self, c1, c4):
            return self.classify(self.decoder_features(c1, c4, True)[1], x.shape[1:3])

    decoder = DecoderOnly(**{f: getattr(model, f) for f in
                             ("num_classes", "output_stride", "multi_grid", "width", "blocks", "head_width",
                              "reduce_width")})
    ref, _ = jax.jit(lambda v, c1, c4: decoder.apply(v, c1, c4, mutable=["batch_stats"]))(
        v, jnp.concatenate([c1, d1]), jnp.concatenate([c4, d4]))
    np.testing.assert_allclose(clean, ref[:2], atol=1e-5)
    np.testing.assert_allclose(out["logits_fp"], ref[2:], atol=1e-5)
    assert not np.allclose(ref[:2], ref[2:], atol=1e-3)


def test_bfloat16_compute_keeps_float32_params_stats_and_logits(tiny, tiny_eval_logits):
    model, v, x = tiny
    model16 = model.clone(dtype=jnp.bfloat16)
    (out16, _), upd = _apply(model16, v, x, train=True, mutable=["batch_stats"])
    assert out16.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))
    # eval mode: bf16 rounding (2^-8 relative) through ~20 layers, no batch-statistic amplification
    out16, out32 = np.asarray(_apply(model16, v, x, train=False)[0]), tiny_eval_logits
    err = np.abs(out16 - out32).max() / np.abs(out32).max()
    assert err < 0.05


def test_remat_gives_the_same_output_and_gradients():
    model = ResNet(output_stride=8, width=8, blocks=(1, 1, 1, 2))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 17, 17, 3)), jnp.float32)
    v = _random_variables(model, x)

    def loss(params, m):
        (c1, _, c4), _ = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(c4 ** 2) + jnp.mean(c1 ** 2)

    g = jax.jit(jax.grad(loss), static_argnums=1)(v["params"], model)
    g_remat = jax.jit(jax.grad(loss), static_argnums=1)(v["params"], model.clone(remat=True))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), g_remat, g)


def test_variant_reuses_stages_without_copying(tiny, tiny_eval_logits):
    model, v, x = tiny

    class WithRepresentation(DeepLabV3Plus):
        @nn.compact
        def __call__(self, x, train):
            c1, _, c4 = self.encode(x, train)
            _, feats = self.decoder_features(c1, c4, train)
            rep = nn.Conv(7, (1, 1), name="representation")(feats)
            return self.classify(feats, x.shape[1:3]), {"rep": rep}

    variant = WithRepresentation(**{f: getattr(model, f) for f in
                                    ("num_classes", "output_stride", "multi_grid", "width",
                                     "blocks", "head_width", "reduce_width")})
    vv = jax.eval_shape(lambda: variant.init(KEY, x, train=False))
    assert set(vv["params"]) == set(v["params"]) | {"representation"}
    rep_params = {"representation": {"kernel": jnp.ones((1, 1, 16, 7)), "bias": jnp.zeros(7)}}
    logits, out = _apply(variant, {"params": {**v["params"], **rep_params},
                                   "batch_stats": v["batch_stats"]}, x, train=False)
    np.testing.assert_allclose(logits, tiny_eval_logits, atol=1e-5)
    assert set(out) == {"rep"} and out["rep"].shape == (2, 9, 9, 7)


def test_build_model_from_config():
    cfg = ml_collections.ConfigDict({"depth": 50, "output_stride": 8, "aspp_rates": [12, 24, 36],
                                     "dtype": "bfloat16", "blocks": None})
    model = build_model(cfg, 19, bn_axis_name="data")
    assert (model.depth, model.output_stride, model.aspp_rates) == (50, 8, (12, 24, 36))
    assert model.dtype == jnp.bfloat16 and model.bn_axis_name == "data"
    assert (model.stem, model.width, model.head_width, model.blocks) == ("deep", 64, 256, None)
    with pytest.raises(ValueError, match="config.model.dtype"):
        build_model(ml_collections.ConfigDict({"dtype": "float16"}), 19)
    assert isinstance(build_model(ml_collections.ConfigDict({"name": "deeplabv3plus"}), 19), DeepLabV3Plus)


def test_build_model_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError,
                       match=r"unknown config.model.name 'segformer'; registered models: \[.*'deeplabv3plus'"):
        build_model(ml_collections.ConfigDict({"name": "segformer"}), 19)


class _Toy(nn.Module):
    num_classes: int
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train):
        return nn.Conv(self.num_classes, (1, 1))(x), {"features": x}


def test_build_model_uses_a_registered_builder():
    calls = []

    def toy_builder(model_cfg, num_classes, bn_axis_name):
        calls.append((model_cfg.width, num_classes, bn_axis_name))
        return _Toy(num_classes, bn_axis_name)

    assert register_model("toy", toy_builder) is toy_builder
    try:
        assert MODELS["toy"] is toy_builder
        with pytest.raises(ValueError, match="'toy' is already registered"):
            register_model("toy", toy_builder)
        model = build_model(ml_collections.ConfigDict({"name": "toy", "width": 3}), 4, bn_axis_name="data")
        assert isinstance(model, _Toy) and calls == [(3, 4, "data")]
        assert (model.num_classes, model.bn_axis_name) == (4, "data")
        x = jnp.ones((1, 5, 5, 3))
        (logits, out), _ = jax.eval_shape(lambda: model.init_with_output(KEY, x, train=False))
        assert logits.shape == (1, 5, 5, 4) and set(out) == {"features"}
    finally:
        MODELS.pop("toy")
