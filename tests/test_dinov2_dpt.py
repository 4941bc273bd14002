"""UniMatch V2's DINOv2 encoder and DPT head (csl_jax/models/{dinov2,dpt}.py, `config.model.name='dpt'`)
against the PyTorch transcription of docs/methods/unimatch_v2.md §§1-3 (tests/helpers/torch_dinov2_dpt.py,
which cites LiheYoung/UniMatch-V2 f6afb4d); its converters, parameter counts, weights names and config
fields (spec §14, §16 items 1-4 and 9). Big sizes are only traced (jax.eval_shape); parity runs on the
spec's tiny network (D 32, depth 4, heads 2, taps 0-3, a 4 x 4 stored position grid, features 8)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from csl_jax import config_checks
from csl_jax.models import build_model, dinov2, dpt, pretrained
from csl_jax.models.convert import convert_state_dict, load_pretrained, unwrap_state_dict

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tests.helpers import torch_dinov2_dpt as ref  # noqa: E402

CLASSES = 5
#: spec §16 item 1 (torch DPT arguments; heads and taps are what a converter cannot read)
TINY = dict(dim=32, depth=4, num_heads=2, taps=(0, 1, 2, 3), features=8, out_channels=(4, 8, 16, 32), pos_grid=4)
GIVEN = dict(num_heads=2, taps=(0, 1, 2, 3))


def tiny_torch(ffn="mlp", seed=0):
    """The tiny reference (official init + random norms, LayerScales and positions), eval mode."""
    torch.manual_seed(seed)
    model = ref.DPT(CLASSES, ffn=ffn, **TINY)
    ref.randomise(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def v2_checkpoint(model, student=None):
    """What unimatch_v2.py:265-275 saves: both DDP networks (`module.` keys) and the loop state."""
    def ddp(m):
        return {f"module.{k}": v for k, v in m.state_dict().items()}

    return {"model": ddp(student or model), "model_ema": ddp(model), "optimizer": {}, "epoch": 3,
            "previous_best": 1.0, "previous_best_ema": 2.0, "best_epoch": 2, "best_epoch_ema": 3}


def nchw_to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def relative_error(got, expected):
    """max |got - expected| / max |expected|."""
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def converted(ffn):
    """(torch model, Flax model, variables, jitted apply returning ((logits, out), intermediates))."""
    tmodel = tiny_torch(ffn)
    model, variables = dpt.from_unimatch_v2(v2_checkpoint(tmodel), attention="einsum", **GIVEN)
    apply = jax.jit(lambda v, x, s: model.apply(v, x, feature_scale=s, mutable=["intermediates"]))
    return tmodel, model, variables, apply


# ----------------------------------------------------------------------------- parity (§16 item 1)
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("size", [(56, 56), (70, 42), (42, 98), (14, 14)])
def test_eval_logits_taps_and_fusion_outputs_match_the_reference(ffn, size):
    """56 x 56 is the stored 4 x 4 grid (identity positions); the others interpolate it."""
    tmodel, model, variables, apply = converted(ffn)
    assert (model.embed_dim, model.depth, model.ffn, model.pos_grid) == (32, 4, ffn, 4)
    x = images(*size)
    (logits, out), state = apply(variables, x, None)
    with torch.no_grad():
        expected = nchw_to_nhwc(tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)))
    assert logits.shape == (2, *size, CLASSES) and logits.dtype == jnp.float32 and out == {}
    errors = {"logits": relative_error(logits, expected)}
    for k, (got, want) in enumerate(zip(state["intermediates"]["backbone"]["taps"][0], tmodel.features)):
        errors[f"tap{k}"] = relative_error(got, want.numpy())
    for name, want in tmodel.head.intermediates.items():
        errors[name] = relative_error(state["intermediates"]["head"]["scratch"][name][0], nchw_to_nhwc(want))
    assert max(errors.values()) < 1e-4, errors


def test_feature_scale_multiplies_the_four_taps_as_the_reference():
    """Complementary-Dropout-like masks (0, 1 or 2 per image and channel) give the reference's logits."""
    tmodel, _, variables, apply = converted("mlp")
    x = images(70, 42, batch=4, seed=3)
    scale = np.random.default_rng(4).choice([0.0, 1.0, 2.0], size=(4, 32)).astype(np.float32)
    (logits, _), _ = apply(variables, x, scale)
    (plain, _), _ = apply(variables, x, None)
    with torch.no_grad():
        expected = nchw_to_nhwc(tmodel(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(scale)))
    assert relative_error(logits, expected) < 1e-4
    assert relative_error(plain, expected) > 1e-2  # the scale matters
    with pytest.raises(ValueError, match=r"feature_scale must be \(B, D\) = \(4, 32\)"):
        apply(variables, x, scale[:, :8])


