"""Plotly figure builders of the workbench: plain functions from arrays to `go.Figure`, no Dash, no I/O.

    >>> from vis.figures import mammogram_figure, patch_figure, unit_map_figure
    >>> fig = mammogram_figure(display_u8, overlay=LesionOverlay(probs, origin=(0, 0), step=32, size=64),
    ...                        box=(120, 300, 184, 364), flagged=[(120, 300, 184, 364)], uirevision="src-1")
    >>> fig = patch_figure(patch_u8, overlays=[Overlay("grad-cam", cam, kind="heat")], shapes=drawn)

Coordinates: the mammogram figure's axes are the pixels of the mammogram PNG (the manifest's patch boxes), whatever
the resolution the image is sent at; the patch figure's axes are the patch's pixels, so drawn shapes come back in
the coordinates that `explain.regions` rasterizes.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from PIL import Image

__all__ = [
    "png_data_uri", "to_uint8", "window_image", "LesionOverlay", "Overlay", "concept_color", "concept_name",
    "mammogram_figure", "overlay_trace", "PENDING_OVERLAY",
    "patch_figure", "unit_map_figure", "image_map_figure", "report_figure",
    "histogram_figure", "probe_versions_figure", "metric_curves_figure", "roc_figure", "empty_figure",
    "MAMMOGRAM_CONFIG", "PATCH_CONFIG", "MAP_CONFIG", "DRAW_BUTTONS",
]

IMAGE_BG = "#0d1117"  # image panes are dark, as on a reading workstation; the chrome around them is light
GRID = "#e5e8ec"
TEXT = "#1f2933"
ACCENT = "#0b7285"
BOX = "#ffd43b"  # the open patch's box on the mammogram
FLAG = "#4dabf7"  # flagged patches' boxes
DRAW = "#00e5ff"  # drawn regions

# One colour per concept of the default vocabulary (docs/CONTRACTS.md), readable on white and on dark images.
CONCEPT_COLORS = {
    "mass": "#e8590c",
    "calcification": "#22b8cf",
    "spiculated_margin": "#c2255c",
    "circumscribed_margin": "#2f9e44",
    "architectural_distortion": "#7048e8",
    "skin": "#e599f7",
    "film_label": "#fab005",
    "normal_tissue": "#74c0fc",
    "background": "#868e96",
    "pectoral_muscle": "#a9e34b",
}
_EXTRA_COLORS = ("#1098ad", "#d6336c", "#5c940d", "#364fc7", "#e67700", "#862e9c", "#087f5b", "#c92a2a")
UNLABELED = "#adb5bd"

DRAW_BUTTONS = ["drawclosedpath", "drawrect", "drawcircle", "eraseshape"]
MAMMOGRAM_CONFIG = {"scrollZoom": True, "displaylogo": False, "doubleClick": "reset",
                    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "toImage"]}
PATCH_CONFIG = {"displaylogo": False, "modeBarButtonsToAdd": DRAW_BUTTONS, "scrollZoom": False,
                "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "toImage", "zoomIn2d", "zoomOut2d"]}
MAP_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["autoScale2d", "toImage"]}


def concept_name(concept: str) -> str:
    """The UI form of a concept id: spaces for underscores (`spiculated_margin` → `spiculated margin`)."""
    return concept.replace("_", " ")


def concept_color(concept: str | None) -> str:
    """A stable colour per concept: the vocabulary's own, else one chosen by a stable hash of the id."""
    if not concept:
        return UNLABELED
    if concept in CONCEPT_COLORS:
        return CONCEPT_COLORS[concept]
    h = sum((i + 1) * ord(c) for i, c in enumerate(concept))
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)]


