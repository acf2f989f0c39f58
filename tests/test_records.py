"""bastion.records: append-only JSONL logs (torn lines repaired), run directories, shard merges."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from bastion.errors import RunError
from bastion.records import JsonlLog, RecordLog, RunDir, config_digest, merge_records, to_toml


def test_append_read_and_clean_values(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    assert log.read() == [] and log.done_keys() == set()
    n = log.append([{"index": torch.tensor(3), "probe": "clean", "correct": np.bool_(True),
                     "logits": torch.tensor([0.5, 1.5]), "score": np.float32(0.25)}])
    assert n == 1 and log.append([]) == 0
    (rec,) = log.read()
    assert rec == {"index": 3, "probe": "clean", "correct": True, "logits": [0.5, 1.5], "score": 0.25}
    assert log.done_keys() == {(3, "clean")}


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "records.jsonl"
    log = RecordLog(path)
    log.append([{"index": i, "probe": "clean"} for i in range(3)])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"index": 3, "pro')  # the process died mid-write
    log = RecordLog(path)
    assert path.read_bytes() == whole
    assert [r["index"] for r in log] == [0, 1, 2]
    log.append([{"index": 3, "probe": "clean"}])
    assert [r["index"] for r in RecordLog(path)] == [0, 1, 2, 3]
    # a file whose only line is torn becomes empty
    path.write_bytes(b'{"ind')
    assert RecordLog(path).read() == [] and path.read_bytes() == b""


def test_damaged_middle_line_raises(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(RunError, match="line 2 is not valid JSON"):
        JsonlLog(path).read()


def test_rewrite(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append([{"epoch": 0}, {"epoch": 1}])
    log.rewrite([{"epoch": 0}])
    assert log.read() == [{"epoch": 0}] and not list(tmp_path.glob("*.tmp"))


def test_merge_records_dedups_and_sorts():
    a = [{"index": 2, "probe": "clean", "v": 1}, {"index": 0, "probe": "pgd", "v": 1}]
    b = [{"index": 2, "probe": "clean", "v": 2}, {"index": 1, "probe": "clean", "v": 2}]
    merged = merge_records([a, b])
    assert [(r["probe"], r["index"], r["v"]) for r in merged] == [("clean", 1, 2), ("clean", 2, 1), ("pgd", 0, 1)]


def test_run_dir_config_stamp(tmp_path):
    cfg = {"model": "m.safetensors", "threat": ["linf:8/255"], "seed": 0, "eps": 8 / 255,
           "probes": {"pgd10@linf:8/255": {"steps": 10}}, "list_of_tables": [{"a": 1}], "path": tmp_path}
    run = RunDir(tmp_path / "run", cfg)
    assert (tmp_path / "run" / "config.toml").is_file()
    stamp = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stamp["digest"] == config_digest(cfg)
    assert run.config()["threat"] == ["linf:8/255"]
    RunDir(tmp_path / "run", dict(cfg))  # same config: reopens
    RunDir(tmp_path / "run", {**cfg, "threat": ("linf:8/255",)})  # tuple == list after cleaning
    with pytest.raises(RunError, match="different config"):
        RunDir(tmp_path / "run", {**cfg, "seed": 1})
    assert RunDir(tmp_path / "run").path == tmp_path / "run"  # read-only open
    with pytest.raises(RunError, match="does not exist"):
        RunDir(tmp_path / "nope")
    (tmp_path / "run" / "config.json").write_text("{torn")
    with pytest.raises(RunError, match="damaged"):
        RunDir(tmp_path / "run", cfg)


def test_write_json_atomic(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1})
    p = run.write_json("metrics.json", {"b": np.float64(0.5), "a": [torch.tensor(1)]})
    assert p.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 0.5\n}'
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert run.checkpoints.is_dir()


def test_to_toml_round_trips():
    cfg = {"command": "evaluate", "eps": 8 / 255, "steps": 10, "flag": True, "threats": ["linf:8/255", "l2:0.5"],
           "data": {"name": "digits", "sub": {"k": 1}}, "pgd10@linf:8/255": 0.5, "tables": [{"x": 1, "y": "z"}]}
    assert tomllib.loads(to_toml(cfg)) == cfg
