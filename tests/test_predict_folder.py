"""Folder prediction (csl_jax/evaluation/folder.py): image modes (16-bit), undecodable files, output folder."""

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from csl_jax import visualize
from csl_jax.data.sources import to_rgb
from csl_jax.evaluation import folder

C = 4
CENTRES = np.array([0.0, 85.0, 170.0, 255.0])  # class c: red value nearest CENTRES[c] (never a tie on integers)
MEAN_R, STD_R = 0.485, 0.229  # ImageNet normalisation of the red channel, as done by the Evaluator
PALETTE = visualize.voc_palette(C)


def red_apply(variables, x):
    """Stub model: logits -(r - centre_c)^2 of the normalised red channel."""
    del variables
    centres = (jnp.asarray(CENTRES, jnp.float32) / 255 - MEAN_R) / STD_R
    return -((x[..., :1] - centres) ** 2)


def expected_mask(rgb: np.ndarray) -> np.ndarray:
    """NumPy twin of red_apply's argmax for an (H, W, 3) uint8 image."""
    return np.abs(rgb[..., :1].astype(np.float64) - CENTRES).argmin(-1).astype(np.uint8)


def _predict(in_dir, out_dir, **kwargs):
    return folder.predict_folder(red_apply, {}, str(in_dir), str(out_dir), palette=PALETTE, num_classes=C, **kwargs)


def _mask(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_16bit_png_gives_the_mask_of_its_8bit_version(tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    gray8 = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value: all four classes
    Image.fromarray(gray8).save(in_dir / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(in_dir / "g16.png")  # the same image in 16 bits
    ramp16 = np.linspace(0, 65535, 12 * 20).round().astype(np.uint16).reshape(12, 20)  # not multiples of 257
    Image.fromarray(ramp16).save(in_dir / "ramp16.png")
    with Image.open(in_dir / "g16.png") as im:
        assert im.mode == "I;16"
    _predict(in_dir, tmp_path / "out")
    want = expected_mask(np.repeat(gray8[..., None], 3, -1))
    assert len(np.unique(want)) == C
    np.testing.assert_array_equal(_mask(tmp_path / "out/g8_mask.png"), want)
    np.testing.assert_array_equal(_mask(tmp_path / "out/g16_mask.png"), want)
    ramp8 = np.rint(ramp16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(_mask(tmp_path / "out/ramp16_mask.png"),
                                  expected_mask(np.repeat(ramp8[..., None], 3, -1)))
    overlay = np.asarray(Image.open(tmp_path / "out/g16_overlay.png"))
    np.testing.assert_array_equal(overlay, np.round(0.5 * gray8[..., None] + 0.5 * PALETTE[want]).astype(np.uint8))


def test_every_mode_becomes_8bit_rgb():
    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (3, 5)).astype(np.uint16)
    gray16 = np.repeat(np.rint(v16 / 257).astype(np.uint8)[..., None], 3, -1)
    la = rng.integers(0, 256, (3, 5, 2), dtype=np.uint8)
    index = rng.integers(0, 4, (3, 5), dtype=np.uint8)
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    p_image = Image.fromarray(index)
    p_image = Image.frombytes("P", p_image.size, index.tobytes())
    p_image.putpalette(palette.ravel().tolist())
    cmyk = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    bits = rng.random((3, 5)) < 0.5
    cases = {
        "I;16": (Image.fromarray(v16), gray16),
        "I;16B": (Image.frombytes("I;16B", (5, 3), v16.astype(">u2").tobytes()), gray16),
        "I": (Image.fromarray(v16.astype(np.int32)), gray16),
        "F": (Image.fromarray(v16.astype(np.float32)), gray16),
        "LA": (Image.fromarray(la), np.repeat(la[..., :1], 3, -1)),
        "P": (p_image, palette[index]),
        "1": (Image.fromarray(bits), np.repeat(np.where(bits, np.uint8(255), np.uint8(0))[..., None], 3, -1)),
        "L": (Image.fromarray(la[..., 0]), np.repeat(la[..., :1], 3, -1)),
    }
    for mode, (image, want) in cases.items():
        assert image.mode == mode
        got = np.asarray(to_rgb(image))
        assert got.dtype == np.uint8 and got.shape == (3, 5, 3), mode
        np.testing.assert_array_equal(got, want, err_msg=mode)
    # CMYK: R = (255 - C)(255 - K) / 255 (PIL's integer formula, within 1)
    got = np.asarray(to_rgb(Image.frombytes("CMYK", (5, 3), cmyk.tobytes()))).astype(np.float64)
    want = (255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255
    np.testing.assert_allclose(got, want, atol=1)


def test_undecodable_files_are_skipped_reported_and_fail_the_run(tmp_path, caplog):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    rng = np.random.default_rng(1)
    images = {name: rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for name in ("a", "c", "e")}
    for name, image in images.items():
        Image.fromarray(image).save(in_dir / f"{name}.png")
    (in_dir / "b.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    truncated = (in_dir / "c.png").read_bytes()
    (in_dir / "d.png").write_bytes(truncated[: len(truncated) // 2])  # header fine, pixel data cut
    caplog.set_level(logging.WARNING)
    with pytest.raises(folder.FolderPredictionError) as err:
        _predict(in_dir, out_dir)
    assert [p for p, _ in err.value.failed] == [str(in_dir / "b.jpg"), str(in_dir / "d.png")]
    assert err.value.written == [str(out_dir / f"{n}_mask.png") for n in ("a", "c", "e")]
    assert f"2 of 5 images in {str(in_dir)!r} could not be decoded" in str(err.value)
    assert f"{in_dir / 'b.jpg'}: " in str(err.value) and f"{in_dir / 'd.png'}: " in str(err.value)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == [f"skipping {in_dir / 'b.jpg'}", f"skipping {in_dir / 'd.png'}"]
    for name, image in images.items():  # every good image's outputs, also the one just before a bad file
        np.testing.assert_array_equal(_mask(out_dir / f"{name}_mask.png"), expected_mask(image))
        assert (out_dir / f"{name}_color.png").is_file() and (out_dir / f"{name}_overlay.png").is_file()
    assert not any(p.name.startswith(("b_", "d_")) for p in out_dir.iterdir())


def test_output_folder_inside_the_input_folder_is_refused(tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(in_dir / "a.png")
    os.symlink(in_dir, tmp_path / "link")
    for out in (in_dir, in_dir / "masks", tmp_path / "in" / ".." / "in" / "x", tmp_path / "link" / "masks"):
        with pytest.raises(ValueError, match="is the input folder .* or inside it .*choose an output folder outside"):
            _predict(in_dir, out)
        assert not (in_dir / "masks").exists() and not (in_dir / "x").exists()
    with pytest.raises(ValueError, match="or inside it"):
        _predict(tmp_path / "link", in_dir / "masks")
    assert _predict(in_dir, tmp_path / "in_masks") == [str(tmp_path / "in_masks" / "a_mask.png")]  # a sibling is fine
    assert os.listdir(in_dir) == ["a.png"]
