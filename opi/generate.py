"""Generate the Phoebus screens in ``opi/`` from the PV declaration (``ioc/schema.py``).

``python -m ptychopv.opi.generate`` rewrites them; ``--check`` exits 1 when they are stale.
Every PV on a screen is ``$(P)`` plus a name taken from the schema, and how a PV is shown
follows from its record type: settings get an entry or a menu with their readback beside
it, commands (``bo`` records whose first state is ``Done``) get buttons, readbacks get text
updates, NTNDArrays get image widgets over ``pva://``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import GENERATOR_CONFIG_HELP, generator_extensions
from ..io.generated import write_or_check

from ..ioc import schema
from ..ioc.schema import PV
from . import bob

OVERVIEW = "ptychopv_overview.bob"


def plugin_stages() -> dict[str, str]:
    """One areaDetector-style screen per chain stage (schema.STAGES), named after it."""
    return {f"ptychopv_{st.group}.bob": st.name for st in schema.STAGES}


def screens() -> dict[str, tuple[str, str]]:
    """Screen file -> (button text, title)."""
    return {OVERVIEW: ("Overview", "ptychopv overview"),
            **{f: (f"{name} plugin", f"ptychopv {name} plugin ($(P){name}:)") for f, name in plugin_stages().items()},
            "ptychopv_images.bob": ("Images", "ptychopv live images"),
            "ptychopv_training.bob": ("Training", "ptychopv training")}


def overview_stages() -> tuple[str, ...]:
    """What the overview's "Stages" panel shows of each stage, where the stage has it."""
    return (*plugin_stages().values(), "Scan", "Recon", "Train", "Auto")


PLUGIN_STAGES = plugin_stages()       # the stages declared at import (tests read it)
STAGE_SUMMARY = ("Status_RBV", "State_RBV", "Capture_RBV", "EnableCallbacks_RBV", "ArrayRate_RBV",
                 "DroppedArrays_RBV", "Message_RBV")

LABEL_W, CTRL_W, RBV_W, GAP = 190, 130, 130, 5
ROW_H, ROW_STEP = 22, 26
INNER_W = LABEL_W + CTRL_W + RBV_W + 2 * GAP
PANEL_W, PANEL_PAD_H = INNER_W + 30, 45       # room for the group's frame and title
MARGIN, HEADER_H, NAV_H = 10, 36, 30


def pv_ref(name: str) -> str:
    return "$(P)" + name


def is_command(pv: PV) -> bool:
    """A button-like record: writing 1 starts something, and it reads ``Done`` otherwise."""
    return pv.rtype == "bo" and not pv.rbv and pv.states[:1] == ("Done",)


def is_long_string(pv: PV) -> bool:
    return pv.rtype.startswith("string") and pv.length > 40


def shown(pv: PV) -> bool:
    """Records a screen row can show (waveforms go to plots, NTNDArrays to image widgets)."""
    return pv.rtype not in ("ntndarray", "waveform_in", "waveform_out") and not pv.desc.endswith("(unused)")


def group_decls(group: str) -> list[PV]:
    return [pv for pv in schema.SCHEMA if pv.group == group and shown(pv)]


# ---------------------------------------------------------------------------- rows and panels
def row(pv: PV, y: int, prefix: str = "") -> list:
    """Label, control and readback widgets for one declaration (a setting and its _RBV share a row)."""
    wname = pv.name.replace(":", "_")
    ref = pv_ref(pv.name)
    x1, x2 = LABEL_W + GAP, LABEL_W + CTRL_W + 2 * GAP
    text = prefix + pv.desc.removesuffix(" RBV")  # a readback twin's DESC ends in " RBV"
    out = [bob.label(wname + "_label", 0, y, LABEL_W, ROW_H, text, align=bob.ALIGN_RIGHT)]
    if is_command(pv):
        out.append(bob.action_button(wname, x1, y, CTRL_W, ROW_H, pv.states[1],
                                     bob.write_pv(ref, 1, pv.states[1]), pv=ref))
        if pv.name + "_RBV" in schema.by_name():  # a toggle with a readback: also offer to stop it
            out.append(bob.action_button(wname + "_stop", x2, y, RBV_W, ROW_H, "Stop",
                                         bob.write_pv(ref, 0, "Stop"), pv=ref))
    elif pv.writable:
        if pv.rtype in ("bo", "mbbo"):
            out.append(bob.combo(wname, x1, y, CTRL_W, ROW_H, ref))
        else:
            fmt = bob.FORMAT_STRING if is_long_string(pv) else None
            out.append(bob.textentry(wname, x1, y, CTRL_W, ROW_H, ref, fmt=fmt))
        if pv.rbv:
            fmt = bob.FORMAT_STRING if is_long_string(pv) else None
            out.append(bob.textupdate(wname + "_RBV", x2, y, RBV_W, ROW_H, ref + "_RBV", fmt=fmt))
    elif is_long_string(pv) or pv.rtype.startswith("string"):
        fmt = bob.FORMAT_STRING if is_long_string(pv) else None
        out.append(bob.textupdate(wname, x1, y, CTRL_W + GAP + RBV_W, ROW_H, ref, fmt=fmt))
    elif pv.egu == "%":
        out.append(bob.progressbar(wname, x1, y, CTRL_W + GAP + RBV_W, ROW_H, ref))
    else:
        out.append(bob.textupdate(wname, x1, y, CTRL_W, ROW_H, ref))
    return out


