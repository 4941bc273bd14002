"""The GPU benchmark suite in --tiny mode (CPU): every part runs, its tables match its reports,
the targets are computed from the measurements, and a spent budget stops it cleanly."""
import contextlib
import json
import os

import pytest

from benchmarks import eval_scale, profile_summary, suite


@contextlib.contextmanager
def one_cpu_device_for_children():
    """The suite's processes inherit the environment: one CPU device each, as on a one-GPU machine."""
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    with one_cpu_device_for_children():
        index = suite.main(["--tiny", "--budget-s", "1200", "--out", str(out)])
    return out, index


def _part(out, stem):
    with open(out / f"{stem}.json") as f:
        jobs = {j["name"]: j for j in json.load(f)["jobs"]}
    with open(out / f"{stem}.md") as f:
        return jobs, f.read()


def test_every_part_runs_and_writes_its_files(tiny_suite, capsys):
    out, index = tiny_suite
    assert [p["number"] for p in index["parts"]] == [1, 2, 3, 4, 5, 6]
    for part in index["parts"]:
        for name, job in part["jobs"].items():
            assert job["status"] == "ok", (part["name"], name, open(out / "logs" / f"{name}.log").read()[-3000:])
        assert (out / part["file"]).exists() and (out / part["file"].replace(".json", ".md")).exists()
    with open(out / "suite.json") as f:
        assert json.load(f) == json.loads(json.dumps(index))
    assert 0 < index["elapsed_s"] < 1200


def test_part_tables_are_the_reports_numbers(tiny_suite):
    out, _ = tiny_suite
    part1, md1 = _part(out, "part1_train_step_513")
    step = part1["train_step"]["report"]
    assert {r["method"] for r in step["results"]} == {"csl", "unimatch"}
    torch_fp32 = {t["method"]: t for t in step["torch_results"] if t["dtype"] == "float32"}
    for r in step["results"]:
        assert f"| {r['ms_per_step']:.1f} |" in md1
        # speed-up against PyTorch float32, recomputed from the two reports
        assert r["speedup_vs_torch_float32"] == pytest.approx(torch_fp32[r["method"]]["ms_per_step"] / r["ms_per_step"])
    assert "profiles" not in step  # traced in a process of its own
    assert set(part1["profile"]["report"]["profiles"]) == {"csl_bfloat16_os8_33"}
    assert "Profile of 3 steps, csl_bfloat16_os8_33" in md1

    part2, md2 = _part(out, "part2_compile")
    cold = {r["method"]: r["lower_s"] + r["compile_s"] for r in step["results"]}
    for w in part2["warm"]["report"]["results"]:
        assert w["compile_only"] and "ms_per_step" not in w
        warm = w["lower_s"] + w["compile_s"]
        assert f"| {cold[w['method']]:.1f} |" in md2 and f"| {warm:.1f} | {cold[w['method']] / warm:.1f} |" in md2
        # the persistent cache filled by part 1 turns the XLA compile into a load
        assert w["compile_s"] < 0.5 * next(r["compile_s"] for r in step["results"] if r["method"] == w["method"])

    part3, md3 = _part(out, "part3_csl_configs")
    remat = part3["os8_801_remat"]["report"]["results"][0]
    assert remat["remat"] and remat["output_stride"] == 8 and f"| {remat['ms_per_step']:.1f} |" in md3

    part6, md6 = _part(out, "part6_eval")
    assert eval_scale.markdown(part6["eval_scale"]["report"]) in md6


