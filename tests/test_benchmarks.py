"""Smoke tests of the train-step benchmarks: --tiny runs, their JSON, FLOPs against a hand count; the
evaluation-at-scale benchmark's --quick run; the data_prep rate of the pipeline benchmark."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import train_step
from configs import common
from csl_jax import pseudo_labels
from csl_jax.models import build_model

NUM_CLASSES = 21
TINY_CROP = 33


@pytest.fixture(scope="module")
def jax_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    return train_step.main(["--tiny", "--method", "supervised", "csl", "--out", str(out)])


def _in_bounds_taps(n, k, stride, pad, dilation):
    """Sum over the output positions of one axis of the kernel taps that read inside the input."""
    out = (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    return sum(1 for o in range(out) for i in range(k) if 0 <= o * stride - pad + i * dilation < n)


def conv_flops(config, batch):
    """Forward conv FLOPs (2 per MAC, in-bounds taps as XLA counts them) of one batch, by module.

    Returns a list of (module path, FLOPs) in call order, counted from the shapes each nn.Conv sees.
    """
    model = build_model(config.model, NUM_CLASSES)
    counted = []

    def count(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            (ph, _), (pw, _) = m.padding
            taps = (_in_bounds_taps(x.shape[1], m.kernel_size[0], m.strides[0], ph, m.kernel_dilation[0])
                    * _in_bounds_taps(x.shape[2], m.kernel_size[1], m.strides[1], pw, m.kernel_dilation[1]))
            counted.append(("/".join(m.path), 2 * x.shape[0] * taps * x.shape[-1] * m.features))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                       jnp.zeros((batch, TINY_CROP, TINY_CROP, 3)))
    return counted


def test_cost_model_reproduces_performance_md_table_2():
    expected = {  # performance.md §2, TFLOP per 8 + 8 step
        ("unimatch", 16): {321: 9.8, 513: 24.5, 801: 58.8},
        ("csl", 8): {321: 27.7, 513: 69.8, 801: 168.6},
        ("csl", 16): {321: 10.4, 801: 62.6},
    }
    for (method, stride), by_crop in expected.items():
        for crop, tflops in by_crop.items():
            config = train_step.make_config(method, 101, stride, crop, "bfloat16", 8, 8)
            assert train_step.reference_tflops(config) == pytest.approx(tflops, rel=0.01), (method, stride, crop)
    supervised = train_step.make_config("supervised", 50, 16, 513, "float32", 8, 8)
    assert train_step.reference_tflops(supervised) == pytest.approx(3 * 8 * 159 / 1e3)
    assert train_step.reference_tflops(train_step.make_config("csl", 101, 8, 600, "float32", 8, 8)) is None


def test_tiny_report_fields_and_values(jax_report):
    assert jax_report["device"].startswith("cpu") and jax_report["tiny"] and jax_report["devices"] == 1
    assert jax_report["peak_tflops"] > 0 and jax_report["peak_tflops_end"] > 0
    assert jax_report["peak_source"] == "measured-in-process" and jax_report["peak_method"].startswith("512^3 float32")
    assert jax_report["xla_flags_added"] == [] and jax_report["hlo_dump"] is None
    assert jax_report["command_buffers_during_profiling"] is None and jax_report["dispatch_samples"] == 5
    results = {r["method"]: r for r in jax_report["results"]}
    assert set(results) == {"supervised", "csl"}
    for method, r in results.items():
        images = 2 + (2 if method == "csl" else 0)
        assert r["crop"] == TINY_CROP and (r["labeled"], r["unlabeled"]) == (2, 2 if method == "csl" else 0)
        assert 0 < r["ms_per_step_min"] <= r["ms_per_step_synced"] and r["ms_per_step"] > 0
        assert 0 < r["dispatch_ms_min"] <= r["dispatch_ms"]
        assert r["images_per_s"] == pytest.approx(images / (r["ms_per_step"] / 1e3))
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["peak_memory_gib"] is None  # CPU has no memory_stats
        assert 0 < r["xla_memory_gib"] < 1
        assert r["reference_tflops_per_step"] is None and r["xla_vs_reference"] is None  # tiny: not in the table
        achieved = r["xla_tflops_per_step"] / (r["ms_per_step"] / 1e3)
        assert r["achieved_tflops"] == pytest.approx(achieved)
        assert r["mfu"] == pytest.approx(achieved / jax_report["peak_tflops"])
        assert math.isfinite(r["final_loss"])


def test_xla_flops_match_a_hand_count_of_the_convolutions(jax_report):
    results = {r["method"]: r for r in jax_report["results"]}
    config = train_step.make_config("csl", 50, 8, TINY_CROP, "float32", 2, 2, tiny=True)
    per_image = conv_flops(config, batch=1)
    total = sum(f for _, f in per_image)
    head = sum(f for path, f in per_image if not path.startswith("backbone"))
    first = per_image[0][1]  # the stem's first conv: no input gradient
    assert per_image[0][0] == "backbone/conv1_0"

    # Supervised, 2 images: forward F, backward 2F except the first conv's input gradient.
    supervised = 2 * (3 * total - first)
    ratio = results["supervised"]["xla_tflops_per_step"] * 1e12 / supervised
    assert 0.98 < ratio < 1.5, ratio  # XLA adds BN, activations, loss and optimizer FLOPs

    # CSL with an EMA teacher, 2 + 2 (+ 2 mix): teacher on 4 weak images; main pass [x; u_w] with FP
    # (backbone on 4 images, head on 8); strong pass on 4 images; both train passes fwd + bwd.
    main = 3 * (4 * (total - head) + 8 * head) - 4 * first
    csl = 4 * total + main + (3 * 4 * total - 4 * first)
    ratio = results["csl"]["xla_tflops_per_step"] * 1e12 / csl
    assert 0.98 < ratio < 1.5, ratio


def test_torch_reference_tiny_and_speedup_join(tmp_path, jax_report):
    pytest.importorskip("torch")
    from benchmarks import torch_reference

    report = torch_reference.main(["--tiny", "--method", "supervised", "csl", "--out", str(tmp_path / "t.json")])
    assert report["device"].startswith("cpu") and report["tiny"]
    rows = {(r["method"], r["dtype"]): r for r in report["results"]}
    assert set(rows) == {(m, d) for m in ("supervised", "csl") for d in ("float32", "bfloat16")}
    for r in rows.values():
        assert 0 < r["ms_per_step_min"] <= r["ms_per_step_synced"] and r["ms_per_step"] > 0 and r["first_step_s"] > 0
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0

    results = [dict(r) for r in jax_report["results"]]
    train_step.attach_torch(results, report["results"])
    assert {(m, d): r["variant"] for (m, d), r in rows.items()} == {
        (m, d): "bf16" if d == "bfloat16" else "tf32" for m, d in rows}
    assert all(r["tf32"] and not r["compiled"] for r in rows.values())
    for r in results:
        torch_ms = rows[(r["method"], "float32")]["ms_per_step"]
        assert r["torch_ms_per_step"] == torch_ms
        assert r["speedup_vs_torch"] == pytest.approx(torch_ms / r["ms_per_step"])
        assert r["speedup_vs_torch_float32"] == pytest.approx(torch_ms / r["ms_per_step"])
        bf16 = rows[(r["method"], "bfloat16")]
        assert r["speedup_vs_torch_by_variant"] == pytest.approx(
            {"bf16": bf16["ms_per_step"] / r["ms_per_step"], "tf32": torch_ms / r["ms_per_step"]})
        assert list(r["speedup_vs_torch_by_variant"]) == ["bf16", "tf32"]
        assert r["speedup_synced_vs_torch_by_variant"]["bf16"] == pytest.approx(
            bf16["ms_per_step_synced"] / r["ms_per_step_synced"])


def test_torch_csl_weights_match_csl_jax():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    rng = np.random.default_rng(0)
    # Two populations of pixels per image: confident ones and uncertain ones.
    logits = rng.normal(size=(3, 12, 10, 6)) * np.where(rng.random((3, 12, 10, 1)) < 0.6, 6.0, 0.7)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    valid = rng.random((3, 12, 10)) < 0.9
    want_w, want_r = pseudo_labels.csl_weights(probs, valid, alpha=8.0)
    got_w, got_r = torch_reference.csl_weights(torch.from_numpy(probs).permute(0, 3, 1, 2),
                                               torch.from_numpy(valid), alpha=8.0, eps=1e-8)
    np.testing.assert_allclose(got_w.numpy(), np.asarray(want_w), atol=1e-4)
    assert 0.2 < np.mean(np.asarray(want_r)[valid]) < 0.95  # a real split, not all-or-nothing
    np.testing.assert_array_equal(got_r.numpy(), np.asarray(want_r))


def test_eval_scale_quick_report_and_table(tmp_path, capsys):
    from benchmarks import eval_scale

    report = eval_scale.main(["--quick", "--out", str(tmp_path / "eval_scale.json")])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "eval_scale.json").read_text()) == report
    assert printed.rstrip().endswith(eval_scale.markdown(report))  # the table comes last
    assert report["quick"] and report["model"] == "tiny" and report["num_classes"] == 81
    rows = {r["grouping"]: r for r in report["results"]}
    assert list(rows) == ["consecutive", "buckets", "pad32"]
    for r in rows.values():
        assert set(r) == {"grouping", "programs", "compile_s", "first_pass_s", "second_pass_s", "images_per_s",
                          "batches", "dummy_fraction", "recompiled_in_second_pass", "miou",
                          "same_confusion_as_consecutive"}
        assert r["recompiled_in_second_pass"] == 0 and 0 <= r["dummy_fraction"] < 1
    # exact groupings: one program per distinct shape and the same confusion matrix; buckets fill batches
    assert rows["consecutive"]["programs"] == rows["buckets"]["programs"] == report["distinct_shapes"]
    assert rows["buckets"]["same_confusion_as_consecutive"] and rows["consecutive"]["same_confusion_as_consecutive"]
    assert rows["buckets"]["batches"] < rows["consecutive"]["batches"]
    assert rows["pad32"]["programs"] < rows["buckets"]["programs"]


def test_eval_scale_plan_only_forms_the_batches_without_a_model(capsys):
    from benchmarks import eval_scale

    report = eval_scale.main(["--plan-only", "--images", "500", "--batch", "8"])
    assert capsys.readouterr().out.rstrip().endswith(eval_scale.markdown(report))
    rows = {r["grouping"]: r for r in report["results"]}
    assert rows["buckets"]["programs"] == rows["consecutive"]["programs"] == report["distinct_shapes"] > 40
    assert rows["buckets"]["batches"] < rows["consecutive"]["batches"] / 3 and rows["buckets"]["images_per_s"] is None
    # at least one batch per shape, and every image in one
    assert report["distinct_shapes"] <= rows["buckets"]["batches"] and rows["buckets"]["batches"] * 8 >= 500


def test_pipeline_benchmark_reports_the_data_prep_rate(tmp_path, monkeypatch, capsys):
    from benchmarks import pipeline

    monkeypatch.setattr(pipeline, "stream_rows", lambda count: [{"images": "pascal", "crop": 321, "ours_labeled": 9.5}])
    report = pipeline.main(["--quick", "--out", str(tmp_path / "pipeline.json")])
    assert json.loads((tmp_path / "pipeline.json").read_text()) == report
    rows = report["data_prep"]["results"]
    assert [(r["workers"], r["images"]) for r in rows] == [(0, 9), (2, 9)] and all(r["images_per_s"] > 0 for r in rows)
    table = capsys.readouterr().out.strip().splitlines()[-3:]  # printed last
    assert table[0] == "data_prep (coco --from-instances, 640x480 JPEG) | workers | images | images/s"
    assert table[1] == f"data_prep | 0 | 9 | {rows[0]['images_per_s']:.1f}"
    assert table[2].startswith("data_prep | 2 | 9 |")


# ---------------------------------------------------------------------------------------------
# UniMatch V2 (DINOv2 + DPT): the cost model and the --tiny step
# ---------------------------------------------------------------------------------------------
def _xla_dot_and_conv_flops(fn, *args):
    """XLA's cost-analysis FLOPs of every dot_general and conv_general_dilated of `fn`'s jaxpr, each
    compiled alone (nested jaxprs included): the matmul/conv part of XLA's count of the whole `fn`."""
    from jax.extend import core

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(sub, (core.Jaxpr, core.ClosedJaxpr)):
                        yield from equations(getattr(sub, "jaxpr", sub))

    total = 0.0
    for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            operands = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
            single = jax.jit(lambda *a, eqn=eqn: eqn.primitive.bind(*a, **eqn.params))
            total += train_step.xla_flops(single.lower(*operands).compile())
    return total


