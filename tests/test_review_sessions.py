"""Review sessions in the app: rights checked inside every callback, forged requests refused with the database
unchanged, labels kept per annotator, live updates between two readers, comments with optimistic concurrency, the
admin-only users page and the import.

Real requests (Flask's test client, the exact payloads the browser sends) against the real small workspace
(`app_workspace`, copied per test): a real store, a real SQLite review database, real accounts.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import DashClient, labelable_patch, login_client, rect_around  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def ws(app_workspace, tmp_path):
    """A private copy of the app workspace, its Settings, and a second session that only `ana` belongs to."""
    from store.accounts import create_session
    from store.annotations import open_database
    from store.settings import load_settings

    root = tmp_path / "workspace"
    shutil.copytree(app_workspace, root, ignore=shutil.ignore_patterns("secret_key", "cache"))
    settings = load_settings(root)
    db = open_database(settings.database_url)
    private = create_session(db, name="ana only", members=["ana"], actor="tests")
    db.dispose()
    return settings, int(private.id)


@pytest.fixture
def app(ws):
    from vis.app import create_app

    settings, _private = ws
    return create_app(settings)


def _as(app, name: str) -> DashClient:
    client = app.server.test_client()
    assert login_client(client, name).status_code == 302
    assert client.get("/").status_code == 200
    return DashClient(client)


def _dump(app) -> dict:
    """Every annotation row of the database (the audit log aside: reading is not logged, refusals may be)."""
    from store.annotations import dump

    data = dump(app.server.extensions["conceptlens"].db())
    return {k: v for k, v in data.items() if k not in ("audit_log",)}


def _text(node) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return " ".join(_text(c) for c in node)
    if isinstance(node, dict):
        return " ".join(_text(v) for k, v in node.items() if k not in ("type", "namespace"))
    return "" if node is None else str(node)


def _label_inputs(ws_settings, session: int, *, actions=()):
    from vis import ids

    layer, source, image, _unit, box = labelable_patch(ws_settings.workspace)
    state = {"source": source, "image": image, "unit": None}
    return {f"{ids.REVIEW_LABEL}.n_clicks": 1, f"{ids.REVIEW_STATE}.data": state,
            f"{ids.REVIEW_REGIONS}.data": rect_around(box, pad=1), f"{ids.REVIEW_CONCEPT}.value": "mass",
            f"{ids.REVIEW_LAYER}.value": layer, f"{ids.REVIEW_ACTIONS}.data": list(actions),
            f"{ids.SESSION}.data": session}


def _label(dc: DashClient, inputs: dict):
    from vis import ids

    return dc.call(f"{ids.REVIEW_ACTIONS}.data", inputs, changed=[f"{ids.REVIEW_LABEL}.n_clicks"])


def test_forged_session_ids_are_403_and_change_nothing(app, ws):
    """RELIABILITY #19: bob is not a member of ana's private session: labeling, undo, views and comments there are
    refused, whatever the request says, and the database is unchanged."""
    from vis import ids

    settings, private = ws
    ana, ben = _as(app, "ana"), _as(app, "ben")
    inputs = _label_inputs(settings, private)
    status, data = _label(ana, inputs)
    assert status == 200 and "Labeled" in _text(data["response"][ids.REVIEW_MESSAGE]), data
    before = _dump(app)
    assert before["label_action"] and before["unit_label"]

    status, data = _label(ben, inputs)
    assert status == 403 and "may not open review session" in data["error"]
    action = data and before["label_action"][-1]["id"]
    status, _ = ben.call(f"{ids.REVIEW_ACTIONS}.data", {**inputs, f"{ids.REVIEW_ACTIONS}.data": [action]},
                         changed=[f"{ids.REVIEW_UNDO}.n_clicks"])
    assert status == 403
    view = {f"{ids.REVIEW_STATE}.data": inputs[f"{ids.REVIEW_STATE}.data"], f"{ids.REVIEW_REGIONS}.data": [],
            f"{ids.REVIEW_LAYER}.value": inputs[f"{ids.REVIEW_LAYER}.value"], f"{ids.REVIEW_ACTIONS}.data": [],
            f"{ids.SESSION}.data": private}
    for output in (f"{ids.REVIEW_UNIT_MAP}.figure", f"{ids.REVIEW_REPORT}.children", f"{ids.REVIEW_PATCH}.figure"):
        status, data = ben.call(output, view)
        assert status == 403, (output, data)
    status, _ = ben.call(f"{ids.SESSION}.data", {f"{ids.SESSION_PICKER}.value": private})
    assert status == 403
    status, _ = ben.call(f"{ids.SESSION_VERSION}.data", {f"{ids.LIVE_INTERVAL}.n_intervals": 1,
                                                         f"{ids.SESSION}.data": private})
    assert status == 403
    status, _ = ben.call(f"{ids.SESS_MESSAGE}.children", {
        f"{ids.SESS_COMMENT_SAVE}.n_clicks": 1, f"{ids.SESS_COMMENT_TEXT}.value": "forged",
        f"{ids.SESS_IMAGE}.value": inputs[f"{ids.REVIEW_STATE}.data"]["image"], f"{ids.SESSION}.data": private},
        changed=[f"{ids.SESS_COMMENT_SAVE}.n_clicks"])
    assert status == 403
    for bad in (999_999, 0, -1, "1", None):  # unknown, malformed and missing ids never reach another session
        status, data = ben.call(f"{ids.REVIEW_ACTIONS}.data", {**inputs, f"{ids.SESSION}.data": bad},
                                changed=[f"{ids.REVIEW_LABEL}.n_clicks"])
        assert status in (400, 403) or "not a member" in _text(data), (bad, status, data)
    assert _dump(app) == before
    # ben's picker lists only the sessions he belongs to; the admin's lists every one
    layout = json.dumps(ben.target.get("/_dash-layout").get_json())
    assert "ana only" not in layout
    assert "ana only" in json.dumps(_as(app, "root").target.get("/_dash-layout").get_json())


def test_a_researcher_cannot_undo_a_radiologists_labels(app, ws):
    from vis import ids

    settings, _private = ws
    ana, rita = _as(app, "ana"), _as(app, "rita")
    inputs = _label_inputs(settings, 1)
    status, data = _label(ana, inputs)
    assert status == 200, data
    actions = data["response"][ids.REVIEW_ACTIONS]["data"]
    before = _dump(app)
    undo = {**inputs, f"{ids.REVIEW_ACTIONS}.data": actions}
    status, data = rita.call(f"{ids.REVIEW_ACTIONS}.data", undo, changed=[f"{ids.REVIEW_UNDO}.n_clicks"])
    assert status == 403 and "rita" in data["error"], data
    assert _dump(app) == before
    status, data = ana.call(f"{ids.REVIEW_ACTIONS}.data", undo, changed=[f"{ids.REVIEW_UNDO}.n_clicks"])
    assert status == 200 and data["response"][ids.REVIEW_ACTIONS]["data"] == []
    assert "Undone" in _text(data["response"][ids.REVIEW_MESSAGE])


def test_two_readers_see_each_others_labels_and_regions_and_agreement(app, ws):
    """Labels are kept per annotator; the live stamp changes when the other reader writes, and every view that
    shows annotations then shows theirs; the session page counts both and computes their agreement."""
    from vis import ids

    settings, _private = ws
    ana, ben = _as(app, "ana"), _as(app, "ben")
    inputs = _label_inputs(settings, 1)
    poll = {f"{ids.LIVE_INTERVAL}.n_intervals": 1, f"{ids.SESSION}.data": 1}
    status, data = ben.call(f"{ids.SESSION_VERSION}.data", poll)
    stamp = data["response"][ids.SESSION_VERSION]["data"]
    status, data = ben.call(f"{ids.SESSION_VERSION}.data", {**poll, f"{ids.SESSION_VERSION}.data": stamp})
    assert status == 204  # nothing new: no update, no view redraws

    assert _label(ana, inputs)[0] == 200
    status, data = ben.call(f"{ids.SESSION_VERSION}.data", {**poll, f"{ids.SESSION_VERSION}.data": stamp})
    assert status == 200 and data["response"][ids.SESSION_VERSION]["data"] != stamp
    view = {f"{ids.REVIEW_STATE}.data": inputs[f"{ids.REVIEW_STATE}.data"], f"{ids.REVIEW_REGIONS}.data": [],
            f"{ids.REVIEW_LAYER}.value": inputs[f"{ids.REVIEW_LAYER}.value"], f"{ids.REVIEW_ACTIONS}.data": [],
            f"{ids.SESSION}.data": 1, f"{ids.REVIEW_PATCH_OVERLAYS}.value": []}
    status, data = ben.call(f"{ids.REVIEW_UNIT_MAP}.figure", view)
    assert "mass" in [t.get("name") for t in data["response"][ids.REVIEW_UNIT_MAP]["figure"]["data"]]
    status, data = ben.call(f"{ids.REVIEW_PATCH}.figure", view)
    names = [t.get("name") for t in data["response"][ids.REVIEW_PATCH]["figure"]["data"]]
    assert any(n and n.startswith("saved by ana: mass") for n in names), names
    assert "ana 1" in _text(data["response"][ids.REVIEW_PATCH_INFO])

    # ben labels the same region as calcification: both labels are kept, the session page shows both readers
    assert _label(ben, {**inputs, f"{ids.REVIEW_CONCEPT}.value": "calcification"})[0] == 200
    from explain.labels import current_labels

    db = app.server.extensions["conceptlens"].db()
    layer = inputs[f"{ids.REVIEW_LAYER}.value"]
    assert set(current_labels(db, layer, session=1, author="ana").values()) == {"mass"}
    assert set(current_labels(db, layer, session=1, author="ben").values()) == {"calcification"}
    # ben also draws the same region as mass: his labels stay (no higher IoU), the region is kept for Dice
    status, data = _label(ben, inputs)
    assert status == 200 and "Nothing relabeled" in _text(data["response"][ids.REVIEW_MESSAGE])
    assert set(current_labels(db, layer, session=1, author="ben").values()) == {"calcification"}
    status, data = ben.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": 1})
    assert status == 200, data
    counts = _text(data["response"][ids.SESS_COUNTS]["children"])
    assert "ana" in counts and "ben" in counts and "calcification" in counts
    agreement = _text(data["response"][ids.SESS_AGREEMENT]["children"])
    assert "ana · ben" in agreement and "1.000" in agreement  # the same mass region drawn by both: Dice 1
    links = _text(data["response"][ids.SESS_EXPORT]["children"])
    assert "report" in links.lower()
    hrefs = json.dumps(data["response"][ids.SESS_EXPORT]["children"])
    assert "/api/sessions/1/report.html" in hrefs and "/api/sessions/1/annotations.json" in hrefs


def test_comments_conflicting_edits_are_shown_and_nothing_is_overwritten(app, ws):
    from explain.labels import add_comment, comments, edit_comment
    from vis import ids

    settings, _private = ws
    _layer, _source, image, _unit, _box = labelable_patch(settings.workspace)
    ana, rita = _as(app, "ana"), _as(app, "rita")
    save = {f"{ids.SESS_COMMENT_SAVE}.n_clicks": 1, f"{ids.SESS_COMMENT_TEXT}.value": "margin looks spiculated",
            f"{ids.SESS_IMAGE}.value": image, f"{ids.SESSION}.data": 1, f"{ids.SESS_EDITING}.data": None}
    status, data = ana.call(f"{ids.SESS_MESSAGE}.children", save, changed=[f"{ids.SESS_COMMENT_SAVE}.n_clicks"])
    assert status == 200 and "Comment added" in _text(data["response"]), data
    db = app.server.extensions["conceptlens"].db()
    c = comments(db, 1, image)[0]
    # ana opens it for editing (version 1) … meanwhile she edits it elsewhere (another tab: version 2)
    edit_comment(db, c.id, text="margin spiculated, 12 mm", author="ana", expected_version=1, session=1)
    stale = {**save, f"{ids.SESS_COMMENT_TEXT}.value": "overwrite?", f"{ids.SESS_EDITING}.data":
             {"id": c.id, "version": 1}}
    status, data = ana.call(f"{ids.SESS_MESSAGE}.children", stale, changed=[f"{ids.SESS_COMMENT_SAVE}.n_clicks"])
    assert status == 200, data
    shown = _text(data["response"][ids.SESS_MESSAGE])
    assert "Changed by someone else" in shown and "ana" in shown and "reload" in shown, shown
    assert comments(db, 1, image)[0].text == "margin spiculated, 12 mm"  # nothing overwritten silently
    # another reader may not rewrite ana's words (403), and the comment list shows the comment to her too
    status, _ = rita.call(f"{ids.SESS_MESSAGE}.children", {**stale, f"{ids.SESS_EDITING}.data":
                                                           {"id": c.id, "version": 2}},
                          changed=[f"{ids.SESS_COMMENT_SAVE}.n_clicks"])
    assert status == 403
    status, data = rita.call(f"{ids.SESS_COMMENTS}.children", {f"{ids.SESS_IMAGE}.value": image,
                                                               f"{ids.SESSION}.data": 1})
    assert "12 mm" in _text(data["response"])
    add_comment(db, image=image, text="second", author="rita", session=1)
    assert [x.author for x in comments(db, 1, image)] == ["ana", "rita"]


def test_users_page_is_for_admins_only(app, ws):
    from store.accounts import get_user
    from vis import ids

    ana, root = _as(app, "ana"), _as(app, "root")
    db = app.server.extensions["conceptlens"].db()
    status, _ = ana.call(f"{ids.USERS_TABLE}.children", {f"{ids.USERS_VERSION}.data": 0})
    assert status == 403
    create = {f"{ids.USERS_CREATE}.n_clicks": 1, f"{ids.USERS_NAME}.value": "carla",
              f"{ids.USERS_DISPLAY}.value": "Carla B.", f"{ids.USERS_ROLE}.value": "researcher",
              f"{ids.USERS_PASSWORD}.value": "a-long-enough-password", f"{ids.USERS_VERSION}.data": 0}
    status, _ = ana.call(f"{ids.USERS_MESSAGE}.children", create, changed=[f"{ids.USERS_CREATE}.n_clicks"])
    assert status == 403 and get_user(db, "carla") is None
    status, data = root.call(f"{ids.USERS_MESSAGE}.children", create, changed=[f"{ids.USERS_CREATE}.n_clicks"])
    assert status == 200 and "User created" in _text(data["response"]), data
    assert get_user(db, "carla").role == "researcher"
    assert login_client(app.server.test_client(), "carla", "a-long-enough-password").status_code == 302
    # a bad name is a message, not an error page; nothing is created
    status, data = root.call(f"{ids.USERS_MESSAGE}.children", {**create, f"{ids.USERS_NAME}.value": "Bad Name!"},
                             changed=[f"{ids.USERS_CREATE}.n_clicks"])
    assert status == 200 and "Bad Name!" in _text(data["response"])
    change = {f"{ids.USERS_TARGET}.value": "carla", f"{ids.USERS_NEW_ROLE}.value": "radiologist",
              f"{ids.USERS_DEACTIVATE}.n_clicks": 1, f"{ids.USERS_SET_ROLE}.n_clicks": 1}
    status, _ = root.call(f"{ids.USERS_MESSAGE}.children", change, changed=[f"{ids.USERS_SET_ROLE}.n_clicks"])
    assert status == 200 and get_user(db, "carla").role == "radiologist"
    status, _ = root.call(f"{ids.USERS_MESSAGE}.children", change, changed=[f"{ids.USERS_DEACTIVATE}.n_clicks"])
    assert status == 200 and not get_user(db, "carla").active
    assert login_client(app.server.test_client(), "carla", "a-long-enough-password").status_code == 401
    status, data = root.call(f"{ids.USERS_TABLE}.children", {f"{ids.USERS_VERSION}.data": 3})
    assert "deactivated" in _text(data["response"])


def test_import_of_an_export_makes_a_new_session_for_admins_only(app, ws):
    from store.exchange import export_session
    from vis import ids

    settings, _private = ws
    ana, root = _as(app, "ana"), _as(app, "root")
    assert _label(ana, _label_inputs(settings, 1))[0] == 200
    db = app.server.extensions["conceptlens"].db()
    exported = export_session(db, 1)
    upload = "data:application/json;base64," + base64.b64encode(json.dumps(exported).encode()).decode()
    inputs = {f"{ids.SESS_IMPORT}.contents": upload, f"{ids.SESS_IMPORT}.filename": "session-1.json"}
    before = _dump(app)
    status, _ = ana.call(f"{ids.SESS_IMPORT_MESSAGE}.children", inputs)
    assert status == 403 and _dump(app) == before
    status, data = root.call(f"{ids.SESS_IMPORT_MESSAGE}.children", inputs)
    assert status == 200 and "Imported" in _text(data["response"]), data
    new_ids = [o["value"] for o in data["response"][ids.SESSION_PICKER]["options"]]
    assert len(new_ids) == len(before["review_session"]) + 1
    again = export_session(db, max(new_ids))
    assert again["unit_labels"] and again["regions"]

    def unnamed(d: dict) -> dict:
        return {**d, "session": {k: v for k, v in d["session"].items() if k != "name"}}

    assert unnamed(again) == unnamed(exported)  # round trip: the same annotations under a new session
    # a file that is not an export is a message; nothing is written
    bad = {**inputs, f"{ids.SESS_IMPORT}.contents": "data:application/json;base64," +
           base64.b64encode(b"{not json").decode()}
    mid = _dump(app)
    status, data = root.call(f"{ids.SESS_IMPORT_MESSAGE}.children", bad)
    assert status == 200 and "not a JSON file" in _text(data["response"])
    assert _dump(app) == mid


# -- review sessions managed in the app (admins) ---------------------------------------------------------------------------
def _refresh(dc: DashClient, shown=None, chosen=None):
    """The header picker's periodic refresh, as a tab sends it: (status, options, value or None when unchanged)."""
    from vis import ids

    status, data = dc.call(f"{ids.SESSION_PICKER}.options", {f"{ids.SESSIONS_INTERVAL}.n_intervals": 1,
                                                              f"{ids.SESSION_PICKER}.options": shown,
                                                              f"{ids.SESSION_PICKER}.value": chosen})
    if status != 200:
        return status, None, None
    out = data["response"][ids.SESSION_PICKER]
    return status, out.get("options"), out.get("value")