def test_targets_are_computed_from_the_measurements(tiny_suite):
    out, index = tiny_suite
    part1, _ = _part(out, "part1_train_step_513")
    rows = {r["method"]: r for r in part1["train_step"]["report"]["results"]}
    by_name = {t["target"]: t for t in index["targets"]}
    mfu = next(t for t in by_name.values() if "MFU" in t["target"])
    assert mfu["measured"] == rows["csl"]["mfu_reference"]  # None: the tiny model is not in the FLOP table
    vs_fp32 = next(t for t in by_name.values() if "TF32" in t["target"])
    assert vs_fp32["measured"] == pytest.approx(rows["csl"]["speedup_vs_torch_float32"])
    assert vs_fp32["met"] == (rows["csl"]["speedup_vs_torch_float32"] >= suite.TARGET_VS_TORCH_TF32)
    compile_t = next(t for t in by_name.values() if "compile" in t["target"])
    assert compile_t["measured"] == pytest.approx(max(r["lower_s"] + r["compile_s"] for r in rows.values()))
    part4, _ = _part(out, "part4_dtype")
    runs = part4["train_run"]["report"]["runs"]
    wait = next(t for t in by_name.values() if "data wait" in t["target"])
    assert wait["measured"] == pytest.approx(max(r["data_wait_share"] for r in runs.values()))
    assert len(by_name) == len(index["targets"]) == 6


def test_the_suite_markdown_is_printed_last(tiny_suite, tmp_path, capsys):
    out, _ = tiny_suite
    with open(out / "suite.md") as f:
        markdown = f.read()
    assert markdown.startswith("# Benchmark suite (tiny, CPU)")
    for number in range(1, 7):
        assert f"\n## {number}. " in markdown


def test_a_spent_budget_stops_the_running_job_and_skips_the_rest(tmp_path, capsys):
    with one_cpu_device_for_children():
        index = suite.main(["--tiny", "--parts", "1", "2", "--budget-s", "3", "--out", str(tmp_path)])
    jobs = {name: job for p in index["parts"] for name, job in p["jobs"].items()}
    assert jobs["train_step"]["status"] == "stopped (budget spent)"
    assert 2.5 < jobs["train_step"]["seconds"] < 25
    assert jobs["warm"]["status"] == "skipped (budget spent)"
    assert all(t["measured"] is None and t["met"] is None for t in index["targets"])
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(open(tmp_path / "suite.md").read().rstrip())


def test_union_length_and_categories_against_hand_counts():
    assert profile_summary.union_length([]) == 0
    assert profile_summary.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7), (10, 11)]) == 3 + 1 + 1
    assert profile_summary.union_length([(4, 9), (0, 1), (1, 2)]) == 7  # touching intervals join
    assert profile_summary.category("convolution.12", "sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    assert profile_summary.category("custom-call.3", "cutlass_80_tensorop_gemm") == "matmul"
    assert profile_summary.category("transpose.1", "") == "copy/transpose"
    assert profile_summary.category("reduce.7", "") == "reduction"
    assert profile_summary.category("loop_add_fusion", "loop_add_fusion") == "fusion"
    assert profile_summary.category("rng-bit-generator", "") == "other"
    # 'convert' is not a convolution (seen on a GPU: loop_convert_fusion kernels)
    assert profile_summary.category("command_buffer_12", "loop_convert_fusion_3") == "fusion"
    assert profile_summary.category("cudnn-conv-bw-filter.431", "sm90_xmma_wgrad_implicit_gemm") == "convolution"


def test_profile_summary_of_a_real_trace(tiny_suite):
    out, _ = tiny_suite
    summary = profile_summary.summarize(str(out / "profile" / "csl_bfloat16_os8_33"), top=5)
    assert 0 < summary["busy_ms"] <= summary["span_ms"] + 1e-9
    assert summary["busy_ms"] <= summary["op_total_ms"] + 1e-9
    assert sum(c["share"] for c in summary["by_category"].values()) == pytest.approx(1.0)
    assert len(summary["top_ops"]) == 5
    assert [o["ms"] for o in summary["top_ops"]] == sorted((o["ms"] for o in summary["top_ops"]), reverse=True)
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb under"):
        profile_summary.summarize(str(out / "logs"))
    assert os.path.isdir(out / "logs")
