"""The session report: one self-contained HTML file (inline CSS, images as PNG data URIs, no script, no link out).

    >>> from vis.export import session_report_html
    >>> html_text = session_report_html(current(), 1)          # inside a request of a member (vis.api's route)
    >>> Path("session-1.html").write_text(html_text)

What it holds, for one review session: the model (its registered version) and the activation store, the members,
every image reviewers drew on with their regions outlined (one colour per reviewer), the labeled units per concept
and annotator, the concept report of the model (explain.report.model_report: units per concept, coverage), the
probe versions recorded in the session and the current probes' held-out metrics, the agreement between readers
(explain.agreement: Cohen's kappa per layer, Dice of regions) and the comments.

Images are named by the store's pseudonymous ids only; nothing read from a source file's header is written. The
reader's membership of the session is checked (`Workbench.review_session`): a forged id raises AccessDenied.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections import Counter, defaultdict

import numpy as np

__all__ = ["session_report_html", "regions_png", "AUTHOR_COLORS", "MAX_IMAGES"]

MAX_IMAGES = 48  # images with regions shown in the report (the newest drawn first); the rest are counted
AUTHOR_COLORS = ((0, 229, 255), (247, 131, 172), (255, 212, 59), (105, 219, 124), (177, 151, 252), (255, 146, 43))
_SCALE = 4  # patch pixels → report pixels


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(value) -> str:
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return "" if value is None else str(value)


def _outline(mask: np.ndarray) -> np.ndarray:
    """bool (y, x): the mask's boundary pixels (inside the mask, next to outside or the border)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def regions_png(patch: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]], *,
                scale: int = _SCALE) -> bytes:
    """PNG bytes of a uint8 (y, x) patch, `scale`× larger, with each bool (y, x) mask outlined (2 px) in its colour
    and lightly filled. Where outlines of several readers coincide they alternate in dashes, so two readers who drew
    the same region both stay visible."""
    from PIL import Image

    big = np.kron(np.asarray(patch, np.uint8), np.ones((scale, scale), np.uint8))
    rgb = np.repeat(big[..., None], 3, axis=2).astype(np.float32)  # (Y, X, 3)
    if not masks:
        edges = np.zeros((0, *big.shape), bool)
    else:
        edges = []
        for mask, color in masks:
            m = np.kron(np.asarray(mask, bool), np.ones((scale, scale), bool))
            rgb[m] = rgb[m] * 0.82 + np.asarray(color, np.float32) * 0.18
            edge = _outline(m)
            edges.append(edge | _outline(m & ~edge))  # two pixels wide at this scale
        edges = np.stack(edges)  # (reader, Y, X)
    count = edges.sum(axis=0)
    if count.any():
        yy, xx = np.indices(big.shape)
        pick = (yy + xx) // 6 % np.maximum(count, 1) + 1  # the k-th reader whose outline covers the pixel
        chosen = np.argmax(np.cumsum(edges, axis=0) >= pick[None], axis=0)  # (Y, X)
        colors = np.asarray([c for _m, c in masks], np.float32)
        on = count > 0
        rgb[on] = colors[chosen[on]]
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(head: list[str], rows: list[list], *, cls: str = "") -> str:
    if not rows:
        return '<p class="muted">None.</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _concept(c: str | None) -> str:
    return _e((c or "").replace("_", " "))