def _create(dc: DashClient, name, *, members=(), model=None, store="demo"):
    from vis import ids

    return dc.call(f"{ids.SESS_NEW_MESSAGE}.children", {
        f"{ids.SESS_NEW_CREATE}.n_clicks": 1, f"{ids.SESS_NEW_NAME}.value": name,
        f"{ids.SESS_NEW_MODEL}.value": model, f"{ids.SESS_NEW_STORE}.value": store,
        f"{ids.SESS_NEW_MEMBERS}.value": list(members)})


def _member_change(dc: DashClient, session, *, add=None, remove=None):
    """Click "Add" (with `add` chosen) or the "Remove" button of member `remove`, as the browser sends it."""
    from vis import ids

    pattern = json.dumps({"index": ["ALL"], "type": ids.MEMBER_REMOVE}, separators=(",", ":"))
    buttons = [{"id": ids.member_remove(n), "property": "n_clicks", "value": 1 if n == remove else 0}
               for n in ("ana", "ben", "rita", "root")]
    inputs = {f"{ids.SESS_ADD_MEMBER}.n_clicks": 1 if add else 0, f"{pattern}.n_clicks": buttons,
              f"{ids.SESS_ADD_USER}.value": add, f"{ids.SESSION}.data": session}
    key = (f"{ids.SESS_ADD_MEMBER}.n_clicks" if add else
           json.dumps(ids.member_remove(remove), sort_keys=True, separators=(",", ":")) + ".n_clicks")
    return dc.call(f"{ids.SESS_MEMBERS_MESSAGE}.children", inputs, changed=[key])