# -- images ----------------------------------------------------------------------------------------------------------
def to_uint8(x: np.ndarray) -> np.ndarray:
    """float in [0, 1] (clipped), uint16 or uint8 → uint8, same shape."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return (x >> 8).astype(np.uint8)
    return (np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def window_image(display: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear window on display values in [0, 1]: `level` is the centre, `width` the span; → uint8 (y, x)."""
    width = max(float(width), 1e-3)
    lo = float(level) - width / 2
    out = (np.asarray(display, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(out, 0, 255).astype(np.uint8)


def png_data_uri(image: np.ndarray, *, size: int | tuple[int, int] | None = None, smooth: bool = True) -> str:
    """uint8 (y, x) gray or (y, x, 3|4) colour → `data:image/png;base64,…`, optionally resized (long side = size)."""
    img = Image.fromarray(to_uint8(image) if image.ndim == 2 else np.asarray(image, dtype=np.uint8))
    if size is not None:
        if isinstance(size, int):
            h, w = image.shape[:2]
            k = size / max(h, w)
            size = (max(1, round(w * k)), max(1, round(h * k)))
        img = img.resize(size, Image.BILINEAR if smooth else Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # speed over size: these travel on loopback or a LAN
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_axes(fig: go.Figure, width: float, height: float, *, bg: str = IMAGE_BG) -> None:
    fig.update_xaxes(visible=False, range=[0, width], constrain="domain")
    fig.update_yaxes(visible=False, range=[height, 0], scaleanchor="x", scaleratio=1, constrain="domain")
    fig.update_layout(margin=dict(l=0, r=0, t=0, b=0), paper_bgcolor=bg, plot_bgcolor=bg, showlegend=False)


def empty_figure(message: str = "", *, height: int | None = None, dark: bool = False) -> go.Figure:
    """A blank figure with a centred message, for views that have nothing to show yet."""
    fig = go.Figure()
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    bg = IMAGE_BG if dark else "white"
    fig.update_layout(margin=dict(l=0, r=0, t=0, b=0), paper_bgcolor=bg, plot_bgcolor=bg, height=height,
                      annotations=[dict(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                                        font=dict(size=14, color="#adb5bd" if dark else "#6c757d"))])
    return fig


@dataclass(frozen=True)
class LesionOverlay:
    """P(lesion) of the patch at every window position: probs (row, col), window `size` px moved by `step` px.

    Row r, column c is the window whose top-left corner is origin + (c, r) · step, in mammogram pixels.
    """

    probs: np.ndarray  # float32 (row, col)
    origin: tuple[float, float]  # x, y of the first window's top-left corner
    step: float
    size: float


PENDING_OVERLAY = LesionOverlay(probs=np.zeros((0, 0), np.float32), origin=(0.0, 0.0), step=1.0, size=1.0)
"""An overlay still being computed: mammogram_figure keeps an empty layer in its place."""

_LESION_SCALE = [[0.0, "rgba(255,212,59,0)"], [0.35, "rgba(255,212,59,0)"], [0.5, "rgba(255,146,43,0.35)"],
                 [0.75, "rgba(240,62,62,0.55)"], [1.0, "rgba(201,42,42,0.75)"]]


def overlay_trace(overlay: LesionOverlay) -> go.Heatmap:
    """The translucent P(lesion) layer of the mammogram figure (PENDING_OVERLAY: an empty one, holding its place)."""
    if overlay is PENDING_OVERLAY:
        return go.Heatmap(z=[[None]], showscale=False, hoverinfo="skip", name="P(lesion)")
    return go.Heatmap(
        z=overlay.probs, x0=overlay.origin[0] + overlay.size / 2, dx=overlay.step,
        y0=overlay.origin[1] + overlay.size / 2, dy=overlay.step, zmin=0, zmax=1, colorscale=_LESION_SCALE,
        zsmooth="best", name="P(lesion)", hovertemplate="P(lesion) %{z:.2f}<extra></extra>",
        colorbar=dict(title=dict(text="P(lesion)", side="right", font=dict(color="#dee2e6", size=11)),
                      thickness=10, len=0.3, x=0.99, xanchor="right", y=0.02, yanchor="bottom",
                      tickfont=dict(color="#dee2e6", size=10), tickvals=[0, 0.5, 1]),
    )


def mammogram_figure(image: np.ndarray, *, scale: float = 1.0, overlay: LesionOverlay | None = None,
                     box: Sequence[float] | None = None, flagged: Sequence[Sequence[float]] = (),
                     uirevision: str | None = None, height: int = 760) -> go.Figure:
    """The whole mammogram: uint8 (y, x) already windowed, sent at `scale` × the PNG's resolution.

    Axes are in the full-resolution PNG's pixels (the image is stretched by 1/scale), so a click's x, y and every
    box are in the manifest's coordinates. `overlay` is drawn translucent on top; `box` (x0, y0, x1, y1) is the
    open patch, `flagged` the flagged patches' boxes.
    """
    h, w = image.shape
    full_w, full_h = w / scale, h / scale
    fig = go.Figure(go.Image(source=png_data_uri(image), x0=0.5 / scale, y0=0.5 / scale, dx=1 / scale, dy=1 / scale,
                             hovertemplate="x %{x:.0f} · y %{y:.0f}<extra></extra>", name="mammogram"))
    if overlay is not None and (overlay is PENDING_OVERLAY or overlay.probs.size):
        fig.add_trace(overlay_trace(overlay))  # always the second trace: overlay_patch replaces it
    shapes = [dict(type="rect", x0=b[0], y0=b[1], x1=b[2], y1=b[3], line=dict(color=FLAG, width=1.5, dash="dot"),
                   layer="above") for b in flagged]
    if box is not None:
        shapes.append(dict(type="rect", x0=box[0], y0=box[1], x1=box[2], y1=box[3],
                           line=dict(color=BOX, width=3), layer="above"))
    _image_axes(fig, full_w, full_h)
    fig.update_layout(shapes=shapes, dragmode="pan", uirevision=uirevision, height=height, hovermode="closest")
    return fig


@dataclass(frozen=True)
class Overlay:
    """One toggleable layer over a patch: a heat map in [0, 1] or a binary mask, (y, x) at the patch's size."""

    name: str
    data: np.ndarray  # float32 (y, x) in [0, 1] for "heat"; bool (y, x) for "mask"
    kind: str = "heat"  # "heat" or "mask"
    color: str = "#ff6b6b"
    label: str = ""


def _heat_scale(color: str) -> list:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return [[0.0, f"rgba({r},{g},{b},0)"], [0.2, f"rgba({r},{g},{b},0.05)"], [1.0, f"rgba({r},{g},{b},0.7)"]]


def patch_figure(patch: np.ndarray, *, overlays: Sequence[Overlay] = (), shapes: Sequence[Mapping] = (),
                 uirevision: str | None = None, height: int = 440, upsample: int = 6) -> go.Figure:
    """One patch, uint8 (y, x), with overlays and the drawn regions (plotly shapes, patch pixel coordinates).

    Dragging draws a closed freehand region by default; the mode bar adds rectangle, circle and erase.
    """
    h, w = patch.shape
    uri = png_data_uri(patch, size=(w * upsample, h * upsample), smooth=True)
    fig = go.Figure(go.Image(source=uri, x0=0.5 / upsample, y0=0.5 / upsample, dx=1 / upsample, dy=1 / upsample, name="patch",
                             hovertemplate="x %{x:.1f} · y %{y:.1f}<extra></extra>"))
    for ov in overlays:
        data = np.asarray(ov.data)
        if ov.kind == "mask":
            m = data.astype(np.float32)
            fig.add_trace(go.Heatmap(z=m, x0=0.5, dx=1, y0=0.5, dy=1, zmin=0, zmax=1, showscale=False,
                                     colorscale=[[0, "rgba(0,0,0,0)"], [1, _rgba(ov.color, 0.28)]],
                                     hoverinfo="skip", name=ov.name))
            fig.add_trace(go.Contour(z=m, x0=0.5, dx=1, y0=0.5, dy=1, showscale=False, hoverinfo="skip",
                                     contours=dict(start=0.5, end=0.5, size=1, coloring="none"),
                                     line=dict(color=ov.color, width=2.5), name=ov.name + " outline"))
        else:
            fig.add_trace(go.Heatmap(z=np.clip(data.astype(np.float32), 0, 1), x0=0.5, dx=1, y0=0.5, dy=1, zmin=0,
                                     zmax=1, zsmooth="best", showscale=False, colorscale=_heat_scale(ov.color),
                                     name=ov.name, hovertemplate=f"{ov.name} %{{z:.2f}}<extra></extra>"))
    _image_axes(fig, w, h)
    drawn = [{"line": {"color": DRAW, "width": 2}, "fillcolor": "rgba(0,229,255,0.12)", **dict(s)} for s in shapes]
    fig.update_layout(
        margin=dict(l=0, r=0, t=30, b=0),  # the mode bar sits above the image, never over what one draws on
        shapes=drawn, dragmode="drawclosedpath", uirevision=uirevision, height=height,
        newshape=dict(line=dict(color=DRAW, width=2), fillcolor="rgba(0,229,255,0.12)", opacity=1),
        activeshape=dict(fillcolor="rgba(0,229,255,0.3)", opacity=1),
    )
    return fig


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# -- maps ------------------------------------------------------------------------------------------------------------
def _chart_layout(fig: go.Figure, *, height: int | None, title: str | None = None, legend: bool = True) -> None:
    fig.update_layout(
        template="plotly_white", height=height, margin=dict(l=8, r=8, t=36 if title else 8, b=8),
        title=dict(text=title, font=dict(size=13, color=TEXT), x=0.01) if title else None,
        font=dict(family="Inter, 'Segoe UI', system-ui, sans-serif", size=12, color=TEXT),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=11)) if legend else None,
        showlegend=legend, hoverlabel=dict(font_size=12),
    )


def unit_map_figure(xy: np.ndarray, *, labels: Sequence[str], color_by: str = "concept",
                    values: np.ndarray | None = None, iou: np.ndarray | None = None, threshold: float = 0.2,
                    selected: int | None = None, layer: str = "", dragmode: str = "zoom",
                    uirevision: str | None = None, height: int = 420) -> go.Figure:
    """Units of one layer as points: xy float (unit, 2) from PCA or UMAP; one marker per unit.

    customdata are plain lists (not numpy): plotly sends numpy arrays as typed binary arrays, and scattergl then
    leaves customdata out of click and selection events.

    `labels` (unit,) are concept ids ('' = unlabeled). `color_by` "concept" colours by label, "cluster" and
    "gt_iou" by `values` (unit,) (cluster ids, or the ground-truth IoU). With `iou` (unit,) from a drawn region,
    units above `threshold` are enlarged and ringed; `selected` is ringed in black. customdata holds the unit index.
    """
    n = len(xy)
    units = np.arange(n)
    size = np.full(n, 8.0)
    if iou is not None:
        above = iou > threshold
        size[above] = 12 + 40 * np.clip(iou[above], 0, 1)
    hover = [f"unit {u}" + (f" · {concept_name(labels[u])}" if labels[u] else "")
             + (f" · IoU {iou[u]:.2f}" if iou is not None else "") for u in units]
    fig = go.Figure()
    if color_by == "concept":
        for concept in sorted(set(labels), key=lambda c: (c == "", c)):
            idx = units[np.asarray(labels) == concept]
            fig.add_trace(go.Scattergl(
                x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=concept_name(concept) or "unlabeled",
                customdata=idx.tolist(), hovertext=[hover[i] for i in idx], hoverinfo="text",
                marker=dict(size=size[idx], color=concept_color(concept), opacity=0.9,
                            line=dict(width=1, color="rgba(0,0,0,0.35)"))))
    else:
        vals = np.zeros(n) if values is None else np.asarray(values, dtype=float)
        categorical = color_by == "cluster"
        fig.add_trace(go.Scattergl(
            x=xy[:, 0], y=xy[:, 1], mode="markers", name=color_by, customdata=units.tolist(), hoverinfo="text",
            hovertext=[f"{hover[u]} · {color_by} {vals[u]:.3g}" for u in units],
            marker=dict(size=size, color=vals, opacity=0.9, line=dict(width=1, color="rgba(0,0,0,0.35)"),
                        colorscale="Turbo" if categorical else "Viridis", showscale=not categorical,
                        colorbar=dict(title=dict(text="IoU" if color_by == "gt_iou" else color_by), thickness=10))))
    if iou is not None and np.any(iou > threshold):
        top = units[iou > threshold]
        fig.add_trace(go.Scattergl(x=xy[top, 0], y=xy[top, 1], mode="markers", name=f"IoU > {threshold:g}",
                                   customdata=top.tolist(), hoverinfo="skip",
                                   marker=dict(size=size[top] + 6, color="rgba(0,0,0,0)",
                                               line=dict(width=2.5, color="#e03131"))))
    if selected is not None and 0 <= selected < n:
        fig.add_trace(go.Scattergl(x=[xy[selected, 0]], y=[xy[selected, 1]], mode="markers", name=f"unit {selected}",
                                   customdata=[int(selected)], hoverinfo="skip",
                                   marker=dict(size=size[selected] + 10, color="rgba(0,0,0,0)",
                                               line=dict(width=3, color="#111"))))
    _chart_layout(fig, height=height)
    fig.update_xaxes(showticklabels=False, zeroline=False, showgrid=True, gridcolor=GRID)
    fig.update_yaxes(showticklabels=False, zeroline=False, showgrid=True, gridcolor=GRID)
    fig.update_layout(dragmode=dragmode, uirevision=uirevision, clickmode="event+select")
    return fig


def image_map_figure(xy: np.ndarray, *, values: Sequence, color_by: str, ids: Sequence[str],
                     selected: Sequence[int] = (), uirevision: str | None = None, height: int = 560) -> dict:
    """Images as points: xy float (image, 2); customdata holds the image's row in the store.

    `color_by` "class", "prediction" and "correct" are categorical (values are their names); "probe" is a
    continuous score in [0, 1].
    Returns the figure as a plain dict, as `report_figure` does: validating a few thousand points' hover texts and
    custom data in plotly's graph objects took about 30 ms of every redraw (the layout, the same for every call,
    comes from `_chart_layout_json`).
    """
    xy = np.asarray(xy, dtype=np.float32)
    rows = np.arange(len(xy))
    data = []

    def points(idx, **trace):  # customdata as a plain list: scattergl leaves typed arrays out of selection events
        return {"type": "scattergl", "x": _typed(xy[idx, 0]), "y": _typed(xy[idx, 1]), "mode": "markers",
                "customdata": idx.tolist(), **trace}

    if color_by == "probe":
        vals = np.asarray(values, dtype=float)
        data.append(points(rows, name="probe score", hoverinfo="text",
                           hovertext=[f"{ids[i]} · score {vals[i]:.2f}" for i in rows],
                           marker={"size": 7, "color": _typed(vals), "cmin": 0, "cmax": 1, "colorscale": "Viridis",
                                   "showscale": True, "opacity": 0.85,
                                   "colorbar": {"title": {"text": "score"}, "thickness": 10}}))
    else:
        palette = {"lesion": "#e8590c", "normal": "#1c7ed6", "correct": "#2f9e44", "wrong": "#e03131"}
        values = np.asarray([str(v) for v in values])
        for name in sorted(set(values.tolist())):
            idx = rows[values == name]
            data.append(points(idx, name=name, hoverinfo="text", hovertext=[f"{ids[i]} · {name}" for i in idx],
                               marker={"size": 7, "color": palette.get(name, concept_color(name)), "opacity": 0.8}))
    if len(selected):
        data.append(points(np.asarray(selected, dtype=int), name="selected", hoverinfo="skip",
                           marker={"size": 11, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "#111"}}))
    axis = {"showticklabels": False, "zeroline": False, "gridcolor": GRID}
    layout = {**_chart_layout_json(height), "xaxis": dict(axis), "yaxis": dict(axis), "dragmode": "lasso",
              "uirevision": uirevision, "clickmode": "event+select"}
    return {"data": data, "layout": layout}