# ----------------------------------------------------------------------------- pieces (§16 items 2-4)
@pytest.mark.parametrize("grid,sizes", [(4, [(4, 4), (2, 8), (5, 3), (3, 7), (1, 1), (8, 6)]),
                                        (37, [(37, 37), (57, 57), (36, 27), (10, 73), (38, 37), (74, 146)])])
def test_position_interpolation_is_torch_bicubic_by_scale_factor(grid, sizes):
    """F.interpolate(scale_factor=((h + 0.1)/M, (w + 0.1)/M), bicubic, no antialias) within 2e-5, also for
    the h = w = M grid the official code interpolates when H != W (the identity is h = w = M only)."""
    d = 8
    table = np.random.default_rng(grid).standard_normal((1, 1 + grid * grid, d)).astype(np.float32)
    for h, w in sizes:
        got = np.asarray(jax.jit(dinov2.position_table, static_argnums=(1, 2))(table, h, w))
        patch = torch.from_numpy(table[:, 1:]).reshape(1, grid, grid, d).permute(0, 3, 1, 2)
        expected = ref.interpolate_grid(patch, h, w).permute(0, 2, 3, 1).reshape(1, h * w, d).numpy()
        if (h, w) == (grid, grid):
            np.testing.assert_array_equal(got, table)  # the stored table, unchanged
            got = np.concatenate([table[:, :1], np.einsum("yi,xj,ijd->yxd", dinov2.bicubic_matrix(grid, h),
                                                          dinov2.bicubic_matrix(grid, w),
                                                          table[0, 1:].reshape(grid, grid, d)).reshape(1, -1, d)], 1)
        np.testing.assert_array_equal(got[:, 0], table[:, 0])  # the class position is kept
        assert np.abs(got[:, 1:] - expected).max() <= 2e-5, (h, w)


@pytest.mark.parametrize("cin,cout,k", [(3, 5, 2), (5, 3, 4), (4, 4, 2), (6, 6, 4)])
def test_conv_transpose_reads_the_converted_kernel(cin, cout, k):
    """torch ConvTranspose2d(cin, cout, k, stride k) == dpt.conv_transpose with the generically converted
    (in, out, k, k) weight (spec §13 trap 3), for in != out and in == out."""
    torch.manual_seed(k + cin)
    layer = torch.nn.ConvTranspose2d(cin, cout, k, k, 0)
    params = traverse_util.unflatten_dict(convert_state_dict({f"t.{n}": v for n, v in layer.state_dict().items()}))
    x = np.random.default_rng(cin).standard_normal((2, 3, 5, cin)).astype(np.float32)
    got = dpt.conv_transpose(cout, k, name="t").apply({"params": params["params"]["t"]}, x)
    with torch.no_grad():
        expected = nchw_to_nhwc(layer(torch.from_numpy(x).permute(0, 3, 1, 2)))
    assert got.shape == (2, 3 * k, 5 * k, cout)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_block_at_extreme_activations_uses_exact_gelu_and_eps_1e6():
    """One block on tokens of three kinds: wide (x30: GELU far from 0), tiny-variance (std 1e-3: eps
    matters) and offset (10 + 0.1 N: one-pass variance cancels, ~1e-3 off). The Flax block matches the
    reference within 2e-5 on each kind; the reference with tanh GELU or eps 1e-5 is off by more than 1e-4."""
    torch.manual_seed(0)
    blocks = {variant: ref.Block(32, 2, **kw) for variant, kw in
              (("right", {}), ("tanh", {"approximate": "tanh"}), ("eps", {"eps": 1e-5}))}
    ref.randomise(blocks["right"], torch.Generator().manual_seed(1))
    with torch.no_grad():
        blocks["right"].mlp.fc1.weight *= 4  # pre-activations of a few units, where tanh GELU is off most
    for b in blocks.values():
        b.load_state_dict(blocks["right"].state_dict())
    params = traverse_util.unflatten_dict(convert_state_dict({f"b.{k}": v for k, v in
                                                              blocks["right"].state_dict().items()}))
    rng = np.random.default_rng(0)
    t = np.concatenate([30 * rng.standard_normal((1, 9, 32)), 1e-3 * rng.standard_normal((1, 9, 32)),
                        10 + 0.1 * rng.standard_normal((1, 9, 32))]).astype(np.float32)
    got = np.asarray(dinov2.Block(2, attention="einsum").apply({"params": params["params"]["b"]}, t)) - t
    errors = {}
    for variant, block in blocks.items():
        with torch.no_grad():
            expected = (block(torch.from_numpy(t)) - torch.from_numpy(t)).numpy()
        errors[variant] = max(relative_error(got[i], expected[i]) for i in range(3))
    assert errors["right"] < 2e-5 and min(errors["tanh"], errors["eps"]) > 1e-4, errors


