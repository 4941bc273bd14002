"""benchmarks/dilated_conv.py: the --tiny run, its FLOP counts against brute-force references,
its ratios, JSON and table, and the timed conv (both impls: 'xla' lax autodiff and the model's
'gemm_wgrad') against a float64 NumPy dilated convolution.

What XLA counts (checked here on CPU): the forward FLOPs of a convolution are 2 x the MACs of
the kernel taps that read inside the input, padding taps excluded; in bfloat16 the CPU backend
computes the conv in float32 and adds one convert FLOP per element of input, kernel and output.
"""
import contextlib
import io
import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import dilated_conv
from csl_jax.models import dilated
from benchmarks.train_step import xla_flops

TINY = dict(batch=1, channels=8, sizes=(9, 13), dilations=(1, 2, 12))
# Element-wise FLOPs in XLA's fwd+bwd count besides the three convolutions (square, mean, their
# gradient, bf16 <-> f32 casts): bounded by this many per element of input, kernel and output.
# (On CPU the measured rest is 2 per output element in float32, < 4 per element in bfloat16.)
ELEMENTWISE_PER_ELEMENT = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(report, stdout, JSON path) of one --tiny run (stdout captured by hand: capsys is per test)."""
    out = tmp_path_factory.mktemp("bench") / "dilated_conv.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        report = dilated_conv.main(["--tiny", "--out", str(out)])
    return report, buffer.getvalue(), out


def brute_force_taps2d(n, dilation):
    """(output pixel, tap) pairs of a 3x3 conv, padding = dilation, whose input pixel is inside n x n."""
    count = 0
    for oy in range(n):
        for ox in range(n):
            for i in range(3):
                for j in range(3):
                    iy, ix = oy + (i - 1) * dilation, ox + (j - 1) * dilation
                    count += 0 <= iy < n and 0 <= ix < n
    return count


def numpy_conv_and_grads(x, k, d):
    """float64 y = dilated 3x3 conv of x (padding d), and d/dk, d/dx of mean(y^2)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    y = np.zeros((b, h, w, k.shape[-1]))
    for i in range(3):
        for j in range(3):
            y += np.einsum("bhwc,co->bhwo", xp[:, i * d:i * d + h, j * d:j * d + w], k[i, j])
    g = 2.0 * y / y.size
    dk = np.zeros_like(k)
    dxp = np.zeros_like(xp)
    for i in range(3):
        for j in range(3):
            dk[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i * d:i * d + h, j * d:j * d + w], g)
            dxp[:, i * d:i * d + h, j * d:j * d + w] += np.einsum("bhwo,co->bhwc", g, k[i, j])
    return y, dk, dxp[:, d:d + h, d:d + w]


def test_tiny_grid_and_fields(run):
    report, _, _ = run
    assert report["device"].startswith("cpu") and report["tiny"] and report["jax"] == jax.__version__
    assert report["dtype"] == "bfloat16" and (report["warmup"], report["iters"]) == (1, 2)
    rows = report["sweep"]
    assert [(r["channels"], r["size"], r["dilation"], r["impl"]) for r in rows] == [
        (TINY["channels"], s, d, impl) for s in TINY["sizes"] for d in TINY["dilations"] for impl in dilated_conv.IMPLS]
    assert dilated_conv.IMPLS == ("xla", "gemm_wgrad")
    for r in rows:
        assert r["batch"] == TINY["batch"] and 0 < r["ms_min"] <= r["ms"]
        assert r["compile_s"] > 0 and r["fwd_compile_s"] > 0
        assert r["all_taps_in_padding"] == (r["dilation"] >= r["size"])
    assert [(a["name"], a["rates"], a["size"], a["impl"]) for a in report["aspp"]] == [
        ("OS8", [12, 24, 36], 9, "xla"), ("OS8", [12, 24, 36], 9, "gemm_wgrad"),
        ("OS16", [6, 12, 18], 5, "xla"), ("OS16", [6, 12, 18], 5, "gemm_wgrad")]


def test_inbounds_count_matches_brute_force(run):
    report, _, _ = run
    for r in report["sweep"]:
        b, n, c, d = r["batch"], r["size"], r["channels"], r["dilation"]
        fwd = 2 * b * brute_force_taps2d(n, d) * c * c
        assert r["inbounds_fwd_gflops"] * 1e9 == pytest.approx(fwd, rel=1e-12)
        assert r["inbounds_gflops"] * 1e9 == pytest.approx(3 * fwd, rel=1e-12)
        assert r["nominal_gflops"] * 1e9 == pytest.approx(3 * 2 * b * n * n * 9 * c * c, rel=1e-12)
    # d >= size: only the centre tap reads the input.
    assert brute_force_taps2d(9, 12) == 81
    for n in range(1, 16):
        for d in range(1, 20):
            assert (dilated_conv.inbounds_taps_1d(n, d) ** 2 == brute_force_taps2d(n, d)), (n, d)