def test_admins_create_sessions_and_manage_members_in_the_app(app, ws):
    """Only admins create sessions and change members (every callback checks on the server: 403 and the database
    unchanged for anyone else, whatever the request); the new session is in the creator's picker at once and in
    its members' pickers at their next refresh, without a restart; a removed member loses it."""
    from store.accounts import audit_entries, get_session
    from vis import ids

    settings, private = ws
    ana, ben, rita, root = (_as(app, n) for n in ("ana", "ben", "rita", "root"))
    wb = app.server.extensions["conceptlens"]
    db = wb.db()
    before = _dump(app)

    # a radiologist and a researcher cannot create sessions, list candidates, add or remove members
    for who in (ana, rita):
        assert _create(who, "mine", members=["ana"])[0] == 403
        assert who.call(f"{ids.SESS_ADD_USER}.options", {f"{ids.SESSION}.data": 1})[0] == 403
        assert _member_change(who, 1, add="rita")[0] == 403
        assert _member_change(who, private, remove="ana")[0] == 403
        assert _member_change(who, 1, remove="ben")[0] == 403
    assert _dump(app) == before

    # the admin creates one: model and store default to the app's; the creator's picker lists it and opens it
    status, data = _create(root, "Double reading", members=["ana", "rita"], model="")
    assert status == 200 and "Session created" in _text(data["response"]), data
    picker = data["response"][ids.SESSION_PICKER]
    sid = picker["value"]
    assert {"label": "Double reading", "value": sid} in picker["options"]
    info = get_session(db, sid)
    assert (info.name, info.store, info.model_uri) == ("Double reading", "demo", wb.config.model)
    assert set(info.members) == {"ana", "rita", "root"}
    assert root.call(f"{ids.SESSION}.data", {f"{ids.SESSION_PICKER}.value": sid})[0] == 200

    # its members' pickers list it at their next refresh; ben's does not, and he cannot open it
    status, options, _value = _refresh(ana, shown=[{"label": "Workspace", "value": 1}], chosen=1)
    assert status == 200 and sid in [o["value"] for o in options]
    status, options, _value = _refresh(ben, shown=[{"label": "Workspace", "value": 1}], chosen=1)
    assert sid not in [o["value"] for o in (options or [])]
    assert ben.call(f"{ids.SESSION}.data", {f"{ids.SESSION_PICKER}.value": sid})[0] == 403

    # mistakes an admin can make are messages, and nothing is written
    mid = _dump(app)
    for name, kwargs, words in (("Double reading", {}, "exists already"), ("", {}, "Name needed"),
                                ("Other", {"store": "nope"}, "No such store"),
                                ("Other", {"store": "../stores/demo"}, "Not a store name")):
        status, data = _create(root, name, members=["ana"], **kwargs)
        assert status == 200 and words in _text(data["response"]), (name, kwargs, data)
        assert ids.SESSION_PICKER not in data["response"]
    assert _dump(app) == mid
    # forged members (unknown, deactivated, not a list) are 400
    from store.accounts import create_user, get_user, update_user

    create_user(db, name="gone", role="researcher", actor="tests")
    update_user(db, "gone", expected_version=get_user(db, "gone").version, active=False, actor="tests")
    mid = _dump(app)
    for members in (["ghost"], ["gone"], "ana", [{"name": "ana"}]):
        status, data = _create(root, "Forged", members=members)
        assert status == 400, (members, data)
    assert _dump(app) == mid

    # adding ben: the members table and ben's picker show it; the candidates no longer offer him
    status, data = root.call(f"{ids.SESS_ADD_USER}.options", {f"{ids.SESSION}.data": sid})
    assert status == 200 and [o["value"] for o in data["response"][ids.SESS_ADD_USER]["options"]] == ["ben"]
    status, data = _member_change(root, sid, add="ben")
    assert status == 200 and "Member added" in _text(data["response"]), data
    assert "ben" in get_session(db, sid).members
    status, data = root.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": sid})
    members_table = json.dumps(data["response"][ids.SESS_MEMBERS]["children"])
    assert all(n in members_table for n in ("ana", "ben", "rita", "root")) and ids.MEMBER_REMOVE in members_table
    status, options, _value = _refresh(ben, shown=[{"label": "Workspace", "value": 1}], chosen=1)
    assert sid in [o["value"] for o in options]
    assert ben.call(f"{ids.SESSION}.data", {f"{ids.SESSION_PICKER}.value": sid})[0] == 200
    # a reader sees the members but no remove buttons
    status, data = ana.call(f"{ids.SESS_TITLE}.children", {f"{ids.SESSION}.data": sid})
    assert status == 200 and ids.MEMBER_REMOVE not in json.dumps(data["response"][ids.SESS_MEMBERS]["children"])

    # removing ana: she can no longer open it, and her picker moves off it at its next refresh
    status, data = _member_change(root, sid, remove="ana")
    assert status == 200 and "Member removed" in _text(data["response"]), data
    assert "ana" not in get_session(db, sid).members
    assert ana.call(f"{ids.SESSION}.data", {f"{ids.SESSION_PICKER}.value": sid})[0] == 403
    status, options, value = _refresh(ana, shown=[{"label": "Double reading", "value": sid}], chosen=sid)
    assert sid not in [o["value"] for o in options] and value == 1
    # removing someone who is not a member, or adding a deactivated user, is a forged request: 400, no change
    mid = _dump(app)
    assert _member_change(root, sid, remove="ana")[0] == 400
    assert _member_change(root, sid, add="gone")[0] == 400
    assert _dump(app) == mid
    actions = [(e["actor"], e["action"]) for e in audit_entries(db, session_id=sid)]
    assert ("root", "session.create") in actions and ("root", "session.add_member") in actions
    assert ("root", "session.remove_member") in actions


