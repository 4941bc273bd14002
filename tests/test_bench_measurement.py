"""The measurement plumbing of the GPU benchmarks (issue 27): XLA_FLAGS handling of train_step.py, the
flag-variant comparison, the fair PyTorch reference (closed-form CSL split, batched EMA, TF32/fp32 and
torch.compile rows), hlo_stats on a synthetic HLO text, and the gpu_suite.sh run plans (dry run)."""
import copy
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from benchmarks import hlo_stats, train_step
from csl_jax import pseudo_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# XLA flags
# ---------------------------------------------------------------------------------------------
def test_requested_and_merged_xla_flags():
    args = train_step.parse_args(["--tiny", "--profile-dir", "/p", "--hlo-dump", "/d",
                                  "--xla-flags=--xla_gpu_autotune_level=1 --xla_gpu_enable_command_buffer="])
    assert train_step.requested_xla_flags(args) == [
        "--xla_gpu_autotune_level=1", "--xla_gpu_enable_command_buffer=",
        "--xla_enable_command_buffers_during_profiling=true", "--xla_dump_to=/d", "--xla_dump_hlo_as_text"]
    assert train_step.requested_xla_flags(train_step.parse_args(["--tiny"])) == []
    # what the caller exported wins; repeats are dropped
    merged, added = train_step.merge_xla_flags(
        "--xla_force_host_platform_device_count=1 --xla_enable_command_buffers_during_profiling=false",
        ["--xla_enable_command_buffers_during_profiling=true", "--xla_dump_to=/d", "--xla_dump_to=/e"])
    assert added == ["--xla_dump_to=/d"]
    assert merged == ("--xla_force_host_platform_device_count=1 --xla_enable_command_buffers_during_profiling=false "
                      "--xla_dump_to=/d")
    assert train_step.xla_flag_value(merged, train_step.PROFILING_FLAG) == "false"
    assert train_step.xla_flag_value("--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer") == ""
    assert train_step.xla_flag_value(merged, "--xla_gpu_autotune_level") is None


def test_configure_xla_flags_sets_them_before_backend_init_and_refuses_after(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    args = train_step.parse_args(["--tiny", "--profile-dir", "/p"])
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    record = train_step.configure_xla_flags(args)
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=1 "
                                       "--xla_enable_command_buffers_during_profiling=true")
    assert record == {"xla_flags": os.environ["XLA_FLAGS"],
                      "xla_flags_added": ["--xla_enable_command_buffers_during_profiling=true"],
                      "command_buffers_during_profiling": "true"}
    # already there: nothing to add, so an initialised backend is fine
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    assert train_step.configure_xla_flags(args)["xla_flags_added"] == []
    # a flag that the running backend would not see: a clean refusal, the environment untouched
    before = os.environ["XLA_FLAGS"]
    with pytest.raises(SystemExit, match="must be in XLA_FLAGS before JAX initialises its backend"):
        train_step.configure_xla_flags(train_step.parse_args(["--tiny", "--hlo-dump", "/d"]))
    assert os.environ["XLA_FLAGS"] == before


