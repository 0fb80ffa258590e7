"""The JSON API (vis.api) on the real demo workspace: labeling with exactly-once request ids, field-by-field
validation that leaves the database untouched, membership (403), login (401), exports and import."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

pytestmark = [pytest.mark.slow]

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def api(app_workspace, tmp_path_factory):
    """(app, settings, db) on a private copy of the demo workspace with users ana (radiologist), rex (researcher),
    olga (radiologist, no member of session 1) and adam (admin)."""
    from store.accounts import add_member, create_user
    from store.annotations import open_database
    from store.settings import load_settings
    from vis.app import create_app

    ws = tmp_path_factory.mktemp("api") / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key", "annotations.db*", "cache"))
    settings = load_settings(ws, env={"CONCEPTLENS_SECRET_KEY": uuid.uuid4().hex})
    db = open_database(settings.database_url)
    for name, role in (("ana", "radiologist"), ("rex", "researcher"), ("olga", "radiologist"), ("adam", "admin")):
        create_user(db, name=name, role=role, password=PASSWORD, actor="test")
    for name in ("ana", "rex"):
        add_member(db, 1, name, actor="test")
    app = create_app(settings)
    yield app, settings, db
    db.dispose()


def client_for(app, name: str | None):
    """A Flask test client logged in through the form as `name` (None: anonymous)."""
    c = app.server.test_client()
    if name is not None:
        page = c.get("/login").get_data(as_text=True)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        r = c.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token, "next": "/"})
        assert r.status_code in (302, 303) and "/login" not in r.headers["Location"], r.get_data(as_text=True)[:300]
    return c


@pytest.fixture(scope="module")
def target(api):
    """A store image, the layer and a region over most of the patch (units with a visible mask overlap it)."""
    app, settings, _db = api
    from vis.services import Workbench

    wb = app.server.extensions["conceptlens"]
    assert isinstance(wb, Workbench)
    h, w = wb.patch_size()
    image = wb.store().image_ids[0]
    return {"image": image, "layer": wb.layer(), "concept": "mass",
            "region": [{"type": "rect", "x0": 2, "y0": 2, "x1": w - 2, "y1": h - 2}]}


def label(c, body, sid: int = 1, **kw):
    return c.post(f"/api/sessions/{sid}/labels", data=json.dumps(body), content_type="application/json", **kw)


def counts(db) -> dict:
    from store.annotations import LabelAction, LabelChange, Region, UnitLabel

    with db.read() as s:
        return {t.__name__: s.scalar(select(func.count()).select_from(t))
                for t in (LabelAction, LabelChange, Region, UnitLabel)}


def test_label_is_written_once_and_replayed_by_request_id(api, target):
    app, _settings, db = api
    ana = client_for(app, "ana")
    before = counts(db)
    rid = uuid.uuid4().hex
    r = label(ana, {**target, "request_id": rid})
    assert r.status_code == 201, r.get_json()
    first = r.get_json()
    assert first["replayed"] is False and first["image"] == target["image"] and first["concept"] == "mass"
    assert all(set(c) == {"unit", "from", "to"} and c["to"] == "mass" for c in first["changed"])
    after = counts(db)
    assert after["LabelAction"] == before["LabelAction"] + 1 and after["Region"] == before["Region"] + 1

    again = label(ana, {**target, "request_id": rid})  # a retry: same answer, nothing written
    assert again.status_code == 200
    assert again.get_json() == {**first, "replayed": True}
    assert counts(db) == after

    from store.annotations import LabelAction

    with db.read() as s:
        rows = s.execute(select(LabelAction.id, LabelAction.author, LabelAction.session_id)
                         .where(LabelAction.request_id == rid)).all()
    assert [tuple(r) for r in rows] == [(first["action_id"], "ana", 1)]

    # the same request id for another label is a client bug: refused, nothing written
    other = label(ana, {**target, "concept": "calcification", "request_id": rid})
    assert other.status_code == 409 and "already used" in other.get_json()["error"]
    assert counts(db) == after
    # request ids are per author: rex may use the same one for his own label
    rex = client_for(app, "rex")
    assert label(rex, {**target, "request_id": rid}).status_code == 201


BAD_FIELDS = [
    ("image", "p-does-not-exist"),
    ("image", 17),
    ("image", None),
    ("layer", "features.999"),
    ("layer", None),
    ("concept", "no_such_concept"),
    ("concept", ["mass"]),
    ("region", []),
    ("region", "M0,0L10,0L10,10Z".replace("10,10", "nan,10")),
    ("region", "M0,0C1,1,2,2,3,3Z"),
    ("region", [{"type": "path", "path": "M0,0L5,5"}]),  # two points, no area
    ("region", [{"type": "rect", "x0": -50, "y0": -50, "x1": -10, "y1": -10}]),  # outside the patch
    ("region", [{"type": "polygon", "points": [[0, 0], [1, 0]] * 6000}]),  # too many vertices
    ("region", [{"type": "rect", "x0": 0, "y0": 0, "x1": 1e300, "y1": "x"}]),
    ("region", [{"type": "polygon", "points": [[0, 0], [9, 0], [0, 9]]}, {"type": "circle", "x0": 0}]),
    ("region", {"type": "rect"}),
    ("request_id", ""),
    ("request_id", "has space"),
    ("request_id", "x" * 65),
    ("request_id", 12),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_bad_field_is_named_and_nothing_changes(api, target, field, value):
    app, _settings, db = api
    ana = client_for(app, "ana")
    before = counts(db)
    r = label(ana, {**target, "request_id": uuid.uuid4().hex, field: value})
    assert r.status_code == 400, r.get_json()
    body = r.get_json()
    assert body["field"] == field and body["error"].startswith(f"{field}:"), body
    assert counts(db) == before


def test_malformed_bodies_are_refused(api, target):
    app, _settings, db = api
    ana = client_for(app, "ana")
    before = counts(db)
    good = {**target, "request_id": uuid.uuid4().hex}
    cases = [
        (lambda: ana.post("/api/sessions/1/labels", data=json.dumps(good), content_type="text/plain"), 415, None),
        (lambda: ana.post("/api/sessions/1/labels", data=good), 415, None),  # an HTML form's encoding
        (lambda: ana.post("/api/sessions/1/labels", data="{not json", content_type="application/json"), 400,
         "request body"),
        (lambda: ana.post("/api/sessions/1/labels", data='{"image": NaN}', content_type="application/json"), 400,
         "request body"),
        (lambda: label(ana, [good]), 400, "request body"),
        (lambda: label(ana, {k: v for k, v in good.items() if k != "concept"}), 400, "concept"),
        (lambda: label(ana, {**good, "author": "rex"}), 400, "author"),  # no field lets a client act as another
        (lambda: label(ana, {**good, "region": [{"type": "polygon", "points": [[1, 1]] * 200_000}]}), 413, None),
    ]
    for send, status, field in cases:
        r = send()
        assert r.status_code == status, (status, r.get_data(as_text=True)[:300])
        assert r.is_json and r.get_json().get("field") == field, (status, r.get_json())
    assert counts(db) == before


def test_members_only_and_login_required(api, target):
    app, _settings, db = api
    before = counts(db)
    olga = client_for(app, "olga")  # a radiologist, but not in session 1
    for sid in (1, 999):
        r = label(olga, {**target, "request_id": uuid.uuid4().hex}, sid=sid)
        assert r.status_code == 403, r.get_json()
        assert olga.get(f"/api/sessions/{sid}/annotations.json").status_code == 403
        assert olga.get(f"/api/sessions/{sid}/report.html").status_code == 403
    anonymous = client_for(app, None)
    assert label(anonymous, {**target, "request_id": uuid.uuid4().hex}).status_code == 401
    for path in ("/api/whoami", "/api/sessions/1/annotations.json", "/api/sessions/1/report.html"):
        assert anonymous.get(path).status_code == 401
    assert anonymous.post("/api/sessions/import", data="{}", content_type="application/json").status_code == 401
    assert counts(db) == before
    me = client_for(app, "ana").get("/api/whoami").get_json()
    assert me == {"name": "ana", "role": "radiologist", "display_name": me["display_name"]}


def test_a_script_draws_where_the_suggestions_say(api, target):
    """GET /api/sessions/1/suggestions: the images explain.labelrules.next_drawings ranks first for the user's own
    drawings of the concept; a drawing there moves the suggestions on; bad queries are 400 naming the field, a
    non-member gets 403, an anonymous caller 401."""
    from explain.labelrules import next_drawings
    from explain.labels import regions_for

    app, _settings, db = api
    wb = app.server.extensions["conceptlens"]
    store, layer = wb.store(), target["layer"]
    concept, shown = max(((c, v) for c, v in wb.images_showing().items() if c not in ("mass", "calcification")),
                         key=lambda cv: len(cv[1]))
    rex = client_for(app, "rex")

    def expected() -> list[str]:
        drawn = [store.index_of(r.image_id) for r in regions_for(db, concept, session=1, author="rex")]
        return [store.image_ids[int(i)] for i in next_drawings(store.pooled(layer, "max"), shown, drawn)[:3]]

    r = rex.get(f"/api/sessions/1/suggestions?concept={concept}&limit=3")
    assert r.status_code == 200, r.get_json()
    first = r.get_json()
    assert first == {"concept": concept, "layer": layer, "listed": len(shown), "drawn": first["drawn"],
                     "images": expected()}
    r = label(rex, {**target, "image": first["images"][0], "concept": concept, "request_id": uuid.uuid4().hex})
    assert r.status_code == 201, r.get_json()
    after = rex.get(f"/api/sessions/1/suggestions?concept={concept}&limit=3&layer={layer}").get_json()
    assert after["drawn"] == first["drawn"] + 1 and first["images"][0] not in after["images"]
    assert after["images"] == expected()
    nothing = rex.get("/api/sessions/1/suggestions?concept=rim_sign").get_json()
    assert nothing == {"concept": "rim_sign", "layer": layer, "listed": 0, "drawn": 0, "images": []}
    before = counts(db)
    for query, field in [(f"concept={concept}&limit=abc", "limit"), (f"concept={concept}&limit=0", "limit"),
                         ("limit=3", "concept"), (f"concept={concept}&layer=features.99", "layer")]:
        r = rex.get(f"/api/sessions/1/suggestions?{query}")
        assert r.status_code == 400 and r.get_json()["field"] == field, (query, r.get_json())
    assert client_for(app, "olga").get(f"/api/sessions/1/suggestions?concept={concept}").status_code == 403
    assert client_for(app, None).get(f"/api/sessions/1/suggestions?concept={concept}").status_code == 401
    assert counts(db) == before


def test_export_import_round_trip(api, target):
    app, _settings, db = api
    ana = client_for(app, "ana")
    assert label(ana, {**target, "request_id": uuid.uuid4().hex}).status_code in (200, 201)
    r = ana.get("/api/sessions/1/annotations.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.headers["Content-Disposition"].startswith("attachment;")
    data = r.get_json()
    assert data["format"] == "conceptlens-annotations/1"
    text = json.dumps(data)
    assert "password" not in text and "$argon2" not in text
    assert target["image"] in text

    assert ana.post("/api/sessions/import", data=json.dumps(data), content_type="application/json").status_code == 403
    adam = client_for(app, "adam")
    name = f"imported {uuid.uuid4().hex[:6]}"
    # an export may be far larger than a label body (1 MiB): imports take up to MAX_IMPORT_BODY
    from vis.api import MAX_IMPORT_BODY

    big = json.dumps(data) + " " * (3 << 20)
    r = adam.post(f"/api/sessions/import?name={name}", data=big, content_type="application/json")
    assert r.status_code == 201, r.get_json()
    info = r.get_json()
    assert info["name"] == name and info["id"] != 1
    again = adam.get(f"/api/sessions/{info['id']}/annotations.json").get_json()

    def strip(d):
        return {k: v for k, v in d.items() if k not in ("session", "exported_at")}

    assert strip(again) == strip(data)
    assert again["session"]["name"] == name
    huge = adam.post("/api/sessions/import", data=" " * (MAX_IMPORT_BODY + 1), content_type="application/json")
    assert huge.status_code == 413
    bad = adam.post("/api/sessions/import", data=json.dumps({"format": "something-else"}),
                    content_type="application/json")
    assert bad.status_code == 400 and bad.get_json()["error"]


def test_report_is_a_self_contained_download(api, target):
    app, _settings, _db = api
    r = client_for(app, "rex").get("/api/sessions/1/report.html")
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    assert r.mimetype == "text/html" and r.headers["Content-Disposition"].startswith("attachment;")
    html = r.get_data(as_text=True)
    assert html.lstrip().lower().startswith("<!doctype html")
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?://', html)  # nothing fetched from elsewhere


@pytest.mark.parametrize("rule_name", ["dataset", "assisted"])
def test_the_dataset_labeling_rule_is_served_by_configuration(api, rule_name):
    """With AppConfig.label_rule = "dataset" a drawing relabels the author's units to what explain.labelrules.
    DatasetRule estimates from all of their drawings in the session ("assisted": ProbeAssistedRule, the estimate
    carried over by probes fitted from the same drawings), with each unit's IoU with the film labels, background,
    skin and pectoral muscle the app segments as rivals (explain.groundtruth.segmented_rivals, computed once per
    model and kept in the workspace cache); the action records which rule ran, and with which rivals."""
    import numpy as np

    import explain.groundtruth
    from explain.groundtruth import load_concept_masks, segmented_rivals
    from explain.labelrules import DatasetRule, ProbeAssistedRule, images_showing
    from explain.labels import current_labels
    from store.accounts import add_member, create_user
    from store.annotations import LabelAction
    from vis.app import AppConfig, app_config_from_env, create_app

    _app, settings, db = api
    assert app_config_from_env({"CONCEPTLENS_LABEL_RULE": rule_name}).label_rule == rule_name
    with pytest.raises(ValueError, match="label_rule must be one of published, dataset, assisted"):
        AppConfig(label_rule="majority")
    app = create_app(settings, config=AppConfig(label_rule=rule_name))
    user = f"dina-{rule_name}"  # the module's database is shared: each rule's reviewer starts with no drawing
    create_user(db, name=user, role="radiologist", password=PASSWORD, actor="test")
    add_member(db, 1, user, actor="test")
    dina = client_for(app, user)
    wb = app.server.extensions["conceptlens"]
    store, manifest, layer = wb.store(), wb.manifest(), wb.layer()
    shown = images_showing(store, manifest)
    known = segmented_rivals(store, manifest, layer)
    assert sorted(known) == ["background", "film_label", "pectoral_muscle", "skin"]
    by_id = manifest.by_id()
    drawn, seen = 0, set()
    for concept in ("mass", "calcification") * 3:  # the small test model needs three calcification drawings
        # the next store patch showing the concept: a rectangle on its ground-truth mask's bounding box, or for a
        # mass the ellipse inscribed in it (plotly's "circle", as a reader outlines a mass)
        while True:
            image = store.image_ids[shown[concept][drawn]]
            drawn += 1
            m = load_concept_masks(by_id[image], wb.patch_size(), [concept])[concept]
            if m.sum() >= 16:
                break
        ys, xs = np.nonzero(m)
        region = [{"type": "circle" if concept == "mass" else "rect", "x0": int(xs.min()), "y0": int(ys.min()),
                   "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1}]
        r = label(dina, {"image": image, "layer": layer, "concept": concept, "region": region,
                         "request_id": uuid.uuid4().hex})
        assert r.status_code == 201, r.get_json()
        estimate = DatasetRule if rule_name == "dataset" else ProbeAssistedRule
        expected = estimate.from_session(db, store, layer, session=1, author=user, shown=shown, known=known).labels()
        assert current_labels(db, layer, session=1, author=user) == expected
        seen |= set(expected.values())
    assert seen == {"mass", "calcification"}  # units of both concepts were labeled along the way
    with db.read() as s:
        rule = s.scalar(select(LabelAction.rule).where(LabelAction.author == user).order_by(LabelAction.id.desc()))
    assert rule == {"kind": "dataset", "threshold": 0.04, "level": 0.99, **({"probes": True} if rule_name == "assisted"
                                                                           else {}), "rivals": sorted(known)}
    # the rivals the app used are those, kept in the workspace cache: a new app process reads them, computes nothing
    cached = wb.segmented_rivals(layer)
    assert sorted(cached) == sorted(known) and all(np.allclose(cached[c], known[c], rtol=1e-6) for c in known)
    assert list((settings.cache_dir / "rivals").glob(f"*-{layer}-*.npz"))

    def no_recount(*args, **kwargs):
        raise AssertionError("the rivals were counted again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(explain.groundtruth, "segmented_rivals", no_recount)
        again = create_app(settings, config=AppConfig(label_rule=rule_name)).server.extensions["conceptlens"]
        assert all(np.array_equal(again.segmented_rivals(layer)[c], cached[c]) for c in known)