def test_dpt_cost_model_equals_xla_count_of_a_tiny_forward():
    from csl_jax.models.dpt import DPT, dpt_fields

    # crop 70: a 5 x 5 token grid (odd: the 3x3/2 conv's ceil and border taps), the stored position grid
    # (identity: no bicubic resize), maps of 20, 10, 5 and 3 px; no matmul contracts a size-1 axis (XLA
    # rewrites those as multiplies, 1 FLOP per output)
    model = DPT(num_classes=NUM_CLASSES, attention="einsum", **dpt_fields("small", **dict(common.TINY_DPT,
                                                                                           pos_grid=5)))
    x = jnp.zeros((1, 70, 70, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))

    def forward(v, images):
        return model.apply(v, images)[0]

    exact = train_step.dpt_forward_flops(model, 70, 70, in_bounds=True)
    assert _xla_dot_and_conv_flops(forward, variables, x) == sum(exact.values())  # exactly
    # the whole forward: the same plus the elementwise ops (LayerNorm, softmax, GELU, bias and residual
    # adds: 1 FLOP per element each), which the cost model leaves out
    whole = train_step.xla_flops(jax.jit(forward).lower(variables, x).compile())
    assert 1.0 < whole / sum(exact.values()) < 1.1
    every_tap = train_step.dpt_forward_flops(model, 70, 70)
    assert every_tap["head"] > exact["head"]  # the 3x3 convs' border taps read padding
    assert {k: v for k, v in every_tap.items() if k != "head"} == {k: v for k, v in exact.items() if k != "head"}