def panel(title: str, decls: list, x: int, y: int, prefixes: list[str] | None = None):
    """A titled group of rows; returns (widget, height)."""
    children = []
    for i, pv in enumerate(decls):
        children += row(pv, i * ROW_STEP, prefixes[i] if prefixes else "")
    height = len(decls) * ROW_STEP + PANEL_PAD_H
    return bob.group(title, x, y, PANEL_W, height, children), height


def columns(cols: list[list[tuple]], y0: int):
    """Lay out panels in columns; each panel is (title, decls) or (title, decls, prefixes)."""
    widgets, bottom = [], y0
    for c, panels in enumerate(cols):
        y = y0
        for spec in panels:
            w, h = panel(*spec[:2], MARGIN + c * (PANEL_W + MARGIN), y, *spec[2:])
            widgets.append(w)
            y += h + MARGIN
        bottom = max(bottom, y)
    return widgets, MARGIN + len(cols) * (PANEL_W + MARGIN), bottom


def header(current: str, width: int) -> list:
    """Title bar and buttons that open the other screens."""
    all_screens = screens()
    title = all_screens[current][1]
    out = [bob.label("title", 0, 0, width, HEADER_H, f"  {title}   —   prefix $(P)", fnt="Header 2",
                     header=True)]
    x = MARGIN
    for file, (button, _) in all_screens.items():
        if file == current:
            continue
        out.append(bob.action_button("open_" + file.removesuffix(".bob"), x, HEADER_H + 4, 130, NAV_H - 4,
                                     button, bob.open_display(file, button)))
        x += 130 + GAP
    return out


def finish(current: str, widgets: list, width: int, height: int) -> str:
    width = max(width, 6 * 135 + MARGIN)
    root = bob.display(screens()[current][1], width, height + MARGIN, header(current, width) + widgets)
    return bob.to_text(root)


# ---------------------------------------------------------------------------- screens
TOP = HEADER_H + NAV_H + MARGIN


def overview() -> str:
    recs = schema.by_name()
    stage_recs, prefixes = [], []
    for stage in overview_stages():
        for suffix in STAGE_SUMMARY:
            if f"{stage}:{suffix}" in recs:
                stage_recs.append(recs[f"{stage}:{suffix}"])
                prefixes.append(f"{stage}: ")
    in_stages = {r.name for r in stage_recs}

    def rest(group):
        return [pv for pv in group_decls(group) if pv.name not in in_stages]

    cols = [[("Live chain", group_decls("core")), ("Stages", stage_recs, prefixes)],
            [("Scan", rest("scan")), ("Reconstruction", rest("recon")), ("Model", rest("model"))],
            [("Training", rest("train")), ("Continual learning (Auto:)", rest("auto")), ("HPC", rest("hpc")),
             ("Scale-out (Scale:)", rest("scale"))]]
    # a group declared since these panels were laid out still shows, in a panel of its own: a
    # declared PV is on a screen without touching this file (a stage's group has its own screen)
    placed = {"core", "scan", "recon", "model", "train", "auto", "hpc", "scale"} | {st.group for st in schema.STAGES}
    others = sorted({pv.group for pv in schema.SCHEMA if shown(pv)} - placed)
    if others:
        cols.append([(f"{g.capitalize()} ({g.capitalize()}:)", rest(g)) for g in others])
    widgets, width, height = columns(cols, TOP)
    return finish(OVERVIEW, widgets, width, height)