# ----------------------------------------------------------------------------- sizes and keys (§16 item 9)
#: spec §1.4 and §2: torch parameter counts (encoder with `mask_token`; head at C classes)
TORCH_COUNTS = {"small": (22_056_576, {21: 2_739_061, 150: 2_747_446}),
                "base": (86_580_480, {21: 10_948_309, 19: 10_948_051}),
                "large": (304_368_640, {21: 31_210_517, 81: 31_225_937}),
                "giant": (1_136_480_768, {21: 122_267_925})}
#: spec §1.1 / §2: D, depth, FFN and the official `features` per encoder
SPEC_SIZES = {"small": (384, 12, "mlp", 64), "base": (768, 12, "mlp", 128), "large": (1024, 24, "mlp", 256),
              "giant": (1536, 40, "swiglu", 384)}


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("encoder", list(TORCH_COUNTS))
def test_parameter_counts_are_the_official_ones_minus_the_unused_tensors(encoder):
    """Flax = torch - mask_token (D) in the encoder and - refinenet4.resConfUnit1 (2 (9 f^2 + f)) in the head."""
    d, _, _, f = SPEC_SIZES[encoder]
    encoder_count, heads = TORCH_COUNTS[encoder]
    for classes, head_count in heads.items():
        model = build_model(ml_collections.ConfigDict({"name": "dpt", "encoder": encoder}), classes)
        v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 3))))
        assert set(v) == {"params"} and set(v["params"]) == {"backbone", "head"}  # no batch_stats
        assert count(v["params"]["backbone"]) == encoder_count - d
        assert count(v["params"]["head"]) == head_count - 2 * (9 * f * f + f)


def official_dinov2_keys(encoder):
    """The key table of spec §1.4 with its shapes, as zero-cost arrays (no memory)."""
    d, depth, ffn, _ = SPEC_SIZES[encoder]
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1370, d), "mask_token": (1, d),
              "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,), "norm.weight": (d,),
              "norm.bias": (d,)}
    mlp = ({"fc1.weight": (4 * d, d), "fc1.bias": (4 * d,), "fc2.weight": (d, 4 * d), "fc2.bias": (d,)}
           if ffn == "mlp" else {"w12.weight": (8192, d), "w12.bias": (8192,), "w3.weight": (d, 4096), "w3.bias": (d,)})
    for i in range(depth):
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "ls2.gamma": (d,),
                 "norm2.weight": (d,), "norm2.bias": (d,), **{f"mlp.{k}": s for k, s in mlp.items()}}
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return {k: np.broadcast_to(np.float32(0.5), s) for k, s in shapes.items()}