def test_cost_model_only_dinov2_sizes_at_518(tmp_path, monkeypatch, capsys):
    def no_device(*args, **kwargs):
        raise AssertionError("--cost-model-only must not touch a device")

    monkeypatch.setattr(train_step.jax, "devices", no_device)
    report = train_step.main(["--cost-model-only", "--method", "unimatch_v2", "--encoder", "small", "base", "large",
                              "--labeled", "16", "--unlabeled", "16", "--out", str(tmp_path / "cost.json")])
    assert json.loads((tmp_path / "cost.json").read_text()) == report
    rows = {r["encoder"]: r for r in report["results"]}
    tokens, patches = 37 * 37 + 1, 37 * 37
    for encoder, (dim, depth) in {"small": (384, 12), "base": (768, 12), "large": (1024, 24)}.items():
        r, part = rows[encoder], rows[encoder]["forward_gflops_by_part"]
        assert part["patch_embed"] == pytest.approx(2 * patches * 3 * 14 ** 2 * dim / 1e9)
        assert part["linear"] == pytest.approx(depth * 24 * tokens * dim ** 2 / 1e9)  # qkv + proj 8ND^2, MLP 16ND^2
        assert part["attention"] == pytest.approx(depth * 4 * tokens ** 2 * dim / 1e9)
        assert r["forward_gflops"] == pytest.approx(sum(v for k, v in part.items() if k != "resize"))
        assert r["passes"] == 16 + 3 * (16 + 32)  # teacher on u_w; student on x and [S1; S2], forward + backward
        assert r["reference_tflops_per_step"] == pytest.approx(160 * r["forward_gflops"] / 1e3)
    assert rows["small"]["forward_gflops"] < rows["base"]["forward_gflops"] < rows["large"]["forward_gflops"]
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert [line.split()[:2] for line in lines[-3:]] == [["unimatch_v2", f"ViT-{s}"] for s in "SBL"]  # table last