def test_xla_counts_inbounds_taps(run):
    report, _, _ = run
    # both impls: the GEMM weight gradient does the in-bounds FLOPs only, as XLA's conv count does
    rows = {(r["size"], r["dilation"], r["impl"]): r for r in report["sweep"]}
    for key in itertools.product((9, 13), (1, 2, 12), dilated_conv.IMPLS):
        r = rows[key]
        n, c, b = r["size"], r["channels"], r["batch"]
        inbounds = r["inbounds_fwd_gflops"] * 1e9
        converts = 2 * b * n * n * c + 9 * c * c  # input, output, kernel elements (bf16 on CPU)
        assert 0 <= r["xla_fwd_gflops"] * 1e9 - inbounds <= converts, key
        rest = r["xla_gflops"] * 1e9 - r["inbounds_gflops"] * 1e9
        # (gemm_wgrad in bf16 on CPU: each tap's cropped x and dy windows are converted to f32 again)
        slack = ELEMENTWISE_PER_ELEMENT * converts * (2 if key[2] == "gemm_wgrad" else 1)
        assert 0 <= rest <= slack, key
        if key[1] == 12:  # far below the nominal count: XLA does not count the padding taps
            assert r["xla_gflops"] + slack / 1e9 < 0.5 * r["nominal_gflops"]
    # float32: the forward count is exactly the in-bounds count.
    x = dilated_conv.random_input((2, 13, 13, 8), jnp.float32)
    params = dilated_conv.conv_params(8)
    for d in (1, 2, 12):
        module = dilated_conv.make_conv(8, d, jnp.float32)
        compiled = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).compile()
        assert xla_flops(compiled) == 2 * 2 * brute_force_taps2d(13, d) * 8 * 8, d


def test_ratios_verdict_json_and_table(run):
    report, stdout, out = run
    rows = report["sweep"]
    key = ("channels", "size", "dilation")
    for r in rows:
        base = next(b for b in rows if b["dilation"] == 1 and b["impl"] == r["impl"]
                    and (b["channels"], b["size"]) == (r["channels"], r["size"]))
        xla = next(b for b in rows if b["impl"] == "xla" and all(b[k] == r[k] for k in key))
        assert r["time_ratio"] == pytest.approx(r["ms"] / base["ms"], rel=1e-12)
        assert r["time_per_inbounds_flop_ratio"] == pytest.approx(
            (r["ms"] / r["inbounds_gflops"]) / (base["ms"] / base["inbounds_gflops"]), rel=1e-12)
        assert r["slow"] == (r["time_ratio"] > 1.5)
        assert r["speedup"] == pytest.approx(xla["ms"] / r["ms"], rel=1e-12)
        if r["dilation"] == 1:
            assert r["time_ratio"] == 1.0 and r["time_per_inbounds_flop_ratio"] == 1.0
        if r["impl"] == "xla":
            assert r["speedup"] == 1.0
    assert set(report["verdict"]) == set(dilated_conv.IMPLS)
    for impl, v in report["verdict"].items():
        mine = [r for r in rows if r["impl"] == impl]
        worst = max(mine, key=lambda r: r["time_ratio"])
        assert v["slow_rows"] == sum(r["time_ratio"] > 1.5 for r in mine) and v["rows"] == len(mine)
        assert v["worst_time_ratio"] == worst["time_ratio"]
        assert v["worst_row"] == {k: worst[k] for k in key}
    for a in report["aspp"]:
        same = [b for b in report["aspp"] if b["name"] == a["name"]]
        assert a["time_ratio"] == pytest.approx(a["ms"] / a["ms_dense"], rel=1e-12)
        assert a["speedup"] == pytest.approx(same[0]["ms"] / a["ms"], rel=1e-12) and same[0]["impl"] == "xla"
        assert a["ms_dense"] == same[0]["ms_dense"]  # the dense ASPP is timed once
        assert a["ms"] > 0 and a["ms_dense"] > 0 and a["xla_gflops"] > 0
        assert a["xla_gflops"] < a["xla_gflops_dense"]  # at a 9x9 / 5x5 map most dilated taps read padding

    assert json.loads(out.read_text()) == report
    lines = stdout.rstrip("\n").split("\n")
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["C", "size", "d", "impl"])
    assert lines[header - 3].startswith("device: cpu")
    assert [lines[header - 2].split(":")[0], lines[header - 1].split(":")[0]] == ["verdict xla", "verdict gemm_wgrad"]
    table = lines[header + 1:]
    assert len(table) == len(rows) + 1 + len(report["aspp"])
    for line, r in zip(table, rows):
        fields = line.split()
        assert [int(f) for f in fields[:3]] + fields[3:4] == [r["channels"], r["size"], r["dilation"], r["impl"]]
    assert table[len(rows)].split()[:3] == ["ASPP", "rates", "impl"]
    assert [line.split()[0] + " " + line.split()[2] for line in table[len(rows) + 1:]] == [
        "OS8 xla", "OS8 gemm_wgrad", "OS16 xla", "OS16 gemm_wgrad"]
    assert all(not line.startswith("{") for line in lines[header - 3:])  # no JSON progress after it
    text = dilated_conv.markdown(report)
    assert text.count("| OS8 |") == 2 and "Sweep, gemm_wgrad:" in text and "Sweep, xla:" in text
    assert sum(line.startswith("| 8 |") for line in text.split("\n")) == len(rows)


@pytest.mark.parametrize("impl", ["xla", "gemm_wgrad"])
@pytest.mark.parametrize("dilation", [1, 2, 3, 8])
def test_timed_conv_matches_numpy(dilation, impl):
    channels = 3
    module = dilated_conv.make_conv(channels, dilation, jnp.float32, impl)
    expected = dilated.DilatedConv if impl == "gemm_wgrad" and dilation > 1 else nn.Conv
    assert type(module) is expected
    params = dilated_conv.conv_params(channels, seed=dilation)
    x = dilated_conv.random_input((2, 7, 7, channels), jnp.float32, seed=10 + dilation)
    y_ref, dk_ref, dx_ref = numpy_conv_and_grads(np.asarray(x, np.float64),
                                                 np.asarray(params["kernel"], np.float64), dilation)
    y = module.apply({"params": params}, x)
    dparams, dx = jax.jit(dilated_conv.conv_grad_fn(module))(params, x)
    for got, ref in ((y, y_ref), (dparams["kernel"], dk_ref), (dx, dx_ref)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
