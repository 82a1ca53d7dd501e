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


# ------------------------------------------------------------------ AuditReport
import re  # noqa: E402

from skdebias.report import AuditReport  # noqa: E402


@pytest.fixture(scope="module")
def audit_parts():
    import torch
    from sklearn.utils import Bunch

    from skdebias import SpectralRelevanceAnalysis

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    rng = np.random.RandomState(0)
    X = rng.rand(24, 3, 4, 4).astype("float32")
    X[:6, :, 0, 0] = 1.0  # a "patch" in part of class 0
    y = np.repeat([0, 1], 12)
    spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_clusters=2, map_size=4,
                                      n_neighbors=4, random_state=0, device="cpu").fit(X, y)
    tcav = Bunch(scores=np.array([0.9, 0.8, 0.85]), random_scores=np.array([0.5, 0.4, 0.6]),
                 mean=0.85, p_value=0.001, significant=True)
    return Bunch(net=net, X=X, y=y, spray=spray, tcav=tcav,
                 spuriosity=np.r_[np.linspace(1, 0, 12), np.linspace(0, 1, 12)],
                 A0=rng.rand(10, 5), cav=np.eye(5)[0])


def _full_report(p, **kw):
    corrected = AuditReport(p.net, p.X, p.y, title="Corrected network", tcav={"after": p.tcav},
                            heatmaps=(p.X[:3], np.random.RandomState(1).randn(3, 4, 4)))
    args = dict(spray=p.spray, spuriosity=p.spuriosity, cav={"pattern": p.cav},
                concept_pairs=(p.A0 + p.cav, p.A0), tcav=p.tcav,
                sensitivity={"1": {"vanilla": 0.2, "corrected": 0.002}},
                heatmaps={"X": p.X[:4], "relevance": np.random.RandomState(0).randn(4, 4, 4),
                          "titles": list("abcd")},
                correction=[{"method": "vanilla", "clean acc": 0.9, "attacked acc": 0.6},
                            {"method": "RR-ClArC", "clean acc": 0.9, "attacked acc": 0.85}],
                corrected=corrected, class_names=["zero", "one"], n_images=2, title="T <&>")
    args.update(kw)
    return AuditReport(p.net, p.X, p.y, **args)


def test_audit_report_has_every_section_and_inline_figures(audit_parts, tmp_path):
    report = _full_report(audit_parts)
    html = report.to_html()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for id_, title in AuditReport.SECTIONS:
        assert f'<section id="{id_}"' in html and title in html
    assert "T &lt;&amp;&gt;" in html  # text is escaped
    assert 'class="note"' not in html  # every section has its data
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    figures = report.figures()
    assert len(imgs) == len(figures) == html.count("<figure>") == html.count("<figcaption>")
    # SpRAy 2 per class, spuriosity, CAV, TCAV, sensitivity, heatmaps, comparison, corrected x2
    assert len(imgs) == 2 * 2 + 6 + 2
    assert all(data.startswith(b"\x89PNG") for data in figures.values())
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing outside the file
    assert "http://" not in html and "https://" not in html
    # per-class accuracy of the network's own predictions, and the spuriosity gap table
    pred = audit_parts.net(__import__("torch").as_tensor(audit_parts.X)).argmax(1).numpy()
    acc = np.mean(pred[audit_parts.y == 0] == 0)
    assert f"<td>zero</td><td>12</td><td>{acc:.3f}</td>" in html
    assert "acc. most spurious" in html
    # the corrected network's sections are nested under the correction, with their own ids
    assert html.index('id="corrected"') > html.index('id="correction"')
    assert 'id="corrected-heatmaps"' in html and 'id="corrected-concept"' in html
    assert report.save(tmp_path / "sub" / "r.html") == tmp_path / "sub" / "r.html"
    saved = (tmp_path / "sub" / "r.html").read_text()
    assert saved.count("<img ") == len(imgs) and "T &lt;&amp;&gt;" in saved
    paths = report.save_figures(tmp_path / "figs")
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{k}.png" for k in figures)
    assert "corrected_heatmaps_relevance.png" in [os.path.basename(p) for p in paths]


def test_audit_report_says_which_classes_barely_separate(audit_parts):
    import copy

    p = audit_parts
    assert all(p.spray.confidence_[c] < 0.25 for c in (0, 1)) and p.spray.weak_classes_ == [0, 1]
    html = AuditReport(p.net, p.X, p.y, spray=p.spray, class_names=["zero", "one"]).to_html()
    assert "The clusters of zero, one barely separate (confidence below 0.25)" in html
    spray = copy.copy(p.spray)
    spray.weak_classes_ = [1]
    html = AuditReport(p.net, p.X, p.y, spray=spray, class_names=["zero", "one"]).to_html()
    assert "The clusters of one barely separate" in html
    spray.weak_classes_ = []
    html = AuditReport(p.net, p.X, p.y, spray=spray, class_names=["zero", "one"]).to_html()
    assert "barely separate" not in html


def test_audit_report_leaves_out_sections_without_data_with_a_note():
    html = AuditReport().to_html()
    for id_, title in AuditReport.SECTIONS:
        assert title in html
    assert html.count('class="note"') == len(AuditReport.SECTIONS)
    assert "<img" not in html
    html = AuditReport(notes={"strategies": "SpRAy needs 8 images."}).to_html()
    assert "SpRAy needs 8 images." in html and "pass spray=" not in html


def test_audit_report_bad_arguments_name_the_parameter(audit_parts):
    p = audit_parts
    with pytest.raises(ValueError, match="spuriosity has 3 entries but X has 24 images"):
        AuditReport(p.net, p.X, p.y, spuriosity=np.zeros(3)).to_html()
    with pytest.raises(ValueError, match="spray was fitted on 24 samples but X has 5"):
        AuditReport(p.net, p.X[:5], spray=p.spray).to_html()
    with pytest.raises(ValueError, match="corrected must be an AuditReport"):
        AuditReport(corrected={"heatmaps": None}).to_html()
    with pytest.raises(ValueError, match=r"notes has unknown section ids \['nope'\]"):
        AuditReport(notes={"nope": "x"}).to_html()
    with pytest.raises(ValueError, match="n_images"):
        AuditReport(n_images=0).to_html()


def test_audit_report_without_jinja2_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ImportError, match=r"pip install skdebias\[report\]"):
        AuditReport().to_html()


def test_docs_report_example_runs():
    import re as re_
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "report.md").read_text()
    (block,) = re_.findall(r"```python\n(.*?)```", text, flags=re_.S)
    ns = {}
    exec(compile(block, "docs/report.md [python block 0]", "exec"), ns)
    html = ns["html"]
    assert "Artifact digits" in html and html.count("<img ") == 3  # SpRAy x2, heatmaps
    assert 'id="strategies-0"' in html
