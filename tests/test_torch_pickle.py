"""csl_jax.models.torch_pickle: torch.save files (zip and legacy) read without torch, compared with
torch.load itself; pickles that would run code are refused before anything runs; the recipes' init
path (pretrained.resolve_init + convert.load_pretrained) works in a process where torch cannot be
imported."""

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

from csl_jax.methods.base import init_network
from csl_jax.models import build_model, convert, torch_pickle

torch = pytest.importorskip("torch")
from tests.test_pretrained import REPO, tiny_model_config  # noqa: E402
from tests.test_pretrained import backbone  # noqa: E402, F401  (a fixture)

FORMATS = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return str(path)


def as_numpy(value):
    """torch.load's result with tensors as NumPy (bfloat16 through its bits): the reference."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    if isinstance(value, dict):
        return type(value)((k, as_numpy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(as_numpy(v) for v in value)
    return value


def assert_same(got, expected, where="checkpoint"):
    """Same containers (OrderedDict stays OrderedDict), same keys, arrays equal bit for bit."""
    assert type(got) is type(expected), where
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray):  # in native byte order, as NumPy 2 unpickles arrays
        expected = expected.astype(expected.dtype.newbyteorder("="))
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), where
        assert got.tobytes() == expected.tobytes(), where
    else:
        assert got == expected, where


def check_against_torch(path):
    got = torch_pickle.load(path)
    assert_same(got, as_numpy(torch.load(path, weights_only=False)))
    return got


# ----------------------------------------------------------------------------- values
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_matches_torch_load(tmp_path, fmt):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) * 300
    values[0, 0, :3] = torch.tensor([float("inf"), -0.0, float("nan")])
    ints = values.round().clamp(-128, 127)
    state = {str(dtype): values.to(dtype) for dtype in DTYPES if dtype.is_floating_point or dtype.is_complex}
    state.update({str(dtype): ints.to(dtype) for dtype in (torch.int64, torch.int32, torch.int16, torch.int8)})
    state.update({"torch.uint8": (ints + 128).to(torch.uint8), "torch.bool": values > 0})
    assert sorted(state) == sorted(map(str, DTYPES))
    got = check_against_torch(save(state, tmp_path / "dtypes.pth", fmt))
    assert got["torch.bfloat16"].dtype == ml_dtypes.bfloat16 and got["torch.bool"].dtype == np.bool_
    assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_shared_storages_and_nested_containers(tmp_path, fmt):
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    state = collections.OrderedDict(
        base=base, transpose=base.t(), slice=base[1:4, 3:10:2], row=base[3], offset=base.view(-1)[7:19],
        expanded=base[2:3, :4].expand(3, 4), scalar=torch.tensor(2.5, dtype=torch.float64),
        empty=torch.zeros(0, 3, dtype=torch.int64), parameter=torch.nn.Parameter(torch.ones(2, 2)),
        nested={"list": [base[0, :2], (base[:, 0], {"deep": collections.OrderedDict(x=base[4, ::5])})],
                "leaves": [3, 0.5, "text", None, True, b"bytes"]})
    state["again"] = state["nested"]  # one pickled object referenced twice
    got = check_against_torch(save(state, tmp_path / "views.pth", fmt))
    assert not any(np.shares_memory(got["base"], got[k]) for k in ("transpose", "slice", "row", "offset"))
    assert got["again"] is got["nested"]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load's storage, the reference
def test_a_bare_storage(tmp_path):
    storage = torch.UntypedStorage(torch.arange(5, dtype=torch.uint8).untyped_storage())
    path = save({"storage": storage, "w": torch.ones(3)}, tmp_path / "storage.pth", "zip")
    got = torch_pickle.load(path)["storage"]
    assert got.dtype == np.uint8 and got.tolist() == torch.load(path, weights_only=False)["storage"].tolist()


def test_a_big_endian_file(tmp_path):
    """The file a big-endian machine writes (byteorder 'big', each element's bytes swapped), which
    torch.load swaps back."""
    path = save({"w": torch.randn(3, 4).t(), "i": torch.tensor([1, -2, 3 << 20], dtype=torch.int32)},
                tmp_path / "little.pth", "zip")  # 4-byte elements only: every storage is swapped alike
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, np.uint32).byteswap().tobytes()
            dst.writestr(name, data)
    got = check_against_torch(str(big))
    assert_same(got, torch_pickle.load(path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_css_numpy_entries(tmp_path, fmt):
    """CSS saves its prototypes as a NumPy array next to the state dicts."""
    rng = np.random.default_rng(0)
    state = {"model": {"w": torch.randn(3, 2)}, "prototypes": rng.standard_normal((4, 8)).astype(np.float32),
             "fortran": np.asfortranarray(rng.standard_normal((3, 5))), "counts": np.arange(6, dtype=np.int64),
             "big_endian": np.arange(4, dtype=">i4"), "best": np.float64(0.725), "step": np.int64(7)}
    got = check_against_torch(save(state, tmp_path / "css.pth", fmt))
    assert type(got["best"]) is np.float64 and got["fortran"].flags.f_contiguous


# ----------------------------------------------------------------------------- refused and broken files
class RunsCommand:
    """Unpickling this runs `touch <path>`: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class Evaluates:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return eval, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = save({"weight": torch.ones(2), "payload": RunsCommand(marker)}, tmp_path / "evil.pth", fmt)
    with pytest.raises(torch_pickle.UnsafeCheckpointError) as error:
        convert.load_file(path)
    assert str(error.value) == (f"refusing to load {path}: it would import {os.system.__module__}.system; a weights "
                                "file holds only tensors and containers")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: torch's unrestricted load runs it
    assert marker.exists()


def test_eval_written_into_data_pkl_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = save({"weight": torch.ones(2)}, tmp_path / "ok.pth", "zip")
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, pickle.dumps(Evaluates(marker), protocol=2) if name.endswith("/data.pkl") else data)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"it would import __builtin__\.eval;"):
        torch_pickle.load(str(evil))
    assert not marker.exists()


