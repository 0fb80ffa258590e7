"""The workbench app without a browser: factory, pages' empty states, the callback guard, debug off, commands.

Fast tests use an empty workspace (the `workspace` fixture); tests marked slow use a real small workspace
(`app_workspace`: the lead's `demo_workspace` when conftest has it, else one built here from the real films).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import TEST_PASSWORD, DashClient, ensure_user, login_client  # noqa: E402

PAGES = ["/", "/units", "/images", "/probes", "/experiments"]
ROUTER = "_pages_content.children"



def _client(settings, *, user: str = "ana", role: str = "radiologist", **config):
    """The app on `settings`, and a DashClient signed in as `user` (created when missing)."""
    from vis.app import AppConfig, create_app

    app = create_app(settings, config=AppConfig(**config))
    ensure_user(settings, user, role)
    client = app.server.test_client()
    assert login_client(client, user).status_code == 302
    assert client.get("/").status_code == 200  # first request: Dash registers the page router
    return app, DashClient(client)


def _page(dc: DashClient, path: str):
    return dc.call(ROUTER, {"_pages_location.pathname": path, "_pages_location.search": ""},
                   changed=["_pages_location.pathname"])


def _text(component) -> str:
    """Every string inside a serialized Dash response or component tree, joined."""
    if isinstance(component, str):
        return component
    if isinstance(component, list):
        return " ".join(_text(c) for c in component)
    if isinstance(component, dict):
        return " ".join(_text(v) for k, v in component.items() if k not in ("type", "namespace", "id"))
    return ""


# -- empty workspace ---------------------------------------------------------------------------------------------------
def test_every_page_explains_what_is_missing_in_an_empty_workspace(workspace):
    _app, dc = _client(workspace)
    for path in ["/", "/units", "/images", "/probes"]:
        status, data = _page(dc, path)
        assert status == 200, (path, data)
        text = _text(data["response"])
        assert "Workspace not ready" in text and "build-demo" in text, (path, text[:300])
    status, data = _page(dc, "/experiments")  # needs only the tracking store, which starts empty
    assert status == 200
    assert "mlflow" in _text(data["response"])


def test_warming_an_empty_workspace_names_what_is_missing_and_the_pages_still_say_it(workspace):
    from vis.app import warm

    app, dc = _client(workspace)
    problems = app.server.extensions["conceptlens"].warm()
    assert problems and problems[0].startswith("store: no activation store 'demo'"), problems
    assert any(p.startswith("manifest: ") and "build-demo" in p for p in problems), problems
    assert warm(app) is app  # what the serving entry points call; it only logs
    status, data = _page(dc, "/")
    assert status == 200 and "Workspace not ready" in _text(data["response"])


def test_the_shell_shows_a_banner_and_links_every_page(workspace):
    app, dc = _client(workspace)
    layout = dc.target.get("/_dash-layout").get_json()
    text = json.dumps(layout)
    for name in ["Review", "Units", "Images", "Probes", "Experiments", "Session"]:
        assert f'"{name}"' in text
    assert '"Users"' not in text  # the users page is linked for admins only
    assert "Workspace not ready" in _text(layout)
    assert "ana" in _text(layout) and "radiologist" in _text(layout)  # who is signed in, and as what
    _admin, admin = _client(workspace, user="root", role="admin")
    assert '"Users"' in json.dumps(admin.target.get("/_dash-layout").get_json())


# -- the guard: forged or malformed callback requests --------------------------------------------------------------------
def _valid_body(dc: DashClient) -> dict:
    return dc.body(ROUTER, {"_pages_location.pathname": "/", "_pages_location.search": ""},
                   changed=["_pages_location.pathname"])


@pytest.mark.parametrize("mutate, status, words", [
    (lambda b: {**b, "output": "nope.children"}, 400, "not a callback of this app"),
    (lambda b: {**b, "output": 7}, 400, "expected a string"),
    (lambda b: {**b, "inputs": b["inputs"][:1]}, 400, "expected 2 entries"),
    (lambda b: {**b, "inputs": [{"id": "review-source", "property": "value", "value": 1}, b["inputs"][1]]}, 400,
     "which this callback declares"),
    (lambda b: {**b, "inputs": "x"}, 400, "expected a list"),
    (lambda b: {**b, "state": [{"id": "x", "property": "y", "value": 1}]}, 400, "expected 0 entries"),
    (lambda b: {**b, "changedPropIds": ["secret.data"]}, 400, "not an input of this request"),
    (lambda b: {**b, "changedPropIds": "all"}, 400, "list of strings"),
    (lambda b: [b], 400, "JSON object"),
])
def test_forged_callback_payloads_get_a_400_naming_the_problem(workspace, mutate, status, words):
    _app, dc = _client(workspace)
    code, data = dc.post(mutate(_valid_body(dc)))
    assert code == status, data
    assert words in data["error"]


def test_nan_infinity_huge_and_non_json_bodies_are_refused(workspace):
    _app, dc = _client(workspace, max_body_bytes=64 * 1024)
    body = json.dumps(_valid_body(dc))
    nan = body.replace('"value": "/"', '"value": NaN')
    assert '"value": NaN' in nan
    code, data = dc.post(None, raw=nan.encode())
    assert code == 400 and "NaN" in data["error"]
    code, data = dc.post(None, raw=body.replace('"value": "/"', '"value": -Infinity').encode())
    assert code == 400 and "Infinity" in data["error"]
    huge = {**_valid_body(dc), "pad": "M" + "L1,1" * 40_000}  # a drawn path of 40 000 vertices
    code, data = dc.post(huge)
    assert code == 413 and "larger than" in data["error"]
    code, data = dc.post(None, raw=b"{not json")
    assert code == 400 and "not JSON" in data["error"]
    code, data = dc.post(None, raw=body.encode(), content_type="text/plain")
    assert code == 415


def test_a_valid_request_still_works_through_the_guard(workspace):
    _app, dc = _client(workspace)
    code, data = dc.post(_valid_body(dc))
    assert code == 200 and "Workspace not ready" in _text(data["response"])


# -- configuration ---------------------------------------------------------------------------------------------------
def test_debug_and_dev_tools_are_off_unless_asked(workspace):
    from vis.app import AppConfig, create_app

    app = create_app(workspace)
    assert not app._dev_tools.ui and not app._dev_tools.props_check and not app._dev_tools.serve_dev_bundles
    ensure_user(workspace, "ana")
    client = app.server.test_client()
    login_client(client, "ana")
    index = client.get("/").get_data(as_text=True)
    assert '"ui": false' in index.replace("'", '"').lower() or '"ui":false' in index.replace(" ", "").lower()
    debug = create_app(workspace, config=AppConfig(debug=True))
    assert debug._dev_tools.ui
    assert app.server.test_client().get("/").status_code == 302  # not even the page shell without a login


def test_secret_key_is_created_once_and_shared(workspace):
    from vis.app import create_app

    a, b = create_app(workspace), create_app(workspace)
    assert a.server.secret_key and a.server.secret_key == b.server.secret_key
    assert (workspace.workspace / "secret_key").stat().st_mode & 0o077 == 0


def test_create_server_reads_the_workspace_from_the_environment(workspace):
    from vis.app import create_server
    from vis.services import EXTENSION

    server = create_server()  # the `workspace` fixture set CONCEPTLENS_WORKSPACE
    assert server.extensions[EXTENSION].settings.workspace == workspace.workspace
    assert server.test_client().get("/health").status_code == 200


def test_background_jobs_use_diskcache_in_the_workspace_by_default(workspace):
    from dash import DiskcacheManager

    from vis.jobs import create_manager

    manager = create_manager(workspace)
    assert isinstance(manager, DiskcacheManager)
    assert Path(manager.handle.directory) == workspace.cache_dir / "jobs"


@pytest.mark.services
def test_background_jobs_use_celery_on_redis_in_the_team_setup(workspace, redis_url):
    from dash import CeleryManager

    from store.settings import load_settings
    from vis.jobs import create_manager

    settings = load_settings(workspace.workspace, env={"CONCEPTLENS_CACHE_URL": redis_url})
    manager = create_manager(settings)
    assert isinstance(manager, CeleryManager)
    assert manager.handle.conf.broker_url == redis_url
    # the result backend really is the machine's Redis: a value written through it reads back
    manager.handle.backend.set("conceptlens-test-key", b"ok")
    assert manager.handle.backend.get("conceptlens-test-key") == b"ok"
    manager.handle.backend.delete("conceptlens-test-key")


def test_mlflow_ui_command_uses_the_workspace_tracking_store_on_loopback(workspace):
    from vis.app import mlflow_ui_command

    cmd = mlflow_ui_command(workspace, port=5123)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == workspace.tracking_uri
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"


def test_vis_command_line_lists_its_commands():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "vis", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0
    for name in ("serve", "mlflow-ui", "worker"):
        assert name in out.stdout


# -- figures ---------------------------------------------------------------------------------------------------------
def test_mammogram_figure_axes_are_the_png_pixels_whatever_the_sent_resolution():
    import numpy as np

    from vis.figures import LesionOverlay, mammogram_figure

    img = np.zeros((100, 60), np.uint8)  # sent at half resolution of a 200×120 PNG
    ov = LesionOverlay(probs=np.full((3, 2), 0.8, np.float32), origin=(0, 0), step=32, size=64)
    fig = mammogram_figure(img, scale=0.5, overlay=ov, box=(10, 20, 74, 84), flagged=[(0, 0, 64, 64)])
    assert fig.layout.xaxis.range == (0, 120) and fig.layout.yaxis.range == (200, 0)
    image = fig.data[0]
    assert image.dx == 2 and image.x0 == 1  # pixel i covers [2i, 2i + 2): centre 2i + 1
    heat = fig.data[1]
    assert heat.x0 == 32 and heat.dx == 32  # the first window's centre, then one step per column
    assert [s.line.color for s in fig.layout.shapes] == ["#4dabf7", "#ffd43b"]
    assert (fig.layout.shapes[1].x0, fig.layout.shapes[1].y1) == (10, 84)


def test_probe_versions_figure_gives_every_version_its_own_point():
    from vis.figures import probe_versions_figure

    # a retrain and a rollback on the same 210 annotations, then a version with more
    versions = [{"run_id": "a", "n_annotations": 210, "auroc": 0.9, "ap": 0.6},
                {"run_id": "b", "n_annotations": 210, "auroc": 0.92, "ap": 0.65},
                {"run_id": "c", "n_annotations": 215, "auroc": 0.95, "ap": 0.7}]
    fig = probe_versions_figure(versions, current="b")
    auroc = fig.data[0]
    assert list(auroc.x) == [1, 2, 3] and list(auroc.y) == [0.9, 0.92, 0.95]
    assert [list(c) for c in auroc.customdata] == [["a", 210], ["b", 210], ["c", 215]]
    assert list(fig.layout.xaxis.ticktext) == ["v1 (210)", "v2 (210)", "v3 (215)"]
    assert [s.x0 for s in fig.layout.shapes] == [2]  # the current version's line
    many = probe_versions_figure([{"run_id": str(i), "n_annotations": i, "auroc": 0.5, "ap": 0.5} for i in range(25)])
    assert len(many.layout.xaxis.tickvals) <= 10 and many.layout.xaxis.tickvals[0] == 1
    assert probe_versions_figure([]).data[0].x == ()


def test_report_figure_marks_a_panel_or_each_row():
    from vis.figures import report_figure

    rows = [{"concept": "mass", "probe": 0.7}, {"concept": "film_label", "probe": 0.2},
            {"concept": "calcification", "probe": 0.4}]
    measures = [("probe", "probe score", (0, 1))]
    one = report_figure(rows, measures=measures, marks={"probe": 0.5})["layout"]["shapes"]
    assert [(s["x0"], s["yref"], s["y0"], s["y1"]) for s in one] == [(0.5, "paper", 0, 1)]
    fig = report_figure(rows, measures=measures, marks={"probe": [0.33, None, 0.8]})
    ticks = [(s["x0"], s["x1"], s["yref"], s["y0"], s["y1"]) for s in fig["layout"]["shapes"]]
    assert ticks == [(0.33, 0.33, "y", -0.42, 0.42), (0.8, 0.8, "y", 1.58, 2.42)]  # no tick for the row without
    bars = fig["data"][0]
    assert bars["customdata"] == ["present from 0.33", "no mark", "present from 0.8"]
    assert bars["hovertemplate"] == "%{y} · probe score %{x:.3g} (%{customdata})<extra></extra>"
    # each panel's title centred over its panel (plotly anchors paper annotations left or right near the edges)
    titles = fig["layout"]["annotations"]
    assert [(a["text"], a["xanchor"]) for a in titles] == [("probe score", "center")]
    assert titles[0]["x"] == pytest.approx(sum(fig["layout"]["xaxis"]["domain"]) / 2)
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        report_figure(rows, measures=measures, marks={"probe": [0.3, 0.4]})


def test_image_map_figure_is_plain_json_with_every_image_where_it_lies():
    """The image map is built as a plain dict (no graph-object validation): each class a trace whose typed x/y decode
    to the images' coordinates and whose customdata are their store rows; the probe colouring; the selection ring;
    the shared chart layout (plotly_white spelled out) with lasso selection."""
    import base64

    from vis.figures import image_map_figure

    def floats(typed):
        assert typed["dtype"] == "f4"
        return np.frombuffer(base64.b64decode(typed["bdata"]), "<f4")

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(7, 2)).astype(np.float32)
    ids = [f"p{i}" for i in range(7)]
    values = ["lesion", "normal", "normal", "lesion", "normal", "normal", "lesion"]
    fig = image_map_figure(xy, values=values, color_by="class", ids=ids, selected=[3, 5], uirevision="features.23")
    json.dumps(fig)  # plain JSON
    traces = {t["name"]: t for t in fig["data"]}
    assert list(traces) == ["lesion", "normal", "selected"]
    assert traces["lesion"]["customdata"] == [0, 3, 6] and traces["selected"]["customdata"] == [3, 5]
    for t in fig["data"]:
        rows = t["customdata"]
        np.testing.assert_array_equal(floats(t["x"]), xy[rows, 0])
        np.testing.assert_array_equal(floats(t["y"]), xy[rows, 1])
    assert traces["normal"]["hovertext"][0] == "p1 · normal" and traces["lesion"]["marker"]["color"] == "#e8590c"
    layout = fig["layout"]
    assert layout["dragmode"] == "lasso" and layout["uirevision"] == "features.23" and layout["height"] == 560
    assert layout["template"]["layout"]["plot_bgcolor"] == "white" and not layout["xaxis"]["showticklabels"]
    scores = np.linspace(0, 1, 7)
    probe = image_map_figure(xy, values=scores, color_by="probe", ids=ids, height=640)
    (trace,) = probe["data"]
    assert trace["name"] == "probe score" and trace["customdata"] == list(range(7))
    np.testing.assert_allclose(floats(trace["marker"]["color"]), scores, rtol=1e-6)
    assert trace["hovertext"][6] == "p6 · score 1.00" and probe["layout"]["height"] == 640
    layout["xaxis"]["range"] = [0, 1]  # a caller's change stays its own
    assert "range" not in image_map_figure(xy, values=values, color_by="class", ids=ids)["layout"]["xaxis"]


def test_metric_curves_tick_whole_steps_when_there_are_few():
    from vis.figures import metric_curves_figure

    one = metric_curves_figure({"probe v1": [(0, 0.97)], "probe v2": [(0, 0.99)]}, metric="auroc")
    assert one.layout.xaxis.dtick == 1 and [t.name for t in one.data] == ["probe v1", "probe v2"]
    many = metric_curves_figure({"fit": [(s, 1 / (s + 1)) for s in range(40)]}, metric="val/loss")
    assert many.layout.xaxis.dtick is None and list(many.data[0].x) == list(range(40))


def test_report_figure_axes_start_at_zero_unless_a_measure_goes_negative():
    """An empty count panel (no concept has a labelled unit yet) reads 0…1, not plotly's −1…1; counts start at 0; a
    signed measure (a contribution) keeps its autorange; a fixed range stays fixed."""
    from vis.figures import report_figure

    rows = [{"concept": "mass", "units": 0.0, "contribution": 0.4, "probe": 0.7},
            {"concept": "calcification", "units": 0.0, "contribution": -1.2, "probe": 0.1}]
    measures = [("units", "labeled units"), ("contribution", "contribution"), ("probe", "probe", (0, 1))]
    layout = report_figure(rows, measures=measures)["layout"]
    assert layout["xaxis"]["range"] == [0, 1] and layout["xaxis"]["rangemode"] == "tozero"
    assert (layout["xaxis"]["tickformat"], layout["xaxis"]["dtick"]) == ("d", 1)  # a count: ticks 0 and 1
    assert "range" not in layout["xaxis2"] and "rangemode" not in layout["xaxis2"]
    fixed = layout["xaxis3"]
    assert fixed["range"] == [0, 1] and "rangemode" not in fixed and "dtick" not in fixed
    rows[0]["units"], rows[1]["units"] = 3.0, 13.0
    counts = report_figure(rows, measures=measures)["layout"]["xaxis"]
    assert counts["rangemode"] == "tozero" and "range" not in counts and counts["dtick"] == 4
    rows[0]["units"] = 2.5  # a ratio (peak activation / threshold): from 0, plotly's own ticks
    ratio = report_figure(rows, measures=measures)["layout"]["xaxis"]
    assert ratio["rangemode"] == "tozero" and "dtick" not in ratio and "tickformat" not in ratio


def test_patch_figure_keeps_patch_coordinates_and_offers_drawing_tools():
    import numpy as np

    from vis.figures import PATCH_CONFIG, Overlay, patch_figure

    patch = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:30] = True
    fig = patch_figure(patch, overlays=[Overlay("unit 3", mask, kind="mask")],
                       shapes=[{"type": "rect", "x0": 1, "y0": 2, "x1": 30, "y1": 40}])
    assert fig.layout.xaxis.range == (0, 64) and fig.layout.dragmode == "drawclosedpath"
    assert fig.data[0].x0 == pytest.approx(0.5 / 6) and fig.data[0].dx == pytest.approx(1 / 6)
    assert fig.data[1].x0 == 0.5  # mask cell (i, j) is centred on (j + 0.5, i + 0.5)
    assert fig.layout.shapes[0].x1 == 30
    assert set(PATCH_CONFIG["modeBarButtonsToAdd"]) == {"drawclosedpath", "drawrect", "drawcircle", "eraseshape"}


def test_unit_map_enlarges_and_rings_units_above_the_iou_threshold():
    import numpy as np

    from vis.figures import unit_map_figure

    xy = np.random.default_rng(0).normal(size=(6, 2))
    iou = np.array([0.0, 0.5, 0.1, 0.3, 0.0, 0.21], np.float32)
    fig = unit_map_figure(xy, labels=["", "mass", "", "", "", ""], iou=iou, threshold=0.2, selected=2)
    sizes = {int(u): s for tr in fig.data[:2] for u, s in zip(tr.customdata, tr.marker.size)}
    assert sizes[1] > sizes[3] > sizes[5] > sizes[0] == sizes[2]
    ring = [tr for tr in fig.data if tr.name == "IoU > 0.2"][0]
    assert sorted(ring.customdata) == [1, 3, 5]
    assert [tr for tr in fig.data if tr.name == "unit 2"]


def test_window_image_maps_level_and_width_linearly():
    import numpy as np

    from vis.figures import window_image

    ramp = np.linspace(0, 1, 11, dtype=np.float32)
    out = window_image(ramp, 0.5, 0.5)  # [0.25, 0.75] → [0, 255]
    assert out[0] == 0 and out[2] == 0 and out[5] == 127 and out[8] == 255 and out[10] == 255


# -- a real workspace (slow: builds demo data, trains 3 epochs, extracts) ---------------------------------------------
@pytest.mark.slow
def test_every_page_renders_on_a_real_workspace(app_workspace):
    from store.settings import load_settings

    _app, dc = _client(load_settings(app_workspace))
    for path in PAGES:
        status, data = _page(dc, path)
        assert status == 200, (path, data)
        text = _text(data["response"])
        assert "not ready" not in text.lower(), (path, text[:300])


@pytest.mark.slow
def test_wrong_types_in_callback_values_are_400_and_change_nothing(app_workspace):
    from store.settings import load_settings
    from vis import ids

    settings = load_settings(app_workspace)
    app, dc = _client(settings)
    wb = app.server.extensions["conceptlens"]
    source = wb.sources()[0].id
    base = {f"{ids.REVIEW_SOURCE}.value": source, f"{ids.REVIEW_LEVEL}.value": 0.5,
            f"{ids.REVIEW_WIDTH}.value": 1.0, f"{ids.REVIEW_OVERLAY}.value": True,
            f"{ids.REVIEW_STATE}.data": {"source": source, "image": None, "unit": None}}
    code, _ = dc.call(f"{ids.REVIEW_MAMMOGRAM}.figure", base)
    assert code == 200
    def stored() -> list[str]:  # SQLite's -wal/-shm side files come and go with connections: not stored data
        return sorted(p.name for p in settings.workspace.rglob("*")
                      if p.is_file() and "cache" not in p.parts and not p.name.endswith(("-wal", "-shm", "-journal")))

    before = stored()
    for key, bad in [(f"{ids.REVIEW_LEVEL}.value", "abc"), (f"{ids.REVIEW_LEVEL}.value", 7.5),
                     (f"{ids.REVIEW_SOURCE}.value", "../../etc/passwd"), (f"{ids.REVIEW_SOURCE}.value", {"a": 1}),
                     (f"{ids.REVIEW_OVERLAY}.value", "yes"), (f"{ids.REVIEW_STATE}.data", {"image": 3})]:
        code, data = dc.call(f"{ids.REVIEW_MAMMOGRAM}.figure", {**base, key: bad})
        assert code == 400, (key, bad, data)
        assert data["error"]
    huge = [{"type": "path", "path": "M0,0" + "L1,1" * 12_000 + "Z"}]
    code, data = dc.call(f"{ids.REVIEW_REGIONS}.data", {f"{ids.REVIEW_PATCH}.relayoutData": {"shapes": huge},
                                                       f"{ids.REVIEW_REGIONS}.data": []},
                         changed=[f"{ids.REVIEW_PATCH}.relayoutData"])
    assert code == 400 and "vertices" in data["error"]
    assert stored() == before


@pytest.mark.slow
def test_a_store_from_another_model_is_refused_with_a_clear_message(app_workspace, tmp_path):
    import torch

    from store.settings import load_settings
    from training.registry import save_model
    from training.zoo import ModelSpec, build_model

    torch.manual_seed(1)
    spec = ModelSpec(zoo="vgg_bn", config={"widths": [8, 16], "convs": [1, 1]})
    other = save_model(tmp_path / "other-model", build_model(spec), spec=spec, input_size=(64, 64),
                       transform={"mean": 0.5, "std": 0.25}, layers=["features.0"])
    _app, dc = _client(load_settings(app_workspace), model=str(other))
    for path in ["/", "/units", "/images", "/probes"]:
        status, data = _page(dc, path)
        assert status == 200
        text = _text(data["response"])
        assert "extracted from another model" in text, text[:400]
        assert "conceptlens-demo" in text and str(other) in text  # both sides are named


@pytest.mark.slow
def test_two_gunicorn_workers_behave_as_one(app_workspace, tmp_path):
    """Labels written through one worker are seen through the other; undo works from either (no worker state)."""
    import shutil

    import psutil

    from browser import AppServer
    from vis import ids
    from vis.services import Workbench

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    from store.settings import load_settings
    from vis.app import AppConfig

    wb = Workbench(load_settings(ws), AppConfig())
    layer = wb.layer()
    image = unit = mask = None
    # flagged patches first, then every patch: a tiny test model does not always flag one with a large mask
    candidates = [f.image_id for src in wb.sources() for f in wb.flagged(src.id)]
    candidates += [r.id for r in wb.manifest().records]
    for image_id in candidates:
        row, _ = wb.record(image_id)
        u = wb.most_active_unit(layer, row)
        m = wb.unit_mask(layer, row, u)
        if m.sum() >= 100:
            image, unit, mask = image_id, u, m
            break
    assert image, "no patch with a visible unit mask"
    ys, xs = mask.nonzero()
    region = [{"type": "rect", "x0": float(xs.min()), "y0": float(ys.min()), "x1": float(xs.max() + 1),
               "y1": float(ys.max() + 1)}]
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "--timeout", "120",
            "vis.app:create_server()"]
    with AppServer(ws, argv=argv) as app:
        assert len(psutil.Process(app.proc.pid).children()) == 2  # two workers
        dc = DashClient(app.url, login=("ana", TEST_PASSWORD))  # one sign-in holds on both workers (one secret)
        state = {"source": None, "image": image, "unit": None}
        view = {f"{ids.REVIEW_STATE}.data": state, f"{ids.REVIEW_REGIONS}.data": [],
                f"{ids.REVIEW_LAYER}.value": layer, f"{ids.REVIEW_ACTIONS}.data": [], f"{ids.SESSION}.data": 1}

        def labeled_everywhere() -> set[bool]:
            seen = set()
            for _ in range(12):  # sequential requests are spread over both workers
                code, data = dc.call(f"{ids.REVIEW_UNIT_MAP}.figure", view)
                assert code == 200, data
                names = [t.get("name") for t in data["response"][ids.REVIEW_UNIT_MAP]["figure"]["data"]]
                seen.add("mass" in names)
            return seen

        assert labeled_everywhere() == {False}
        label = {f"{ids.REVIEW_LABEL}.n_clicks": 1, f"{ids.REVIEW_STATE}.data": state,
                 f"{ids.REVIEW_REGIONS}.data": region, f"{ids.REVIEW_CONCEPT}.value": "mass",
                 f"{ids.REVIEW_LAYER}.value": layer, f"{ids.REVIEW_ACTIONS}.data": [], f"{ids.SESSION}.data": 1}
        code, data = dc.call(f"{ids.REVIEW_ACTIONS}.data", label, changed=[f"{ids.REVIEW_LABEL}.n_clicks"])
        assert code == 200, data
        actions = data["response"][ids.REVIEW_ACTIONS]["data"]
        assert len(actions) == 1 and "Labeled" in _text(data["response"][ids.REVIEW_MESSAGE])
        assert labeled_everywhere() == {True}
        code, data = dc.call(f"{ids.REVIEW_ACTIONS}.data", {**label, f"{ids.REVIEW_ACTIONS}.data": actions},
                             changed=[f"{ids.REVIEW_UNDO}.n_clicks"])
        assert code == 200 and data["response"][ids.REVIEW_ACTIONS]["data"] == []
        assert labeled_everywhere() == {False}


@pytest.mark.slow
@pytest.mark.services
def test_background_retrain_runs_on_celery_with_redis(app_workspace, tmp_path, redis_url):
    """The team setup: CONCEPTLENS_CACHE_URL=redis://… → jobs go through Redis to a `python -m vis worker`."""
    import shutil
    import subprocess

    import numpy as np

    from browser import AppServer, call_background
    from store.settings import load_settings
    from vis import ids
    from vis.app import AppConfig
    from vis.services import Workbench

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    wb = Workbench(load_settings(ws), AppConfig())
    layer, labels = wb.layer(), np.asarray(wb.store().labels())
    env = {"CONCEPTLENS_CACHE_URL": redis_url, "CONCEPTLENS_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "vis", "worker", "--pool", "solo", "--loglevel", "WARNING"],
                              cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with AppServer(ws, env=env) as app:
            dc = DashClient(app.url, login=("ana", TEST_PASSWORD))
            for present, button in ((1, ids.IMAGES_MARK_POS), (0, ids.IMAGES_MARK_NEG)):
                rows = [int(i) for i in np.flatnonzero(labels == present)[:15]]
                result, _seconds = call_background(
                    dc, app.url, f"{ids.IMAGES_VERSION}.data",
                    {f"{button}.n_clicks": 1, f"{ids.IMAGES_STATE}.data": {"selected": rows},
                     f"{ids.IMAGES_CONCEPT}.value": "mass", f"{ids.IMAGES_LAYER}.value": layer,
                     f"{ids.SESSION}.data": 1},
                    changed=[f"{button}.n_clicks"], timeout=240)
            run_id = result["response"][ids.IMAGES_VERSION]["data"]
            assert "Probe retrained" in _text(result["response"][ids.IMAGES_MESSAGE])
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    from store.activations import open_store

    assert open_store(load_settings(ws).store_url("demo")).probe("mass", layer).run_id == run_id


def test_suggest_a_patch_opens_the_one_that_balances_the_drawings(app_workspace):
    """"Suggest a patch" on the Review page opens the patch explain.labelrules.next_drawings ranks first for the
    chosen concept (its mammogram follows), passes over the open one when asked again, says why, and refuses forged
    values; a concept the dataset lists nowhere gets a message and opens nothing."""
    from explain.labelrules import next_drawings
    from explain.labels import regions_for
    from store.settings import load_settings
    from vis import ids

    app, dc = _client(load_settings(app_workspace))
    wb = app.server.extensions["conceptlens"]
    layer, store = wb.layer(), wb.store()
    concept, shown = max(wb.images_showing().items(), key=lambda kv: len(kv[1]))
    assert len(shown) >= 3
    drawn = [store.index_of(r.image_id) for r in regions_for(wb.db(), concept, session=1, author="ana")]
    ranked = next_drawings(store.pooled(layer, "max"), shown, drawn)
    source = wb.sources()[0].id
    inputs = {f"{ids.REVIEW_SUGGEST}.n_clicks": 1, f"{ids.REVIEW_SOURCE}.value": source,
              f"{ids.REVIEW_STATE}.data": {"source": source, "image": None, "unit": None},
              f"{ids.REVIEW_CONCEPT}.value": concept, f"{ids.REVIEW_LAYER}.value": layer, f"{ids.SESSION}.data": 1}

    def suggest(**changes):
        code, data = dc.call(f"{ids.REVIEW_STATE}.data", {**inputs, **changes},
                             changed=[f"{ids.REVIEW_SUGGEST}.n_clicks"])
        assert code == 200, data
        return data["response"]

    out = suggest()
    first = store.image_ids[int(ranked[0])]
    state = out[ids.REVIEW_STATE]["data"]
    assert state["image"] == first and out[ids.REVIEW_REGIONS]["data"] == []
    assert out[ids.REVIEW_SOURCE]["value"] == state["source"] == wb.record(first)[1].source_id
    text = _text(out[ids.REVIEW_MESSAGE])
    assert f"on {first}" in text and f"of the {len(shown)} images listed" in text, text
    assert ("most typical" if not drawn else f"keeps your {len(drawn)} drawing") in text, text
    # asked again with that patch open: the next in the ranking
    out = suggest(**{f"{ids.REVIEW_STATE}.data": state})
    assert out[ids.REVIEW_STATE]["data"]["image"] == store.image_ids[int(ranked[1])]
    # a concept no image is listed as showing: a message, nothing opened
    out = suggest(**{f"{ids.REVIEW_CONCEPT}.value": "rim_sign"})
    assert ids.REVIEW_STATE not in out and "lists no image showing" in _text(out[ids.REVIEW_MESSAGE])
    # forged values: 400 naming the value
    for key, bad in [(f"{ids.REVIEW_CONCEPT}.value", {"a": 1}), (f"{ids.REVIEW_LAYER}.value", "features.99"),
                     (f"{ids.REVIEW_STATE}.data", {"image": "../../etc/passwd"})]:
        code, data = dc.call(f"{ids.REVIEW_STATE}.data", {**inputs, key: bad},
                             changed=[f"{ids.REVIEW_SUGGEST}.n_clicks"])
        assert code == 400, (key, bad, data)


def _components(node, kind) -> list:
    """Every component of type `kind` in a Dash component tree."""
    found = [node] if isinstance(node, kind) else []
    children = getattr(node, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children] if children is not None else []:
        found += _components(child, kind)
    return found


def test_the_experiments_roc_view_shows_logged_rocs_and_keeps_a_finished_runs(app_workspace, tmp_path, monkeypatch):
    """The Experiments page's ROC view: the training run's logged curve (figures/test_roc.json) in one interactive
    figure, the logged image for a run with only a PNG (or a JSON that is not a curve), a message for a run that
    logged none. The artifact store is listed once per run instead of tried with downloads that fail; a finished
    run's answer is kept, so choosing the same runs again asks nothing; an artifact store that cannot be reached is
    asked again."""
    import json
    import shutil

    from dash import dcc, html
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import Workbench

    ws = tmp_path / "ws"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    settings = load_settings(ws)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    trained = next(r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                   if "figures/test_roc.json" in {a.path for a in client.list_artifacts(r.info.run_id, "figures")})
    logged = json.loads(Path(client.download_artifacts(trained.info.run_id, "figures/test_roc.json",
                                                       str(tmp_path))).read_text())
    png = Path(client.download_artifacts(trained.info.run_id, "figures/test_roc.png", str(tmp_path)))
    experiment = client.create_experiment("other-runs")
    only_png, broken = (client.create_run(experiment, run_name=n).info.run_id for n in ("only-png", "broken-json"))
    client.log_artifact(only_png, str(png), "figures")
    client.log_artifact(broken, str(png), "figures")
    client.log_text(broken, "{not a curve", "figures/test_roc.json")
    bare = client.create_run(experiment, run_name="bare").info.run_id
    client.log_metric(bare, "auroc", 0.5)
    for rid in (only_png, broken, bare):
        client.set_terminated(rid)

    wb = Workbench(settings, AppConfig())
    listed = []
    real_list = wb._mlflow().list_artifacts
    monkeypatch.setattr(wb._mlflow(), "list_artifacts", lambda rid, path=None: listed.append(rid) or
                        real_list(rid, path))
    runs = [trained.info.run_id, only_png, broken, bare]
    view = wb.roc_view(wb._runs(runs))
    (graph,) = _components(view, dcc.Graph)  # the training run's curve, drawn from its numbers
    curves = {t.name: t for t in graph.figure.data if t.name != "chance"}
    name = f"{trained.info.run_name} (AUROC {trained.data.metrics['test/auroc']:.3f})"
    assert list(curves) == [name] and logged["auroc"] == pytest.approx(trained.data.metrics["test/auroc"], abs=1e-6)
    assert list(curves[name].x) == logged["fpr"] and list(curves[name].y) == logged["tpr"] and len(logged["fpr"]) > 5
    layout = graph.figure.layout  # square on exactly [0, 1], the 90 % specificity operating point marked
    assert tuple(layout.xaxis.range) == (0, 1) and layout.xaxis.constrain == layout.yaxis.constrain == "domain"
    assert [(sh.x0, sh.x1) for sh in layout.shapes] == [(0.1, 0.1)] and "specificity" in layout.annotations[0].text
    images = _components(view, html.Img)  # the PNG-only run, and the run whose JSON is no curve, as images
    assert len(images) == 2 and all(i.src.startswith("data:image/png;base64,") and len(i.src) > 1000 for i in images)
    assert [c.children for c in _components(view, html.Figcaption)] == ["only-png", "broken-json"]
    assert sorted(listed) == sorted(runs)
    none = wb.roc_view(wb._runs([bare]))
    assert not _components(none, html.Img) and not _components(none, dcc.Graph) and "No ROC logged" in str(none)
    again = wb.roc_view(wb._runs(runs))
    assert len(listed) == 4 and _components(again, html.Img)[0].src == images[0].src  # kept: nothing asked

    down = Workbench(settings, AppConfig())  # another process, whose artifact store is out of reach at first
    real_down = down._mlflow().list_artifacts

    def unreachable(rid, path=None):
        raise MlflowException("connection refused")

    monkeypatch.setattr(down._mlflow(), "list_artifacts", unreachable)
    assert not _components(down.roc_view(down._runs([only_png])), html.Img)
    monkeypatch.setattr(down._mlflow(), "list_artifacts", real_down)
    assert _components(down.roc_view(down._runs([only_png])), html.Img)[0].src == images[0].src


def test_a_logged_roc_file_is_drawn_only_when_it_is_a_curve():
    """figures/test_roc.json is read from an artifact store anyone may log to: only two equal lists of numbers in
    [0, 1] are a curve; an AUROC or operating point that is no such number is left out, anything else is no curve."""
    from vis.services import _roc_curve

    good = '{"fpr": [0, 0.5, 1], "tpr": [0, 0.9, 1], "auroc": 0.85, "specificity": 0.9}'
    assert _roc_curve(good) == ([0, 0.5, 1], [0, 0.9, 1], 0.85, 0.9)
    assert _roc_curve(good.encode()) == _roc_curve(good)
    assert _roc_curve('{"fpr": [0, 1], "tpr": [0, 1], "auroc": "high", "specificity": true}') == ([0, 1], [0, 1],
                                                                                                 None, None)
    for bad in ('{not json', b"\xff\xfe", '[0, 1]', '{"fpr": [0, 1], "tpr": [0]}', '{"fpr": [0, 1]}',
                '{"fpr": [0, 2], "tpr": [0, 1]}', '{"fpr": [0, NaN], "tpr": [0, 1]}', '{"fpr": ["0", 1], "tpr": [0, 1]}',
                '{"fpr": [0], "tpr": [0]}', '{"fpr": %s, "tpr": %s}' % ([0.5] * 100_001, [0.5] * 100_001)):
        assert _roc_curve(bad) is None, bad


def test_the_experiments_parameter_table_cuts_long_values_and_keeps_them_whole_in_the_tooltip(app_workspace, tmp_path):
    """A parameter value longer than the table shows (a data digest, the per-split counts as JSON) is cut with an
    ellipsis and kept whole in the cell's tooltip; short values and the parameters every run shares stay as they
    are; each run's column is headed by its name with its id as the tooltip."""
    import shutil

    from dash import html
    from mlflow import MlflowClient

    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import PARAM_SHOWN, Workbench

    ws = tmp_path / "ws"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    settings = load_settings(ws)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    exp = client.create_experiment("wide-params")
    long_value = '{"train": {"normal": 1249, "lesion": 1036}, "val": {"normal": 130, "lesion": 118}, "test": {}}'
    runs = []
    for name, counts in (("first", long_value), ("second", "{}")):
        rid = client.create_run(exp, run_name=name).info.run_id
        client.log_param(rid, "data.counts", counts)
        client.log_param(rid, "seed", 0)
        client.set_terminated(rid)
        runs.append(rid)

    table, *_ = Workbench(settings, AppConfig()).runs_view(runs, None)
    heads = _components(table, html.Th)
    assert [h.children for h in heads] == ["parameter", "first", "second"] and heads[1].title == runs[0]
    rows = {r.children[0].children: r.children[1:] for r in _components(table, html.Tr)[1:]}
    assert set(rows) == {"data.counts"}  # the seed is the same in both runs
    cut, short = rows["data.counts"]
    assert len(long_value) > PARAM_SHOWN and cut.title == long_value
    assert cut.children == long_value[:PARAM_SHOWN - 1] + "…" and len(cut.children) == PARAM_SHOWN
    assert short.children == "{}" and getattr(short, "title", None) is None
    # the caption says what the panel holds: with one run every parameter, with several only those that differ
    (caption,) = _components(table, html.P)
    assert caption.children == "2 runs: the 1 of 2 parameters that differ, then their final metrics."
    one, *_ = Workbench(settings, AppConfig()).runs_view(runs[:1], None)
    assert _components(one, html.P)[0].children.startswith("One run: all 2 of its parameters.")
    assert {r.children[0].children for r in _components(one, html.Tr)[1:]} == {"data.counts", "seed"}


def test_a_server_process_imports_what_the_first_probe_fit_would_import(app_workspace):
    """torch.optim's first step imports torch._dynamo (about a second); a server process (and the job processes
    forked from it) has it imported once it is prepared (vis.app.prepare_process, run by the gunicorn factory
    `create_server`, `python -m vis serve` and the worker), so the first retrain of a process does not wait for it.
    Checked in a fresh interpreter, where nothing else has imported it."""
    import subprocess

    code = ("import sys\n"
            "from vis.app import create_server\n"
            "before = 'torch._dynamo' in sys.modules\n"
            f"create_server({str(app_workspace)!r})\n"
            "print(before, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout


def test_the_servers_log_gets_no_mlflow_download_progress_bars(app_workspace):
    """mlflow draws a progress bar on stderr for every artifact download (the model, an ROC figure); in a server's
    log that is noise, so a prepared server process (vis.app.prepare_process) has it off, unless the user set
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR. Checked in fresh interpreters, downloading the training run's logged ROC
    figure from the gunicorn factory's process."""
    import subprocess

    code = ("import tempfile\n"
            "from mlflow import MlflowClient\n"
            "from store.settings import load_settings\n"
            "from vis.app import create_server\n"
            f"settings = load_settings({str(app_workspace)!r})\n"
            f"create_server({str(app_workspace)!r})\n"
            "client = MlflowClient(tracking_uri=settings.tracking_uri)\n"
            "run = next(r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])\n"
            "           if 'figures' in {a.path for a in client.list_artifacts(r.info.run_id)})\n"
            "print(client.download_artifacts(run.info.run_id, 'figures', tempfile.mkdtemp()))\n")
    cwd = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "figures" in quiet.stdout and "Downloading artifacts" not in quiet.stderr, quiet.stderr[-2000:]
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                            env={**env, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"})
    assert chosen.returncode == 0 and "Downloading artifacts" in chosen.stderr  # the user's choice is kept


@pytest.mark.slow
def test_warm_opens_what_the_first_report_needs_before_any_request(app_workspace, tmp_path):
    """`python -m vis serve` and the gunicorn app warm their Workbench before serving: the store, manifest, model,
    the images showing each concept, the stored probes and each probed concept's verdict threshold are ready, so the
    first report computes none of them."""
    import shutil

    from explain.groundtruth import load_concept_masks
    from explain.probes import ProbeAnnotations, _read_probe, retrain
    from store.activations import open_store
    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import Workbench

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    settings = load_settings(ws)
    probe_wb = Workbench(settings, AppConfig())
    records = [r for r in probe_wb.manifest().records if "mass" in r.masks][:3]
    regions = [(r.id, load_concept_masks(r, probe_wb.patch_size(), ["mass"])["mass"]) for r in records]
    store = open_store(settings.store_url("demo"), read_only=False)
    retrain(store, ProbeAnnotations("mass", regions=regions), settings=settings, session="ana",
            layers=[store.layers[-1]])
    _read_probe.cache_clear()

    wb = Workbench(settings, AppConfig())
    assert wb.warm() == []
    assert {"store", "manifest", "model", "images-showing", "unfitted-images"} <= set(wb._handles)
    versions = wb.probes_version()
    assert [c for c, _l, _r in versions] == ["mass"]
    assert wb._views.contains(("presence", "mass", versions))  # the verdict threshold, calibrated once
    assert _read_probe.cache_info().currsize == 1  # the probe read back from mlflow
    threshold = wb.presence_thresholds()["mass"]
    assert threshold == wb.presence("mass")["threshold"] and 0 < threshold < 1


@pytest.mark.slow
def test_the_review_patch_overlays_a_concepts_map_across_layers(app_workspace, tmp_path):
    """Once a concept has probes on several layers, the Review page's probe menu offers it "@ all layers" first: every
    layer's stored map combined (explain.probes.concept_heatmap), drawn over the patch; the Probes page keeps one entry
    per fitted probe, and a combined value for a concept without probes is refused with a 400."""
    import shutil

    from explain.groundtruth import load_concept_masks
    from explain.probes import ProbeAnnotations, concept_heatmap, retrain
    from store.activations import open_store
    from store.settings import load_settings
    from vis import ids
    from vis.errors import InvalidInput

    ws = tmp_path / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key"))
    settings = load_settings(ws)
    app, dc = _client(settings)
    wb = app.server.extensions["conceptlens"]
    assert wb.probe_options(combined=True) == []  # no probe yet: nothing to combine
    records = [r for r in wb.manifest().records if "mass" in r.masks]
    regions = [(r.id, load_concept_masks(r, wb.patch_size(), ["mass"])["mass"]) for r in records[:3]]
    store = open_store(settings.store_url("demo"), read_only=False)
    retrain(store, ProbeAnnotations("mass", regions=regions), settings=settings, session="ana")  # every layer
    layers = list(store.layers)
    assert len(layers) > 1

    options = wb.probe_options(combined=True)
    assert options[0] == {"label": "mass @ all layers", "value": "mass@*"}
    # the page opened before the fit gets them at the session's next stamp; an unchanged menu is left alone (204)
    refresh = {f"{ids.SESSION_VERSION}.data": [1, "a new stamp"], f"{ids.REVIEW_PROBE}.options": []}
    code, data = dc.call(f"{ids.REVIEW_PROBE}.options", refresh, changed=[f"{ids.SESSION_VERSION}.data"])
    assert code == 200 and data["response"][ids.REVIEW_PROBE]["options"] == options, data
    code, _ = dc.call(f"{ids.REVIEW_PROBE}.options", {**refresh, f"{ids.REVIEW_PROBE}.options": options},
                      changed=[f"{ids.SESSION_VERSION}.data"])
    assert code == 204
    assert [o["value"] for o in options[1:]] == [f"mass@{layer}" for layer in sorted(layers)]
    assert [o["value"] for o in wb.probe_options()] == [o["value"] for o in options[1:]]  # the Probes page's menu

    shown = records[3]  # a patch nobody drew on
    row = store.index_of(shown.id)
    combined = wb.probe_map("mass@*", row)
    np.testing.assert_allclose(combined, concept_heatmap(store, "mass", row, size=wb.patch_size()), rtol=1e-6)
    assert not np.allclose(combined, wb.probe_map(f"mass@{layers[-1]}", row))
    view = {f"{ids.REVIEW_STATE}.data": {"source": shown.source_id, "image": shown.id, "unit": None},
            f"{ids.REVIEW_PATCH_OVERLAYS}.value": ["probe"], f"{ids.REVIEW_PROBE}.value": "mass@*",
            f"{ids.REVIEW_REGIONS}.data": [], f"{ids.REVIEW_LAYER}.value": None, f"{ids.SESSION}.data": 1,
            f"{ids.SESSION_VERSION}.data": 0}
    code, data = dc.call(f"{ids.REVIEW_PATCH}.figure", view)
    assert code == 200, data
    traces = {t.get("name"): t for t in data["response"][ids.REVIEW_PATCH]["figure"]["data"]}
    assert "probe mass @ all layers" in traces, list(traces)
    np.testing.assert_allclose(_plotly_array(traces["probe mass @ all layers"]["z"]), combined, atol=1e-4)
    for forged in ("calcification@*", "mass@**", "@*"):
        code, data = dc.call(f"{ids.REVIEW_PATCH}.figure", {**view, f"{ids.REVIEW_PROBE}.value": forged})
        assert code == 400 and "is not a probe of store" in data["error"], (forged, data)
    with pytest.raises(InvalidInput, match="is not a probe"):
        wb.parse_probe("mass@*")  # the Probes page's versions are per layer: no combined entry there

    # the report's "probe score" bar is the concept's verdict, the max of that map, not its highest probe's score
    # (a shallow layer's probe scores nearly every patch above 0.5: explain.report), and it is present from the
    # threshold calibrated on the images the manifest lists as showing a mass or not (explain.verdict)
    from explain.labelrules import images_showing
    from explain.verdict import calibrate_presence
    from vis.figures import concept_name

    from explain.probe_eval import split_images

    # calibrated on the images the model was not trained on
    unfitted = np.setdiff1d(np.arange(store.n_images), split_images(store, wb.manifest(), "train"))
    assert 0 < len(unfitted) < store.n_images and np.array_equal(wb.unfitted_images(), unfitted)
    cal = calibrate_presence(store, "mass", images_showing(store, wb.manifest())["mass"], reference=unfitted)
    threshold = cal["threshold"]
    assert wb.presence_thresholds() == {"mass": pytest.approx(threshold)}
    for r in (shown, next(r for r in wb.manifest().records if "mass" not in r.masks)):  # with and without a mass
        i = store.index_of(r.id)
        report = {f"{ids.REVIEW_STATE}.data": {"source": r.source_id, "image": r.id, "unit": None},
                  f"{ids.REVIEW_ACTIONS}.data": [], f"{ids.REVIEW_LAYER}.value": None, f"{ids.SESSION}.data": 1,
                  f"{ids.SESSION_VERSION}.data": 0}
        code, data = dc.call(f"{ids.REVIEW_REPORT}.children", report)
        assert code == 200, data
        graph = data["response"][ids.REVIEW_REPORT]["children"]["props"]["children"][1]["props"]
        traces = {t["name"]: t for t in graph["figure"]["data"]}
        probe = traces["probe score (present from the dash)"]
        score = dict(zip(probe["y"], probe["x"]))[concept_name("mass")]
        assert score == pytest.approx(float(concept_heatmap(store, "mass", i, size=wb.patch_size()).max()), abs=1e-6)
        highest = max(float(store.probe("mass", layer).scores[i]) for layer in layers)
        assert score < highest if r is not shown else score <= highest + 1e-6  # (a mass may saturate every layer)
        # a dashed tick across the mass bar where its verdict turns to present, its value in the hover
        marks = [s for s in graph["figure"]["layout"]["shapes"] if s["xref"] == probe["xaxis"]]
        row = probe["y"].index(concept_name("mass"))
        assert [(m["x0"], m["x1"], m["y0"] < row < m["y1"], m["yref"], m["line"]["dash"]) for m in marks] == [
            (pytest.approx(threshold), pytest.approx(threshold), True, probe["yaxis"], "dash")]
        assert probe["customdata"][row] == f"present from {threshold:.3g}"
    # the Probes page says so, with how well that threshold separates the images it was calibrated on
    from plotly.utils import PlotlyJSONEncoder

    line = _text(json.loads(json.dumps(wb.probe_view(f"mass@{layers[-1]}")[1], cls=PlotlyJSONEncoder)))
    assert (f"mass present from a score of {threshold:.2f} on its map across {', '.join(cal['layers'])}, "
            f"calibrated on {cal['n_with']} images the dataset lists as showing it and {cal['n_without']} others the "
            f"model was not trained on (there: sensitivity {cal['sensitivity']:.2f}, specificity {cal['specificity']:.2f})") in line, line
    # too few of them (here 5): every image of the store instead, and the page no longer says "not trained on"
    wb._views.clear()
    wb.unfitted_images = lambda: unfitted[:5]
    everything = calibrate_presence(store, "mass", images_showing(store, wb.manifest())["mass"])
    assert wb.presence("mass") == {**everything, "unfitted": False}
    fallback = _text(json.loads(json.dumps(wb._presence_line("mass"), cls=PlotlyJSONEncoder)))
    assert f"and {everything['n_without']} others (there:" in fallback, fallback
    del wb.unfitted_images
    # a manifest that is not the store's (an image of the store missing from it): no calibration, not a broken report
    import dataclasses

    full = wb.manifest()
    wb._handles.pop("images-showing")
    wb._handles["manifest"] = dataclasses.replace(full, records=full.records[1:])
    wb._views.clear()
    assert wb.presence("mass") is None and wb.presence_thresholds() == {}
    wb._handles.pop("images-showing", None)
    wb._handles["manifest"] = full
    assert wb.presence("calcification") is None  # no probe of it
    assert "surgical_clip" not in wb.images_showing()  # a concept the dataset does not annotate keeps 0.5
    assert wb.presence("surgical_clip") is None
    assert "surgical clip present from a probe score of 0.5" in _text(
        wb._presence_line("surgical_clip").to_plotly_json())


def _plotly_array(z) -> np.ndarray:
    """A figure's array as sent to the browser: a list, or plotly's typed array {"dtype", "bdata", "shape"}."""
    import base64

    if isinstance(z, dict) and "bdata" in z:
        a = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return a.reshape([int(n) for n in str(z.get("shape", a.size)).split(",")]).astype(np.float64)
    return np.asarray(z, np.float64)