@pytest.mark.parametrize("encoder,keys", [("small", 175), ("base", 175), ("large", 343), ("giant", 567)])
def test_the_converter_takes_exactly_the_official_encoder_keys(encoder, keys):
    sd = official_dinov2_keys(encoder)
    assert len(sd) == keys
    unwrapped, kind, ignored = unwrap_state_dict(sd)
    assert (kind, ignored, len(unwrapped)) == ("dinov2", ["mask_token"], keys - 1)
    model, variables = dpt.from_dinov2(sd, depth=101, width=64, blocks=None)  # the CLI's arguments are not read
    heads = {"small": 6, "base": 12, "large": 16, "giant": 24}[encoder]  # from the name (§1.1), never from shapes
    assert (model.num_heads, model.embed_dim) == (heads, SPEC_SIZES[encoder][0])
    assert count(variables) == TORCH_COUNTS[encoder][0] - SPEC_SIZES[encoder][0]
    assert dpt.encoder_error(unwrapped, encoder) is None
    other = "giant" if encoder != "giant" else "small"
    assert dpt.encoder_error(unwrapped, other).startswith(f"encoder '{other}' does not fit the checkpoint (D ")
    grid = {**unwrapped, "backbone.pos_embed": np.zeros((1, 1 + 16 * 16, SPEC_SIZES[encoder][0]), np.float32)}
    assert dpt.encoder_error(grid, encoder) == f"it has {{'pos_grid': 16}}, the {encoder} encoder {{'pos_grid': 37}}"
    shapes = {**unwrapped, "backbone.blocks.0.ls1.gamma": np.zeros(3, np.float32)}
    assert dpt.encoder_error(shapes, encoder).startswith("shape mismatch: params/backbone/blocks_0/ls1/gamma: ")


def test_a_missing_or_extra_encoder_key_is_an_error_and_register_tokens_are_refused():
    sd = official_dinov2_keys("small")
    with pytest.raises(ValueError, match=r"1 model variables are missing .*blocks_11/ls2/gamma"):
        dpt.from_dinov2({k: v for k, v in sd.items() if k != "blocks.11.ls2.gamma"})
    with pytest.raises(ValueError, match=r"no place in the model: \['params/backbone/blocks_0/attn/q_norm/scale'\]"):
        dpt.from_dinov2({**sd, "blocks.0.attn.q_norm.weight": sd["blocks.0.ls1.gamma"]}, encoder="small")
    with pytest.raises(ValueError, match=r"encoder 'small' does not fit the checkpoint \(D 384, depth 13, mlp\)"):
        dpt.from_dinov2({**sd, "blocks.12.ls1.gamma": sd["blocks.0.ls1.gamma"]}, encoder="small")
    with pytest.raises(ValueError, match="register tokens .* use dinov2_vit"):
        unwrap_state_dict({**sd, "register_tokens": np.zeros((1, 4, 384), np.float32)})
    with pytest.raises(ValueError, match="encoder 'base' does not fit the checkpoint"):
        dpt.from_dinov2(sd, encoder="base")


def test_a_trained_v2_checkpoint_converts_its_teacher_or_student():
    tmodel = tiny_torch()
    student = tiny_torch(seed=5)
    checkpoint = v2_checkpoint(tmodel, student)
    sd, kind, ignored = unwrap_state_dict(checkpoint)
    unused = ["backbone.mask_token"] + [f"head.scratch.refinenet4.resConfUnit1.conv{i}.{p}"
                                        for i in (1, 2) for p in ("bias", "weight")]
    assert kind == "unimatch_v2" and ignored == ["best_epoch", "best_epoch_ema", "epoch", "model", "optimizer",
                                                 "previous_best", "previous_best_ema"] + unused
    for network, source in (("teacher", tmodel), ("student", student)):
        model, variables = dpt.from_unimatch_v2(checkpoint, network=network, **GIVEN)
        assert (model.num_classes, model.features, model.out_channels) == (CLASSES, 8, (4, 8, 16, 32))
        np.testing.assert_array_equal(variables["params"]["backbone"]["blocks_2"]["attn"]["qkv"]["kernel"],
                                      source.backbone.blocks[2].attn.qkv.weight.detach().numpy().T)
    with pytest.raises(ValueError, match=r"has 5 classes, not num_classes=21 \(the converter CLI: --num-classes 5\)"):
        dpt.from_unimatch_v2(checkpoint, num_classes=21, **GIVEN)
    with pytest.raises(ValueError, match=r"\['num_heads', 'taps'\] cannot be read from a checkpoint"):
        dpt.from_unimatch_v2(checkpoint)


def test_a_dinov2_file_initialises_the_encoder_and_leaves_the_head(tmp_path):
    """`model.init_from` with a bare DINOv2 file: the encoder loaded, the head at init, reported."""
    tmodel = tiny_torch()
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(tmodel.backbone.state_dict(), path)
    model = dpt.DPT(CLASSES, **dpt.dpt_fields("small", embed_dim=32, depth=4, **GIVEN, pos_grid=4, features=8,
                                               out_channels=(4, 8, 16, 32)))
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 3))))
    variables, report = load_pretrained(init, str(path))
    assert report["kind"] == "dinov2" and report["ignored"] == ["mask_token"]
    assert report["left_at_init"] and all(p.startswith("params/head/") for p in report["left_at_init"])
    np.testing.assert_array_equal(variables["params"]["backbone"]["pos_embed"], tmodel.backbone.pos_embed.detach())