def test_tensor_outside_its_storage_is_refused(tmp_path):
    """An allowed global with hostile arguments: a view past the end of its storage is never read."""
    path = save({"w": torch.arange(4.0)}, tmp_path / "ok.pth", "zip")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")][0]
        data = archive.read(pkl)
        others = {n: archive.read(n) for n in archive.namelist() if n != pkl}
    # _rebuild_tensor_v2(storage, 0, (4,), (1,), ...): the pickle holds size and stride as BININT1 pairs
    assert data.count(b"K\x04\x85") == 1
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for name, content in others.items():
            dst.writestr(name, content)
        dst.writestr(pkl, data.replace(b"K\x04\x85", b"K\x40\x85"))  # size 64 over a storage of 4
    with pytest.raises(ValueError, match=r"reads element 63 of a storage of 4"):
        torch_pickle.load(str(bad))


def test_files_that_are_not_checkpoints_are_one_line_naming_them(tmp_path):
    good = save({"w": torch.randn(64, 64)}, tmp_path / "good.pth", "zip")
    legacy = save({"w": torch.randn(64, 64)}, tmp_path / "legacy.pth", "legacy")
    cases = {"page.pth": b"<!DOCTYPE html><html><body>Google Drive quota exceeded</body></html>",
             "empty.pth": b"", "noise.pth": np.random.default_rng(0).bytes(4096),
             "half.pth": open(good, "rb").read()[:9000], "half_legacy.pth": open(legacy, "rb").read()[:9000]}
    npz = tmp_path / "arrays.pth"  # a zip archive, but not torch's
    with open(npz, "wb") as f:
        np.savez(f, w=np.zeros(3))
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, npz.name]:
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as error:
            convert.load_file(path)
        message = str(error.value)
        assert message.startswith(f"cannot read PyTorch checkpoint {path}: ") and "\n" not in message, message
    with pytest.raises(ValueError, match="not a torch.save file: neither a zip archive nor a legacy checkpoint"):
        torch_pickle.load(str(tmp_path / "page.pth"))


# ----------------------------------------------------------------------------- the recipes' path without torch
NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import flax, jax, numpy as np
from configs import common, demo
from csl_jax.methods.base import init_network
from csl_jax.models import build_model
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = demo.get_config()
    common.tiny_model(config, width=4, head_width=8, reduce_width=4)
    config.model.init_from = path
    variables = jax.device_get(init_network(build_model(config.model, 3), config.model, jax.random.PRNGKey(0),
                                            (32, 32, 3)))
    np.savez(out, **flax.traverse_util.flatten_dict(variables, sep="/"))
assert sys.modules["torch"] is None
"""


def test_the_recipes_init_path_reads_pth_files_without_torch(backbone, tmp_path):  # noqa: F811
    _, state = backbone
    args = []
    for fmt in FORMATS:
        args += [save(state, tmp_path / f"{fmt}.pth", fmt), str(tmp_path / f"{fmt}.npz")]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the reference: the torch tensors themselves loaded into the same random init
    model_cfg = tiny_model_config("none")
    random = jax.device_get(init_network(build_model(model_cfg, 3), model_cfg, jax.random.PRNGKey(0), (32, 32, 3)))
    expected, report = convert.load_pretrained(random, state)
    assert report["kind"] == "deep_backbone"
    expected = flax.traverse_util.flatten_dict(expected, sep="/")
    for fmt in FORMATS:
        with np.load(tmp_path / f"{fmt}.npz") as got:
            assert sorted(got.files) == sorted(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{fmt}: {key}")
