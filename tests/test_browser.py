"""The workbench in a real browser (Debian chromium, headless), against a real small workspace.

Every page is opened (after signing in through the login form) and screenshotted to test-output/screenshots/; the
review loop is driven with real mouse events on the plotly graphs (click a flagged patch, draw a region, label units,
undo) and the images loop (lasso, mark, retrain with the progress bar, views updated). Two readers in two browser
contexts work in one session: one labels, the other sees the region and labels appear, then exports the report.
Look at the screenshots: a cramped or broken view is a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import (SCREENSHOTS, AppServer, browser_login, click_data, drag, labelable_patch,  # noqa: E402
                     open_browser, open_contexts, screenshot, wait_idle)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGES = [("/", "review", "#review-mammogram .main-svg"), ("/units", "units", "#units-map .main-svg"),
         ("/images", "images", "#images-map .main-svg"), ("/probes", "probes", "#probes-versions .main-svg"),
         ("/experiments", "experiments", "#exp-curves .main-svg"), ("/session", "session", "#sess-members table")]



@pytest.fixture
def served(app_workspace, tmp_path):
    """The app on a copy of the workspace (the tests write labels, marks and probes), and a browser page."""
    import shutil

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    with AppServer(ws) as app, open_browser() as page:
        failures: list[str] = []
        page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("pageerror", lambda e: failures.append(f"page error: {e}"))
        browser_login(page, app.url, "ana")
        yield app, page, failures
        assert not failures, f"{failures}\n{app.log()}"


def _figure(page, graph_id: str) -> dict:
    """What plotly shows now: per trace name, type, customdata and marker sizes (typed arrays made plain), and the
    layout's shapes."""
    return page.evaluate("""(id) => {
        const gd = document.getElementById(id).querySelector('.js-plotly-plot');
        const plain = (v) => (v && typeof v === 'object' && v.length !== undefined) ? Array.from(v) : v;
        return JSON.parse(JSON.stringify({
            data: gd._fullData.map(t => ({name: t.name || '', type: t.type, customdata: plain(t.customdata) || [],
                                     sizes: plain((t.marker || {}).size)})),
            layout: {shapes: gd.layout.shapes || []}}));
    }""", graph_id)


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_every_page_opens_and_is_screenshotted(served):
    app, page, _failures = served
    for path, name, ready in PAGES:
        page.goto(app.url + path)
        page.wait_for_selector(ready, state="visible")
        wait_idle(page)
        shot = screenshot(page, name)
        assert shot.stat().st_size > 20_000
        assert "not ready" not in page.inner_text("body").lower()
        assert page.locator(".cl-navbar .nav-link.active").inner_text() == {"/": "Review"}.get(path, name.title())
        if path == "/experiments":  # the figures stack beside the parameter table, which runs as tall as both
            params, curves, roc = (page.locator(f"#{i}").bounding_box() for i in ("exp-params", "exp-curves", "exp-roc"))
            assert params["x"] + params["width"] <= min(curves["x"], roc["x"])
            assert curves["y"] + curves["height"] <= roc["y"] < params["y"] + params["height"]
        if path == "/probes":  # no probe yet: nothing to retrain or roll back
            assert "no probe" in _text(page, "#probes-table").lower()
            assert page.locator("#probes-retrain").is_disabled() and page.locator("#probes-rollback").is_disabled()
    # the header: the session picker, who is signed in and as what, and the sign-out button
    header = page.locator(".cl-navbar")
    assert "ana" in header.inner_text() and "radiologist" in header.inner_text()
    assert page.locator(f"#{'shell-session-picker'}").inner_text().strip() == "Workspace"
    page.evaluate("() => window.scrollTo(0, 0)")
    header.screenshot(path=str(SCREENSHOTS / "header.png"))


def _labelable_patch(workspace) -> tuple[str, str, int, tuple[int, int, int, int]]:
    """(source, flagged patch, unit, mask bbox x0, y0, x1, y1) where the patch's most active unit has a clear mask."""
    _layer, source, image, unit, box = labelable_patch(workspace)
    return source, image, unit, box