def test_main_refuses_hlo_dump_once_the_backend_runs(tmp_path):
    import jax

    jax.devices()  # this process's backend is up
    with pytest.raises(SystemExit, match="fresh process"):
        train_step.main(["--tiny", "--method", "supervised", "--hlo-dump", str(tmp_path / "hlo"),
                         "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "hlo").exists()


def test_fresh_process_dumps_hlo_and_profiles_with_command_buffers_on(tmp_path):
    """A new process: the flags reach XLA (the dump exists), the report records them, hlo_stats reads it;
    `--kernels reference fast` times the step with both kernel sets (layers.kernels), one profile each."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    out, dump = tmp_path / "r.json", tmp_path / "hlo"
    subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--tiny", "--method", "supervised",
                    "--hlo-dump", str(dump), "--profile-dir", str(tmp_path / "p"), "--profile-steps", "1",
                    "--kernels", "reference", "fast", "--out", str(out)], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["xla_flags"] == ("--xla_force_host_platform_device_count=1 "
                                   "--xla_enable_command_buffers_during_profiling=true "
                                   f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    assert report["command_buffers_during_profiling"] == "true" and report["hlo_dump"] == str(dump)
    assert [r["kernels"] for r in report["results"]] == ["reference", "fast"]
    assert sorted(os.listdir(tmp_path / "p")) == ["supervised_float32_os8_33", "supervised_float32_os8_33_reference"]
    r = report["results"][1]
    assert r["dispatch_ms"] > 0 and report["peak_source"] == "measured-in-process"
    summary = hlo_stats.summarize([str(dump)])
    main = summary["modules"][summary["main"]]
    assert "train_step" in summary["main"] or main["instructions"] > 1000
    assert main["cudnn_convs"] == {} and main["command_buffer_computations"] == 0  # CPU: no cuDNN, no graphs
    assert any(n.endswith("after_optimizations.txt") for n in os.listdir(dump))


def test_compare_reports_table(tmp_path, capsys):
    def report(flags, added, compile_s, ms, synced, dispatch):
        return {"xla_flags": flags, "xla_flags_added": added,
                "results": [{"method": "csl", "lower_s": 1.0, "compile_s": compile_s, "ms_per_step": ms,
                             "ms_per_step_synced": synced, "dispatch_ms": dispatch, "peak_memory_gib": 17.5}]}

    (tmp_path / "a.json").write_text(json.dumps(report("", [], 60.0, 110.0, 120.0, 2.5)))
    (tmp_path / "b.json").write_text(json.dumps(report("--xla_gpu_enable_command_buffer=",
                                                       ["--xla_gpu_enable_command_buffer="], 50.0, 115.0, 121.0, 40.0)))
    result = train_step.main(["--compare", f"default={tmp_path / 'a.json'}", f"no_cmdbuf={tmp_path / 'b.json'}",
                              f"conv_fusion={tmp_path / 'missing.json'}", "--out", str(tmp_path / "flags.json")])
    assert json.loads((tmp_path / "flags.json").read_text()) == result
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["default"]["compile_s"] == 61.0 and rows["no_cmdbuf"]["dispatch_ms"] == 40.0
    assert rows["conv_fusion"]["status"] == "no report (FileNotFoundError)"
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| default | csl | 61.0 | 110.0 | 120.0 | 2.50 | 17.50 | - |"
    assert lines[3] == "| no_cmdbuf | csl | 51.0 | 115.0 | 121.0 | 40.00 | 17.50 | --xla_gpu_enable_command_buffer= |"
    assert lines[4].startswith("| conv_fusion | no report")


# ---------------------------------------------------------------------------------------------
# The PyTorch reference
# ---------------------------------------------------------------------------------------------
def _csl_weights_eigh(probs, valid, alpha, eps):
    """The torch reference's CSL weights as they were before issue 27: the split by torch.linalg.eigh of
    the raw 2x2 moments (a device sync on CUDA). The closed form must reproduce it."""
    import torch

    b, c = probs.shape[:2]
    conf, arg = probs.max(1)
    rest = probs.scatter(1, arg[:, None], 0.0)
    var = ((rest - ((1 - conf) / (c - 1))[:, None]) ** 2).sum(1) / (c - 1)
    x = torch.stack([conf, var], -1).reshape(b, -1, 2)
    m = valid.reshape(b, -1, 1).float()
    lam, vec = torch.linalg.eigh(torch.einsum("bni,bnj->bij", x * m, x))
    scores = (x @ vec).abs() / lam.clamp_min(1e-30).sqrt()[:, None, :]
    second = scores[..., 0] > scores[..., 1]
    member = torch.stack([~second, second], 1) & (m[..., 0] > 0)[:, None]
    count = member.sum(-1, keepdim=True).float()
    mf = member.float()
    mean = torch.einsum("bkn,bni->bki", mf, x) / count.clamp_min(1)
    variance = torch.einsum("bkn,bkni->bki", mf, (x[:, None] - mean[:, :, None]) ** 2) / (count - 1).clamp_min(1)
    pick = (mean[:, 1, 0] > mean[:, 0, 0]).long()
    mu = mean[torch.arange(b), pick][:, None, None]
    sigma2 = variance[torch.arange(b), pick][:, None, None]
    z_c = (conf - mu[..., 0]) / (sigma2[..., 0] + eps).sqrt()
    z_v = (mu[..., 1] - var) / (sigma2[..., 1] + eps).sqrt()
    soft = torch.exp(-z_c ** 2 / alpha) * torch.exp(-z_v ** 2 / alpha)
    weights = torch.where((z_c > 0) | (z_v > 0), torch.ones_like(soft), soft) * valid
    return weights, valid & (weights == 1)


def _random_probs(seed, shape=(4, 16, 12, 21)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * np.where(rng.random((*shape[:3], 1)) < 0.6, 6.0, 0.7)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32), rng.random(shape[:3]) < 0.9


@pytest.mark.parametrize("seed", range(6))
def test_torch_closed_form_split_equals_eigh_and_csl_jax(seed, monkeypatch):
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    probs, valid = _random_probs(seed)
    tp, tv = torch.from_numpy(probs).permute(0, 3, 1, 2), torch.from_numpy(valid)
    want_w, want_r = _csl_weights_eigh(tp, tv, 8.0, 1e-8)
    jax_w, jax_r = pseudo_labels.csl_weights(probs, valid, alpha=8.0)

    def no_eigh(*args, **kwargs):
        raise AssertionError("the closed form must not call torch.linalg.eigh")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    got_w, got_r = torch_reference.csl_weights(tp, tv, alpha=8.0, eps=1e-8)
    np.testing.assert_allclose(got_w.numpy(), want_w.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_w.numpy(), np.asarray(jax_w), rtol=0, atol=1e-6)
    assert torch.equal(got_r, want_r) and np.array_equal(got_r.numpy(), np.asarray(jax_r))
    assert 0.2 < got_r.numpy()[valid].mean() < 0.95  # a real split


def test_torch_closed_form_split_degenerate_images_match_csl_jax():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    probs, valid = _random_probs(7, (4, 8, 8, 5))
    probs[0] = 0.2                      # uniform: conf 0.2, var 0 everywhere (M singular, v = 0)
    probs[1] = np.eye(5, dtype=np.float32)[np.arange(64).reshape(8, 8) % 5]  # one-hot: all p = 1, v = 0
    valid[2] = False                    # no valid pixel
    probs[3, :, :4] = probs[3, 0, 0]    # half the image one identical pixel
    tp, tv = torch.from_numpy(probs).permute(0, 3, 1, 2), torch.from_numpy(valid)
    got_w, got_r = torch_reference.csl_weights(tp, tv, alpha=8.0, eps=1e-8)
    want_w, want_r = pseudo_labels.csl_weights(probs, valid, alpha=8.0)
    assert np.isfinite(got_w.numpy()).all()
    np.testing.assert_allclose(got_w.numpy(), np.asarray(want_w), rtol=0, atol=1e-6)
    assert np.array_equal(got_r.numpy(), np.asarray(want_r))
    # the split itself, image by image, against csl_jax's assignments
    stats = pseudo_labels.csl_statistics(probs, valid)
    split = torch_reference.spectral_split(torch.from_numpy(np.array(stats.conf)).reshape(4, -1),
                                           torch.from_numpy(np.array(stats.var)).reshape(4, -1), tv.reshape(4, -1))
    assert np.array_equal(split.numpy().astype(np.int32), np.asarray(stats.assignment).reshape(4, -1))


def test_torch_foreach_ema_equals_the_per_tensor_loop():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    config = train_step.make_config("csl", 50, 8, 33, "float32", 2, 2, tiny=True)
    torch.manual_seed(0)
    trainer = torch_reference.Trainer(config, 21, torch.device("cpu"), bf16=False)
    with torch.no_grad():  # a student that differs from the teacher in every parameter and BN buffer
        for t in list(trainer.model.parameters()) + list(trainer.model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
        trainer.model.layers[0][0].body[0][1].num_batches_tracked += 3
    reference = copy.deepcopy(trainer.teacher)
    teacher, student = trainer.ema_pairs()
    assert len(teacher) == len(student) == sum(t.is_floating_point() for t in
                                                list(reference.parameters()) + list(reference.buffers()))
    trainer.update_teacher(0.99)
    with torch.no_grad():
        for t, s in zip(list(reference.parameters()) + list(reference.buffers()),
                        list(trainer.model.parameters()) + list(trainer.model.buffers())):
            if t.is_floating_point():
                t.lerp_(s, 1 - 0.99)
    got = dict(trainer.teacher.state_dict())
    for name, want in reference.state_dict().items():
        assert torch.equal(got[name], want), name
    assert trainer.teacher.layers[0][0].body[0][1].num_batches_tracked == 0  # integer buffers: no EMA


def test_torch_variants_and_the_command_train_step_runs():
    from benchmarks import torch_reference

    assert torch_reference.variants("bfloat16", ["eager"], True) == [(True, False)]
    assert torch_reference.variants("float32", ["eager"], False) == [(True, False)]
    assert torch_reference.variants("float32", ["eager", "compile"], True) == [
        (True, False), (False, False), (True, True), (False, True)]
    assert [torch_reference.variant_name(*v) for v in [("bfloat16", True, False), ("float32", True, False),
                                                       ("float32", False, True)]] == ["bf16", "tf32", "fp32_compile"]
    args = train_step.parse_args(["--method", "csl", "--torch", "--torch-compile", "--torch-strict-fp32",
                                  "--torch-args", "--compile-backend eager", "--iters", "20", "--out", "/x/b.json"])
    cmd = train_step.torch_command(args)
    assert cmd[cmd.index("--out") + 1] == "/x/b.json.torch.json"
    assert cmd[cmd.index("--dtype") + 1:cmd.index("--dtype") + 3] == ["bfloat16", "float32"]
    assert cmd[-6:] == ["--compile", "--compile-mode", "default", "--strict-fp32", "--compile-backend", "eager"]


def test_torch_tf32_fp32_and_compile_rows_and_their_speedups(tmp_path, capsys):
    """The plumbing of the extra rows on the CPU: compile through dynamo's 'eager' backend (graph capture of
    the whole loss, closed-form split included, without inductor's C++ build), and the table's columns."""
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference

    allow = torch.backends.cudnn.allow_tf32
    report = torch_reference.main(["--tiny", "--method", "csl", "--dtype", "float32", "--strict-fp32", "--compile",
                                   "--compile-backend", "eager", "--out", str(tmp_path / "t.json")])
    assert torch.backends.cudnn.allow_tf32 == allow  # restored
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["tf32", "fp32", "tf32_compile", "fp32_compile"]
    assert [(r["tf32"], r["compiled"]) for r in rows.values()] == [(True, False), (False, False), (True, True),
                                                                  (False, True)]
    assert rows["fp32"]["recipe"] == "float32 NCHW, TF32 off"
    assert rows["tf32_compile"]["recipe"] == "float32 NCHW, TF32 convs (default) + torch.compile"
    assert rows["tf32_compile"]["compile_backend"] == "eager" and rows["tf32"]["compile_backend"] is None
    assert report["settings"]["modes"] == ["eager", "compile"] and report["settings"]["strict_fp32"]
    for r in rows.values():
        assert np.isfinite(r["final_loss"]) and r["ms_per_step"] > 0
    # the same numbers in every row: TF32 is a no-op on the CPU, and dynamo's eager backend runs the same ops
    assert rows["tf32_compile"]["final_loss"] == pytest.approx(rows["tf32"]["final_loss"], rel=1e-5)

    jax_row = {"method": "csl", "encoder": None, "depth": 50, "output_stride": 8, "crop": 33, "labeled": 2,
               "unlabeled": 2, "dtype": "float32", "compile_only": False, "ms_per_step": 10.0,
               "ms_per_step_synced": 12.0}
    train_step.attach_torch([jax_row], report["results"])
    assert list(jax_row["speedup_vs_torch_by_variant"]) == ["tf32", "fp32", "tf32_compile", "fp32_compile"]
    assert jax_row["speedup_vs_torch_float32"] == pytest.approx(rows["tf32"]["ms_per_step"] / 10.0)
    assert jax_row["speedup_vs_torch_by_variant"]["fp32_compile"] == pytest.approx(
        rows["fp32_compile"]["ms_per_step"] / 10.0)
    capsys.readouterr()
    full = dict(jax_row, output_stride=8, lower_s=1.0, compile_s=2.0, dispatch_ms=0.5)
    train_step.print_table({"device": "cpu: cpu", "devices": 1, "jax": "x", "peak_tflops": 1.0,
                            "peak_source": "flag", "out": "o.json", "results": [full]})
    header, line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split()[-8:] == ["vs", "TF32", "vs", "fp32", "vs", "TF32c", "vs", "fp32c"]
    assert "synced" in header and "disp ms" in header
    assert line.split()[-4:] == [f"{v:.2f}" for v in jax_row["speedup_vs_torch_by_variant"].values()]


# ---------------------------------------------------------------------------------------------
# hlo_stats
# ---------------------------------------------------------------------------------------------
SYNTHETIC_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[16,33,33,256]{3,2,1,0})->f32[]}

%fused_convert (param_0.1: bf16[16,33,33,256]) -> f32[16,33,33,256] {
  %param_0.1 = bf16[16,33,33,256]{3,2,1,0} parameter(0)
  ROOT %convert.5 = f32[16,33,33,256]{3,2,1,0} convert(bf16[16,33,33,256]{3,2,1,0} %param_0.1)
}

%fused_reduce (param_0.2: bf16[16,33,33,256]) -> f32[256] {
  %param_0.2 = bf16[16,33,33,256]{3,2,1,0} parameter(0)
  %convert.6 = f32[16,33,33,256]{3,2,1,0} convert(bf16[16,33,33,256]{3,2,1,0} %param_0.2)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[256]{0} reduce(f32[16,33,33,256]{3,2,1,0} %convert.6, f32[] %constant.1), dimensions={0,1,2}, to_apply=%add
}

%fused_small_convert (param_0.3: bf16[256]) -> f32[256] {
  %param_0.3 = bf16[256]{0} parameter(0)
  ROOT %convert.7 = f32[256]{0} convert(bf16[256]{0} %param_0.3)
}

%command_buffer (p.0: bf16[16,33,33,256]) -> f32[16,33,33,256] {
  %p.0 = bf16[16,33,33,256]{3,2,1,0} parameter(0)
  ROOT %loop_convert_fusion = f32[16,33,33,256]{3,2,1,0} fusion(bf16[16,33,33,256]{3,2,1,0} %p.0), kind=kLoop, calls=%fused_convert
}

%command_buffer.1 (p.1: bf16[256]) -> f32[256] {
  %p.1 = bf16[256]{0} parameter(0)
  ROOT %loop_convert_fusion.1 = f32[256]{0} fusion(bf16[256]{0} %p.1), kind=kLoop, calls=%fused_small_convert
}

ENTRY %main.9 (x: bf16[16,33,33,256]) -> f32[] {
  %x = bf16[16,33,33,256]{3,2,1,0} parameter(0)
  %w = bf16[3,3,256,256]{3,2,1,0} parameter(1)
  %cudnn-conv.1 = (bf16[16,33,33,256]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,33,33,256]{3,2,1,0} %x, bf16[3,3,256,256]{3,2,1,0} %w), window={size=3x3 pad=1_1x1_1 rhs_dilate=2x2}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", backend_config={"conv_result_scale":1}
  %cudnn-conv.2 = (bf16[3,3,256,256]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,33,33,256]{3,2,1,0} %x, bf16[16,33,33,256]{3,2,1,0} %x), window={size=33x33 stride=6x6 pad=6_6x6_6 lhs_dilate=1x1}, dim_labels=f01b_i01o->01bf, custom_call_target="__cudnn$convForward"
  %cudnn-conv.3 = (bf16[3,3,256,256]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,33,33,256]{3,2,1,0} %x, bf16[16,33,33,256]{3,2,1,0} %x), window={size=33x33 stride=12x12 pad=12_12x12_12}, dim_labels=f01b_i01o->01bf, custom_call_target="__cudnn$convForward"
  %cudnn-conv.4 = (bf16[16,17,17,512]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,33,33,256]{3,2,1,0} %x, bf16[1,1,256,512]{3,2,1,0} %w), window={size=1x1 stride=2x2}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %cudnn-conv-bw-filter.5 = (bf16[3,3,256,256]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,33,33,256]{3,2,1,0} %x, bf16[16,33,33,256]{3,2,1,0} %x), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %cublas-gemm.1 = (f32[64,64]{1,0}, s8[4194304]{0}) custom-call(f32[64,64]{1,0} %a, f32[64,64]{1,0} %b), custom_call_target="__cublas$gemm"
  %call = f32[16,33,33,256]{3,2,1,0} call(bf16[16,33,33,256]{3,2,1,0} %x), to_apply=%command_buffer
  %call.1 = f32[256]{0} call(bf16[256]{0} %y), to_apply=%command_buffer.1
  %input_reduce_fusion = f32[256]{0} fusion(bf16[16,33,33,256]{3,2,1,0} %x), kind=kInput, calls=%fused_reduce
  %convert_fusion.2 = (bf16[16,33,33,256]{3,2,1,0}, bf16[16]{0}) fusion(f32[16,33,33,256]{3,2,1,0} %call), kind=kLoop, calls=%fused_other
  ROOT %r = f32[] constant(0)
}
"""  # noqa: E501  (HLO text lines as XLA prints them)


def test_hlo_stats_counts_a_synthetic_module(tmp_path, capsys):
    s = hlo_stats.module_stats(SYNTHETIC_HLO)
    assert s["computations"] == 6 and s["instructions"] == 25  # 2 + 4 + 2 + 2 + 2 + 13
    assert s["cudnn_convs"] == {"__cudnn$convBackwardFilter": 1, "__cudnn$convForward": 4}
    assert s["custom_call_targets"]["__cublas$gemm"] == 1
    # the two map-sized windows with stride 6 and 12 (dilated wgrads) and the 1x1/2 downsample
    assert s["strided_conv_forward"] == 3 and s["strided_conv_forward_large_window"] == 2
    assert s["strided_conv_forward_by_window"] == {"size=33x33 stride=6x6": 1, "size=33x33 stride=12x12": 1,
                                                   "size=1x1 stride=2x2": 1}
    assert s["command_buffer_computations"] == 2 and s["command_buffer_calls"] == 2
    assert s["fusions"] == 4 and s["convert_fusions"] == 3
    assert s["f32_convert_fusions"] == 2 and s["f32_convert_fusions_4d"] == 1
    assert s["fusions_with_f32_upcast_4d"] == 2  # loop_convert_fusion and the BN-like input_reduce_fusion

    # a dump directory, a .tgz of it, a single file: the same counts; the largest module is 'main'
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "module_0001.jit_step.sm_9.0_gpu_after_optimizations.txt").write_text(SYNTHETIC_HLO)
    (dump / "module_0001.jit_step.sm_9.0_gpu_after_optimizations-buffer-assignment.txt").write_text("x")
    (dump / "module_0000.jit_small.sm_9.0_gpu_after_optimizations.txt").write_text(
        "HloModule jit_small\n\nENTRY %main (p: f32[2]) -> f32[2] {\n  ROOT %p = f32[2]{0} parameter(0)\n}\n")
    with tarfile.open(tmp_path / "hlo.tgz", "w:gz") as tar:
        for name in os.listdir(dump):
            tar.add(dump / name, arcname=name)
    for source in (dump, tmp_path / "hlo.tgz"):
        summary = hlo_stats.summarize([str(source)])
        assert len(summary["modules"]) == 2 and summary["main"].endswith("jit_step.sm_9.0_gpu_after_optimizations.txt")
        assert summary["modules"][summary["main"]] == s
    result = hlo_stats.main([str(tmp_path / "hlo.tgz"), "--out", str(tmp_path / "stats.json")])
    assert json.loads((tmp_path / "stats.json").read_text()) == result
    printed = capsys.readouterr().out
    assert "| convForward with window stride > 1 | 3 |" in printed
    assert "| command-buffer computations | 2 |" in printed
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*after_optimizations.txt"):
        hlo_stats.summarize([str(tmp_path / "empty")])


# ---------------------------------------------------------------------------------------------
# gpu_suite.sh runs A/B/C (dry run: the plan, no GPU)
# ---------------------------------------------------------------------------------------------
def _dry(mode, tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", mode], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return [line.split(" ", 3)[3] if line.startswith("[dry] timeout") else line
            for line in done.stdout.strip().splitlines()]


def test_gpu_suite_run_plans(tmp_path):
    a = _dry("runA", tmp_path)
    assert a[0].startswith("python3 -m benchmarks.train_step --method csl unimatch --torch --iters 20 ")
    assert "--hlo-dump" in a[0] and a[0].endswith(f"--out {tmp_path}/out/base.json")
    assert "--profile-dir" in a[1] and "--hlo-dump" not in a[1]
    assert a[2].startswith("python3 -m benchmarks.profile_summary") and a[3].startswith("[dry] pack")
    assert a[4].startswith("python3 -m benchmarks.hlo_stats") and a[5].startswith("python3 -m benchmarks.dilated_conv")

    b = _dry("runB", tmp_path)
    assert b[0] == "[dry] probe XLA_FLAGS=--xla_gpu_command_buffer_update_mode=NEVER_UPDATE"
    flags = [line.split("--xla-flags=")[1].split(" --out")[0] for line in b if "--xla-flags=" in line]
    assert flags == ["", "--xla_gpu_enable_command_buffer=", "--xla_gpu_autotune_level=1",
                     "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE",
                     "--xla_gpu_experimental_enable_conv_fusion=true"]
    assert all("--method csl --iters 20" in line for line in b if "--xla-flags=" in line)
    assert b[-1].startswith("[dry] compare default=")

    c = _dry("runC", tmp_path)
    assert c[0].startswith("python3 -m benchmarks.train_step --method csl unimatch --torch")
    assert "--hlo-dump" not in c[0] and "--kernels reference fast" in c[0]  # before / after in one process
    assert "--modes compile" in c[1] and c[2].startswith("python3 -m benchmarks.suite") and "--parts 4" in c[2]


def test_gpu_suite_run_b_flags_parse_in_this_jaxlib():
    """The values runB probes and the flags it passes are known to the installed jaxlib's flag parser
    (an unknown flag aborts the process), checked in a subprocess each."""
    for flags in ("--xla_gpu_command_buffer_update_mode=NEVER_UPDATE --xla_gpu_enable_command_buffer= "
                  "--xla_gpu_autotune_level=1 --xla_gpu_experimental_enable_conv_fusion=true "
                  "--xla_enable_command_buffers_during_profiling=true",):
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, check=True, timeout=120,
                       capture_output=True)
