"""MetricsWriter: JSONL lines, TensorBoard records (read back with a minimal TFRecord reader), ETA."""

import glob
import io
import json
import logging
import os
import struct
import time

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from csl_jax import metrics_writer as mw


def _crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path):
    """TFRecord framing: uint64 length, uint32 masked crc(length), data, uint32 masked crc(data)."""
    records = []
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        assert length_crc == _masked_crc(header)
        data = blob[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        assert data_crc == _masked_crc(data)
        records.append(data)
        pos += 16 + length
    assert pos == len(blob)
    return records


def tb_events(workdir):
    """The events of every event file in workdir/tb, file by file in the order they were written."""
    files = sorted(glob.glob(str(workdir / "tb" / "events.out.tfevents.*")), key=os.path.getmtime)
    return [[event_pb2.Event.FromString(record) for record in read_tfrecords(path)] for path in files]


def tb_scalars(workdir):
    (events,) = tb_events(workdir)
    return {(value.tag, event.step): value.simple_value for event in events for value in event.summary.value}


def test_crc32c_check_value():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_jsonl_and_tensorboard(tmp_path):
    writer = mw.MetricsWriter(str(tmp_path), total_steps=100)
    writer.write(10, {"loss": np.float32(0.75), "lr": 0.01, "data_wait": 0.1, "steps_per_sec": 2.0})
    writer.write(20, {"loss": 0.5, "lr": 0.009})
    results = {"miou": 0.625, "iou": [0.5, 0.75], "iou_per_class": {"background": 0.5, "traffic light": 0.75},
               "pixel_acc": 0.9, "mean_acc": 0.8, "num_images": 3,
               "protocol": {"name": "whole", "window": None, "stride": None, "num_images": 3},
               "confusion": np.array([[3, 1], [0, 4]], np.int64), "samples": [(np.zeros(2),) * 3]}
    writer.write_eval(20, results)
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert lines[0]["step"] == 10 and lines[0]["loss"] == 0.75 and lines[0]["lr"] == 0.01
    assert lines[0]["steps_per_sec"] == 2.0 and lines[0]["data_wait"] == 0.1
    assert lines[1]["step"] == 20 and lines[1]["loss"] == 0.5 and lines[1]["steps_per_sec"] > 0  # measured
    assert lines[0]["time"] <= lines[1]["time"]
    assert lines[2] == {"step": 20, "time": lines[2]["time"], "val/miou": 0.625, "val/pixel_acc": 0.9,
                        "val/mean_acc": 0.8, "val/iou/background": 0.5, "val/iou/traffic_light": 0.75}

    (eval_line,) = [json.loads(x) for x in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert eval_line["step"] == 20 and eval_line["miou"] == 0.625 and eval_line["iou"] == [0.5, 0.75]
    writer = mw.MetricsWriter(str(tmp_path / "no_names"), total_steps=100)
    writer.write_eval(20, {k: v for k, v in results.items() if k != "iou_per_class"})  # without names: indices
    writer.close()
    (unnamed,) = [json.loads(x) for x in (tmp_path / "no_names" / "metrics.jsonl").read_text().splitlines()]
    assert unnamed["val/iou/00"] == 0.5 and unnamed["val/iou/01"] == 0.75
    assert eval_line["confusion"] == [[3, 1], [0, 4]] and eval_line["protocol"]["name"] == "whole"
    assert "samples" not in eval_line

    tb = tb_scalars(tmp_path)  # training scalars under train/, metrics.jsonl keeps the plain names
    assert tb[("train/loss", 10)] == pytest.approx(0.75) and tb[("train/loss", 20)] == pytest.approx(0.5)
    assert tb[("train/lr", 20)] == pytest.approx(0.009) and tb[("val/miou", 20)] == pytest.approx(0.625)
    assert tb[("val/iou/traffic_light", 20)] == pytest.approx(0.75) and ("loss", 10) not in tb

    # appending after a restart keeps the earlier lines
    writer = mw.MetricsWriter(str(tmp_path), total_steps=100)
    writer.write(30, {"loss": 0.25})
    writer.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_non_main_process_writes_nothing(tmp_path):
    writer = mw.MetricsWriter(str(tmp_path / "run"), total_steps=10, is_main_process=False)
    writer.write(1, {"loss": 1.0})
    writer.write_eval(1, {"miou": 0.5})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_bad_metric_is_named(tmp_path):
    writer = mw.MetricsWriter(str(tmp_path), total_steps=10)
    with pytest.raises(ValueError, match="'hist'"):
        writer.write(1, {"loss": 1.0, "hist": np.zeros(3)})
    writer.close()


def test_eta_and_progress_line(tmp_path, caplog):
    assert mw.format_hms(3725.4) == "1:02:05"
    assert mw.format_hms(90061) == "25:01:01"
    assert mw.steps_per_second(50, 20.0) == 2.5 and mw.steps_per_second(0, 1.0) == 0.0
    assert mw.eta_seconds(200, 1000, 2.5) == 320.0 and mw.eta_seconds(1, 10, 0.0) == float("inf")
    writer = mw.MetricsWriter(str(tmp_path), total_steps=1000)
    line = writer.progress_line(200, {"loss": 0.123456, "lr": 0.004, "steps_per_sec": 2.5, "data_wait": 0.05})
    assert line == "step 200/1000 (20.0%) | loss 0.1235 | lr 0.004 | 2.50 steps/s | data 5% | ETA 0:05:20"
    with caplog.at_level(logging.INFO):
        writer.write(200, {"loss": 0.5, "steps_per_sec": 2.5})
    assert any("ETA 0:05:20" in r.getMessage() for r in caplog.records)
    writer.close()


def test_write_image_to_tensorboard(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    writer = mw.MetricsWriter(str(tmp_path), total_steps=10)
    writer.write_image(4, "val/predictions", image)
    with pytest.raises(ValueError, match=r"image 'grid' must be \(H, W, 3\) uint8, got float32 of shape \(6, 10\)"):
        writer.write_image(4, "grid", np.zeros((6, 10), np.float32))
    writer.close()
    ((event, value),) = [(e, v) for e in tb_events(tmp_path)[0] for v in e.summary.value]
    assert value.tag == "val/predictions" and event.step == 4
    assert (value.image.height, value.image.width, value.image.colorspace) == (6, 10, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string))), image)


