"""Weights & Biases: ``--wandb-project`` logs what metrics.jsonl holds, and the config, from rank 0 only;
with no API key it runs offline. The run's ``.wandb`` file (W&B's own record log) is read back here.

wandb 0.2x+ writes the offline run as ``<wandb-save-dir>/wandb/offline-run-*/run-<id>.wandb``: a W&B
header (``:W&B``, magic, version: 7 bytes) followed by LevelDB-log records (32 KiB blocks, each record
``crc32c u32, length u16, type u8`` then the bytes; type 1 full, 2 first, 3 middle, 4 last) holding
protobuf ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import wandb  # noqa: F401 - in the test extra: this test must run, not skip
from wandb.proto import wandb_internal_pb2

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

BLOCK = 32768


def read_wandb_records(path: Path) -> list:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_offline_run_logs_the_metrics_and_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no API key anywhere
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--model", "tiny", "--loss-type", "dpo", "--train-iters", "3", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "64", "--lr", "1e-3", "--eval-iters", "0",
            "--data-cache-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "log"), "--no-tensorboard",
            "--wandb-project", "tgdpo-test", "--wandb-exp-name", "offline-check",
            "--wandb-save-dir", str(tmp_path / "wb")]
    assert run_on_ranks(2, run_train, argv, model_parallel=False) == [0, 0]

    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only, and offline (no API key)
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tgdpo-test" and run.display_name == "offline-check"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    for key, value in parse_args(argv).to_dict().items():
        assert config[key] == value, key

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    jsonl = read_metrics(tmp_path / "log")
    assert sorted(history) == [r["iteration"] for r in jsonl] == [1, 2, 3]
    for row in jsonl:
        logged = history[row["iteration"]]
        for key, value in row.items():
            if key == "iteration":
                continue
            assert key in logged, key
            if isinstance(value, str):  # metrics.jsonl spells non-finite values as strings
                assert math.isnan(logged[key]) if value == "nan" else str(logged[key]) == value, key
            else:
                assert logged[key] == value, (key, logged[key], value)