def plugin_base_names(stage: str) -> list[str]:
    return [pv.name for pv in schema.plugin_records(stage, "")]


def plugin_screen(file: str) -> str:
    """areaDetector-style plugin screen: the NDPluginBase records, then the stage's own."""
    stage = plugin_stages()[file]
    base = set(plugin_base_names(stage))
    decls = group_decls(stage.lower())
    base_decls = [pv for pv in decls if pv.name in base]
    own = [pv for pv in decls if pv.name not in base]
    half = (len(base_decls) + 1) // 2
    title = {"Infer": "Inference", "Stitch": "Stitching"}.get(stage, stage)
    cols = [[(f"{stage}: plugin (NDPluginBase)", base_decls[:half])],
            [(f"{stage}: arrays and queue", base_decls[half:])],
            [(title, own), ("Live chain", group_decls("core"))]]
    widgets, width, height = columns(cols, TOP)
    return finish(file, widgets, width, height)


IMG_W, IMG_H = 480, 400


def images() -> str:
    live = [pv for pv in schema.SCHEMA if pv.group == "core" and not pv.writable and shown(pv)]
    stitch = [pv for pv in group_decls("stitch") if pv.name not in set(plugin_base_names("Stitch"))]
    widgets, width, y = columns([[("Live chain", live)], [("Stitching", stitch)],
                                 [("Reconstruction", group_decls("recon"))]], TOP)
    first = ("Stitch:Image", "Infer:Phase", "Recon:Image")  # the live image leads
    arrays = sorted(schema.ntndarrays(), key=lambda pv: first.index(pv.name) if pv.name in first else len(first))
    for i, pv in enumerate(arrays):
        x = MARGIN + (i % 2) * (IMG_W + MARGIN)
        top = y + (i // 2) * (IMG_H + 30 + MARGIN)
        wname = pv.name.replace(":", "_")
        widgets.append(bob.label(wname + "_label", x, top, IMG_W, 24, f"{pv.name}: {pv.desc}", fnt="Default Bold"))
        widgets.append(bob.image(wname, x, top + 26, IMG_W, IMG_H, "pva://" + pv_ref(pv.name)))
    rows_ = (len(arrays) + 1) // 2
    return finish("ptychopv_images.bob", widgets, max(width, MARGIN + 2 * (IMG_W + MARGIN)),
                  y + rows_ * (IMG_H + 30 + MARGIN))


PLOT_W, PLOT_H = 640, 440


def training() -> str:
    curves = [pv for pv in schema.SCHEMA if pv.group == "train" and pv.rtype == "waveform_in"]
    plot = bob.xyplot("loss_per_epoch", MARGIN, TOP, PLOT_W, PLOT_H, [(pv.desc, pv_ref(pv.name)) for pv in curves],
                      title="Loss per epoch", x_title="Epoch", y_title="Loss (train.loss: weighted MAE or MSE)")
    x0 = 2 * MARGIN + PLOT_W
    train, h = panel("Training", group_decls("train"), x0, TOP)
    model, h2 = panel("Model", group_decls("model"), x0, TOP + h + MARGIN)
    height = max(TOP + PLOT_H, TOP + h + MARGIN + h2)
    return finish("ptychopv_training.bob", [plot, train, model], x0 + PANEL_W + MARGIN, height)


def render_all() -> dict[str, str]:
    out = {OVERVIEW: overview(), "ptychopv_images.bob": images(), "ptychopv_training.bob": training()}
    for file in plugin_stages():
        out[file] = plugin_screen(file)
    return dict(sorted(out.items()))


def opi_folder() -> Path:
    return Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the screens in opi/ are stale")
    ap.add_argument("--folder", type=Path, default=None, help="where the .bob files live (default: opi/)")
    ap.add_argument("--config", help=GENERATOR_CONFIG_HELP)
    args = ap.parse_args(argv)
    folder = args.folder or opi_folder()
    if not generator_extensions(args.config, ap.prog):
        return 2
    return write_or_check(folder, render_all(), "python -m ptychopv.opi.generate", args.check)


if __name__ == "__main__":
    sys.exit(main())