def test_resume_drops_the_records_after_the_restored_step(tmp_path):
    """A run killed after logging step 5 whose last checkpoint is step 3: the resumed writer keeps
    steps <= 3 (a torn last line goes too) and TensorBoard purges steps >= 4."""
    writer = mw.MetricsWriter(str(tmp_path), total_steps=10)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.write_eval(2, {"miou": 0.2})
    writer.write_eval(4, {"miou": 0.4})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing
    before = (tmp_path / "eval_results.jsonl").stat().st_ino
    time.sleep(1.1)  # event files are named by the second: the resumed run's is a new one

    writer = mw.MetricsWriter(str(tmp_path), total_steps=10, start_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss", r.get("val/miou"))) for r in rows] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (2, 0.2), (4, 40.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()] == [2]
    assert (tmp_path / "eval_results.jsonl").stat().st_ino != before  # rewritten (os.replace), not truncated
    assert not list(tmp_path.glob("*.tmp"))

    first, resumed = tb_events(tmp_path)
    assert {e.step for e in first if e.summary.value} == {1, 2, 3, 4, 5}  # the file of the killed run stays
    starts = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]  # TensorBoard discards the earlier files' events of steps >= 4
    assert [(v.tag, e.step) for e in resumed for v in e.summary.value] == [("train/loss", 4)]


def test_fresh_writer_keeps_everything(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    mw.MetricsWriter(str(tmp_path), total_steps=10).close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 7