def session_report_html(workbench, session_id) -> str:
    """The report of one review session as a single HTML document (see the module docstring)."""
    from explain.labels import comments, recorded_probe_versions, regions_for, unit_labels
    from explain.report import model_report
    from store.accounts import list_users

    wb = workbench
    info = wb.review_session(session_id)  # membership: AccessDenied for anyone else
    sid = int(info.id)
    db, store = wb.db(), wb.store()
    roles = {u.name: u for u in list_users(db)}
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = dict(store.attrs.get("model") or {})

    # -- annotations ----------------------------------------------------------------------------------------------
    regions = regions_for(db, session=sid)
    merged_labels = unit_labels(db, session=sid, author=None)  # the merged view: one concept per unit
    authors = sorted({r.author for r in regions} | set(_annotators(db, sid)))
    color_of = {a: AUTHOR_COLORS[i % len(AUTHOR_COLORS)] for i, a in enumerate(authors)}
    by_author_labels = {a: unit_labels(db, session=sid, author=a) for a in _annotators(db, sid)}
    merged = wb.labels(sid)

    sections = []
    # model and store
    kv = [("Session", f"{_e(info.name)} (#{sid})"),
          ("Model", _e(model.get("model_uri") or model.get("name") or info.model_uri or "—")),
          ("Model run", _e(model.get("run_id") or "—")),
          ("Activation store", _e(wb.config.store)),
          ("Layers", _e(", ".join(store.layers))),
          ("Images in the store", _e(store.n_images)),
          ("Generated", f"{_e(now)} by {_e(wb.user())}")]
    sections.append('<section><h2>Model and store</h2><dl class="kv">' +
                    "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in kv) + "</dl></section>")

    # members
    rows = []
    for name in sorted(info.members):
        u = roles.get(name)
        n_labels = len(by_author_labels.get(name, []))
        n_regions = sum(r.author == name for r in regions)
        swatch = (f'<span class="swatch" style="background:rgb{color_of[name]}"></span>' if name in color_of else "")
        rows.append([swatch + _e(name), _e(u.display_name if u else ""), _e(u.role if u else ""), n_regions,
                     n_labels])
    sections.append("<section><h2>Members</h2>" +
                    _table(["reader", "display name", "role", "regions", "unit labels"], rows) + "</section>")

    # images with regions
    images = list(dict.fromkeys(r.image_id for r in reversed(regions)))  # newest drawn first
    figs = []
    for image in images[:MAX_IMAGES]:
        try:
            row, _rec = wb.record(image)
        except Exception:  # noqa: BLE001 — an image of another store (an imported session): named, not drawn
            figs.append(f'<figure class="img missing"><figcaption>{_e(image)}: not in store '
                        f'{_e(wb.config.store)}</figcaption></figure>')
            continue
        on = [r for r in regions if r.image_id == image]
        masks = []
        for a in sorted({r.author for r in on}):
            m = np.zeros(on[0].shape, bool)
            for r in on:
                if r.author == a:
                    m |= r.mask()
            masks.append((m, color_of[a]))
        patch = store.image(row)
        png = regions_png(patch, masks)
        cap = "".join(f'<li><span class="swatch" style="background:rgb{color_of[r.author]}"></span>'
                      f'{_e(r.author)}: {_concept(r.concept)} ({r.area} px)</li>' for r in on)
        figs.append(f'<figure class="img"><img alt="{_e(image)} with regions" src="{_uri(png)}" '
                    f'width="{patch.shape[1] * _SCALE}" height="{patch.shape[0] * _SCALE}">'
                    f'<figcaption><strong>{_e(image)}</strong><ul>{cap}</ul></figcaption></figure>')
    more = (f'<p class="muted">… and {len(images) - MAX_IMAGES} more image(s) with regions.</p>'
            if len(images) > MAX_IMAGES else "")
    sections.append(f"<section><h2>Images with regions ({len(images)})</h2>" +
                    (f'<div class="gallery">{"".join(figs)}</div>' if figs else '<p class="muted">No region yet.</p>')
                    + more + "</section>")

    # labeled units per concept and annotator
    rows = []
    concepts = sorted({x.concept for labels in by_author_labels.values() for x in labels})
    for concept in concepts:
        for a, labels in sorted(by_author_labels.items()):
            mine = [x for x in labels if x.concept == concept]
            if not mine:
                continue
            per_layer = defaultdict(list)
            for x in mine:
                per_layer[x.layer].append(int(x.unit))
            units = "; ".join(f"{_e(layer)}: {', '.join(map(str, sorted(us)))}" for layer, us in sorted(per_layer.items()))
            rows.append([_concept(concept), _e(a), len(mine), f'<span class="units">{units}</span>'])
    merged_counts = Counter(x.concept for x in merged_labels)
    sections.append("<section><h2>Labeled units per concept and annotator</h2>" +
                    _table(["concept", "annotator", "units", "units by layer"], rows) +
                    '<p class="muted">Merged (the concept most readers gave each unit): ' +
                    (", ".join(f"{_concept(c)} {n}" for c, n in sorted(merged_counts.items())) or "none") +
                    "</p></section>")

    # concept report of the model
    rep = model_report(store, labels=merged, settings=wb.settings, level=wb.config.mask_level,
                       thresholds=wb.presence_thresholds())
    rows = [[_concept(c), e["units"], _e(", ".join(f"{layer} ({len(u)})" for layer, u in e["layers"].items())),
             _fmt(e["coverage"])] for c, e in sorted(rep["concepts"].items())]
    layer_rows = [[_e(layer), e["units"], e["labeled"], e["unlabeled"],
                   _e(", ".join(f"{c.replace('_', ' ')} {n}" for c, n in e["units_per_concept"].items()))]
                  for layer, e in rep["layers"].items()]
    sections.append("<section><h2>Concept report</h2>"
                    f'<p>Model accuracy on the store\'s {rep["n_images"]} images: {_fmt(rep["accuracy"])}.</p>' +
                    _table(["concept", "labeled units", "layers", "coverage (share of images where a unit fires)"],
                           rows) + "<h3>Layers</h3>" +
                    _table(["layer", "units", "labeled", "unlabeled", "units per concept"], layer_rows) +
                    "</section>")

    # probes
    recorded = recorded_probe_versions(db, session=sid)
    rows = [[_concept(p.concept), _e(p.layer), f"<code>{_e(p.run_id[:12])}</code>", _e(p.author),
             _e(_when(p.created_at)), _fmt(p.metrics.get("auroc")), _fmt(p.metrics.get("ap")),
             "active" if p.active else ""] for p in recorded]
    current = [[_concept(p["concept"]), _e(p["layer"]), f"<code>{_e((p.get('run_id') or '')[:12])}</code>",
                _fmt(p.get("auroc")), _fmt(p.get("ap")), _e(p.get("n_positive", "—")), _e(p.get("n_negative", "—")),
                _e(p.get("n_annotations", "—"))] for p in rep["probes"]]
    verdicts = []
    for c, e in sorted(rep["concepts"].items()):
        if "probe" not in e:
            continue
        v, cal = e["probe"], wb.presence(c)
        how = ("0.5 (the dataset does not say which images show it)" if cal is None else
               f"calibrated on {cal['n_with']} + {cal['n_without']} images"
               + (" the model was not trained on" if cal["unfitted"] else "")
               + f": sensitivity {_fmt(cal['sensitivity'])}, specificity {_fmt(cal['specificity'])}")
        verdicts.append([_concept(c), _e(", ".join(v["layers"])), _fmt(v["threshold"]), _e(how),
                         _fmt(v["images_present"])])
    sections.append("<section><h2>Probes</h2><h3>Versions fitted in this session</h3>" +
                    _table(["concept", "layer", "mlflow run", "by", "when", "AUROC", "AP", ""], rows) +
                    "<h3>Current probes of the store (held-out metrics from mlflow)</h3>" +
                    _table(["concept", "layer", "mlflow run", "AUROC", "AP", "positives", "negatives", "annotations"],
                           current) +
                    "<h3>When the image report calls a concept present</h3>" +
                    _table(["concept", "probes of", "present from", "threshold", "share of images present"],
                           verdicts) + "</section>")

    # agreement
    sections.append("<section><h2>Agreement between readers</h2>" + agreement_html(wb, sid) + "</section>")

    # comments
    notes = comments(db, sid)
    rows = [[_e(c.image_id), _e(c.author), _e(_when(c.updated_at or c.created_at)), _e(c.text)] for c in notes]
    sections.append("<section><h2>Comments</h2>" + _table(["image", "by", "when", "comment"], rows) + "</section>")

    title = f"ConceptLens · session report · {info.name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            # nothing may be fetched: the file is whole (a browser, or the PDF printer, loads no URL it could hold)
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{_e(title)}</title><style>{_CSS}{_print_css(info.name)}</style></head><body>"
            f'<header><div class="brand"><span>Concept</span><span class="b">Lens</span></div>'
            f"<h1>Review session “{_e(info.name)}”</h1>"
            f'<p class="muted">{len(info.members)} member(s) · {len(regions)} region(s) · '
            f'{len(merged_labels)} labeled unit(s) · generated {_e(now)}</p></header>'
            f"<main>{''.join(sections)}</main></body></html>\n")


