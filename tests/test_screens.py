"""The Phoebus screens in opi/: current with the schema, real Phoebus widgets, and every PV served.

Phoebus cannot run here, so the files are held to what Phoebus's display model defines: the
widget types and the persisted properties of each (names as in
``org.csstudio.display.builder.model.widgets.*``), written the way Phoebus writes them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import epics
import pytest

from ptychopv.ioc import schema
from ptychopv.opi import generate

pytestmark = pytest.mark.epics

OPI = Path(generate.__file__).resolve().parent
FILES = sorted(OPI.glob("*.bob"))

# --- What Phoebus's widget model persists, per widget type (conservative: long-standing names only).
WIDGET = {"name", "class", "x", "y", "width", "height", "actions", "rules", "scripts"}     # Widget
VISIBLE = WIDGET | {"visible", "tooltip"}                                                  # VisibleWidget
MACRO = VISIBLE | {"macros"}                                                               # MacroWidget
PVW = VISIBLE | {"pv_name", "border_alarm_sensitive"}                                      # PVWidget
BORDER = {"border_width", "border_color"}                                                  # BorderSupport
CONFIRM = {"enabled", "confirm_dialog", "confirm_message", "password"}
PROPERTIES = {
    "label": MACRO | BORDER | {"text", "font", "foreground_color", "background_color", "transparent",
                               "horizontal_alignment", "vertical_alignment", "rotation_step", "auto_size",
                               "wrap_words"},
    "textupdate": PVW | BORDER | {"font", "foreground_color", "background_color", "transparent", "format",
                                  "precision", "show_units", "horizontal_alignment", "vertical_alignment",
                                  "wrap_words", "rotation_step"},
    "textentry": PVW | BORDER | {"font", "foreground_color", "background_color", "format", "precision",
                                 "show_units", "enabled", "wrap_words", "multi_line"},
    "action_button": PVW | CONFIRM | {"text", "font", "foreground_color", "background_color", "transparent",
                                      "rotation_step"},
    "combo": PVW | CONFIRM | {"font", "foreground_color", "background_color", "items", "items_from_pv",
                              "editable"},
    "choice": PVW | CONFIRM | {"font", "foreground_color", "background_color", "selected_color", "items",
                               "items_from_pv", "horizontal"},
    "bool_button": PVW | CONFIRM | {"bit", "off_label", "off_color", "on_label", "on_color", "show_led", "font",
                                    "foreground_color", "background_color", "labels_from_pv", "mode"},
    "led": PVW | {"bit", "off_label", "off_color", "on_label", "on_color", "font", "foreground_color",
                  "line_color", "square", "labels_from_pv"},
    "byte_monitor": PVW | {"startBit", "numBits", "bitReverse", "horizontal", "square", "off_color", "on_color",
                           "foreground_color", "font", "labels"},
    "progressbar": PVW | {"fill_color", "background_color", "horizontal", "limits_from_pv", "minimum",
                          "maximum", "log_scale"},
    "image": PVW | {"background_color", "show_toolbar", "color_map", "color_bar", "x_axis", "y_axis",
                    "data_width", "data_height", "interpolation", "unsigned", "autoscale", "logscale",
                    "minimum", "maximum", "cursor_info_pv", "x_pv", "y_pv", "cursor_crosshair", "rois"},
    "xyplot": VISIBLE | {"foreground_color", "background_color", "title", "title_font", "show_toolbar",
                         "show_legend", "x_axis", "y_axes", "traces", "marker"},
    "group": MACRO | {"style", "font", "foreground_color", "background_color", "transparent"},
    "embedded": MACRO | BORDER | {"file", "resize", "group_name", "transparent"},
}
DISPLAY = WIDGET | {"macros", "background_color", "grid_visible", "grid_color", "grid_step_x", "grid_step_y"}
CONTAINERS = {"group"}                                   # may hold <widget> children
COLOR_PROPS = {"foreground_color", "background_color", "border_color", "fill_color", "line_color", "off_color",
               "on_color", "selected_color", "grid_color", "color"}
FONT_PROPS = {"font", "title_font", "scale_font"}
AXIS = {"title", "autoscale", "log_scale", "minimum", "maximum", "show_grid", "title_font", "scale_font",
        "visible"}
TRACE = {"name", "x_pv", "y_pv", "err_pv", "axis", "trace_type", "color", "line_width", "point_type",
         "point_size", "visible"}
ACTIONS = {"write_pv": {"pv_name", "value", "description"},
           "open_display": {"file", "macros", "target", "name", "description"}}
TARGETS = {"replace", "tab", "window"}


def parse(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "display" and root.get("version") == "2.0.0", f"{path.name}: root is not display 2.0.0"
    return root


def widgets(el: ET.Element):
    for w in el.findall("widget"):
        yield w
        yield from widgets(w)


def check_value(where: str, prop: ET.Element) -> None:
    """Structured properties are written the way Phoebus writes them."""
    tag = prop.tag
    if tag in COLOR_PROPS:
        (c,) = list(prop)
        assert c.tag == "color" and all(c.get(k, "").isdigit() for k in ("red", "green", "blue")), where
    elif tag in FONT_PROPS:
        (f,) = list(prop)
        assert f.tag == "font" and f.get("style") in ("REGULAR", "BOLD", "ITALIC", "BOLD_ITALIC"), where
        float(f.get("size"))
    elif tag == "actions":
        for a in prop:
            assert a.tag == "action" and a.get("type") in ACTIONS, f"{where}: action {a.get('type')}"
            extra = {c.tag for c in a} - ACTIONS[a.get("type")]
            assert not extra, f"{where}: {a.get('type')} action has {extra}"
            if a.get("type") == "open_display":
                assert a.findtext("target") in TARGETS, where
    elif tag == "traces":
        for t in prop:
            assert t.tag == "trace" and not {c.tag for c in t} - TRACE, f"{where}: trace {[c.tag for c in t]}"
            for c in t:
                if c.tag == "color":
                    check_value(where, c)
    elif tag in ("x_axis", "y_axes"):
        axes = [prop] if tag == "x_axis" else list(prop)
        for ax in axes:
            assert tag == "x_axis" or ax.tag == "y_axis", where
            assert not {c.tag for c in ax} - AXIS, f"{where}: {tag} has {[c.tag for c in ax]}"
    elif tag == "items":
        assert all(c.tag == "item" for c in prop), where
    elif tag in ("format", "horizontal_alignment", "vertical_alignment", "style", "x", "y", "width", "height"):
        assert prop.text is not None and prop.text.lstrip("-").isdigit(), f"{where}: {tag}={prop.text!r}"
    elif len(prop):
        pytest.fail(f"{where}: unexpected structure in <{tag}>")


def test_every_screen_is_there_and_current(tmp_path):
    from ptychopv.ioc.schema import STAGES

    # one screen per declared stage (Infer, Stitch, Refine, ...) beside the fixed ones
    assert {f.name for f in FILES} == {"ptychopv_overview.bob", "ptychopv_images.bob", "ptychopv_training.bob",
                                       *(f"ptychopv_{st.name.lower()}.bob" for st in STAGES)}
    assert "ptychopv_refine.bob" in {f.name for f in FILES}
    run = [sys.executable, "-m", "ptychopv.opi.generate", "--check"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # a screen edited by hand (or left behind by a schema change) is reported as stale
    stale = tmp_path / "opi"
    shutil.copytree(OPI, stale)
    (stale / "ptychopv_infer.bob").write_text((stale / "ptychopv_infer.bob").read_text().replace("Infer:", "Inf:"))
    (stale / "ptychopv_training.bob").unlink()
    r = subprocess.run(run + ["--folder", str(stale)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "ptychopv_infer.bob is stale" in r.stderr and "ptychopv_training.bob is stale" in r.stderr


def check_screen(root: ET.Element, label: str) -> None:
    extra = {c.tag for c in root if c.tag != "widget"} - DISPLAY
    assert not extra, f"{label}: display properties Phoebus does not have: {extra}"
    names = []
    for w in widgets(root):
        wtype = w.get("type")
        assert wtype in PROPERTIES, f"{label}: widget type {wtype!r} is not a Phoebus widget"
        assert w.get("version", "").count(".") == 2, f"{label}: widget without a version"
        where = f"{label}:{w.findtext('name')}"
        names.append(w.findtext("name"))
        for prop in w:
            if prop.tag == "widget":
                assert wtype in CONTAINERS, f"{where}: a {wtype} cannot hold widgets"
                continue
            assert prop.tag in PROPERTIES[wtype], f"{where}: {wtype} has no property <{prop.tag}>"
            check_value(where, prop)
    assert len(names) == len(set(names)), f"{label}: widget names repeat"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_only_phoebus_widgets_and_properties(path):
    check_screen(parse(path), path.name)


@pytest.mark.parametrize("spoil", ["runtime property", "BOY type", "xyplot pv_name", "bad action", "bad color"])
def test_the_checks_reject_what_phoebus_would_not_load(spoil):
    root = parse(OPI / "ptychopv_training.bob")
    by_type = {}
    for w in widgets(root):
        by_type.setdefault(w.get("type"), w)  # the first of each type (the title label has a font)
    if spoil == "runtime property":
        ET.SubElement(by_type["textupdate"], "pv_value").text = "1"  # runtime only, never persisted
    elif spoil == "BOY type":
        by_type["textupdate"].set("type", "TextUpdate")
    elif spoil == "xyplot pv_name":
        ET.SubElement(by_type["xyplot"], "pv_name").text = "$(P)X"  # its PVs live in traces
    elif spoil == "bad action":
        ET.SubElement(by_type["action_button"].find("actions/action"), "confirm_message").text = "sure?"
    else:
        by_type["label"].find("font").tag = "foreground_color"
    with pytest.raises(AssertionError):
        check_screen(root, "spoiled")


def pv_names(root: ET.Element) -> list[str]:
    """Every PV a screen connects to: widget and action pv_name, and plot trace PVs."""
    out = [e.text for e in root.iter("pv_name") if e.text]
    for t in root.iter("trace"):
        out += [t.findtext(k) for k in ("x_pv", "y_pv", "err_pv") if t.findtext(k)]
    return out


def test_all_pvs_use_the_prefix_macro():
    for path in FILES:
        for name in pv_names(parse(path)):
            assert name.removeprefix("pva://").startswith("$(P)"), f"{path.name}: {name} without $(P)"


def test_every_pv_on_every_screen_is_served(ioc, pva_ctx):
    ca, pva = set(), set()
    for path in FILES:
        for name in pv_names(parse(path)):
            full = name.replace("$(P)", ioc.prefix)
            if full.startswith("pva://"):
                pva.add(full.removeprefix("pva://"))
            else:
                ca.add(full.removeprefix("ca://"))
    assert len(ca) > 100 and {ioc.pv("Stitch:Image"), ioc.pv("Infer:Phase"), ioc.pv("Recon:Image")} <= pva
    pvs = {n: epics.get_pv(n) for n in sorted(ca)}
    missing = [n for n, pv in pvs.items() if not pv.wait_for_connection(timeout=10)]
    assert not missing, f"not served over CA: {missing}"
    for name in sorted(pva):
        value = pva_ctx.get(name, timeout=10)
        assert value.getID() == "epics:nt/NTNDArray:1.0", name


def test_screens_cover_the_interface():
    """Plugin screens show every record of their plugin (areaDetector style); links resolve."""
    refs = {p.name: {n.removeprefix("pva://").removeprefix("$(P)") for n in pv_names(parse(p))} for p in FILES}
    for file, stage in generate.PLUGIN_STAGES.items():
        want = {r.name for pv in schema.SCHEMA if pv.group == stage.lower() and generate.shown(pv)
                for r in pv.records()}
        assert want - refs[file] == set(), f"{file} lacks {sorted(want - refs[file])}"
        assert {"EnableCallbacks", "BlockingCallbacks_RBV", "QueueSize", "DroppedArrays_RBV",
                "ArrayRate_RBV"} <= {n.removeprefix(stage + ":") for n in refs[file]}
    overview = refs["ptychopv_overview.bob"]
    assert {"ModelVersion_RBV", "ScaleFactor", "FrameRate_RBV", "SSIM_RBV", "Recon:Start", "Recon:Abort",
            "Train:Start", "Train:Abort"} <= overview
    assert {r.name for pv in schema.SCHEMA if pv.group == "auto" for r in pv.records()} <= overview
    assert {"Train:LossHistory_RBV", "Train:ValLossHistory_RBV", "Train:Epoch_RBV", "Train:Loss_RBV",
            "Train:Start", "Train:Abort"} <= refs["ptychopv_training.bob"]
    for path in FILES:
        for a in parse(path).iter("action"):
            if a.get("type") == "open_display":
                assert (OPI / a.findtext("file")).is_file(), f"{path.name} opens missing {a.findtext('file')}"
    opened = {a.findtext("file") for a in parse(OPI / generate.OVERVIEW).iter("action")
              if a.get("type") == "open_display"}
    assert opened == {f.name for f in FILES} - {generate.OVERVIEW}


def test_commands_write_one_and_settings_have_readbacks():
    root = parse(OPI / generate.OVERVIEW)
    writes = {a.findtext("pv_name"): a.findtext("value") for a in root.iter("action") if a.get("type") == "write_pv"}
    assert writes["$(P)Recon:Start"] == "1" and writes["$(P)Train:Abort"] == "1"
    entries = {w.findtext("pv_name") for w in widgets(root) if w.get("type") in ("textentry", "combo")}
    updates = {w.findtext("pv_name") for w in widgets(root) if w.get("type") == "textupdate"}
    assert "$(P)ScaleFactor" in entries and "$(P)ScaleFactor_RBV" in updates
    assert "$(P)Auto:Enable" in entries and "$(P)Auto:Enable_RBV" in updates


def test_a_pv_in_a_group_no_panel_names_is_on_the_overview(monkeypatch):
    """The overview listed its groups by hand: a PV declared in a new group was on no screen."""
    from ptychopv.ioc import schema
    from ptychopv.ioc.schema import PV
    from ptychopv.opi import generate

    extra = [PV("Beam:Energy", "ao", "Beam energy", egu="keV", prec=2, low=1, high=30, initial=8.8, rbv=True,
                group="beam"),
             PV("Beam:Status_RBV", "stringin", "Beam status", initial="", group="beam")]
    before = generate.overview()
    monkeypatch.setattr(schema, "SCHEMA", schema.SCHEMA + extra)
    after = generate.overview()
    assert "$(P)Beam:Energy" in after and "$(P)Beam:Status_RBV" in after and "Beam (Beam:)" in after
    assert "Beam:" not in before
