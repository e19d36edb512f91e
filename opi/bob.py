"""Phoebus display (``.bob``) building blocks: one small function per widget, XML elements out.

Only widget types and properties that Phoebus's display model defines are written, in the
form Phoebus itself writes them (``display version="2.0.0"``; enums as ordinals; colours and
fonts as nested ``<color>``/``<font>`` elements). Properties left at Phoebus's default are
not written, as Phoebus does not write them either.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

# Widget model versions (Phoebus writes each widget's own version; a lower one would make it
# apply its legacy-file conversions).
VERSION = {"action_button": "3.0.0", "textentry": "3.0.0", "xyplot": "3.0.0"}

# Enum ordinals as Phoebus stores them.
FORMAT_DEFAULT, FORMAT_DECIMAL, FORMAT_EXPONENTIAL, FORMAT_STRING = 0, 1, 2, 6
ALIGN_LEFT, ALIGN_CENTER, ALIGN_RIGHT = 0, 1, 2
VALIGN_TOP, VALIGN_MIDDLE = 0, 1
GROUP_STYLE_GROUP, GROUP_STYLE_TITLE = 0, 1
TRACE_LINE = 1

# Named fonts of Phoebus's default font set (name, style, size).
FONTS = {"Default": ("REGULAR", 14.0), "Default Bold": ("BOLD", 14.0), "Header 1": ("BOLD", 22.0),
         "Header 2": ("BOLD", 18.0), "Header 3": ("BOLD", 16.0), "Comment": ("ITALIC", 14.0)}

HEADER_BG = (77, 77, 77)
HEADER_FG = (255, 255, 255)
TRACE_COLORS = ((0, 0, 255), (255, 0, 0), (0, 160, 0), (160, 0, 160))


def _text(parent: ET.Element, tag: str, value) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = str(value).lower() if isinstance(value, bool) else str(value)
    return el


def color(tag: str, rgb: tuple[int, int, int]) -> ET.Element:
    el = ET.Element(tag)
    r, g, b = rgb
    ET.SubElement(el, "color", red=str(r), green=str(g), blue=str(b))
    return el


def font(tag: str, name: str) -> ET.Element:
    style, size = FONTS[name]
    el = ET.Element(tag)
    ET.SubElement(el, "font", name=name, family="Liberation Sans", style=style, size=str(size))
    return el


def widget(wtype: str, name: str, x: int, y: int, width: int, height: int, **props) -> ET.Element:
    """A widget element; ``props`` are simple properties (text), ``ET.Element`` values are nested."""
    w = ET.Element("widget", type=wtype, version=VERSION.get(wtype, "2.0.0"))
    _text(w, "name", name)
    for tag, value in (("x", x), ("y", y), ("width", width), ("height", height)):
        _text(w, tag, value)
    for tag, value in props.items():
        if value is None:
            continue
        if isinstance(value, ET.Element):
            value.tag = tag
            w.append(value)
        else:
            _text(w, tag, value)
    return w


# ---------------------------------------------------------------------------- widgets
def label(name, x, y, width, height, text, *, fnt: str | None = None, align: int | None = None,
          header: bool = False) -> ET.Element:
    w = widget("label", name, x, y, width, height, text=text, horizontal_alignment=align,
               vertical_alignment=VALIGN_MIDDLE)
    if fnt:
        w.append(font("font", fnt))
    if header:
        w.append(color("foreground_color", HEADER_FG))
        w.append(color("background_color", HEADER_BG))
        _text(w, "transparent", False)
    return w


def textupdate(name, x, y, width, height, pv, *, fmt: int | None = None, align: int | None = None,
               wrap: bool | None = None) -> ET.Element:
    return widget("textupdate", name, x, y, width, height, pv_name=pv, format=fmt, horizontal_alignment=align,
                  vertical_alignment=VALIGN_MIDDLE, wrap_words=wrap)


def textentry(name, x, y, width, height, pv, *, fmt: int | None = None) -> ET.Element:
    return widget("textentry", name, x, y, width, height, pv_name=pv, format=fmt)


def combo(name, x, y, width, height, pv) -> ET.Element:
    """Choices come from the enum record's state strings (``items_from_pv``)."""
    return widget("combo", name, x, y, width, height, pv_name=pv, items_from_pv=True)


