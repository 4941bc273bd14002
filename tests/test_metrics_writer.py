"""MetricsWriter: JSONL lines, TensorBoard records (read back with a minimal TFRecord reader), ETA."""

import glob
import json
import logging
import struct

import numpy as np
import pytest
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


def tb_scalars(workdir):
    files = glob.glob(str(workdir / "tb" / "events.out.tfevents.*"))
    assert len(files) == 1
    out = {}
    for record in read_tfrecords(files[0]):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            out[(value.tag, event.step)] = value.simple_value
    return out


def test_crc32c_check_value():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_jsonl_and_tensorboard(tmp_path):
    writer = mw.MetricsWriter(str(tmp_path), total_steps=100)
    writer.write(10, {"loss": np.float32(0.75), "lr": 0.01, "data_wait": 0.1, "steps_per_sec": 2.0})
    writer.write(20, {"loss": 0.5, "lr": 0.009})
    results = {"miou": 0.625, "iou": [0.5, 0.75], "pixel_acc": 0.9, "mean_acc": 0.8, "num_images": 3,
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
                        "val/mean_acc": 0.8, "val/iou/00": 0.5, "val/iou/01": 0.75}

    (eval_line,) = [json.loads(x) for x in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert eval_line["step"] == 20 and eval_line["miou"] == 0.625 and eval_line["iou"] == [0.5, 0.75]
    assert eval_line["confusion"] == [[3, 1], [0, 4]] and eval_line["protocol"]["name"] == "whole"
    assert "samples" not in eval_line

    tb = tb_scalars(tmp_path)
    assert tb[("loss", 10)] == pytest.approx(0.75) and tb[("loss", 20)] == pytest.approx(0.5)
    assert tb[("lr", 20)] == pytest.approx(0.009) and tb[("val/miou", 20)] == pytest.approx(0.625)
    assert tb[("val/iou/01", 20)] == pytest.approx(0.75)

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