def _typed(values: np.ndarray) -> dict:
    """float32 values as plotly.js's typed array (what plotly's graph objects send for a numpy array): 4 bytes a value
    in base64 instead of a decimal in JSON."""
    return {"dtype": "f4", "bdata": base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode()}


@functools.lru_cache(maxsize=16)
def _chart_layout_json(height: int | None, legend: bool = True) -> dict:
    """`_chart_layout`'s layout as plain JSON (its template spelled out), built once per height: callers copy the top
    level and set their own keys; the nested values are shared and must not be changed."""
    fig = go.Figure()
    _chart_layout(fig, height=height, legend=legend)
    return fig.to_plotly_json()["layout"]


# -- charts ----------------------------------------------------------------------------------------------------------
def report_figure(rows: Sequence[Mapping], *, measures: Sequence[tuple], height: int | None = None,
                  marks: Mapping[str, float] | None = None) -> dict:
    """Horizontal bars, one panel per measure: rows are {"concept": id, <measure key>: value, …}.

    `measures` are (key, title) or (key, title, (lo, hi)) tuples, e.g. ("probe", "probe score", (0, 1)); `marks`
    ({key: value}) draws a dashed line at that value across the measure's panel, over its bars, or, given one value
    per row ({key: [value or None, …]}), a dashed tick across each row's bar (e.g. where a probe score says
    "present", per concept; the title should say what it marks, the hover gives the value).
    Returns the figure as a plain dict: built without plotly's graph objects, whose validation costs ~0.1 s for
    five panels, and a report is redrawn after every labeling action.
    """
    concepts = [r["concept"] for r in rows]
    names = [concept_name(c) for c in concepts]
    colors = [concept_color(c) for c in concepts]
    n, gap = len(measures), 0.05
    width = (1 - gap * (n - 1)) / n
    data, layout = [], {
        "template": {"layout": {"paper_bgcolor": "white", "plot_bgcolor": "white"}},
        "height": height or max(180, 34 * len(rows) + 60), "margin": {"l": 8, "r": 8, "t": 30, "b": 8},
        "showlegend": False, "bargap": 0.3, "annotations": [], "shapes": [],
        "font": {"family": "Inter, 'Segoe UI', system-ui, sans-serif", "size": 12, "color": TEXT},
    }
    for i, measure in enumerate(measures):
        key, title = measure[0], measure[1]
        ax = "" if i == 0 else str(i + 1)
        data.append({"type": "bar", "orientation": "h", "x": [float(r.get(key) or 0.0) for r in rows], "y": names,
                     "xaxis": f"x{ax}", "yaxis": f"y{ax}", "name": title,
                     "marker": {"color": colors, "line": {"color": "rgba(0,0,0,0.25)", "width": 1}},
                     "hovertemplate": f"%{{y}} · {title} %{{x:.3g}}<extra></extra>"})
        lo = i * (width + gap)
        xaxis = {"domain": [lo, lo + width], "anchor": f"y{ax}", "gridcolor": GRID, "zeroline": True,
                 "zerolinecolor": "#ced4da", "tickfont": {"size": 10}}
        values = data[-1]["x"]
        if len(measure) > 2:  # a fixed range (scores and shares in [0, 1])
            xaxis["range"] = list(measure[2])
        elif min(values, default=0.0) >= 0:  # a count or a ratio: from 0, and 0…1 while every bar is empty
            top = max(values, default=0.0)
            xaxis.update(rangemode="tozero", **({"range": [0, 1]} if top == 0 else {}))
            if all(float(v).is_integer() for v in values):  # a count: whole ticks (plotly would put one at 0.5)
                xaxis.update(tickformat="d", dtick=max(1, math.ceil(top / 4)))
        yaxis = {"anchor": f"x{ax}", "autorange": "reversed", "tickfont": {"size": 11}, "automargin": True}
        if i > 0:
            yaxis.update(matches="y", showticklabels=False)
        layout[f"xaxis{ax}"], layout[f"yaxis{ax}"] = xaxis, yaxis
        layout["annotations"].append({"text": title, "x": lo + width / 2, "y": 1.0, "xref": "paper", "yref": "paper",
                                      "xanchor": "center", "yanchor": "bottom", "showarrow": False,
                                      "font": {"size": 11, "color": "#495057"}})
        mark = (marks or {}).get(key)
        line = {"type": "line", "xref": f"x{ax}", "layer": "above",
                "line": {"color": "#212529", "width": 1.5, "dash": "dash"}}
        if isinstance(mark, (int, float)):
            layout["shapes"].append({**line, "yref": "paper", "x0": mark, "x1": mark, "y0": 0, "y1": 1})
        elif mark is not None:  # one per row; rows sit at 0, 1, … on the category axis
            if len(mark) != len(rows):
                raise ValueError(f"report marks for {key!r}: {len(mark)} values for {len(rows)} rows")
            layout["shapes"] += [{**line, "yref": f"y{ax}", "x0": m, "x1": m, "y0": j - 0.42, "y1": j + 0.42}
                                 for j, m in enumerate(mark) if m is not None]
            data[-1]["customdata"] = [f"present from {m:.3g}" if m is not None else "no mark" for m in mark]
            data[-1]["hovertemplate"] = f"%{{y}} · {title} %{{x:.3g}} (%{{customdata}})<extra></extra>"
    return {"data": data, "layout": layout}