# -- probe versions: one store, several sessions ----------------------------------------------------------------------------
def _fit_two_versions(settings):
    """Two real versions of the mass probe at the deepest layer (image marks: 10, then 20 of each class)."""
    import numpy as np

    from explain.probes import FeatureCache, ProbeAnnotations, retrain
    from store.activations import open_store

    store = open_store(settings.store_url("demo"), read_only=False)
    labels = np.asarray(store.labels())
    layer = store.layers[-1]
    runs = []
    for n in (10, 20):
        marks = [(int(i), True) for i in np.flatnonzero(labels == 1)[:n]] + \
                [(int(i), False) for i in np.flatnonzero(labels == 0)[:n]]
        res = retrain(store, ProbeAnnotations("mass", marks=marks), settings=settings, session="tests",
                      layers=[layer], cache=FeatureCache(store), store_name="demo")
        runs.append(res[0].run_id)
    return f"mass@{layer}", runs


def test_a_probe_rollback_is_recorded_in_its_session_and_the_page_says_what_the_store_serves(app, ws):
    """The store holds one current version per probe, shared by every session of the store: a rollback made in
    ana's private session is checked (ben, not a member: 403, nothing changes) and recorded there, not in the
    workspace session; each session's Probes page says which version the store serves and which one it chose."""
    from explain.labels import recorded_probe_versions
    from vis import ids

    settings, private = ws
    probe, (v1, v2) = _fit_two_versions(settings)
    ana, ben = _as(app, "ana"), _as(app, "ben")
    wb = app.server.extensions["conceptlens"]
    concept, layer = probe.split("@")
    db = wb.db()

    def store_run():
        return wb.store().probe(concept, layer).run_id

    def rollback(dc, run, session):
        return dc.call(f"{ids.PROBES_MESSAGE}.children", {f"{ids.PROBES_ROLLBACK}.n_clicks": 1,
                                                      f"{ids.PROBES_SELECT}.value": probe,
                                                      f"{ids.PROBES_ROLLBACK_TO}.value": run,
                                                      f"{ids.SESSION}.data": session})

    def view(dc, session):
        status, data = dc.call(f"{ids.PROBES_TABLE}.children", {f"{ids.PROBES_SELECT}.value": probe,
                                                                f"{ids.PROBES_VERSION}.data": None,
                                                                f"{ids.SESSION}.data": session})
        assert status == 200, data
        return " ".join(_text(data["response"][ids.PROBES_TABLE]["children"]).split())

    assert store_run() == v2
    before = _dump(app)
    status, _ = rollback(ben, v1, private)  # a forged session: ben is not a member
    assert status == 403 and store_run() == v2 and _dump(app) == before
    status, _ = ben.call(f"{ids.PROBES_TABLE}.children", {f"{ids.PROBES_SELECT}.value": probe,
                                                           f"{ids.SESSION}.data": private})
    assert status == 403  # nor may he read what that session chose
    status, _ = rollback(ana, "not-a-run", private)
    assert status == 400 and store_run() == v2 and _dump(app) == before

    status, data = rollback(ana, v1, private)
    assert status == 200 and "Rolled back" in _text(data["response"]), data
    assert store_run() == v1
    mine = [(p.run_id, p.active, p.author) for p in recorded_probe_versions(db, session=private)]
    assert mine == [(v1, True, "ana")]
    assert recorded_probe_versions(db, session=1) == []  # the other session recorded nothing…
    shown = view(ben, 1)  # …but is told which version the store now serves
    assert f"Active for the store: v1 · {v1[:8]}" in shown and "every review session" in shown
    assert "No version was fitted or rolled back in this session yet" in shown
    assert f"This session's active version (by ana) is the store's" in view(ana, private)

    # ben rolls forward in the workspace session: recorded there; ana's page says the store moved on
    status, _ = rollback(ben, v2, 1)
    assert status == 200 and store_run() == v2
    assert [(p.run_id, p.active) for p in recorded_probe_versions(db, session=1)] == [(v2, True)]
    assert [(p.run_id, p.active) for p in recorded_probe_versions(db, session=private)] == [(v1, True)]
    shown = view(ana, private)
    assert f"Active for the store: v2 · {v2[:8]}" in shown
    assert f"This session: v1 · {v1[:8]}" in shown and "roll back to v1" in shown
    # rolling back to a version already recorded in the session re-activates it (no second row)
    assert rollback(ana, v1, private)[0] == 200
    assert [(p.run_id, p.active) for p in recorded_probe_versions(db, session=private)] == [(v1, True)]
