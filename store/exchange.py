"""Annotations of one review session to and from JSON, round-trip exact.

    >>> from store.exchange import export_session, import_session
    >>> data = export_session(db, 3)                         # JSON-ready dict, format "conceptlens-annotations/1"
    >>> json.dump(data, open("march.json", "w"))
    >>> info = import_session(other_db, data, actor="admin")  # a new session (SessionInfo) holding the same rows

The document (every list in a stable order; rows refer to each other by session-local `ref` numbers, never by
database ids, so it imports into any database):

    format        "conceptlens-annotations/1"
    session       name, model_uri, store, created_by, created_at, archived_at
    users         [{name, display_name, role}] — the members and every author; never password hashes
    members       [name]
    concepts      [{id, name, description, builtin, position}] — every concept the rows use
    regions       [{ref, image_id, concept, spec, height, width, area, author, created_at, deleted_at, version}]
    actions       [{ref, kind, layer, concept, image_id, region, rule, author, created_at, n_changed, undoes,
                    undone_by, request_id}]          (region / undoes / undone_by: refs)
    changes       [{action, layer, unit, before, after}]   (snapshots with region / action refs)
    unit_labels   [{author, layer, unit, concept, iou, created_at, image_id, region, action, version}]
    marks         [{image_id, concept, present, author, created_at, version}]
    comments      [{ref, image_id, author, text, created_at, updated_at, deleted_at, updated_by, version}]
    probe_versions [{concept, layer, run_id, author, created_at, metrics, active, version}]

Times are ISO 8601 in UTC. The audit log is not exported (it is the database's own history); an import appends
one `session.import` entry. Round trip: `export_session(import_session(export_session(s)))` equals the first
export except the session's name (and its database id); users that already exist in the target keep their role
there. `import_session` validates the whole document first (ExchangeError naming the first bad field, e.g.
`regions[3].concept`) and then writes everything in one transaction: on any error nothing is stored. The session's
name: `name`, else the exported one, else (taken) the exported one with " (import N)".
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any

from sqlalchemy import select

from .accounts import SessionInfo, _session_info, audit
from .annotations import (
    ROLES,
    Comment,
    Concept,
    Database,
    ImageMark,
    LabelAction,
    LabelChange,
    ProbeVersion,
    Region,
    ReviewSession,
    SessionMember,
    UnitLabel,
    User,
)
from .errors import AccountError, StoreError

__all__ = ["FORMAT", "ExchangeError", "export_session", "import_session"]

FORMAT = "conceptlens-annotations/1"


class ExchangeError(StoreError, ValueError):
    """An annotations document that cannot be imported; the message names the field (`regions[3].concept`)."""


def _t(value) -> str | None:
    """A stored time → ISO 8601 in UTC (SQLite hands back naive UTC times, PostgreSQL the server's zone)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat()


# -- export ------------------------------------------------------------------------------------------------------------
def export_session(db: Database, session_id: int) -> dict:
    """Every annotation of a session as a JSON-ready dict (see the module docstring); AccountError for an unknown
    session. Rights are the caller's (require_member)."""
    with db.read() as s:
        rs = s.get(ReviewSession, session_id) if isinstance(session_id, int) and not isinstance(session_id, bool) \
            else None
        if rs is None:
            raise AccountError(f"no review session {session_id!r}")
        sid = rs.id
        regions = s.scalars(select(Region).where(Region.session_id == sid).order_by(Region.id)).all()
        actions = s.scalars(select(LabelAction).where(LabelAction.session_id == sid).order_by(LabelAction.id)).all()
        rref = {r.id: i + 1 for i, r in enumerate(regions)}
        aref = {a.id: i + 1 for i, a in enumerate(actions)}

        def ref(table: dict, value, what: str):
            if value is None:
                return None
            if value not in table:
                raise StoreError(f"session {sid}: {what} {value} belongs to another session; cannot export")
            return table[value]

        def snap(d):
            if d is None:
                return None
            out = {k: v for k, v in d.items() if k not in ("region_id", "action_id")}
            out["region"] = ref(rref, d.get("region_id"), "region")
            out["action"] = ref(aref, d.get("action_id"), "action")
            return out

        changes = s.scalars(select(LabelChange).where(LabelChange.session_id == sid).order_by(LabelChange.id)).all()
        labels = s.scalars(select(UnitLabel).where(UnitLabel.session_id == sid)
                           .order_by(UnitLabel.author, UnitLabel.layer, UnitLabel.unit)).all()
        marks = s.scalars(select(ImageMark).where(ImageMark.session_id == sid)
                          .order_by(ImageMark.image_id, ImageMark.concept)).all()
        notes = s.scalars(select(Comment).where(Comment.session_id == sid).order_by(Comment.id)).all()
        probes = s.scalars(select(ProbeVersion).where(ProbeVersion.session_id == sid).order_by(ProbeVersion.id)).all()
        members = s.scalars(select(User.name).join(SessionMember, SessionMember.user_id == User.id)
                            .where(SessionMember.session_id == sid).order_by(User.name)).all()
        names = set(members) | {x.author for x in (*regions, *actions, *labels, *marks, *notes, *probes)}
        names |= {c.updated_by for c in notes if c.updated_by}
        users = s.scalars(select(User).where(User.name.in_(sorted(names))).order_by(User.name)).all()
        used = {x.concept for x in (*regions, *actions, *labels, *marks, *probes) if x.concept}
        concepts = s.scalars(select(Concept).where(Concept.id.in_(sorted(used)))
                             .order_by(Concept.position, Concept.id)).all()
        return {
            "format": FORMAT,
            "session": {"name": rs.name, "model_uri": rs.model_uri, "store": rs.store, "created_by": rs.created_by,
                        "created_at": _t(rs.created_at), "archived_at": _t(rs.archived_at)},
            "users": [{"name": u.name, "display_name": u.display_name, "role": u.role} for u in users],
            "members": list(members),
            "concepts": [{"id": c.id, "name": c.name, "description": c.description, "builtin": bool(c.builtin),
                          "position": c.position} for c in concepts],
            "regions": [{"ref": rref[r.id], "image_id": r.image_id, "concept": r.concept, "spec": r.spec,
                         "height": r.height, "width": r.width, "area": r.area, "author": r.author,
                         "created_at": _t(r.created_at), "deleted_at": _t(r.deleted_at), "version": r.version}
                        for r in regions],
            "actions": [{"ref": aref[a.id], "kind": a.kind, "layer": a.layer, "concept": a.concept,
                         "image_id": a.image_id, "region": ref(rref, a.region_id, "region"), "rule": a.rule,
                         "author": a.author, "created_at": _t(a.created_at), "n_changed": a.n_changed,
                         "undoes": ref(aref, a.undoes, "action"), "undone_by": ref(aref, a.undone_by, "action"),
                         "request_id": a.request_id} for a in actions],
            "changes": [{"action": ref(aref, c.action_id, "action"), "layer": c.layer, "unit": c.unit,
                         "before": snap(c.before), "after": snap(c.after)} for c in changes],
            "unit_labels": [{"author": x.author, "layer": x.layer, "unit": x.unit, "concept": x.concept,
                             "iou": x.iou, "created_at": _t(x.created_at), "image_id": x.image_id,
                             "region": ref(rref, x.region_id, "region"), "action": ref(aref, x.action_id, "action"),
                             "version": x.version} for x in labels],
            "marks": [{"image_id": m.image_id, "concept": m.concept, "present": bool(m.present), "author": m.author,
                       "created_at": _t(m.created_at), "version": m.version} for m in marks],
            "comments": [{"ref": i + 1, "image_id": c.image_id, "author": c.author, "text": c.text,
                          "created_at": _t(c.created_at), "updated_at": _t(c.updated_at),
                          "deleted_at": _t(c.deleted_at), "updated_by": c.updated_by, "version": c.version}
                         for i, c in enumerate(notes)],
            "probe_versions": [{"concept": p.concept, "layer": p.layer, "run_id": p.run_id, "author": p.author,
                                "created_at": _t(p.created_at), "metrics": p.metrics, "active": bool(p.active),
                                "version": p.version} for p in probes],
        }


# -- validation --------------------------------------------------------------------------------------------------------
class _V:
    """Field checks that name the path of what is wrong."""

    @staticmethod
    def fail(path: str, why: str):
        raise ExchangeError(f"{path}: {why}")

    def obj(self, value, path: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {type(value).__name__}")
        missing = keys - set(value)
        if missing:
            self.fail(path, f"missing {', '.join(sorted(missing))}")
        extra = set(value) - keys - set(optional)
        if extra:
            self.fail(path, f"unexpected field(s) {', '.join(sorted(extra))}")
        return value

    def lst(self, value, path: str, max_len: int = 1_000_000) -> list:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
        if len(value) > max_len:
            self.fail(path, f"more than {max_len} entries")
        return value

    def text(self, value, path: str, max_len: int, *, null: bool = False, empty: bool = False) -> str | None:
        if value is None and null:
            return None
        if not isinstance(value, str) or len(value) > max_len or (not empty and not value):
            self.fail(path, f"expected {'non-empty ' if not empty else ''}text of at most {max_len} characters"
                      + (" or null" if null else ""))
        return value

    def int_(self, value, path: str, lo: int = 0, hi: int = 2**62, *, null: bool = False) -> int | None:
        if value is None and null:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"expected an integer in [{lo}, {hi}]" + (" or null" if null else ""))
        return value

    def num(self, value, path: str, *, null: bool = False) -> float | None:
        if value is None and null:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                value in (float("inf"), float("-inf")):
            self.fail(path, "expected a finite number" + (" or null" if null else ""))
        return float(value)

    def bool_(self, value, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, "expected true or false")
        return value

    def time(self, value, path: str, *, null: bool = False) -> _dt.datetime | None:
        if value is None and null:
            return None
        if not isinstance(value, str) or len(value) > 40:
            self.fail(path, "expected an ISO 8601 time" + (" or null" if null else ""))
        try:
            t = _dt.datetime.fromisoformat(value)
        except ValueError:
            self.fail(path, f"expected an ISO 8601 time, got {value[:40]!r}")
        return t if t.tzinfo is not None else t.replace(tzinfo=_dt.timezone.utc)

    def json_(self, value, path: str, kind: type, max_chars: int = 1_000_000):
        if not isinstance(value, kind):
            self.fail(path, f"expected a JSON {'object' if kind is dict else 'list'}")
        try:
            if len(json.dumps(value, allow_nan=False)) > max_chars:
                self.fail(path, f"larger than {max_chars} characters")
        except ValueError:
            self.fail(path, "not JSON (NaN or infinity)")
        return value


def _validate(data) -> dict:
    """Check the whole document; returns it with references resolved to ordinal positions (no database access)."""
    v = _V()
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            v.fail("document", "not UTF-8 text")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError as e:
            v.fail("document", f"not JSON ({e})")
    sections = {"format", "session", "users", "members", "concepts", "regions", "actions", "changes", "unit_labels",
                "marks", "comments", "probe_versions"}
    v.obj(data, "document", sections)
    if data["format"] != FORMAT:
        v.fail("format", f"expected {FORMAT!r}, got {str(data['format'])[:60]!r}")
    sess = v.obj(data["session"], "session", {"name", "model_uri", "store", "created_by", "created_at",
                                              "archived_at"})
    v.text(sess["name"], "session.name", 200)
    v.text(sess["model_uri"], "session.model_uri", 500, null=True)
    v.text(sess["store"], "session.store", 1000, null=True)
    v.text(sess["created_by"], "session.created_by", 200, null=True)
    v.time(sess["created_at"], "session.created_at")
    v.time(sess["archived_at"], "session.archived_at", null=True)

    users = {}
    for i, u in enumerate(v.lst(data["users"], "users")):
        p = f"users[{i}]"
        v.obj(u, p, {"name", "display_name", "role"})
        v.text(u["name"], f"{p}.name", 200)
        v.text(u["display_name"], f"{p}.display_name", 200, empty=True)
        if u["role"] not in ROLES:
            v.fail(f"{p}.role", f"one of {', '.join(ROLES)}")
        if u["name"] in users:
            v.fail(f"{p}.name", f"{u['name']!r} listed twice")
        users[u["name"]] = u

    def author(value, path):
        v.text(value, path, 200)
        if value not in users:
            v.fail(path, f"{value!r} is not in users")
        return value

    for i, m in enumerate(v.lst(data["members"], "members")):
        author(m, f"members[{i}]")
    if len(set(data["members"])) != len(data["members"]):
        v.fail("members", "a name is listed twice")

    concepts = set()
    for i, c in enumerate(v.lst(data["concepts"], "concepts")):
        p = f"concepts[{i}]"
        v.obj(c, p, {"id", "name", "description", "builtin", "position"})
        if not isinstance(c["id"], str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", c["id"]):
            v.fail(f"{p}.id", "a snake-case concept id")
        v.text(c["name"], f"{p}.name", 200)
        v.text(c["description"], f"{p}.description", 1000, empty=True)
        v.bool_(c["builtin"], f"{p}.builtin")
        v.int_(c["position"], f"{p}.position", -2**31, 2**31)
        concepts.add(c["id"])

    def concept(value, path, *, null=False):
        if value is None and null:
            return None
        if value not in concepts:
            v.fail(path, f"concept {str(value)[:64]!r} is not in concepts")
        return value

    def refs(rows, path):
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or r.get("ref") != i + 1:
                v.fail(f"{path}[{i}].ref", f"expected {i + 1} (refs number the rows in order)")

    regions = v.lst(data["regions"], "regions")
    refs(regions, "regions")
    for i, r in enumerate(regions):
        p = f"regions[{i}]"
        v.obj(r, p, {"ref", "image_id", "concept", "spec", "height", "width", "area", "author", "created_at",
                     "deleted_at", "version"})
        v.text(r["image_id"], f"{p}.image_id", 128)
        concept(r["concept"], f"{p}.concept")
        v.json_(r["spec"], f"{p}.spec", list)
        _check_spec(r["spec"], f"{p}.spec", r, v)
        v.int_(r["height"], f"{p}.height", 1, 65536)
        v.int_(r["width"], f"{p}.width", 1, 65536)
        v.int_(r["area"], f"{p}.area", 0, r["height"] * r["width"])
        author(r["author"], f"{p}.author")
        v.time(r["created_at"], f"{p}.created_at")
        v.time(r["deleted_at"], f"{p}.deleted_at", null=True)
        v.int_(r["version"], f"{p}.version", 1)

    n_reg = len(regions)
    actions = v.lst(data["actions"], "actions")
    refs(actions, "actions")
    n_act = len(actions)
    keys = set()
    for i, a in enumerate(actions):
        p = f"actions[{i}]"
        v.obj(a, p, {"ref", "kind", "layer", "concept", "image_id", "region", "rule", "author", "created_at",
                     "n_changed", "undoes", "undone_by", "request_id"})
        if a["kind"] not in ("region", "manual", "undo"):
            v.fail(f"{p}.kind", "one of region, manual, undo")
        v.text(a["layer"], f"{p}.layer", 200)
        concept(a["concept"], f"{p}.concept", null=True)
        v.text(a["image_id"], f"{p}.image_id", 128, null=True)
        v.int_(a["region"], f"{p}.region", 1, n_reg, null=True)
        v.json_(a["rule"], f"{p}.rule", dict, 10000)
        author(a["author"], f"{p}.author")
        v.time(a["created_at"], f"{p}.created_at")
        v.int_(a["n_changed"], f"{p}.n_changed", 0)
        v.int_(a["undoes"], f"{p}.undoes", 1, n_act, null=True)
        v.int_(a["undone_by"], f"{p}.undone_by", 1, n_act, null=True)
        if a["request_id"] is not None:
            v.text(a["request_id"], f"{p}.request_id", 128)
            key = (a["author"], a["request_id"])
            if key in keys:
                v.fail(f"{p}.request_id", "used twice by the same author")
            keys.add(key)

    def snapshot(d, path):
        if d is None:
            return
        v.obj(d, path, {"concept", "iou", "author", "created_at", "image_id", "region", "action", "version"})
        concept(d["concept"], f"{path}.concept")
        v.num(d["iou"], f"{path}.iou", null=True)
        v.text(d["author"], f"{path}.author", 200)
        v.time(d["created_at"], f"{path}.created_at")
        v.text(d["image_id"], f"{path}.image_id", 128, null=True)
        v.int_(d["region"], f"{path}.region", 1, n_reg, null=True)
        v.int_(d["action"], f"{path}.action", 1, n_act)
        v.int_(d["version"], f"{path}.version", 0)

    for i, c in enumerate(v.lst(data["changes"], "changes")):
        p = f"changes[{i}]"
        v.obj(c, p, {"action", "layer", "unit", "before", "after"})
        v.int_(c["action"], f"{p}.action", 1, n_act)
        v.text(c["layer"], f"{p}.layer", 200)
        v.int_(c["unit"], f"{p}.unit", 0, 2**31)
        snapshot(c["before"], f"{p}.before")
        snapshot(c["after"], f"{p}.after")

    seen = set()
    for i, x in enumerate(v.lst(data["unit_labels"], "unit_labels")):
        p = f"unit_labels[{i}]"
        v.obj(x, p, {"author", "layer", "unit", "concept", "iou", "created_at", "image_id", "region", "action",
                     "version"})
        author(x["author"], f"{p}.author")
        v.text(x["layer"], f"{p}.layer", 200)
        v.int_(x["unit"], f"{p}.unit", 0, 2**31)
        concept(x["concept"], f"{p}.concept")
        v.num(x["iou"], f"{p}.iou", null=True)
        v.time(x["created_at"], f"{p}.created_at")
        v.text(x["image_id"], f"{p}.image_id", 128, null=True)
        v.int_(x["region"], f"{p}.region", 1, n_reg, null=True)
        v.int_(x["action"], f"{p}.action", 1, n_act)
        v.int_(x["version"], f"{p}.version", 1)
        key = (x["author"], x["layer"], x["unit"])
        if key in seen:
            v.fail(p, f"a second label of unit {x['unit']} of {x['layer']!r} by {x['author']!r}")
        seen.add(key)

    seen = set()
    for i, m in enumerate(v.lst(data["marks"], "marks")):
        p = f"marks[{i}]"
        v.obj(m, p, {"image_id", "concept", "present", "author", "created_at", "version"})
        v.text(m["image_id"], f"{p}.image_id", 128)
        concept(m["concept"], f"{p}.concept")
        v.bool_(m["present"], f"{p}.present")
        author(m["author"], f"{p}.author")
        v.time(m["created_at"], f"{p}.created_at")
        v.int_(m["version"], f"{p}.version", 1)
        if (m["image_id"], m["concept"]) in seen:
            v.fail(p, f"a second mark of {m['concept']!r} on {m['image_id']!r}")
        seen.add((m["image_id"], m["concept"]))

    notes = v.lst(data["comments"], "comments")
    refs(notes, "comments")
    for i, c in enumerate(notes):
        p = f"comments[{i}]"
        v.obj(c, p, {"ref", "image_id", "author", "text", "created_at", "updated_at", "deleted_at", "updated_by",
                     "version"})
        v.text(c["image_id"], f"{p}.image_id", 128)
        author(c["author"], f"{p}.author")
        v.text(c["text"], f"{p}.text", 10000)
        v.time(c["created_at"], f"{p}.created_at")
        v.time(c["updated_at"], f"{p}.updated_at", null=True)
        v.time(c["deleted_at"], f"{p}.deleted_at", null=True)
        if c["updated_by"] is not None:
            author(c["updated_by"], f"{p}.updated_by")
        v.int_(c["version"], f"{p}.version", 1)

    for i, pv in enumerate(v.lst(data["probe_versions"], "probe_versions")):
        p = f"probe_versions[{i}]"
        v.obj(pv, p, {"concept", "layer", "run_id", "author", "created_at", "metrics", "active", "version"})
        concept(pv["concept"], f"{p}.concept")
        v.text(pv["layer"], f"{p}.layer", 200)
        if not isinstance(pv["run_id"], str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", pv["run_id"]):
            v.fail(f"{p}.run_id", "an mlflow run id")
        author(pv["author"], f"{p}.author")
        v.time(pv["created_at"], f"{p}.created_at")
        v.json_(pv["metrics"], f"{p}.metrics", dict, 100000)
        v.bool_(pv["active"], f"{p}.active")
        v.int_(pv["version"], f"{p}.version", 1)
    return data


def _check_spec(spec, path: str, region: dict, v: _V) -> None:
    """A region's shapes must parse as explain.regions JSON (what the app will read back)."""
    try:
        from explain.regions import regions_from_json  # the one parser of region JSON (explain builds on store)
    except ImportError:  # store used without explain: the JSON checks above are all we can do
        return
    try:
        regions_from_json(spec)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad document, named here
        v.fail(path, f"not region shapes ({str(e)[:200]})")


# -- import ------------------------------------------------------------------------------------------------------------
def _free_name(s, wanted: str) -> str:
    taken = set(s.scalars(select(ReviewSession.name).where(ReviewSession.name.like(wanted[:180] + "%"))).all())
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted[:180]} (import {n})" in taken:
        n += 1
    return f"{wanted[:180]} (import {n})"


def import_session(db: Database, data: Any, *, actor, name: str | None = None) -> SessionInfo:
    """A new session holding the document's annotations (validated first; one transaction). `data`: the dict, or
    its JSON text. Users that do not exist are created without password (the exported role); concepts that do not
    exist are added to the vocabulary. ExchangeError for a bad document, AccountError for a taken `name`."""
    data = _validate(data)
    actor_name = actor.name if hasattr(actor, "name") else actor
    if not isinstance(actor_name, str) or not actor_name:
        raise AccountError(f"actor must be a user name, got {actor!r}")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 200):
        raise ExchangeError(f"name: expected non-empty text of at most 200 characters, got {name!r}")
    v = _V()
    sess = data["session"]
    with db.write() as s:
        if name is not None:
            if s.scalar(select(ReviewSession.id).where(ReviewSession.name == name.strip())) is not None:
                raise AccountError(f"a session named {name.strip()!r} exists already")
            final = name.strip()
        else:
            final = _free_name(s, sess["name"])
        created_users = []
        by_name = {}
        for u in data["users"]:
            row = s.scalar(select(User).where(User.name == u["name"]))
            if row is None:
                row = User(name=u["name"], display_name=u["display_name"] or u["name"], role=u["role"],
                           password_hash=None, active=True, version=1, created_at=_dt.datetime.now(_dt.timezone.utc))
                s.add(row)
                created_users.append(u["name"])
            by_name[u["name"]] = row
        for c in data["concepts"]:
            if s.get(Concept, c["id"]) is None:
                s.add(Concept(id=c["id"], name=c["name"], description=c["description"], builtin=False,
                              position=c["position"]))
        rs = ReviewSession(name=final, model_uri=sess["model_uri"], store=sess["store"],
                           created_by=sess["created_by"], created_at=v.time(sess["created_at"], ""),
                           archived_at=v.time(sess["archived_at"], "", null=True), version=1)
        s.add(rs)
        s.flush()
        sid = rs.id
        for m in data["members"]:
            s.add(SessionMember(session_id=sid, user_id=by_name[m].id, added_at=_dt.datetime.now(_dt.timezone.utc)))
        regions = []
        for r in data["regions"]:
            row = Region(session_id=sid, image_id=r["image_id"], concept=r["concept"], spec=r["spec"],
                         height=r["height"], width=r["width"], area=r["area"], author=r["author"],
                         created_at=v.time(r["created_at"], ""), deleted_at=v.time(r["deleted_at"], "", null=True),
                         version=r["version"])
            s.add(row)
            regions.append(row)
        s.flush()
        rid = {i + 1: row.id for i, row in enumerate(regions)}
        actions = []
        for a in data["actions"]:
            row = LabelAction(session_id=sid, kind=a["kind"], layer=a["layer"], concept=a["concept"],
                              image_id=a["image_id"], region_id=rid.get(a["region"]), rule=a["rule"],
                              author=a["author"], created_at=v.time(a["created_at"], ""), n_changed=a["n_changed"],
                              request_id=a["request_id"])
            s.add(row)
            actions.append(row)
        s.flush()
        aid = {i + 1: row.id for i, row in enumerate(actions)}
        for a, row in zip(data["actions"], actions):  # links between actions, now that every one has its id
            row.undoes, row.undone_by = aid.get(a["undoes"]), aid.get(a["undone_by"])

        def snap(d):
            if d is None:
                return None
            out = {k: d[k] for k in ("concept", "iou", "author", "created_at", "image_id")}
            out["region_id"] = rid.get(d["region"])
            out["action_id"] = aid[d["action"]]
            out["version"] = d["version"]
            return {k: out[k] for k in UnitLabel.PROVENANCE}

        for c in data["changes"]:
            s.add(LabelChange(session_id=sid, action_id=aid[c["action"]], layer=c["layer"], unit=c["unit"],
                              before=snap(c["before"]), after=snap(c["after"])))
        for x in data["unit_labels"]:
            s.add(UnitLabel(session_id=sid, author=x["author"], layer=x["layer"], unit=x["unit"], concept=x["concept"],
                            iou=x["iou"], created_at=v.time(x["created_at"], ""), image_id=x["image_id"],
                            region_id=rid.get(x["region"]), action_id=aid[x["action"]], version=x["version"]))
        for m in data["marks"]:
            s.add(ImageMark(session_id=sid, image_id=m["image_id"], concept=m["concept"], present=m["present"],
                            author=m["author"], created_at=v.time(m["created_at"], ""), version=m["version"]))
        for c in data["comments"]:
            s.add(Comment(session_id=sid, image_id=c["image_id"], author=c["author"], text=c["text"],
                          created_at=v.time(c["created_at"], ""), updated_at=v.time(c["updated_at"], "", null=True),
                          deleted_at=v.time(c["deleted_at"], "", null=True), updated_by=c["updated_by"],
                          version=c["version"]))
        for p in data["probe_versions"]:
            s.add(ProbeVersion(session_id=sid, concept=p["concept"], layer=p["layer"], run_id=p["run_id"],
                               author=p["author"], created_at=v.time(p["created_at"], ""), metrics=p["metrics"],
                               active=p["active"], version=p["version"]))
        s.flush()
        audit(s, actor=actor_name, action="session.import", session_id=sid, target=f"session:{sid}",
              detail={"name": final, "from": sess["name"], "users_created": created_users,
                      "rows": {k: len(data[k]) for k in ("regions", "actions", "changes", "unit_labels", "marks",
                                                         "comments", "probe_versions")}})
        return _session_info(s, rs)