def histogram_figure(values: np.ndarray, *, threshold: float | None = None, title: str = "",
                     height: int = 220) -> go.Figure:
    """Distribution of one unit's activations (pooled max per image), with its mask threshold."""
    fig = go.Figure(go.Histogram(x=np.asarray(values, dtype=float), nbinsx=40, marker_color=ACCENT, opacity=0.85,
                                 hovertemplate="%{x:.3g}: %{y} images<extra></extra>"))
    if threshold is not None:
        fig.add_vline(x=threshold, line=dict(color="#e03131", width=2, dash="dash"),
                      annotation=dict(text=f"threshold {threshold:.3g}", font=dict(size=11, color="#e03131")))
    _chart_layout(fig, height=height, title=title, legend=False)
    fig.update_xaxes(gridcolor=GRID)
    fig.update_yaxes(gridcolor=GRID, title=dict(text="images", font=dict(size=11)))
    return fig


def probe_versions_figure(versions: Sequence[Mapping], *, metrics: Sequence[str] = ("auroc", "ap"),
                          current: str | None = None, height: int = 300) -> go.Figure:
    """Held-out metrics of each probe version, oldest first: one position per version ("v1", "v2", …, each with
    its number of annotations), so a retrain or a rollback on the same annotations gets a point of its own."""
    fig = go.Figure()
    x = list(range(1, len(versions) + 1))
    n_ann = [v.get("n_annotations") for v in versions]
    for metric, color in zip(metrics, ("#0b7285", "#e8590c", "#7048e8")):
        fig.add_trace(go.Scatter(x=x, y=[v.get(metric) for v in versions], mode="lines+markers", name=metric.upper(),
                                 line=dict(color=color, width=2), marker=dict(size=8),
                                 customdata=[[v.get("run_id", ""), a] for v, a in zip(versions, n_ann)],
                                 hovertemplate=f"v%{{x}} · {metric.upper()} %{{y:.3f}} · %{{customdata[1]}} "
                                               "annotations<extra>%{customdata[0]}</extra>"))
    for i, v in enumerate(versions):
        if current and v.get("run_id") == current:
            fig.add_vline(x=x[i], line=dict(color="#495057", dash="dot"),
                          annotation=dict(text="current", font=dict(size=11)))
    _chart_layout(fig, height=height)
    step = max(1, -(-len(x) // 10))  # at most about 10 tick labels
    ticks = x[::step]
    fig.update_xaxes(title=dict(text="version (annotations)", font=dict(size=11)), gridcolor=GRID,
                     tickmode="array", tickvals=ticks, ticktext=[f"v{i} ({n_ann[i - 1]})" for i in ticks],
                     range=[0.5, len(x) + 0.5])
    fig.update_yaxes(range=[0, 1.02], gridcolor=GRID)
    return fig


def metric_curves_figure(curves: Mapping[str, Sequence[tuple[int, float]]], *, metric: str,
                         height: int = 320) -> go.Figure:
    """One line per run: {run label: [(step, value), …]} of one metric."""
    fig = go.Figure()
    for i, (label, points) in enumerate(curves.items()):
        steps = [p[0] for p in points]
        fig.add_trace(go.Scatter(x=steps, y=[p[1] for p in points], mode="lines+markers", name=label,
                                 line=dict(width=2, color=_EXTRA_COLORS[i % len(_EXTRA_COLORS)]), marker=dict(size=5)))
    _chart_layout(fig, height=height)  # the panel and the metric menu name it; a title would sit under the legend
    steps = [p[0] for points in curves.values() for p in points]
    few = bool(steps) and max(steps) - min(steps) < 10  # whole steps (one logged value: plotly ticks at −0.5 …)
    fig.update_xaxes(title=dict(text="step", font=dict(size=11)), gridcolor=GRID, **({"dtick": 1} if few else {}))
    fig.update_yaxes(title=dict(text=metric, font=dict(size=11)), gridcolor=GRID)
    return fig


def roc_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float | None]], *,
               specificity: float | None = None, height: int = 320) -> go.Figure:
    """ROC curves: {run label: (fpr, tpr, auroc)}; the chance diagonal for reference, and the operating point the
    runs report (`specificity`, as logged with their curves) marked where given."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#adb5bd", dash="dash"),
                               name="chance", hoverinfo="skip"))
    for i, (label, (fpr, tpr, auc)) in enumerate(curves.items()):
        name = f"{label} (AUROC {auc:.3f})" if auc is not None else label
        fig.add_trace(go.Scatter(x=list(fpr), y=list(tpr), mode="lines", name=name,
                                 line=dict(width=2.5, color=_EXTRA_COLORS[i % len(_EXTRA_COLORS)])))
    _chart_layout(fig, height=height)
    if specificity is not None:  # training's test/sens_at_90spec: the sensitivity where a curve crosses this line
        fig.add_vline(x=round(1 - specificity, 9), line=dict(color="#e03131", width=1, dash="dot"),
                      annotation_text=f"{specificity:.0%} specificity", annotation_position="bottom right",
                      annotation_font=dict(size=10, color="#e03131"))
    # square and exactly [0, 1] on both axes: the plot area shrinks to fit (constrain), the ranges never widen
    fig.update_xaxes(title=dict(text="false-positive rate", font=dict(size=11)), range=[0, 1], gridcolor=GRID,
                     constrain="domain")
    fig.update_yaxes(title=dict(text="true-positive rate", font=dict(size=11)), range=[0, 1.01], gridcolor=GRID,
                     scaleanchor="x", scaleratio=1, constrain="domain")
    return fig