# ----------------------------------------------------------------------------- options
def test_dot_product_attention_bf16_and_remat_agree_with_the_einsum_path():
    tmodel, model, variables, apply = converted("mlp")
    x = images(42, 56)
    (logits, _), _ = apply(variables, x, None)
    for kw, tol in (({"attention": "dot_product"}, 1e-5), ({"remat": True}, 1e-6), ({"dtype": jnp.bfloat16}, 2e-2)):
        other, _ = jax.jit(model.clone(**kw).apply)(variables, x)
        assert other.dtype == jnp.float32 and relative_error(other, logits) < tol, kw
    assert dinov2.attention_kind("auto") == ("dot_product" if jax.default_backend() == "gpu" else "einsum")
    with pytest.raises(ValueError, match="multiples of 14 pixels, got 43 x 56"):
        model.apply(variables, images(43, 56))
    with pytest.raises(ValueError, match="no feature-perturbation stream"):
        model.apply(variables, x, feature_perturb=True)


def test_the_builder_reads_the_encoder_and_overrides_and_refuses_deeplab_fields():
    small = build_model(ml_collections.ConfigDict({"name": "dpt", "encoder": "small", "dtype": "bfloat16"}), 21)
    assert isinstance(small, dpt.DPT) and small.dtype == jnp.bfloat16
    assert (small.embed_dim, small.depth, small.num_heads, small.taps, small.features, small.out_channels) == (
        384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384))
    giant = build_model(ml_collections.ConfigDict({"name": "dpt", "encoder": "giant"}), 21)
    assert (giant.ffn, giant.taps, dinov2.ffn_hidden(1536, "swiglu"), dinov2.ffn_hidden(32, "swiglu")) == (
        "swiglu", (9, 19, 29, 39), 4096, 88)
    tiny = ml_collections.ConfigDict({"name": "dpt", "encoder": "small", "embed_dim": 32, "depth": 4, "num_heads": 2,
                                      "taps": (0, 1, 2, 3), "pos_grid": 4, "features": 8, "remat": True,
                                      "out_channels": (4, 8, 16, 32), "init_from": "imagenet"})
    model = build_model(tiny, CLASSES)
    assert (model.embed_dim, model.depth, model.pos_grid, model.remat) == (32, 4, 4, True)
    with pytest.raises(ValueError, match=r"\['stem', 'width'\] are DeepLabV3\+ fields"):
        build_model(ml_collections.ConfigDict({"name": "dpt", "stem": "deep", "width": 64}), 21)
    with pytest.raises(ValueError, match="DINOv2 encoder must be one of"):
        build_model(ml_collections.ConfigDict({"name": "dpt", "encoder": "huge"}), 21)
    # weights: 'imagenet' is the encoder's DINOv2 file; a narrowed encoder takes none
    assert pretrained.imagenet_name(ml_collections.ConfigDict({"name": "dpt", "encoder": "large"})) == "dinov2:large"
    assert pretrained.imagenet_name(ml_collections.ConfigDict({"name": "dpt", "encoder": "base", "depth": 12,
                                                               "features": 8})) == "dinov2:base"
    with pytest.raises(ValueError, match=r"fit only the official encoders, not model.encoder='small' with "
                                         r"\{'embed_dim': 32, 'depth': 4, 'num_heads': 2, 'pos_grid': 4\}"):
        pretrained.resolve_init(tiny)


def test_the_weights_names_and_the_crop_check():
    for encoder, letter in (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g")):
        record = pretrained.REGISTRY[f"dinov2:{encoder}"]
        assert (record.kind, record.sha256, record.filename) == ("dinov2", None, f"dinov2_vit{letter}14_pretrain.pth")
        assert record.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{letter}14/{record.filename}"
    config = ml_collections.ConfigDict({"model": {"name": "dpt"}, "data": {"crop_size": 518}})
    config_checks.check(config)
    config.data.crop_size = 513
    with pytest.raises(ValueError, match=r"config.data.crop_size=513: must be a multiple of 14 for model.name='dpt'"):
        config_checks.check(config)
