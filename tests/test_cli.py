"""The `ptychopv` command: help on each subcommand, and the interim demo end to end."""

import json
import subprocess
import sys

import pytest

from ptychopv.cli import build_parser


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ptychopv", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_every_subcommand_has_help():
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices.keys()
    assert {"ioc", "sim", "demo"} <= set(names)
    for name in names:
        r = run(name, "--help")
        assert r.returncode == 0 and "usage: ptychopv " + name in r.stdout


def test_no_command_prints_help():
    r = run()
    assert r.returncode == 2 and "COMMAND" in r.stdout


@pytest.mark.epics
def test_demo_quick_streams_a_scan_through_sim_and_ioc(tmp_path):
    r = run("demo", "--quick", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames_streamed"] > 10 and summary["ioc_status"] == "Running"
    assert (tmp_path / "scan1_truth.h5").exists()


def test_readme_pv_table_is_current():
    from pathlib import Path

    from ptychopv.ioc.pvtable import BEGIN, END, render

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    assert text[a:b] == render(), "run: python -m ptychopv.ioc.pvtable --write README.md"