def test_a_mammogram_never_viewed_shows_at_once_and_its_overlay_follows(served):
    """The first response draws the mammogram with an empty P(lesion) layer and says the overlay is being computed;
    a second callback computes it and fills that layer in; a mammogram whose overlay is cached comes whole."""
    import shutil

    app, page, _failures = served
    shutil.rmtree(app.workspace / "cache" / "overlays", ignore_errors=True)  # nothing computed yet
    seen: list = []  # values the server gave the pending-overlay store, in order

    def record(response):
        if "/_dash-update-component" in response.url and response.ok:
            out = response.json().get("response", {})
            if "review-overlay-pending" in out:
                seen.append(out["review-overlay-pending"]["data"])

    page.on("response", record)
    page.goto(app.url + "/")
    page.wait_for_selector("#review-mammogram .main-svg")
    wait_idle(page)
    page.wait_for_function("() => !document.getElementById('review-source-info').innerText.includes('computing')")
    assert len(seen) == 2 and seen[0] and seen[1] is None, seen  # shown without its overlay, then filled in
    layers = _layers(page)
    assert [t["type"] for t in layers] == ["image", "heatmap"]
    assert layers[1]["rows"] > 3 and layers[1]["cols"] > 3  # the model's P(lesion) over the breast, not the placeholder
    assert "computing" not in _text(page, "#review-source-info")
    screenshot(page, "review-overlay-filled")

    # the next mammogram and back: the first one's overlay is cached now, so it comes in the first response
    page.locator("#review-next").click()
    wait_idle(page)
    page.wait_for_function("() => !document.getElementById('review-source-info').innerText.includes('computing')")
    page.locator("#review-prev").click()
    wait_idle(page)
    # the second mammogram waited for its overlay (shown, then filled), the first came whole
    assert len(seen) == 5 and seen[2] not in (None, seen[0]) and seen[3:] == [None, None], seen
    layers = _layers(page)
    assert [t["type"] for t in layers] == ["image", "heatmap"] and layers[1]["rows"] > 3


def _layers(page) -> list[dict]:
    """The mammogram figure's traces as plotly drew them: type and rows × columns of z (decoded arrays)."""
    return page.evaluate("""() => {
        const gd = document.getElementById('review-mammogram').querySelector('.js-plotly-plot');
        return gd._fullData.map(t => ({type: t.type, rows: (t.z || []).length, cols: ((t.z || [])[0] || []).length}));
    }""")