def _annotators(db, sid: int) -> list[str]:
    from explain.labels import annotators

    return annotators(db, session=sid)


def agreement_data(wb, sid: int) -> dict:
    """explain.agreement for the session over every layer of the store (the session must already be checked)."""
    from explain.agreement import agreement

    store = wb.store()
    return agreement(wb.db(), session=sid, layers={layer: int(store.layer_shape(layer)[0]) for layer in store.layers})


def agreement_rows(data: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of the agreement table: one row per pair of readers, kappa per layer, mean Dice."""
    pairs = data.get("pairs") or []
    layers = sorted({layer for p in pairs for layer in (p.get("kappa") or {})})
    head = ["readers", *[f"κ {layer}" for layer in layers], "Dice of regions", "images both drew on"]
    rows = []
    for p in pairs:
        kappa = p.get("kappa") or {}
        rows.append([f"{p.get('a')} · {p.get('b')}", *[_fmt(kappa.get(layer)) for layer in layers],
                     _fmt(p.get("dice")), str(p.get("n_images", p.get("dice_images", "—")))])
    return head, rows


def agreement_html(wb, sid: int) -> str:
    head, rows = agreement_rows(agreement_data(wb, sid))
    if not rows:
        return '<p class="muted">Agreement needs two readers who labeled units or drew regions.</p>'
    return (_table(head, [[_e(c) for c in r] for r in rows]) +
            '<p class="muted">Cohen\'s κ over every unit of a layer (categories: the concept, or none); Dice: mean '
            'overlap of the two readers\' regions of the same concept on the images both drew on.</p>')


_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _css_string(text: str) -> str:
    """`text` as a CSS string literal that cannot end the string or the <style> element (every character outside
    letters, digits, space and a few marks is written as a CSS escape)."""
    safe = set(" .,:;-_()#/")
    return '"' + "".join(c if (c.isalnum() and c.isascii()) or c in safe else f"\\{ord(c):x} " for c in text) + '"'


def _print_css(session_name: str) -> str:
    """Print rules (the PDF, or a browser's print): A4 pages with a running footer (session name, page x of y),
    white background, headings kept with what follows, no image or table row cut by a page break."""
    footer = _css_string(f"ConceptLens · session report · {session_name[:120]}")
    return _PRINT_CSS.replace("/*FOOTER*/", footer)


_PRINT_CSS = """
@page { size: A4; margin: 14mm 13mm 16mm;
  @bottom-left { content: /*FOOTER*/; font: 8.5px/1.2 Inter, "Segoe UI", system-ui, Arial, sans-serif;
    color: #66717e; }
  @bottom-right { content: "page " counter(page) " of " counter(pages); font: 8.5px/1.2 Inter, "Segoe UI",
    system-ui, Arial, sans-serif; color: #66717e; } }
@media print {
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  body { background: #fff; font-size: 11.5px; }
  header { padding: 14px 18px 12px; border-radius: 6px; }
  header h1 { font-size: 20px; }
  main { max-width: none; padding: 12px 0 0; }
  section { border: 0; border-radius: 0; padding: 0; margin: 0 0 18px; }
  section + section { border-top: 1px solid var(--border); padding-top: 12px; }
  h2, h3 { break-after: avoid; }
  h2 { font-size: 15px; }
  table { font-size: 11px; }
  th, td { padding: 4px 6px; }
  thead { display: table-header-group; }
  tr, dl.kv, figure.img { break-inside: avoid; }
  .gallery { grid-template-columns: repeat(3, 1fr); gap: 10px; }
  figure.img { padding: 6px; }
  figcaption { font-size: 10.5px; }
  .units { word-break: break-word; }
}
"""

_CSS = """
:root { --accent: #0b7285; --text: #1f2933; --muted: #66717e; --border: #dde2e8; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f5f7; color: var(--text); font: 14px/1.5 Inter, "Segoe UI", system-ui, -apple-system,
  Roboto, Arial, sans-serif; }
header { background: #12263a; color: #e9eef3; padding: 22px 36px 18px; }
header h1 { margin: 6px 0 4px; font-size: 24px; font-weight: 650; }
header .muted { color: #b8c6d4; }
.brand { font-size: 15px; font-weight: 700; letter-spacing: .3px; } .brand .b { color: #66d9e8; }
main { max-width: 1200px; margin: 0 auto; padding: 18px 28px 40px; }
section { background: #fff; border: 1px solid var(--border); border-radius: 8px; padding: 16px 20px; margin: 0 0 16px; }
h2 { margin: 0 0 12px; font-size: 17px; } h3 { margin: 16px 0 8px; font-size: 14px; color: #3b4754; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #edf0f3; vertical-align: top; }
th { font-size: 11.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .4px; }
.muted { color: var(--muted); font-size: 13px; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; font-weight: 500; word-break: break-all; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 14px; }
figure.img { margin: 0; border: 1px solid var(--border); border-radius: 6px; padding: 8px; background: #fafbfc; }
figure.img img { display: block; width: 100%; height: auto; image-rendering: pixelated; border-radius: 3px;
  background: #0d1117; }
figcaption { font-size: 12.5px; margin-top: 6px; } figcaption ul { margin: 4px 0 0; padding-left: 16px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px;
  border: 1px solid rgba(0,0,0,.2); vertical-align: baseline; }
.units { font-family: Menlo, Consolas, monospace; font-size: 12px; }
code { font-family: Menlo, Consolas, monospace; font-size: 12px; }
"""
