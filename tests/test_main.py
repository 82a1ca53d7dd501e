"""skdebias.__main__: ``python -m skdebias`` runs the command line."""

import runpy
import sys

import pytest


def test_python_m_skdebias_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["skdebias", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("skdebias", run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "audit" in out