def led(name, x, y, width, height, pv) -> ET.Element:
    return widget("led", name, x, y, width, height, pv_name=pv)


def progressbar(name, x, y, width, height, pv) -> ET.Element:
    return widget("progressbar", name, x, y, width, height, pv_name=pv, limits_from_pv=True)


def write_pv(pv: str, value, description: str) -> ET.Element:
    a = ET.Element("action", type="write_pv")
    _text(a, "pv_name", pv)
    _text(a, "value", value)
    _text(a, "description", description)
    return a


def open_display(file: str, description: str, target: str = "tab") -> ET.Element:
    a = ET.Element("action", type="open_display")
    _text(a, "file", file)
    _text(a, "target", target)
    _text(a, "description", description)
    return a


def action_button(name, x, y, width, height, text, action: ET.Element, *, pv: str | None = None) -> ET.Element:
    """A button running one action; ``pv`` (the written PV) gives it an alarm border and write-access state."""
    w = widget("action_button", name, x, y, width, height, pv_name=pv, text=text)
    actions = ET.SubElement(w, "actions")
    actions.append(action)
    return w


def image(name, x, y, width, height, pv) -> ET.Element:
    """An image widget on an NTNDArray channel: size and type come from the array itself."""
    return widget("image", name, x, y, width, height, pv_name=pv, show_toolbar=True, autoscale=True)


def _axis(tag: str, title: str, *, autoscale: bool = True) -> ET.Element:
    el = ET.Element(tag)
    _text(el, "title", title)
    _text(el, "autoscale", autoscale)
    _text(el, "log_scale", False)
    _text(el, "minimum", 0.0)
    _text(el, "maximum", 100.0)
    _text(el, "show_grid", True)
    el.append(font("title_font", "Default Bold"))
    el.append(font("scale_font", "Default"))
    _text(el, "visible", True)
    return el


def xyplot(name, x, y, width, height, traces: list[tuple[str, str]], *, title: str = "",
           x_title: str = "X", y_title: str = "Y") -> ET.Element:
    """An X/Y plot of waveform PVs against their index; ``traces`` are (name, y_pv) pairs."""
    w = widget("xyplot", name, x, y, width, height, title=title, show_toolbar=True, show_legend=True)
    w.append(_axis("x_axis", x_title))
    y_axes = ET.SubElement(w, "y_axes")
    y_axes.append(_axis("y_axis", y_title))
    tr = ET.SubElement(w, "traces")
    for i, (tname, pv) in enumerate(traces):
        t = ET.SubElement(tr, "trace")
        _text(t, "name", tname)
        _text(t, "x_pv", "")
        _text(t, "y_pv", pv)
        _text(t, "err_pv", "")
        _text(t, "axis", 0)
        _text(t, "trace_type", TRACE_LINE)
        t.append(color("color", TRACE_COLORS[i % len(TRACE_COLORS)]))
        _text(t, "line_width", 2)
        _text(t, "point_type", 0)
        _text(t, "point_size", 6)
        _text(t, "visible", True)
    return w


def group(name, x, y, width, height, children: list[ET.Element], *, style: int = GROUP_STYLE_GROUP) -> ET.Element:
    """A titled frame; children use coordinates relative to its inside."""
    w = widget("group", name, x, y, width, height, style=style)
    w.extend(children)
    return w


def display(name: str, width: int, height: int, children: list[ET.Element]) -> ET.Element:
    d = ET.Element("display", version="2.0.0")
    _text(d, "name", name)
    _text(d, "width", width)
    _text(d, "height", height)
    d.extend(children)
    return d


def to_text(root: ET.Element) -> str:
    """Deterministic text of a display, with the XML declaration Phoebus writes."""
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
