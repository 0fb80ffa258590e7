"""JSON export/import of a review session: exact round trip on SQLite and PostgreSQL, no password hashes, and a bad
document refused with the field named and nothing written."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from helpers_dissection import build_real_store, fresh_postgres_database

from explain.labels import (
    add_comment,
    apply_ious,
    delete_comment,
    edit_comment,
    label_region,
    mark_image,
    name_unit,
    record_probe_version,
    undo,
)
from explain.regions import Polygon, Rect
from store.accounts import create_session, create_user
from store.annotations import dump, open_database
from store.exchange import FORMAT, ExchangeError, export_session, import_session

L4 = "features.4"


@pytest.fixture(scope="module")
def store(real_dicoms, tmp_path_factory):
    return build_real_store(tmp_path_factory.mktemp("exchange"), real_dicoms)


def _fill(db, store) -> int:
    """A session with everything a review produces: labels of two readers, an undo, marks, comments, probes."""
    create_user(db, name="ana", role="radiologist", password="ana-password", actor="admin")
    create_user(db, name="rob", role="researcher", password="rob-password", actor="admin")
    sid = create_session(db, name="March review", model_uri="models:/demo/3", store="demo", members=["ana", "rob"],
                         actor="admin").id
    label_region(db, store, layer=L4, image=0, region=[Rect(8, 8, 40, 40)], concept="mass", author="ana",
                 session=sid, request_id="r-1")
    r = apply_ious(db, store, layer=L4, image=3, concept="calcification", author="ana", specs=[Rect(0, 0, 20, 20)],
                   ious=np.array([0.45, 0.35, 0.6, 0.1, 0.19, 0.0], np.float32), session=sid)
    apply_ious(db, store, layer=L4, image=3, concept="mass", author="rob",
               specs=[Polygon([(4, 4), (50, 6), (30, 44)])], ious=np.array([0.3, 0, 0.7, 0, 0, 0.25], np.float32),
               session=sid)
    undo(db, r.action_id, author="ana", session=sid)
    name_unit(db, store, layer=L4, unit=4, concept="skin", author="rob", session=sid)
    mark_image(db, store, image=1, concept="mass", present=True, author="ana", session=sid)
    c = add_comment(db, image=store.image_ids[0], text="spiculated? ünïcödé ✓", author="ana", session=sid)
    edit_comment(db, c.id, text="spiculated margin", author="ana", expected_version=c.version, session=sid)
    d = add_comment(db, image=store.image_ids[1], text="film artefact", author="rob", session=sid)
    delete_comment(db, d.id, author="rob", expected_version=d.version, session=sid)
    record_probe_version(db, session=sid, concept="mass", layer=L4, run_id="abc123", author="ana",
                         metrics={"auroc": 0.91, "n": 12})
    return sid


def _without_name(doc):
    doc = copy.deepcopy(doc)
    doc["session"].pop("name")
    return doc


def _round_trip(db, store):
    sid = _fill(db, store)
    first = export_session(db, sid)
    assert first["format"] == FORMAT
    assert json.loads(json.dumps(first)) == first  # JSON-ready
    text = json.dumps(first)
    assert "$argon2" not in text and "password" not in text  # hashes never leave the database
    assert {len(first[k]) for k in ("regions", "actions", "unit_labels", "comments")} and len(first["actions"]) == 5
    info = import_session(db, first, actor="admin")
    assert info.id != sid and info.name == "March review (import 2)" and info.members == ("ana", "rob")
    second = export_session(db, info.id)
    assert _without_name(second) == _without_name(first)
    # and through JSON text into another database, where the users do not exist yet
    return first, text


def test_round_trip_is_exact_and_imports_into_another_database(tmp_path, store):
    db = open_database(f"sqlite:///{tmp_path / 'a.db'}")
    first, text = _round_trip(db, store)
    other = open_database(f"sqlite:///{tmp_path / 'b.db'}")
    info = import_session(other, text, actor="admin", name="Copied")
    assert info.name == "Copied" and info.id == 2
    assert _without_name(export_session(other, info.id)) == _without_name(first)
    users = {u["name"]: u for u in dump(other)["user_account"]}
    assert users["ana"]["password_hash"] is None and users["rob"]["role"] == "researcher"  # created, no password
    from explain.labels import current_labels

    assert current_labels(other, L4, session=info.id) == current_labels(db, L4, session=1 + 1)


@pytest.mark.services
def test_round_trip_is_exact_on_postgresql(postgres_url, store, tmp_path):
    with fresh_postgres_database(postgres_url) as url:
        db = open_database(url)
        first, text = _round_trip(db, store)
        lite = open_database(f"sqlite:///{tmp_path / 'c.db'}")  # PostgreSQL → SQLite keeps every value too
        info = import_session(lite, text, actor="admin")
        assert _without_name(export_session(lite, info.id)) == _without_name(first)
        db.dispose()


def test_malformed_documents_are_refused_naming_the_field_and_nothing_is_written(tmp_path, store):
    db = open_database(f"sqlite:///{tmp_path / 'a.db'}")
    sid = _fill(db, store)
    good = export_session(db, sid)
    before = dump(db)

    def broken(path, value):
        doc = copy.deepcopy(good)
        where = doc
        for key in path[:-1]:
            where = where[key]
        if value is KeyError:
            del where[path[-1]]
        else:
            where[path[-1]] = value
        return doc

    cases = [
        ("{not json", "document: not JSON"),
        (b"\xff\xfe", "document: not UTF-8"),
        ([], "document: expected an object"),
        (broken(["format"], "other/9"), "format: expected 'conceptlens-annotations/1'"),
        (broken(["regions", 0, "concept"], "tumour"), r"regions\[0\].concept: concept 'tumour' is not in concepts"),
        (broken(["regions", 0, "spec"], [{"type": "blob"}]), r"regions\[0\].spec: not region shapes"),
        (broken(["regions", 0, "area"], -1), r"regions\[0\].area: expected an integer"),
        (broken(["actions", 1, "undone_by"], 99), r"actions\[1\].undone_by: expected an integer in \[1, 5\]"),
        (broken(["actions", 0, "author"], "mallory"), r"actions\[0\].author: 'mallory' is not in users"),
        (broken(["unit_labels", 0, "iou"], float("nan")), r"unit_labels\[0\].iou: expected a finite number"),
        (broken(["users", 0, "role"], "root"), r"users\[0\].role: one of"),
        (broken(["users", 0, "password_hash"], "$argon2id$x"), r"users\[0\]: unexpected field\(s\) password_hash"),
        (broken(["comments", 0, "created_at"], "yesterday"), r"comments\[0\].created_at: expected an ISO 8601"),
        (broken(["marks"], KeyError), "document: missing marks"),
        (broken(["changes", 0, "after", "action"], 0), r"changes\[0\].after.action: expected an integer"),
    ]
    for doc, match in cases:
        with pytest.raises(ExchangeError, match=match):
            import_session(db, doc, actor="admin")
    assert dump(db) == before
    assert isinstance(ExchangeError("x"), ValueError)
