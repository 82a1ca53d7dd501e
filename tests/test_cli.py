"""The demo/audit command line and the report helpers."""

import json

import numpy as np
import pytest
import torch

from skdebias.cli import main, run_audit, run_demo
from skdebias.report import Timer, format_table, mean_std, write_json


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


def test_demo_audit_fast(capsys):
    res = run_demo(seed=0, epochs=4, correction=False)
    out = capsys.readouterr().out
    assert "clean test accuracy" in out and "pattern" in out and "svm" in out
    assert res["clean_accuracy"] > 0.8
    # the Clever-Hans model loses accuracy when the patch is added to every test image
    assert res["attacked_accuracy"] < res["clean_accuracy"] - 0.1
    pattern = next(r for r in res["cav"] if r["cav"] == "pattern")
    assert pattern["cos(mean d, cav)"] > 0.8
    assert (res["seed"], res["epochs"], res["artifact"], res["layer"]) == (0, 4, "patch",
                                                                           "features.6")


def test_main_demo_writes_json(tmp_path, monkeypatch):
    calls = {}

    def fake_demo(**kwargs):
        calls.update(kwargs)
        return {"ok": 1}

    monkeypatch.setattr("skdebias.cli.run_demo", fake_demo)
    out = tmp_path / "demo.json"
    assert main(["demo", "--seed", "3", "--no-correction", "--json", str(out)]) == 0
    assert calls["seed"] == 3 and calls["correction"] is False
    assert json.loads(out.read_text()) == {"ok": 1}


def test_main_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["train"])
    assert "invalid choice" in capsys.readouterr().err


def _write_pngs(root, classes, n, make):
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(make(k, i)).save(root / name / f"{i}.png")


def test_audit_on_generated_folders(tmp_path, capsys):
    from skdebias.models import SmallCNN

    rng = np.random.RandomState(0)

    def img(k, i):
        a = (rng.rand(28, 28, 3) * 80).astype(np.uint8)
        if k == 1:
            a[20:26, 20:26] = [255, 0, 0]
        return a

    _write_pngs(tmp_path / "concept", ["absent", "present"], 6, img)
    _write_pngs(tmp_path / "images", ["a", "b"], 4, img)
    torch.manual_seed(0)
    torch.save(SmallCNN(n_classes=2), tmp_path / "m.pt")
    res = run_audit(str(tmp_path / "m.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                    "features.6", device="cpu")
    assert [r["class"] for r in res["rows"]] == ["a", "b"]
    # class "b" images carry the concept, so they score higher along the CAV
    assert res["rows"][1]["mean concept score"] > res["rows"][0]["mean concept score"]
    assert "Concept 'present'" in capsys.readouterr().out
    torch.save({"not": "a module"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not hold a torch.nn.Module"):
        run_audit(str(tmp_path / "bad.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                  "features.6")


def test_audit_grayscale_model_and_folders_of_different_sizes(tmp_path):
    from skdebias.models import SmallCNN

    rng = np.random.RandomState(0)

    def gray(size):
        def img(k, i):
            a = (rng.rand(size, size) * 80).astype(np.uint8)
            if k == 1:
                a[-8:-2, -8:-2] = 255
            return a
        return img

    _write_pngs(tmp_path / "concept", ["absent", "present"], 6, gray(28))
    _write_pngs(tmp_path / "images", ["a", "b"], 4, gray(40))  # another size: SmallCNN pools
    torch.manual_seed(0)
    torch.save(SmallCNN(n_classes=2, in_channels=1), tmp_path / "m.pt")
    res = run_audit(str(tmp_path / "m.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                    "features.6", device="cpu", verbose=False)  # grayscale from in_channels
    assert [r["n"] for r in res["rows"]] == [4, 4]
    assert res["rows"][1]["mean concept score"] > res["rows"][0]["mean concept score"]
    assert main(["audit", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "images"),
                 "--concept", str(tmp_path / "concept"), "--layer", "features.6",
                 "--device", "cpu", "--grayscale", "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["rows"][0]["class"] == "a"
    with pytest.raises(RuntimeError, match="channels"):  # forcing RGB on a 1-channel model
        run_audit(str(tmp_path / "m.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                  "features.6", device="cpu", grayscale=False, verbose=False)


def test_audit_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["audit", "--model", str(tmp_path / "missing.pt"), "--images", str(tmp_path),
              "--concept", str(tmp_path), "--layer", "features.6"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("skdebias audit: error:") and "missing.pt" in err
