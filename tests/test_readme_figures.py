"""The README's fidelity table is read off the committed benchmark JSON, figure by figure: a re-run
that changes the JSON and not the README (or a figure typed wrong) fails here."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"natural": "natural", "IC layout": "ic", "Siemens star": "star", "cells": "cell"}
# the table's columns, each (JSON file under docs/science-generic, key of the row's score)
COLUMNS = [("results.json", "refined"), ("results-restore.json", "live"), ("results.json", "epie"),
           ("results.json", "blurred"), ("results.json", "highpass")]
CELL = re.compile(r"^\**(\d\.\d{3})\** \((\d\.\d{3})\)$")


def table_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("| family, case | `Refine:Image` |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def scores(name: str) -> dict:
    rows = json.loads((ROOT / "docs" / "science-generic" / name).read_text())["rows"]
    return {(r["family"], r["overlap"], r["dose_x"]): r for r in rows}


def test_every_figure_of_the_fidelity_table_is_the_jsons():
    data = {name: scores(name) for name in {c[0] for c in COLUMNS}}
    rows = table_rows()
    assert len(rows) == 16
    checked = 0
    for cells in rows:
        m = re.fullmatch(r"(.+), overlap ([\d.]+), ×([\d.]+)", cells[0])
        assert m, cells[0]
        key = (FAMILIES[m[1]], float(m[2]), float(m[3]))
        for (name, score), cell in zip(COLUMNS, cells[1:]):
            if not cell:        # a calibration image, given once per overlap at full dose
                assert score in ("blurred", "highpass") and key[2] != 1.0
                continue
            got = CELL.fullmatch(cell)
            assert got, (cells[0], score, cell)
            row = data[name][key][score]
            assert float(got[1]) == pytest.approx(row["nrmse"], abs=5.01e-4), (cells[0], score, "nrmse")
            assert float(got[2]) == pytest.approx(row["ssim"], abs=5.01e-4), (cells[0], score, "ssim")
            checked += 1
    assert checked == 16 * 3 + 8 * 2


# the demo's scan-B2 table: its rows (by how they start) and the summary's scores
DEMO_ROWS = {"v1 (": "v1, same window", "v2 (": "v2, same window", "the IOC's live image": "live (IOC, v2)",
             "the IOC's refined image": "refined (IOC, v2 + frames)", "pty-chi ePIE": "pty-chi ePIE",
             "calibration: truth blurred": "calibration: blurred",
             "calibration: truth high-passed": "calibration: highpass", "calibration: all-zero": "calibration: zero"}


def test_every_figure_of_the_demo_table_is_the_demo_summarys():
    """The README's table of scan B2 against the truth is `ptychopv demo`'s summary.json
    (docs/demo), figure by figure, and its run's controller figures are too."""
    text = (ROOT / "README.md").read_text()
    summary = json.loads((ROOT / "docs" / "demo" / "summary.json").read_text())
    start = text.index("| image of scan B2 | NRMSE | SSIM | NRMSE / SSIM, ramp removed too |")
    seen = set()
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        label, nrmse, ssim, ramp = [c.strip().strip("*") for c in line.strip("|").split("|")]
        key = next(v for k, v in DEMO_ROWS.items() if label.startswith(k))
        row = summary["scan2_scores"][key]
        ramp_n, ramp_s = (float(x) for x in ramp.split(" / "))
        for got, want in ((nrmse, "nrmse"), (ssim, "ssim"), (ramp_n, "nrmse_ramp"), (ramp_s, "ssim_ramp")):
            assert float(got) == pytest.approx(row[want], abs=5.01e-4), (label, want)
        seen.add(key)
    assert seen == set(DEMO_ROWS.values())
    for scan in ("scan1", "scan2"):
        c = summary["controller"][scan]
        assert f"{c['ssim_vs_reconstruction']:.3f}, {c['mismatch']:.3f} →" in text, scan