def test_review_loop_with_real_mouse_events(served):
    app, page, _failures = served
    source, image, unit, (bx0, by0, bx1, by1) = _labelable_patch(app.workspace)
    page.goto(app.url + "/")
    page.wait_for_selector("#review-mammogram .main-svg")
    wait_idle(page)
    screenshot(page, "review-first-load")
    for _ in range(20):  # a mammogram with at least two flagged patches
        if page.locator("#review-flagged button").count() >= 2:
            break
        page.locator("#review-next").click()
        wait_idle(page)

    # click the second flagged patch: the patch opens and its box is outlined on the mammogram
    tiles = page.locator("#review-flagged button")
    assert tiles.count() >= 2
    caption = tiles.nth(1).inner_text()
    tiles.nth(1).click()
    wait_idle(page)
    info = _text(page, "#review-patch-info").split("\n")
    shown = float(info[info.index("P(LESION)") - 1])
    assert abs(shown - float(caption.split()[-1])) <= 0.005  # the tile's P(lesion) is the open patch's
    boxes = _figure(page, "review-mammogram")["layout"]["shapes"]
    open_box = [s for s in boxes if s["line"]["color"] == "#ffd43b"]
    assert len(open_box) == 1

    # clicking a point of the breast opens the patch under it
    x0, y0, x1, y1 = (open_box[0][k] for k in ("x0", "y0", "x1", "y1"))
    cx, cy = (x0 + x1) / 2 + 20, (y0 + y1) / 2 + 20
    click_data(page, "review-mammogram", cx, cy)
    wait_idle(page)
    box = [s for s in _figure(page, "review-mammogram")["layout"]["shapes"] if s["line"]["color"] == "#ffd43b"][0]
    assert box["x0"] <= cx < box["x1"] and box["y0"] <= cy < box["y1"]

    # next mammogram until the one whose patch we label
    _open_patch(page, image)

    # the most active unit's mask over the patch
    page.get_by_label("unit mask").check()
    wait_idle(page)
    assert f"unit {unit} (most active)" in _text(page, "#review-patch-info").replace("\n", " ")
    assert [t for t in _figure(page, "review-patch")["data"] if t["name"] == f"unit {unit}"]
    screenshot(page, "review-unit-mask")

    # draw a closed freehand region around it with real mouse events
    before = _figure(page, "review-unit-map")
    ring = [(bx0 - 1, by0 - 1), ((bx0 + bx1) / 2, by0 - 2), (bx1 + 1, by0 - 1), (bx1 + 2, (by0 + by1) / 2),
            (bx1 + 1, by1 + 1), ((bx0 + bx1) / 2, by1 + 2), (bx0 - 1, by1 + 1), (bx0 - 2, (by0 + by1) / 2),
            (bx0 - 1, by0 - 1)]
    drag(page, "review-patch", [(min(63.5, max(0.5, x)), min(63.5, max(0.5, y))) for x, y in ring], steps=5)
    wait_idle(page)
    assert "best unit" in _text(page, "#review-iou-info").lower()
    after = _figure(page, "review-unit-map")
    size_of = lambda fig: max(s for t in fig["data"] for s in (t["sizes"] if isinstance(t["sizes"], list)  # noqa
                                                                else [t["sizes"] or 0]))
    assert size_of(after) > size_of(before)  # the units that match the region are enlarged
    assert [t for t in after["data"] if t["name"].startswith("IoU >")]
    assert "best IoU" in _text(page, "#review-patch-info")
    screenshot(page, "review-region-drawn")

    # a rectangle as a second region
    page.locator('#review-patch .modebar-btn[data-title="Draw rectangle"]').click()
    cx = 6 if (bx0 + bx1) / 2 > 32 else 46  # in the free corner, away from the first region
    cy = 6 if (by0 + by1) / 2 > 32 else 46
    drag(page, "review-patch", [(cx, cy), (cx + 12, cy + 12)], steps=8)
    wait_idle(page)
    shapes = _figure(page, "review-patch")["layout"]["shapes"]
    assert {s["type"] for s in shapes} == {"path", "rect"}

    # clicking a unit of the map shows its prototypes and its mask on this patch
    ring_trace = [t for t in after["data"] if t["name"].startswith("IoU >")][0]
    xy = page.evaluate("""() => { const gd = document.querySelector('#review-unit-map .js-plotly-plot');
        const t = gd._fullData.find(t => (t.name || '').startsWith('IoU >'));
        return [t.x[0], t.y[0], t.customdata[0]]; }""")
    click_data(page, "review-unit-map", xy[0], xy[1])
    wait_idle(page)
    detail = _text(page, "#review-unit-detail")
    assert f"Unit {xy[2]} of" in detail and "on this patch" in detail.lower()
    assert page.locator("#review-unit-detail img").count() >= 2
    assert ring_trace

    # label the matching units as a concept: message, unit map, report change; then undo
    report_before = _text(page, "#review-report")
    page.locator("#review-label").click()
    wait_idle(page)
    message = _text(page, "#review-message")
    assert "labeled" in message.lower(), message
    assert "mass" in _text(page, "#review-report") and _text(page, "#review-report") != report_before
    assert "mass" in [t["name"] for t in _figure(page, "review-unit-map")["data"]]
    screenshot(page, "review-labeled")
    page.locator("#review-undo").click()
    wait_idle(page)
    assert "undone" in _text(page, "#review-message").lower()
    assert "mass" not in [t["name"] for t in _figure(page, "review-unit-map")["data"]]
    assert _text(page, "#review-report") == report_before
    page.locator("#review-clear").click()
    wait_idle(page)
    assert _figure(page, "review-patch")["layout"]["shapes"] == []
    screenshot(page, "review-undone")