@pytest.fixture(scope="module")
def v2_report(tmp_path_factory):
    """The --tiny unimatch_v2 run: (report, the JSON file's contents, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench_v2") / "train_step.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = train_step.main(["--tiny", "--method", "unimatch_v2", "--out", str(out)])
    return report, json.loads(out.read_text()), printed.getvalue()


def test_tiny_unimatch_v2_report_and_table(v2_report):
    report, written, printed = v2_report
    assert written == report and report["tiny"] and report["device"].startswith("cpu")
    (r,) = report["results"]
    assert set(r) == {"method", "encoder", "depth", "output_stride", "crop", "dtype", "remat", "labeled", "unlabeled",
                      "devices", "lower_s", "compile_s", "compile_only", "ms_per_step", "ms_per_step_synced",
                      "ms_per_step_min", "dispatch_ms", "dispatch_ms_min", "images_per_s", "peak_memory_gib",
                      "xla_memory_gib", "xla_tflops_per_step",
                      "forward_gflops", "reference_tflops_per_step", "xla_vs_reference", "achieved_tflops", "mfu",
                      "mfu_reference", "final_loss", "kernels"}
    assert r["kernels"] == "fast"  # the default (--kernels)
    assert (r["method"], r["encoder"], r["depth"], r["output_stride"]) == ("unimatch_v2", "small", None, None)
    assert (r["crop"], r["dtype"], r["labeled"], r["unlabeled"]) == (28, "float32", 2, 2)
    assert math.isfinite(r["final_loss"]) and 0 < r["xla_memory_gib"] < 1
    config = train_step.make_v2_config("unimatch_v2", "small", 28, "float32", 2, 2, tiny=True)
    per_image = train_step.dpt_forward_flops(build_model(config.model, NUM_CLASSES), 28, 28)
    assert r["forward_gflops"] == pytest.approx(sum(v for k, v in per_image.items() if k != "resize") / 1e9)
    assert r["reference_tflops_per_step"] == pytest.approx((2 + 3 * (2 + 4)) * r["forward_gflops"] / 1e3)
    assert r["xla_vs_reference"] == pytest.approx(r["xla_tflops_per_step"] / r["reference_tflops_per_step"])
    lines = printed.rstrip().splitlines()
    assert lines[-2].split()[:3] == ["method", "model", "OS"]  # the table comes last
    assert lines[-1].split()[:5] == ["unimatch_v2", "ViT-S", "-", "28", "float32"]


def test_tiny_unimatch_v2_xla_flops_match_a_hand_count(v2_report):
    (r,) = v2_report[0]["results"]
    config = train_step.make_v2_config("unimatch_v2", "small", 28, "float32", 2, 2, tiny=True)
    f = train_step.dpt_forward_flops(build_model(config.model, NUM_CLASSES), 28, 28, in_bounds=True)
    forward = sum(f.values())
    # backward: 2x the forward, except the patch embedding (no input gradient) and the resizes (constant
    # matrices: only the input gradient), 1x each
    backward = 2 * forward - f["patch_embed"] - f["resize"]
    # the teacher on u_w (2 images), the student on x (2) and [S1; S2] (4), forward and backward
    hand = 2 * forward + 6 * (forward + backward)
    ratio = r["xla_tflops_per_step"] * 1e12 / hand
    assert 1.0 < ratio < 1.25, ratio  # XLA adds the elementwise ops, losses, AdamW and the EMA


def test_torch_unimatch_v2_step_tiny_and_its_masks(tmp_path):
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    report = torch_reference.main(["--tiny", "--method", "unimatch_v2", "--dtype", "float32",
                                   "--out", str(tmp_path / "t.json")])
    (r,) = report["results"]
    assert (r["method"], r["encoder"], r["crop"], r["labeled"], r["unlabeled"]) == ("unimatch_v2", "small", 28, 2, 2)
    assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0

    # Complementary Dropout (spec §3): m1 + m2 = 2, values 0 / 2, and 1 in both views for floor(g / 2) images a group
    m1, m2 = torch_reference.comp_drop_masks(8, 6, 4, 0.5, 2.0, "cpu").chunk(2)
    assert torch.equal(m1 + m2, torch.full((8, 6), 2.0))
    untouched = (m1 == 1).all(1)
    assert untouched.reshape(2, 4).sum(1).tolist() == [2, 2] and set(m1[~untouched].unique().tolist()) <= {0.0, 2.0}
    assert torch_reference.reversed_groups(torch.arange(8), 4).tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
