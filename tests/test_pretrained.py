"""Initial weights by name (csl_jax/models/pretrained.py): registry, download from a local HTTP server,
cache, checksums, offline and corrupt files, the 'imagenet' alias, records; published recipes never
train from random weights by accident. No test reaches the internet: files come from 127.0.0.1."""

import dataclasses
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import pytest

from configs import common, csl_pascal, demo, supervised_pascal
from csl_jax import run_info, train
from csl_jax.methods.base import init_network
from csl_jax.models import build_model, pretrained
from data_prep import synthetic

torch = pytest.importorskip("torch")
from tests.test_convert_parity import _randomised  # noqa: E402  (tiny PyTorch DeepLabV3+ with random BN)
from tests.test_training_run import tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=4, head_width=8, reduce_width=4)  # common.tiny_model overrides
NAME = "test:tiny"


# ----------------------------------------------------------------------------- fixtures
class Server:
    """A local HTTP server of `files` ({'/path': bytes}) that counts the requests per path."""

    def __init__(self):
        self.files, self.requests = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def backbone():
    """(bytes of a torch-saved tiny deep-stem ResNet state dict with an `fc`, as ImageNet files have; the dict)."""
    model = common.tiny_model(common.get_base_config(), **TINY).model  # the same network in PyTorch
    tmodel = _randomised(num_classes=3, **{k: model[k] for k in common.TINY_MODEL})
    state = {k: v.clone() for k, v in tmodel.backbone.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    state["fc.weight"] = torch.randn(10, 32 * model.width, generator=gen)
    state["fc.bias"] = torch.randn(10, generator=gen)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weights cache ($CSL_JAX_WEIGHTS_DIR) and a registry restored after the test."""
    folder = tmp_path / "weights"
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(folder))
    monkeypatch.setattr(pretrained, "REGISTRY", dict(pretrained.REGISTRY))
    return folder


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/resnet101.pth"


def tiny_model_config(init_from: str):
    c = demo.get_config()
    common.tiny_model(c, **TINY)
    c.model.init_from = init_from
    return c.model


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- download and cache
def test_download_once_then_cache_hit(server, backbone, cache, capsys):
    data, _ = backbone
    server.files["/ok.pth"] = data
    pretrained.register_weights(NAME, url=server.url("/ok.pth"), kind="deep_backbone", filename="tiny.pth",
                                sha256=sha256(data))
    source = pretrained.resolve_init(tiny_model_config(NAME))
    path = cache / "test" / "tiny.pth"
    assert source == pretrained.InitSource(path=str(path), name=NAME, sha256=sha256(data), kind="deep_backbone")
    assert path.read_bytes() == data
    assert files_in(cache) == ["test/tiny.pth"]  # no temporary file, no .sha256 (a published checksum)
    err = capsys.readouterr().err
    assert f"Downloading {NAME} from {server.url('/ok.pth')} to {path}" in err and "100% " in err
    assert pretrained.check_available(tiny_model_config(NAME)) == source  # served from the cache
    assert server.requests["/ok.pth"] == 1
    assert source.record() == {"name": NAME, "path": str(path), "sha256": sha256(data), "kind": "deep_backbone"}


def test_checksum_mismatch_keeps_nothing(server, backbone, cache):
    data, _ = backbone
    server.files["/corrupt.pth"] = data[:-10] + b"x" * 10
    pretrained.register_weights(NAME, url=server.url("/corrupt.pth"), kind="deep_backbone", filename="tiny.pth",
                                sha256=sha256(data))
    with pytest.raises(pretrained.ChecksumError) as error:
        pretrained.resolve_init(tiny_model_config(NAME))
    message = str(error.value)
    served = sha256(server.files["/corrupt.pth"])
    for text in (server.url("/corrupt.pth"), f"expected {sha256(data)}", f"sha256 {served}"):
        assert text in message, (text, message)
    assert files_in(cache) == []


def test_torchvision_style_prefix_is_checked(server, backbone, cache):
    data, _ = backbone
    server.files["/prefix.pth"] = data
    good, bad = sha256(data)[:8], "0" * 8 if not sha256(data).startswith("0" * 8) else "f" * 8
    pretrained.register_weights(NAME, url=server.url("/prefix.pth"), kind="deep_backbone", filename="p.pth",
                                sha256_prefix=bad)
    with pytest.raises(pretrained.ChecksumError, match=f"expected {bad}\\.\\.\\."):
        pretrained.resolve_init(tiny_model_config(NAME))
    assert files_in(cache) == []
    pretrained.register_weights(NAME, url=server.url("/prefix.pth"), kind="deep_backbone", filename="p.pth",
                                sha256_prefix=good, replace=True)
    assert pretrained.resolve_init(tiny_model_config(NAME)).sha256 == sha256(data)


def test_offline_is_one_line_with_the_url_and_the_path(cache):
    url = closed_port_url()
    pretrained.register_weights(NAME, url=url, kind="deep_backbone", filename="r101.pth",
                                page="https://example.org/r101")
    with pytest.raises(pretrained.WeightsUnavailableError) as error:
        pretrained.resolve_init(tiny_model_config(NAME))
    path = cache / "test" / "r101.pth"
    assert str(error.value) == (
        f"pretrained weights '{NAME}' are not in the cache and could not be downloaded from {url} "
        f"([Errno 111] Connection refused); download the file yourself from https://example.org/r101 and put it "
        f"at {path}")
    assert files_in(cache) == []


def test_a_web_page_instead_of_the_file_is_refused(server, cache):
    server.files["/drive"] = b"\n<!DOCTYPE html><html>Google Drive can't scan this file for viruses</html>"
    pretrained.register_weights(NAME, url=server.url("/drive"), kind="deep_backbone", filename="r.pth")
    with pytest.raises(pretrained.WeightsUnavailableError, match="sent a web page instead of the file"):
        pretrained.resolve_init(tiny_model_config(NAME))
    assert files_in(cache) == []
    pretrained.register_weights(NAME, url=server.url("/gone"), kind="deep_backbone", filename="r.pth", replace=True)
    with pytest.raises(pretrained.WeightsUnavailableError, match=re.escape(
            f"downloaded from {server.url('/gone')} (HTTP Error 404: Not Found); download the file yourself and put "
            f"it at {cache / 'test' / 'r.pth'}")):
        pretrained.resolve_init(tiny_model_config(NAME))
    assert files_in(cache) == []


def test_corrupt_cached_file_is_an_error_and_is_kept(server, backbone, cache):
    data, _ = backbone
    server.files["/kept.pth"] = data
    pretrained.register_weights(NAME, url=server.url("/kept.pth"), kind="deep_backbone", filename="tiny.pth",
                                sha256=sha256(data))
    path = cache / "test" / "tiny.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 2])  # e.g. an interrupted copy by hand
    with pytest.raises(pretrained.ChecksumError) as error:
        pretrained.resolve_init(tiny_model_config(NAME))
    assert str(error.value) == (
        f"the cached weights {path} ('{NAME}') are corrupt or not the registered file: sha256 "
        f"{sha256(data[: len(data) // 2])}, expected {sha256(data)} (published); delete the file to download it "
        f"again from {server.url('/kept.pth')}, or put the right file there")
    assert path.read_bytes() == data[: len(data) // 2] and "/kept.pth" not in server.requests
    path.unlink()  # what the message says: the next use downloads it
    assert pretrained.resolve_init(tiny_model_config(NAME)).sha256 == sha256(data)


def test_unpublished_checksum_is_trusted_on_first_use(server, backbone, cache, capsys):
    data, _ = backbone
    server.files["/tofu.pth"] = data
    pretrained.register_weights(NAME, url=server.url("/tofu.pth"), kind="deep_backbone", filename="tiny.pth")
    source = pretrained.resolve_init(tiny_model_config(NAME))
    path = cache / "test" / "tiny.pth"
    assert source.sha256 == sha256(data)
    assert (cache / "test" / "tiny.pth.sha256").read_text() == sha256(data) + "\n"
    assert f"recorded its sha256 {sha256(data)} in {path}.sha256 (trust on first use" in capsys.readouterr().err
    path.write_bytes(data + b"\0")  # changed after its first use
    with pytest.raises(pretrained.ChecksumError, match=re.escape(f"expected {sha256(data)} (recorded at its first use "
                                                                 f"in {path}.sha256); delete the file")):
        pretrained.resolve_init(tiny_model_config(NAME))
    # A file put into the cache by hand (offline) is trusted and recorded at its first use.
    os.remove(f"{path}.sha256")
    assert pretrained.resolve_init(tiny_model_config(NAME)).sha256 == sha256(data + b"\0")
    assert (cache / "test" / "tiny.pth.sha256").read_text() == sha256(data + b"\0") + "\n"
    assert server.requests["/tofu.pth"] == 1


# ----------------------------------------------------------------------------- names, aliases, paths
def test_registered_names_and_the_imagenet_alias():
    for name, kind in (("imagenet:resnet50", "deep_backbone"), ("imagenet:resnet101", "deep_backbone"),
                       ("torchvision:resnet50", "torchvision"), ("torchvision:resnet101", "torchvision")):
        assert pretrained.REGISTRY[name].kind == kind
    assert pretrained.REGISTRY["torchvision:resnet101"].url.endswith(
        "/resnet101-" + pretrained.REGISTRY["torchvision:resnet101"].sha256_prefix + ".pth")
    assert "1Rx0legsMolCWENpfvE2jUScT3ogalMO8" in pretrained.REGISTRY["imagenet:resnet101"].url
    model = common.get_base_config().model
    for stem, depth, name in (("deep", 101, "imagenet:resnet101"), ("deep", 50, "imagenet:resnet50"),
                              ("torchvision", 101, "torchvision:resnet101"),
                              ("torchvision", 50, "torchvision:resnet50")):
        model.update(stem=stem, depth=depth)
        assert pretrained.imagenet_name(model) == name
    with pytest.raises(ValueError, match=r"fit only full-size models \(model.width=64, model.blocks=None\), not "
                                         r"width=4, blocks=\(1, 1, 1, 1\); set --config.model.init_from=none"):
        pretrained.resolve_init(tiny_model_config("imagenet"))


@pytest.mark.parametrize("name,filename,link", [
    ("imagenet:resnet50_v1c", "resnet50_v1c.pth", "https://pan.baidu.com/s/1agsf6BSvmVVGTvk23JXxaw?pwd=skrv"),
    ("imagenet:resnet101_v1c", "resnet101_v1c.pth", "https://pan.baidu.com/s/1PLg22P_Nv9GwR-KEzGdvTA?pwd=0g8u"),
    ("imagenet:resnet101_u2pl", "resnet101_u2pl.pth", "1nzSX8bX3zoRREn6WnoEeAPbKYPPOa-3Y")])
def test_cpcl_and_u2pl_backbones_resolve_by_name(name, filename, link, cache):
    """CPCL's README (leofansq/CPCL f0e1800) and U2PL's (HEAD ab3d2be) links, resolved from a file put into
    the cache by hand (no network): deep-stem ResNets, loaded as 'deep_backbone'."""
    record = pretrained.REGISTRY[name]
    assert (record.kind, record.filename) == ("deep_backbone", filename) and link in record.url
    path = cache / "imagenet" / filename
    path.parent.mkdir(parents=True)
    data = resnet_skeleton(101 if "101" in name else 50)
    path.write_bytes(data)
    source = pretrained.resolve_init(tiny_model_config(name))
    assert (source.path, source.name, source.kind, source.sha256) == (str(path), name, "deep_backbone", sha256(data))


def resnet_skeleton(depth: int) -> bytes:
    """torch.save bytes of a deep-stem ResNet-`depth` state dict with every block's keys and 1x1x1x1 kernels
    (the layout `validation_error` checks; too small to load into a model)."""
    keys = ["conv1.0.weight", "bn1.weight", "fc.weight"]
    for stage, blocks in enumerate(pretrained.RESNET_BLOCKS[depth], start=1):
        keys += [f"layer{stage}.{i}.conv{j}.weight" for i in range(blocks) for j in (1, 2, 3)]
    buffer = io.BytesIO()
    torch.save({k: torch.zeros((1, 1, 1, 1) if "conv" in k else (1,)) for k in keys}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content,reason", [
    (b"<!DOCTYPE html><html>quota exceeded</html>", "not a torch.save file"),
    ("resnet50", "layer3 has 6 blocks, a ResNet-101 has 23 (keys backbone.layer3.<i>.*)")])
def test_a_wrong_file_put_into_the_cache_is_moved_aside_and_never_pinned(content, reason, cache):
    """A hand-placed file is checked before its checksum is recorded: a web page or another network's file
    is moved to .invalid with one line saying what to do; the right file is then accepted and pinned."""
    name = "imagenet:resnet101"
    path = cache / "imagenet" / "resnet101.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(resnet_skeleton(50) if content == "resnet50" else content)
    with pytest.raises(pretrained.WeightsUnavailableError) as error:
        pretrained.resolve_init(tiny_model_config(name))
    message = str(error.value)
    assert message.startswith(f"{path} is not a valid '{name}' weights file (") and reason in message
    assert message.endswith(f"moved it to {path}.invalid; put the right file from "
                            f"{pretrained.REGISTRY[name].page} at {path}") and "\n" not in message
    assert files_in(cache) == ["imagenet/resnet101.pth.invalid"]  # nothing pinned
    path.write_bytes(resnet_skeleton(101))
    assert pretrained.resolve_init(tiny_model_config(name)).sha256 == sha256(resnet_skeleton(101))
    assert (cache / "imagenet" / "resnet101.pth.sha256").read_text() == sha256(resnet_skeleton(101)) + "\n"


def test_a_dinov2_file_of_another_size_is_moved_aside(cache):
    """A 'dinov2:<encoder>' file must hold exactly that encoder's tensors (dpt.encoder_error): here the ViT-S
    keys with 1-element tensors, as if a truncated or other file had been put there."""
    from tests.test_dinov2_dpt import official_dinov2_keys

    path = cache / "dinov2" / "dinov2_vits14_pretrain.pth"
    path.parent.mkdir(parents=True)
    torch.save({k: torch.zeros((1,) * v.ndim) for k, v in official_dinov2_keys("small").items()}, path)
    model = ml_collections.ConfigDict({"name": "dpt", "encoder": "small", "init_from": "imagenet"})
    reason = r"not a valid 'dinov2:small' weights file \(encoder 'small' does not fit the checkpoint \(D 1, depth 12"
    with pytest.raises(pretrained.WeightsUnavailableError, match=reason):
        pretrained.resolve_init(model)
    assert files_in(cache) == ["dinov2/dinov2_vits14_pretrain.pth.invalid"]  # nothing pinned


def test_a_download_that_is_not_a_checkpoint_is_not_kept(server, cache):
    server.files["/junk.pth"] = bytes(range(256)) * 8
    pretrained.register_weights(NAME, url=server.url("/junk.pth"), kind="deep_backbone", filename="tiny.pth")
    with pytest.raises(pretrained.WeightsUnavailableError, match="the downloaded file is not a valid weights file: "):
        pretrained.resolve_init(tiny_model_config(NAME))
    assert files_in(cache) == []


def test_a_recorded_checksum_is_reset_by_one_command(cache, capsys):
    """After a wrong file was trusted on first use, the right file is refused with the reset command named;
    `python -m csl_jax.models.pretrained --reset=NAME` forgets the pin."""
    name = "imagenet:resnet50"
    path = cache / "imagenet" / "resnet50.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(resnet_skeleton(50))
    pretrained.resolve_init(tiny_model_config(name))  # pinned
    right = resnet_skeleton(50) + b"\0"
    path.write_bytes(right)
    with pytest.raises(pretrained.ChecksumError, match=re.escape(
            f"run `python -m csl_jax.models.pretrained --reset={name}`")):
        pretrained.resolve_init(tiny_model_config(name))
    assert pretrained.main([f"--reset={name}"]) == 0
    assert f"{name}: removed the recorded checksum {path}.sha256" in capsys.readouterr().out
    assert pretrained.resolve_init(tiny_model_config(name)).sha256 == sha256(right)
    assert pretrained.main(["--reset=imagenet:nope"]) == 2


def test_unknown_names_and_missing_paths_are_clear(cache, tmp_path):
    with pytest.raises(ValueError, match=r"'xyz:abc' is not a registered weights name; registered: "
                                         r"\['dinov2:base', 'dinov2:giant', 'dinov2:large', 'dinov2:small', "
                                         r"'imagenet:resnet101', 'imagenet:resnet101_u2pl', "
                                         r"'imagenet:resnet101_v1c', 'imagenet:resnet50', 'imagenet:resnet50_v1c', "
                                         r"'imagenet:xception65', 'torchvision:resnet101', 'torchvision:resnet50'\]"):
        pretrained.resolve_init(tiny_model_config("xyz:abc"))
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"no such file {re.escape(str(missing))}; give 'none', 'imagenet'"):
        pretrained.resolve_init(tiny_model_config(str(missing)))
    with pytest.raises(ValueError, match="already registered"):
        pretrained.register_weights("imagenet:resnet101", url="http://x", kind="deep_backbone", filename="r.pth")
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        pretrained.register_weights("a:b", url="http://x", kind="deep_backbone", filename="r.pth", sha256="abc")
    assert not cache.exists()  # nothing was downloaded


def test_none_is_random_init_and_a_plain_path_still_works(backbone, tmp_path):
    data, _ = backbone
    for value in ("none", "", "None"):
        assert pretrained.resolve_init(tiny_model_config(value)) is None
    assert pretrained.init_record(None) == {"name": "none"}
    path = tmp_path / "mine.pth"
    path.write_bytes(data)
    source = pretrained.resolve_init(tiny_model_config(str(path)))
    assert source == pretrained.InitSource(path=str(path), name=None, sha256=sha256(data), kind="auto")


def _backbone_expected(state) -> dict:
    """{Flax path: array} of the backbone, transcribed by hand from the PyTorch keys (OIHW -> HWIO)."""
    leaves = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
              "bias": ("params", "bias")}
    expected = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        *modules, leaf = key.split(".")
        joined = []
        for m in modules:  # layer1.0.conv1 -> layer1_0/conv1; conv1.0 -> conv1_0
            if m.isdigit():
                joined[-1] += f"_{m}"
            else:
                joined.append(m)
        array = value.numpy().astype(np.float64)
        if leaf == "weight":
            collection, name = ("params", "kernel" if array.ndim == 4 else "scale")
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
        else:
            collection, name = leaves[leaf]
        expected[(collection, "backbone", *joined, name)] = array
    return expected


def test_a_downloaded_backbone_loads_by_name(server, backbone, cache):
    data, state = backbone
    server.files["/load.pth"] = data
    pretrained.register_weights(NAME, url=server.url("/load.pth"), kind="deep_backbone", filename="tiny.pth",
                                sha256=sha256(data))
    model_cfg = tiny_model_config(NAME)
    model = build_model(model_cfg, 3)
    rng = jax.random.PRNGKey(0)
    loaded = jax.device_get(init_network(model, model_cfg, rng, (32, 32, 3)))
    random = jax.device_get(init_network(model, tiny_model_config("none"), rng, (32, 32, 3)))
    flat = {p: v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    got = {tuple(k.key for k in p): np.asarray(v) for p, v in flat.items()}
    expected = _backbone_expected(state)
    assert sorted(p for p in got if p[1] == "backbone") == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value.astype(np.float32), err_msg="/".join(path))
    # the head stays at its random init (the same as with init_from='none')
    np.testing.assert_array_equal(loaded["params"]["classifier"]["kernel"], random["params"]["classifier"]["kernel"])
    assert not np.array_equal(loaded["params"]["backbone"]["bn1"]["scale"],
                              random["params"]["backbone"]["bn1"]["scale"])


def test_the_run_record_names_the_initial_weights(server, backbone, cache, tmp_path):
    data, _ = backbone
    server.files["/record.pth"] = data
    pretrained.register_weights(NAME, url=server.url("/record.pth"), kind="deep_backbone", filename="tiny.pth",
                                sha256=sha256(data))
    config = demo.get_config()
    common.tiny_model(config, **TINY)
    config.model.init_from = NAME
    path = run_info.prepare(config, str(tmp_path / "run"), "train")
    assert json.load(open(path))["init"] == {"name": NAME, "path": str(cache / "test" / "tiny.pth"),
                                             "sha256": sha256(data), "kind": "deep_backbone"}
    assert run_info.initial_weights(str(tmp_path / "run"))["sha256"] == sha256(data)


# ----------------------------------------------------------------------------- no silent scratch training
def test_pascal_recipe_without_its_weights_fails_before_compiling(tmp_path):
    """main.py with the Pascal CSL config, an empty cache and no network: one line naming the URL and the path."""
    url = closed_port_url()
    workdir, weights = tmp_path / "run", tmp_path / "weights"
    # The registered record, pointed at a closed port of this machine (so nothing reaches the internet).
    script = ("import dataclasses, runpy, sys; from csl_jax.models import pretrained as p; "
              "r = p.REGISTRY['imagenet:resnet101']; p.REGISTRY[r.name] = dataclasses.replace(r, url=sys.argv[1]); "
              "sys.argv = ['main.py'] + sys.argv[2:]; runpy.run_path('main.py', run_name='__main__')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               CSL_JAX_WEIGHTS_DIR=str(weights))
    proc = subprocess.run([sys.executable, "-c", script, url, "--config=configs/csl_pascal.py",
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    page = pretrained.REGISTRY["imagenet:resnet101"].page
    assert lines[-1] == (f"error: pretrained weights 'imagenet:resnet101' are not in the cache and could not be "
                         f"downloaded from {url} ([Errno 111] Connection refused); download the file yourself from "
                         f"{page} and put it at {weights / 'imagenet' / 'resnet101.pth'}"), proc.stderr
    assert not workdir.exists() and files_in(weights) == []  # nothing written, nothing compiled
    assert "Compiling" not in proc.stderr


def test_train_and_evaluate_checks_the_weights_before_building_anything(tmp_path, monkeypatch, cache):
    config = csl_pascal.get_config()
    record = pretrained.REGISTRY["imagenet:resnet101"]
    monkeypatch.setitem(pretrained.REGISTRY, record.name, dataclasses.replace(record, url=closed_port_url()))
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: pytest.fail("built a train step"))
    with pytest.raises(pretrained.WeightsUnavailableError, match=re.escape(str(cache / "imagenet" / "resnet101.pth"))):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_pascal_recipe_with_init_from_none_trains(tmp_path):
    root = tmp_path / "data"
    synthetic.prepare(root, num_train=16, num_val=2, image_size=(40, 40), seed=0)
    config = supervised_pascal.get_config()
    assert config.model.init_from == "imagenet"  # the recipe's default
    small = tiny_config(str(root))
    config.data, config.eval = small.data, small.eval  # generated data instead of Pascal's
    common.tiny_model(config, **TINY)
    config.model.init_from = "none"  # explicit random init
    config.batch.labeled = 8
    config.loss.group_size = 1
    config.optim.total_steps = 2
    config.checkpoint_every_steps = 2
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["finished"] and results["step"] == 2 and np.isfinite(results["miou"])
    assert results["init"] == {"name": "none"}
    assert json.load(open(tmp_path / "run" / train.FINAL_RESULTS))["init"] == {"name": "none"}


def test_a_resumed_run_does_not_need_the_initial_weights(backbone, tmp_path):
    """The restored train state replaces the initial weights: a resume (and its final results, which
    name the fresh run's weights) works after the weights file is gone; step-0 params were the file's."""
    data, state = backbone
    weights = tmp_path / "tiny_backbone.pth"
    weights.write_bytes(data)
    root = tmp_path / "data"
    synthetic.prepare(root, num_train=32, num_val=2, image_size=(40, 40), seed=0)
    config = tiny_config(str(root))
    common.tiny_model(config, **TINY)
    config.model.init_from = str(weights)
    config.model.init_kind = "deep_backbone"
    config.optim.total_steps = 2
    config.checkpoint_every_steps = 1
    config.stop_after_steps = 1
    workdir = str(tmp_path / "run")
    run_info.prepare(config, workdir, "train")  # as main.py does: run_train.json names the weights
    first = train.train_and_evaluate(config, workdir)
    assert (first["step"], first["finished"]) == (1, False)
    weights.unlink()
    config.stop_after_steps = 0
    run_info.prepare(config, workdir, "train")  # a resume: a runs/train_*.json record, nothing resolved
    results = train.train_and_evaluate(config, workdir)
    assert results["finished"] and results["step"] == 2
    assert results["init"]["path"] == str(weights) and results["init"]["sha256"] == sha256(data)
