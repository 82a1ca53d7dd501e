"""skdebias.report: tables, timers, and JSON results that are strict JSON and written
atomically."""

import json
import math
import os

import numpy as np
import pytest

from skdebias.report import Timer, format_table, mean_std, write_json


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_nan_and_inf_become_null(tmp_path):
    payload = {
        "nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 0.5,
        "np": [np.float32("nan"), np.float64("inf"), np.float16(1.5)],
        "array": np.array([[1.0, np.nan], [-np.inf, 2.0]]),
        "tuple": (np.nan, 1),
        "nested": {"deeper": [{"x": np.float64("-inf")}]},
    }
    path = write_json(tmp_path / "r.json", payload)
    assert _strict_loads((tmp_path / "r.json").read_text()) == {
        "nan": None, "inf": None, "ninf": None, "ok": 0.5,
        "np": [None, None, 1.5],
        "array": [[1.0, None], [None, 2.0]],
        "tuple": [None, 1],
        "nested": {"deeper": [{"x": None}]},
    }
    assert path == tmp_path / "r.json"


def test_write_json_serialisation_error_keeps_the_previous_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"run": 1, "values": list(range(50))})
    before = path.read_text()
    with pytest.raises(TypeError):
        # the unencodable value comes after enough data for a partial write to show
        write_json(path, {"values": list(range(1000)), "model": object()})
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


def test_write_json_failed_replace_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json(path, {"run": 1})
    before = path.read_text()

    def killed(src, dst):
        raise OSError("simulated failure while replacing")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="simulated"):
        write_json(path, {"run": 2})
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_write_json_replaces_the_file_from_a_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"run": 1})
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.fspath(src), os.fspath(dst)))
        with open(src) as fh:  # complete before the move
            assert _strict_loads(fh.read()) == {"run": 2}
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_json(path, {"run": 2})
    assert len(calls) == 1
    src, dst = calls[0]
    assert os.path.samefile(dst, path)
    assert os.path.dirname(src) == os.path.dirname(dst) and src != dst
    assert not os.path.exists(src)
    assert _strict_loads(path.read_text()) == {"run": 2}
    # readable like a file made by open(path, "w"), not private like a fresh temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_format_table_aligns_and_formats():
    text = format_table([{"a": "x", "b": 1.23456}, {"a": "longer", "b": float("nan")}],
                        title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["a", "b"]
    assert "1.235" in text and "nan" in text
    assert len({len(line) for line in lines[2:3]}) == 1
    assert format_table([]) == "(no rows)"


def test_write_json_numpy(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert json.loads(open(path).read()) == {"a": 1.5, "b": [0, 1]}


def test_timer_and_mean_std():
    timer = Timer()
    with timer("x"):
        pass
    assert timer["x"] >= 0
    assert mean_std([1.0, 3.0], ".1f") == "2.0 ± 1.0"


def test_write_json_writes_classes_by_name(tmp_path):
    import torch

    path = write_json(tmp_path / "r.json", {"optimizer": torch.optim.SGD})
    assert json.loads(open(path).read())["optimizer"] == "torch.optim.sgd.SGD"