def _box(page, graph_id: str, name: str, *, avoid=None) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in data coordinates, a tenth of the shown axes wide and high (so that a lasso along it
    spans tens of pixels whatever the map's layout), centred on a point of trace `name`: the one whose box holds the
    most points of that trace. `avoid` (bool over every trace's points, as `_inside` gives): no avoided point within
    the box grown by half, so a lasso along it cannot catch one."""
    ax, ay, traces, (xr, yr) = _points(page, graph_id)
    hx, hy = abs(xr[1] - xr[0]) * 0.05, abs(yr[1] - yr[0]) * 0.05
    x, y = ax[traces == name], ay[traces == name]
    best, most = None, 0
    for cx, cy in zip(x, y):
        if avoid is not None and (avoid & (abs(ax - cx) <= 1.5 * hx) & (abs(ay - cy) <= 1.5 * hy)).any():
            continue
        held = int(((abs(x - cx) <= hx) & (abs(y - cy) <= hy)).sum())
        if held > most:
            best, most = (cx - hx, cy - hy, cx + hx, cy + hy), held
    assert best is not None, f"no point of {name!r} on {graph_id} has a box clear of the avoided points"
    return best


def _lasso_box(page, graph_id: str, box) -> None:
    """A lasso (real mouse drag) along the edges of a box in data coordinates."""
    x0, y0, x1, y1 = box
    drag(page, graph_id, [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], steps=6)


def _points(page, graph_id: str):
    """Every trace's points, concatenated in trace order: x, y (float arrays), each point's trace name, and the
    shown axis ranges ((x0, x1), (y0, y1))."""
    import numpy as np

    data, ranges = page.evaluate("""(id) => { const gd = document.querySelector('#' + id + ' .js-plotly-plot');
        return [gd._fullData.map(t => [Array.from(t.x || []), Array.from(t.y || []), t.name]),
                [gd._fullLayout.xaxis.range, gd._fullLayout.yaxis.range]]; }""", graph_id)
    x = np.concatenate([np.asarray(t[0], float) for t in data])
    y = np.concatenate([np.asarray(t[1], float) for t in data])
    return x, y, np.concatenate([np.full(len(t[0]), t[2], object) for t in data]), ranges


def _inside(page, graph_id: str, box):
    """bool (point,) over every trace's points (concatenated): which fall in the box (a lasso along it selects them)."""
    x, y, _, _ = _points(page, graph_id)
    return (x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])


def _finish_job(page, before: str) -> str:
    """Wait for the background job to end (a new message) and return the message."""
    page.wait_for_function("(before) => { const m = document.querySelector('#images-message');"
                           " return m && m.innerText.length > 0 && m.innerText !== before; }", arg=before,
                           timeout=180_000)
    wait_idle(page)
    return _text(page, "#images-message")


def test_images_lasso_mark_retrain_and_views_update(served):
    app, page, _failures = served
    page.goto(app.url + "/images")
    page.wait_for_selector("#images-map .main-svg")
    wait_idle(page)

    positive = _box(page, "images-map", "lesion")
    _lasso_box(page, "images-map", positive)
    wait_idle(page)
    selected = _text(page, "#images-selection")
    assert "image(s) selected" in selected and int(selected.split()[0]) > 0
    assert page.locator("#images-gallery img").count() > 0
    screenshot(page, "images-selected")
    page.locator("#images-mark-pos").click()
    message = _finish_job(page, "")
    # positives alone cannot make a probe: the job says so and nothing is retrained
    assert "only positives" in message, message

    # normal images away from every marked positive (a new mark replaces one, so the positives must stay outside it)
    marked = _inside(page, "images-map", positive)
    negative = _box(page, "images-map", "normal", avoid=marked)
    assert marked.any() and not (marked & _inside(page, "images-map", negative)).any()
    _lasso_box(page, "images-map", negative)
    wait_idle(page)
    page.locator("#images-mark-neg").click()
    page.wait_for_selector("#images-progress .progress-bar-animated", timeout=30_000)  # the job is running
    screenshot(page, "images-retraining")
    message = _finish_job(page, message)
    assert "Probe retrained" in message and "AUROC" in message, message
    assert page.evaluate("() => document.querySelector('#images-progress .progress-bar').style.width") == "100%"
    # the views moved to the new version: the map is coloured by the probe's scores, the selection shows them
    names = page.evaluate("() => document.querySelector('#images-map .js-plotly-plot')._fullData.map(t => t.name)")
    assert "probe score" in names
    assert "score" in _text(page, "#images-gallery")
    screenshot(page, "images-retrained")

    page.goto(app.url + "/probes")
    page.wait_for_selector("#probes-versions .main-svg")
    wait_idle(page)
    assert "v1" in _text(page, "#probes-table") and "current" in _text(page, "#probes-table")
    assert page.locator("#probes-maps img").count() >= 8
    assert page.locator("#probes-rollback").is_disabled()  # one version: nothing earlier to roll back to
    screenshot(page, "probes-after-retrain")

    # retrain here: v2 becomes current, and the roll back to v1 brings v1 back
    page.locator("#probes-retrain").click()
    _wait_current(page, "v2", timeout_ms=60_000)
    wait_idle(page)
    assert "current" in _row(page, "v2") and "current" not in _row(page, "v1")
    assert page.locator("#probes-retrain").is_enabled() and page.locator("#probes-rollback").is_enabled()
    ticks = page.evaluate("() => Array.from(document.querySelectorAll('#probes-versions .xtick text'), t => t.textContent)")
    assert [t.split(" ")[0] for t in ticks] == ["v1", "v2"], ticks  # same annotations, a point each
    page.locator("#probes-rollback-to").click()
    page.get_by_text("v1 ·", exact=False).last.click()
    page.locator("#probes-rollback").click()
    _wait_current(page, "v1", timeout_ms=30_000)
    wait_idle(page)
    assert "current" in _row(page, "v1") and "current" not in _row(page, "v2")
    assert not page.locator("#probes-rollback").is_disabled()  # v2 is now the earlier one to go back to
    screenshot(page, "probes-rolled-back")


def _wait_current(page, version: str, *, timeout_ms: int) -> None:
    """Wait until the versions table marks `version` as the store's current one."""
    page.wait_for_function("""(v) => Array.from(document.querySelectorAll('#probes-table tbody tr')).some(
        r => r.innerText.startsWith(v + ' ·') && r.innerText.includes('current'))""", arg=version, timeout=timeout_ms)


def _row(page, version: str) -> str:
    """The text of one version's row in the probe's versions table ("v1", "v2", …)."""
    return page.locator("#probes-table tbody tr", has_text=f"{version} ·").inner_text()


def test_units_lasso_gallery_and_detail(served):
    app, page, _failures = served
    page.goto(app.url + "/units")
    page.wait_for_selector("#units-map .main-svg")
    wait_idle(page)
    points = page.evaluate("""() => { const gd = document.querySelector('#units-map .js-plotly-plot');
        const t = gd._fullData[0]; return {x: Array.from(t.x), y: Array.from(t.y), u: Array.from(t.customdata)}; }""")
    # click one unit: its histogram with the threshold, its prototypes and its (empty) label history
    click_data(page, "units-map", points["x"][0], points["y"][0])
    wait_idle(page)
    detail = _text(page, "#units-detail")
    assert f"Unit {points['u'][0]} of" in detail and "never labeled" in detail.lower()
    assert page.locator("#units-detail .js-plotly-plot").count() == 1 and page.locator("#units-detail img").count() >= 4
    # lasso a group of units: a gallery row per unit
    xs, ys = sorted(points["x"]), sorted(points["y"])
    lo_x, hi_x, lo_y, hi_y = xs[0], xs[len(xs) // 3], ys[0], ys[-1]
    pad = (xs[-1] - xs[0]) * 0.01
    drag(page, "units-map", [(lo_x - pad, lo_y - pad), (hi_x + pad, lo_y - pad), (hi_x + pad, hi_y + pad),
                             (lo_x - pad, hi_y + pad), (lo_x - pad, lo_y - pad)], steps=6)
    wait_idle(page)
    gallery = _text(page, "#units-gallery")
    assert "unit(s) selected" in gallery and page.locator("#units-gallery img").count() >= 4
    # colour by the ground-truth IoU of the demo's concept masks
    page.get_by_label("ground-truth IoU").check()
    wait_idle(page)
    assert page.locator("#units-map .colorbar").count() == 1
    screenshot(page, "units-selected")


def _open_patch(page, image: str) -> None:
    """Step through the mammograms on Review until the flagged patch `image` is in the strip, then open it."""
    page.wait_for_selector("#review-mammogram .main-svg")
    wait_idle(page)
    for _ in range(30):
        if page.locator(f'#review-flagged button[id*="{image}"]').count():
            break
        page.locator("#review-next").click()
        wait_idle(page)
    page.locator(f'#review-flagged button[id*="{image}"]').click()
    wait_idle(page)


def _dataset_rule_patch(workspace) -> tuple[str, str, tuple[int, int, int, int], list[int]]:
    """(flagged patch, a lesion concept it shows, the lesion's bounding box, units the dataset rule labels from that
    one box)."""
    import numpy as np

    from browser import workspace_dir
    from explain.groundtruth import load_concept_masks
    from explain.labelrules import DatasetRule, images_showing
    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import Workbench

    wb = Workbench(load_settings(workspace_dir(workspace)), AppConfig())
    store, layer, by_id = wb.store(), wb.layer(), wb.manifest().by_id()
    shown = images_showing(store, wb.manifest())
    for src in wb.sources():
        for f in wb.flagged(src.id):
            rec = by_id[f.image_id]
            for concept in ("mass", "calcification"):
                if concept not in rec.masks:
                    continue
                ys, xs = np.nonzero(load_concept_masks(rec, wb.patch_size(), [concept])[concept])
                if ys.size < 30:
                    continue
                box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                rect = np.zeros(wb.patch_size(), bool)
                rect[box[1]:box[3], box[0]:box[2]] = True
                rule = DatasetRule(store, layer, shown=shown)
                rule.add(f.image_id, concept, rect)
                if rule.labels():
                    return f.image_id, concept, box, sorted(rule.labels())
    raise AssertionError("no flagged lesion patch of the workspace gives the dataset rule a label")


def _suggestion(workspace, concept: str, *, drawn: list[str]) -> tuple[str, str, float]:
    """(the patch "Suggest a patch" should open for `concept` after drawings on `drawn`, its mammogram, its
    P(lesion)), computed with explain.labelrules.next_drawings on the default layer's pooled activations."""
    from browser import workspace_dir
    from explain.labelrules import next_drawings
    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import Workbench

    wb = Workbench(load_settings(workspace_dir(workspace)), AppConfig())
    store = wb.store()
    row = int(next_drawings(store.pooled(wb.layer(), "max"), wb.images_showing()[concept],
                            [store.index_of(i) for i in drawn])[0])
    image = store.image_ids[row]
    return image, wb.record(image)[1].source_id, float(wb.lesion_prob()[row])


def test_the_dataset_labeling_rule_from_the_review_page(app_workspace, tmp_path):
    """CONCEPTLENS_LABEL_RULE=dataset: a rectangle drawn with the mouse around a lesion relabels units by the estimated
    dataset-level IoU, which must also beat their IoU with what the app segments (the message says so and names the
    units), the unit map shows the concept, "Suggest a patch" opens the patch to draw it on next, and undo takes the
    labels back."""
    import shutil

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    image, concept, (x0, y0, x1, y1), expected = _dataset_rule_patch(ws)
    with AppServer(ws, env={"CONCEPTLENS_LABEL_RULE": "dataset"}) as app, open_browser() as page:
        browser_login(page, app.url, "ana")
        page.goto(app.url + "/")
        _open_patch(page, image)
        page.locator("#review-new-concept").fill(concept)  # typing a known concept selects it
        page.locator("#review-add-concept").click()
        wait_idle(page)
        assert concept in _text(page, "#review-concept").lower()
        page.locator('#review-patch .modebar-btn[data-title="Draw rectangle"]').click()
        drag(page, "review-patch", [(x0, y0), (x1, y1)], steps=8)
        wait_idle(page)
        page.locator("#review-label").click()
        wait_idle(page, quiet_ms=1500)
        message = _text(page, "#review-message")
        assert "Relabeled" in message and "dataset rule" in message and f"{concept}:" in message, message
        assert "above its IoU with film label, background, skin, pectoral muscle" in message, message  # the rivals
        named = {int(u) for u in message.split(f"{concept}:")[1].split("(")[0].split(";")[0].replace("…", "")
                 .split(",") if u.strip()}
        assert named & set(expected), (message, expected)  # the mouse rectangle is the box give or take a pixel
        assert concept in [t["name"] for t in _figure(page, "review-unit-map")["data"]]
        screenshot(page, "review-dataset-rule")
        # "Suggest a patch": the one that best balances ana's drawings of the concept opens, on its own mammogram
        suggested, source, prob = _suggestion(ws, concept, drawn=[image])
        page.locator("#review-suggest").click()
        wait_idle(page)
        assert f"on {suggested}" in _text(page, "#review-message"), _text(page, "#review-message")
        assert source in _text(page, "#review-source")
        info = _text(page, "#review-patch-info").split("\n")
        assert info[info.index("P(LESION)") - 1] == f"{prob:.3f}", info
        screenshot(page, "review-suggested-patch")
        page.locator("#review-undo").click()
        wait_idle(page)
        assert "undone" in _text(page, "#review-message").lower()
        assert concept not in [t["name"] for t in _figure(page, "review-unit-map")["data"]]


def test_two_readers_work_together_and_export_the_report(app_workspace, tmp_path):
    """ana labels a region; ben, signed in elsewhere on the same session, sees her region and labels appear within
    a few seconds without reloading, reads the session page and downloads the session report."""
    import shutil

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    source, image, unit, (bx0, by0, bx1, by1) = _labelable_patch(ws)
    failures: list[str] = []
    with AppServer(ws) as app, open_contexts(2) as (ana, ben):
        for who, page in (("ana", ana), ("ben", ben)):
            page.on("response", lambda r, who=who: failures.append(f"{who}: {r.status} {r.url} {(r.request.post_data or '')[:300]} {r.text()[:200]}")
                    if r.status >= 400 else None)
            page.on("pageerror", lambda e, who=who: failures.append(f"{who}: page error: {e}"))
        # the login page, a refused sign-in (one message, whoever the user), then both readers sign in
        ana.goto(app.url + "/")
        ana.wait_for_selector("form.cl-login-card")
        assert ana.url.endswith("/login?next=%2F")
        screenshot(ana, "login")
        ana.fill("#username", "ana")
        ana.fill("#password", "not-her-password")
        ana.click("button[type=submit]")
        ana.wait_for_selector(".cl-login-error")
        assert ana.inner_text(".cl-login-error") == "Unknown user name or wrong password."
        screenshot(ana, "login-refused")
        failures.clear()  # the refused sign-in answered 401 on purpose
        browser_login(ana, app.url, "ana")
        browser_login(ben, app.url, "ben")
        for page in (ana, ben):
            _open_patch(page, image)
        before = [t["name"] for t in _figure(ben, "review-unit-map")["data"]]
        assert "mass" not in before

        # ana draws a rectangle around the unit's mask and labels the units it matches
        ana.locator('#review-patch .modebar-btn[data-title="Draw rectangle"]').click()
        drag(ana, "review-patch", [(max(0.5, bx0 - 1), max(0.5, by0 - 1)), (min(63.5, bx1 + 1), min(63.5, by1 + 1))],
             steps=8)
        wait_idle(ana)
        ana.locator("#review-label").click()
        wait_idle(ana)
        assert "labeled" in _text(ana, "#review-message").lower(), _text(ana, "#review-message")

        # ben's views follow within a few poll intervals: ana's units on the map, her region on the patch
        ben.wait_for_function("""() => {
            const names = (id) => (document.querySelector('#' + id + ' .js-plotly-plot')._fullData || [])
                .map(t => t.name || '');
            return names('review-unit-map').includes('mass')
                && names('review-patch').some(n => n.startsWith('saved by ana: mass'));
        }""", timeout=15_000)
        wait_idle(ben)
        assert "ana 1" in _text(ben, "#review-patch-info")
        assert "mass" in _text(ben, "#review-report")
        screenshot(ben, "review-live-update")

        # the session page: members, ana's labels, the export links; a comment on the patch ben had open
        ben.locator(".cl-navbar a", has_text="Session").click()
        ben.wait_for_selector("#sess-members table")
        wait_idle(ben)
        counts = _text(ben, "#sess-counts")
        assert "ana" in counts and "mass" in counts.lower()
        assert ben.locator("#sess-image").inner_text().strip() == image
        ben.fill("#sess-comment-text", "agree: mass, spiculated margin?")
        ben.locator("#sess-comment-save").click()
        wait_idle(ben)
        assert "spiculated margin?" in _text(ben, "#sess-comments")
        screenshot(ben, "session")
        with ben.expect_download() as download:
            ben.locator("#sess-export-report").click()
        report = Path(download.value.path()).read_text(encoding="utf-8")
        assert image in report and "ana" in report and "mass" in report and "spiculated margin?" in report
        assert "<script" not in report.lower()
        # ana sees ben's comment appear on her session page without reloading
        ana.locator(".cl-navbar a", has_text="Session").click()
        ana.wait_for_selector("#sess-members table")
        ana.wait_for_function("() => document.querySelector('#sess-comments').innerText.includes('spiculated')",
                              timeout=15_000)
        # signing out ends the session: the app sends ana back to the login page
        ana.locator("#shell-logout").click()
        ana.wait_for_selector("form.cl-login-card")
    assert not failures, f"{failures}\n{app.log()}"
