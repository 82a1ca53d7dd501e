"""skdebias.cli: the demo/audit command line."""

import json
import warnings

import numpy as np
import pytest
import torch

from skdebias.cli import main, run_audit


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


def _write_square_folders(root, n_images=4):
    """Concept folders absent/present (6 PNGs each) and image folders a/b (``n_images`` each)
    under ``root``: noisy RGB 28 px images; class index 1 ("present", "b") carries a red
    square."""
    rng = np.random.RandomState(0)

    def img(k, i):
        a = (rng.rand(28, 28, 3) * 80).astype(np.uint8)
        if k == 1:
            a[20:26, 20:26] = [255, 0, 0]
        return a

    _write_pngs(root / "concept", ["absent", "present"], 6, img)
    _write_pngs(root / "images", ["a", "b"], n_images, img)


def test_audit_on_generated_folders(tmp_path, capsys):
    from skdebias.models import SmallCNN

    _write_square_folders(tmp_path)
    torch.manual_seed(0)
    torch.save(SmallCNN(n_classes=2), tmp_path / "m.pt")
    res = run_audit(str(tmp_path / "m.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                    "features.6", device="cpu", trust_model=True)
    assert [r["class"] for r in res["rows"]] == ["a", "b"]
    # class "b" images carry the concept, so they score higher along the CAV
    assert res["rows"][1]["mean concept score"] > res["rows"][0]["mean concept score"]
    assert "Concept 'present'" in capsys.readouterr().out
    torch.save({"not": "a module"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="neither a state dict"):
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
                    "features.6", device="cpu", verbose=False,
                    trust_model=True)  # grayscale from in_channels
    assert [r["n"] for r in res["rows"]] == [4, 4]
    assert res["rows"][1]["mean concept score"] > res["rows"][0]["mean concept score"]
    assert main(["audit", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "images"),
                 "--concept", str(tmp_path / "concept"), "--layer", "features.6",
                 "--device", "cpu", "--grayscale", "--trust-model",
                 "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["rows"][0]["class"] == "a"
    # forcing RGB on a 1-channel model: the input check names the shape the network takes
    with pytest.raises(ValueError, match=r"expects shape \(n_samples, 1, H, W\)"):
        run_audit(str(tmp_path / "m.pt"), str(tmp_path / "images"), str(tmp_path / "concept"),
                  "features.6", device="cpu", grayscale=False, verbose=False, trust_model=True)


def test_audit_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["audit", "--model", str(tmp_path / "missing.pt"), "--images", str(tmp_path),
              "--concept", str(tmp_path), "--layer", "features.6"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("skdebias audit: error:") and "missing.pt" in err


# Model files: state dicts need --arch, whole pickles --trust-model, and every unusable file ends
# in one stderr line and exit status 2.

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Image and concept folders (RGB 28 px; class "b" and "present" carry a red square)."""
    root = tmp_path_factory.mktemp("audit")
    _write_square_folders(root)
    return ["--images", str(root / "images"), "--concept", str(root / "concept"),
            "--layer", "features.6", "--device", "cpu"]


def _small_cnn():
    from skdebias.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN()  # the defaults: what --arch skdebias.models:SmallCNN builds


def _audit_error(capsys, argv):
    """Exit status and stderr of ``skdebias audit`` with ``argv``, which must fail."""
    capsys.readouterr()
    # a warning would print more lines on a real stderr (torch warns about damaged pickles)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as info:
        warnings.simplefilter("always")
        main(["audit", *argv])
    assert [str(w.message) for w in caught] == []
    return info.value.code, capsys.readouterr().err


def _assert_one_line(err, *names):
    assert err.startswith("skdebias audit: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err


def test_audit_state_dict_with_arch_matches_the_whole_network(tmp_path, folders, capsys):
    net = _small_cnn()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save(net, tmp_path / "full.pt")
    assert main(["audit", "--model", str(tmp_path / "sd.pt"), "--arch", "skdebias.models:SmallCNN",
                 *folders, "--json", str(tmp_path / "sd.json")]) == 0
    assert main(["audit", "--model", str(tmp_path / "full.pt"), "--trust-model", *folders,
                 "--json", str(tmp_path / "full.json")]) == 0
    from_sd = json.loads((tmp_path / "sd.json").read_text())
    assert [r["class"] for r in from_sd["rows"]] == ["a", "b"]
    # the same weights give the same audit, so the state dict was loaded, not random weights
    assert from_sd == json.loads((tmp_path / "full.json").read_text())


def test_audit_torchvision_arch_reads_the_number_of_classes(tmp_path, folders):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    res = run_audit(str(tmp_path / "r18.pt"), folders[1], folders[3], "layer4", device="cpu",
                    verbose=False, arch="resnet18")
    assert [r["n"] for r in res["rows"]] == [4, 4]


def test_audit_refuses_a_whole_pickle_without_trust_model(tmp_path, folders, capsys):
    torch.save(_small_cnn(), tmp_path / "full.pt")
    code, err = _audit_error(capsys, ["--model", str(tmp_path / "full.pt"), *folders])
    assert code == 2
    _assert_one_line(err, "full.pt", "--arch", "--trust-model")


def test_audit_state_dict_without_arch_asks_for_it(tmp_path, folders, capsys):
    torch.save(_small_cnn().state_dict(), tmp_path / "sd.pt")
    code, err = _audit_error(capsys, ["--model", str(tmp_path / "sd.pt"), *folders])
    assert code == 2
    _assert_one_line(err, "sd.pt", "state dict", "--arch")


def _missing(path):
    pass


def _empty(path):
    path.write_bytes(b"")


def _corrupt(path):
    # a pickle header then garbage: torch warns about the protocol before failing
    path.write_bytes(b"\x80\x04" + np.random.RandomState(0).bytes(256))


def _mismatched(path):
    sd = _small_cnn().state_dict()
    del sd["features.0.bias"]
    sd["extra.weight"] = torch.zeros(2, 2)
    torch.save(sd, path)


@pytest.mark.parametrize("make, arch, names", [
    (_missing, "skdebias.models:SmallCNN", ["m.pt", "no such file"]),
    (_empty, "skdebias.models:SmallCNN", ["m.pt", "empty"]),
    (_corrupt, "skdebias.models:SmallCNN", ["m.pt", "not a file written by torch.save"]),
    (_mismatched, "skdebias.models:SmallCNN",
     ["m.pt", "features.0.bias", "extra.weight", "skdebias.models:SmallCNN"]),
    (_mismatched, "resnet19", ["resnet19", "resnet18"]),
    (_mismatched, "skdebias.models:NoSuchNet", ["skdebias.models:NoSuchNet", "no attribute"]),
], ids=["missing", "empty", "corrupt", "mismatched-keys", "unknown-torchvision-arch",
        "unknown-class-arch"])
def test_audit_model_file_problems_end_in_one_line(tmp_path, folders, capsys, make, arch, names):
    make(tmp_path / "m.pt")
    code, err = _audit_error(capsys, ["--model", str(tmp_path / "m.pt"), "--arch", arch, *folders])
    assert code == 2
    _assert_one_line(err, *names)


def test_audit_help_documents_exit_codes_and_trust(capsys):
    with pytest.raises(SystemExit) as info:
        main(["audit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "--arch" in out
    assert "--trust-model" in out and "runs any code" in out


# ------------------------------------------------------------------ shared conventions
def test_version(capsys):
    from skdebias import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"skdebias {__version__}"


@pytest.mark.parametrize("command", ["demo", "audit"])
def test_both_commands_take_the_shared_options_and_document_exit_codes(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for option in ("--batch-size", "--device", "--output", "--report", "--json", "--progress"):
        assert option in out
    assert "exit status" in out and "  2  " in out


def test_batch_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--batch-size", "0"])
    assert info.value.code == 2
    assert "must be a positive integer, got '0'" in capsys.readouterr().err


def _fake_demo(calls):
    def fake(**kwargs):
        calls.update(kwargs)
        for key in ("report", "figures"):
            if kwargs.get(key):
                calls[f"{key}_dir_exists"] = True
        return {"ok": 1}
    return fake


def test_demo_output_dir_names_report_json_and_figures(tmp_path, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr("skdebias.cli.run_demo", _fake_demo(calls))
    out = tmp_path / "out"
    assert main(["demo", "--output", str(out), "--batch-size", "16", "--device", "cpu",
                 "--no-progress"]) == 0
    assert calls["report"] == str(out / "report.html")
    assert calls["figures"] == str(out / "figures")
    assert (calls["batch_size"], calls["device"], calls["progress"]) == (16, "cpu", False)
    assert json.loads((out / "results.json").read_text()) == {"ok": 1}
    assert str(out / "results.json") in capsys.readouterr().out


def test_demo_writes_the_default_output_unless_told_otherwise(tmp_path, monkeypatch):
    from skdebias.cli import DEMO_OUTPUT

    calls = {}
    monkeypatch.setattr("skdebias.cli.run_demo", _fake_demo(calls))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-correction"]) == 0
    assert calls["report"] == f"{DEMO_OUTPUT}/report.html"
    assert (tmp_path / DEMO_OUTPUT / "results.json").exists()
    calls.clear()
    assert main(["demo", "--no-report"]) == 0
    assert calls["report"] is None and calls["figures"] is None
    calls.clear()
    assert main(["demo", "--report", "r.html"]) == 0  # only what was asked for
    assert calls["report"] == "r.html" and calls["figures"] is None


def test_output_under_a_file_fails_before_the_work(tmp_path, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr("skdebias.cli.run_demo", _fake_demo(calls))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--report", str(tmp_path / "file" / "r.html")])
    assert info.value.code == 2 and calls == {}
    assert "is not a directory" in capsys.readouterr().err


def test_report_without_jinja2_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import sys

    calls = {}
    monkeypatch.setattr("skdebias.cli.run_demo", _fake_demo(calls))
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import fails
    with pytest.raises(SystemExit) as info:
        main(["demo", "--report", "r.html"])
    assert info.value.code == 2 and calls == {}
    assert "pip install skdebias[report]" in capsys.readouterr().err
    # the demo's default report is left out with a message; the rest is written
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-correction"]) == 0
    assert calls["report"] is None and calls["figures"].endswith("figures")
    assert "no HTML report" in capsys.readouterr().err


def test_audit_output_writes_a_report_with_every_section(tmp_path, capsys):
    from skdebias.models import SmallCNN
    from skdebias.report import AuditReport

    _write_square_folders(tmp_path, n_images=8)
    torch.manual_seed(0)
    torch.save(SmallCNN().state_dict(), tmp_path / "m.pt")  # 10 outputs, 2 folders
    out = tmp_path / "out"
    assert main(["audit", "--model", str(tmp_path / "m.pt"), "--arch", "skdebias.models:SmallCNN",
                 "--images", str(tmp_path / "images"), "--concept", str(tmp_path / "concept"),
                 "--layer", "features.6", "--device", "cpu", "--batch-size", "4",
                 "--output", str(out)]) == 0
    html = (out / "report.html").read_text()
    for _, title in AuditReport.SECTIONS:
        assert title in html
    assert "concept &#39;present&#39;" in html or "concept 'present'" in html
    assert html.count("<img ") >= 5  # SpRAy x2 per class, spuriosity, CAV, TCAV, ...
    assert "http://" not in html and "https://" not in html  # opens offline
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert "heatmaps_relevance.png" in pngs and "spuriosity_grid.png" in pngs
    assert json.loads((out / "results.json").read_text())["report"] == str(out / "report.html")
    assert f"Report written to {out / 'report.html'}" in capsys.readouterr().out
