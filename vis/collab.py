"""Working together: what the Session and Users pages show and do, as plain functions of the Workbench.

    >>> from vis.collab import session_overview, save_comment, import_annotations, users_table
    >>> members, counts, agreement = session_overview(wb, session=1)        # Dash components
    >>> save_comment(wb, session=1, image="p-000123", text="spiculated?", editing=None)
    >>> save_comment(wb, session=1, image="p-000123", text="…", editing={"id": 7, "version": 1})   # ConflictError
    >>> msg, sid = create_review_session(wb, name="Reading 2025-03", model=None, store="demo", members=["ana"])
    >>> change_member(wb, sid, "add", "ben")                                 # admins only

Every function checks the signed-in user's rights on the server first: membership of the session
(`Workbench.review_session`, AccessDenied → 403) or, for user management and imports, `require_admin`. What a user
can meet and should read (a stale edit, a bad password, a file that is not an export) comes back as a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter

from dash import html

from .components import message, stat
from .errors import InvalidInput
from .services import check_choice, check_id, check_int, check_list

__all__ = ["session_overview", "session_title", "export_links", "comments_view", "save_comment", "delete_comment",
           "start_edit", "import_annotations", "users_table", "create_user", "change_user", "create_review_session",
           "change_member", "active_user_options", "candidate_options", "MAX_IMPORT_BYTES"]

MAX_IMPORT_BYTES = 700_000  # an uploaded file travels base64 in one callback body (the app's body limit is 1 MiB)


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else ("" if value is None else str(value))


def _table(head, rows, *, empty: str):
    if not rows:
        return html.Div(empty, className="cl-muted")
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in head])),
                       html.Tbody([html.Tr([html.Td(c) for c in r]) for r in rows])], className="table table-sm")


# -- the session page ---------------------------------------------------------------------------------------------------
def session_title(wb, session):
    info = wb.review_session(session)
    return html.Div([html.H4(info.name, className="cl-session-title"),
                     html.Span(f"session #{info.id} · model {info.model_uri or wb.config.model or 'of the store'} · "
                               f"store {info.store or wb.config.store}", className="cl-muted")])


def export_links(wb, session):
    """Download links of the session's report (HTML, and PDF when the server has Chromium) and annotations
    (JSON): vis.api's routes."""
    from .pdf import find_chromium, missing_message

    sid = wb.session_id(session)
    if find_chromium() is not None:
        pdf = html.A("Download the report (PDF)", href=f"/api/sessions/{sid}/report.pdf", download="",
                     className="btn btn-outline-primary", id="sess-export-pdf")
        hint = None
    else:  # a link would download an error message: say what is missing instead
        pdf = html.Button("Download the report (PDF)", disabled=True, className="btn btn-outline-secondary",
                          id="sess-export-pdf", title=missing_message())
        hint = html.Div(missing_message(), className="cl-hint mt-1")
    return html.Div([
        html.Div([
            html.A("Download the report (HTML)", href=f"/api/sessions/{sid}/report.html", download="",
                   className="btn btn-primary", id="sess-export-report"),
            pdf,
            html.A("Download the annotations (JSON)", href=f"/api/sessions/{sid}/annotations.json", download="",
                   className="btn btn-outline-primary", id="sess-export-json"),
        ], className="cl-actions"),
        hint,
    ])


def session_overview(wb, session):
    """(members table, per-annotator label counts, agreement table) of a session the user may open."""
    from explain.labels import regions_for, unit_labels
    from store.accounts import list_users

    from .export import agreement_data, agreement_rows

    from . import ids

    info = wb.review_session(session)
    sid, db = int(info.id), wb.db()
    users = {u.name: u for u in list_users(db)}
    manage = wb.account().role == "admin"  # the buttons only; change_member checks the right on the server

    def row(m):
        u = users.get(m)
        cells = [m, u.display_name if u else "", (u.role if u else "") + ("" if u is None or u.active
                                                                          else " (deactivated)")]
        if manage:
            cells.append(html.Button("Remove", id=ids.member_remove(m), n_clicks=0, title=f"remove {m} from this session",
                                     className="btn btn-outline-danger btn-sm"))
        return cells

    members = _table(["reader", "name", "role", *([""] if manage else [])], [row(m) for m in sorted(info.members)],
                     empty="No member.")

    labels = unit_labels(db, session=sid, author=None)  # merged: one per unit, with its winning author
    per = {}
    for a in sorted({x.author for x in labels} | {r.author for r in regions_for(db, session=sid)}):
        mine = unit_labels(db, session=sid, author=a)
        per[a] = Counter(x.concept for x in mine)
    concepts = sorted({c for cnt in per.values() for c in cnt})
    regions = Counter(r.author for r in regions_for(db, session=sid))
    counts = _table(["annotator", "regions", "labeled units", *[c.replace("_", " ") for c in concepts]],
                    [[a, regions.get(a, 0), sum(cnt.values()), *[cnt.get(c, 0) for c in concepts]]
                     for a, cnt in per.items()], empty="Nobody has labeled a unit in this session yet.")
    head, rows = agreement_rows(agreement_data(wb, sid))
    agreement = (_table(head, rows, empty="") if rows else
                 html.Div("Agreement needs two readers who labeled units or drew regions in this session.",
                          className="cl-muted"))
    summary = html.Div([stat("members", str(len(info.members))), stat("annotators", str(len(per))),
                        stat("labeled units (merged)", str(len(labels))), stat("regions", str(sum(regions.values())))],
                       className="cl-stats mb-2")
    return members, html.Div([summary, counts]), agreement


# -- comments -------------------------------------------------------------------------------------------------------------
def image_options(wb, session, current_image) -> list[dict]:
    """The images worth commenting on: the one open on Review, then those with regions or comments here."""
    from explain.labels import comments, regions_for

    sid = wb.session_id(session)
    out = []
    if isinstance(current_image, str) and current_image:
        wb.record(current_image)  # an image of the store, or 400
        out.append(current_image)
    out += [r.image_id for r in reversed(regions_for(wb.db(), session=sid))]
    out += [c.image_id for c in comments(wb.db(), sid)]
    return [{"label": i, "value": i} for i in dict.fromkeys(out)]


def comments_view(wb, session, image):
    """The comments on one image of the session, oldest first, each with edit / delete buttons where allowed."""
    from explain.labels import comments

    from . import ids

    sid = wb.session_id(session)
    if not image:
        return html.Div("Choose an image (the patch open on Review comes first).", className="cl-muted")
    check_id(image, "image")
    me = wb.account()
    items = []
    for c in comments(wb.db(), sid, image):
        edited = f" · edited {_when(c.updated_at)}" if c.updated_at else ""
        tools = []
        if c.author == me.name:
            tools.append(html.Button("Edit", id=ids.comment_edit(c.id), n_clicks=0, className="btn btn-light btn-sm"))
        tools.append(html.Button("Delete", id=ids.comment_delete(c.id), n_clicks=0,
                                 className="btn btn-outline-danger btn-sm"))
        items.append(html.Div([
            html.Div([html.Strong(c.author), html.Span(f" · {_when(c.created_at)}{edited} · v{c.version}",
                                                       className="cl-muted"),
                      html.Div(tools, className="cl-comment-tools")], className="cl-comment-head"),
            html.Div(c.text, className="cl-comment-text"),
        ], className="cl-comment", id=f"comment-{c.id}"))
    return html.Div(items or [html.Div("No comment on this image yet.", className="cl-muted")])


def _find_comment(wb, sid: int, comment_id):
    from explain.labels import comments

    cid = check_int(comment_id, "comment", lo=1, hi=2**62)
    for c in comments(wb.db(), sid):
        if c.id == cid:
            return c
    raise InvalidInput("comment", f"no comment {cid} in this session")


def start_edit(wb, session, comment_id):
    """(text to edit, {"id", "version"} the editor saw) of one of the user's own comments."""
    c = _find_comment(wb, wb.session_id(session), comment_id)
    return c.text, {"id": c.id, "version": c.version}


def save_comment(wb, session, *, image, text, editing):
    """Add a comment, or save an edit with the version the editor saw (a stale one → ConflictError, shown)."""
    from explain.labels import add_comment, edit_comment

    sid = wb.session_id(session)
    if not isinstance(text, str) or not text.strip():
        return message("Nothing to save", "type a comment first.", color="info")
    if editing:
        if not isinstance(editing, dict):
            raise InvalidInput("editing", "expected {'id', 'version'}")
        cid = check_int(editing.get("id"), "comment", lo=1, hi=2**62)
        version = check_int(editing.get("version"), "version", lo=1, hi=2**62)
        c = edit_comment(wb.db(), cid, text=text, author=wb.user(), expected_version=version, session=sid)
        return message("Comment saved", f"version {c.version}.", color="success")
    check_id(image, "image")
    wb.record(image)  # comments are on images of this store only
    add_comment(wb.db(), image=image, text=text, author=wb.user(), session=sid)
    return message("Comment added", "", color="success")


def delete_comment(wb, session, comment_id):
    from explain.labels import delete_comment as delete

    sid = wb.session_id(session)
    c = _find_comment(wb, sid, comment_id)
    user = wb.account()
    delete(wb.db(), c.id, author=user.name, expected_version=c.version, session=sid, actor_role=user.role)
    return message("Comment deleted", "", color="success")


# -- review sessions (admins) -------------------------------------------------------------------------------------------
_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def active_user_options(wb) -> list[dict]:
    """Every active account, for the members of a new session (admins only)."""
    from store.accounts import list_users, require_admin

    require_admin(wb.account())
    return [{"label": f"{u.name} ({u.role})", "value": u.name} for u in list_users(wb.db()) if u.active]


def candidate_options(wb, session) -> list[dict]:
    """Active accounts that are not members of the session yet (admins only)."""
    from store.accounts import require_admin

    require_admin(wb.account())
    members = set(wb.review_session(session).members)
    return [o for o in active_user_options(wb) if o["value"] not in members]


def _active_names(wb, names, what: str) -> list[str]:
    """Browser-sent user names, each an active account (the form only offers those: anything else is forged)."""
    from store.accounts import list_users

    names = check_list(names, what, max_len=1000)
    active = {u.name for u in list_users(wb.db()) if u.active}
    for n in names:
        check_id(n, what)
        if n not in active:
            raise InvalidInput(what, f"{n[:80]!r} is not an active user")
    return list(dict.fromkeys(names))


def create_review_session(wb, *, name, model, store, members):
    """A new review session (store.accounts.create_session), admins only: `model` and `store` empty mean the
    app's (`wb.config`); the store must exist in the workspace; `members` are active user names. Returns
    (message, the new session id or None)."""
    from store.accounts import create_session, require_admin
    from store.activations import store_exists

    admin = require_admin(wb.account())
    for value, what in ((name, "name"), (model, "model"), (store, "store")):
        if value is not None and not isinstance(value, str):
            raise InvalidInput(what, f"expected text, got {type(value).__name__}")
    names = _active_names(wb, members, "members")
    if not (name or "").strip():
        return message("Name needed", "give the new session a name.", color="info"), None
    model = (model or "").strip() or wb.config.model  # None: the model named in the store
    store = (store or "").strip() or wb.config.store
    if not _STORE_NAME.fullmatch(store) or store.endswith(".zarr"):
        return message("Not a store name", f"{store[:80]!r}: letters, digits, '.', '_' and '-' only (the name "
                                           f"under {wb.settings.store_root}).", color="warning"), None
    if not store_exists(wb.settings.store_url(store)):
        return message("No such store", f"there is no activation store {store!r} in this workspace; this app "
                                        f"serves {wb.config.store!r}.", color="warning"), None
    info = create_session(wb.db(), name=name, model_uri=model, store=store, members=names, actor=admin.name)
    return message("Session created", f"“{info.name}” (#{info.id}) with {len(info.members)} member(s) is now "
                                      "open; it is in the header's session list.", color="success"), int(info.id)


def change_member(wb, session, action: str, name):
    """Add ("add") or remove ("remove") one member of a session; admins only. Removing keeps the member's
    annotations (attributed to them); a removed reader no longer opens the session."""
    from store.accounts import add_member, remove_member, require_admin

    admin = require_admin(wb.account())
    sid = wb.session_id(session)
    check_choice(action, "action", ("add", "remove"))
    if action == "add":
        if not name:
            return message("Nobody chosen", "choose a user to add first.", color="info")
        (name,) = _active_names(wb, [name], "user")
        info = add_member(wb.db(), sid, name, actor=admin.name)
        return message("Member added", f"{name} is a member of “{info.name}”.", color="success")
    check_id(name, "user")
    info = wb.review_session(sid)
    if name not in info.members:
        raise InvalidInput("user", f"{name[:80]!r} is not a member of session {sid}")
    info = remove_member(wb.db(), sid, name, actor=admin.name)
    return message("Member removed", f"{name} no longer opens “{info.name}”; their annotations stay.",
                   color="success")


# -- import ---------------------------------------------------------------------------------------------------------------
def import_annotations(wb, contents, filename):
    """A dcc.Upload of an annotations.json export → a new session (store.exchange.import_session); admins only,
    since an import creates the accounts it names. Returns (message, the new session id or None)."""
    from store.accounts import require_admin
    from store.exchange import import_session

    user = require_admin(wb.account())
    if not isinstance(contents, str) or "," not in contents:
        raise InvalidInput("upload", "expected a data URL")
    name = filename if isinstance(filename, str) else "upload"
    header, _, payload = contents.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidInput("upload", "expected a base64 data URL")
    if len(payload) > MAX_IMPORT_BYTES * 4 // 3 + 8:
        return message("File too large", f"{name[:80]}: at most {MAX_IMPORT_BYTES // 1000} kB here; use "
                                         "POST /api/sessions/import for larger exports.", color="warning"), None
    try:
        data = json.loads(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return message("Not an annotations export", f"{name[:80]} is not a JSON file.", color="warning"), None
    if not isinstance(data, dict):
        return message("Not an annotations export", f"{name[:80]}: expected a JSON object.", color="warning"), None
    info = import_session(wb.db(), data, actor=user.name)
    return message("Imported", f"{name[:80]} became session “{info.name}” (#{info.id}) with "
                               f"{len(info.members)} member(s).", color="success"), int(info.id)


# -- users (admins) -------------------------------------------------------------------------------------------------------
def users_table(wb):
    from store.accounts import list_users, require_admin

    require_admin(wb.account())
    rows = [[u.name, u.display_name, u.role, "active" if u.active else "deactivated",
             "set" if getattr(u, "has_password", True) else "none (cannot sign in)"] for u in list_users(wb.db())]
    return _table(["user name", "display name", "role", "state", "password"], rows, empty="No user.")


def user_options(wb) -> list[dict]:
    from store.accounts import list_users, require_admin

    require_admin(wb.account())
    return [{"label": f"{u.name} ({u.role}{'' if u.active else ', deactivated'})", "value": u.name}
            for u in list_users(wb.db())]


def create_user(wb, *, name, display_name, role, password):
    from store.accounts import add_member, create_user as create, require_admin

    admin = require_admin(wb.account())
    u = create(wb.db(), name=name, role=role, password=password or None, display_name=display_name or None,
               actor=admin.name)
    add_member(wb.db(), 1, u.name, actor=admin.name)  # the workspace session, so the new reader sees something
    return message("User created", f"{u.name} ({u.role}), a member of the workspace session.", color="success")


def change_user(wb, action: str, *, name, role=None, password=None):
    """An admin's change to one account: "role", "password", "deactivate" or "activate"."""
    from store.accounts import get_user, require_admin, set_password, update_user

    admin = require_admin(wb.account())
    check_id(name, "user")
    u = get_user(wb.db(), name)
    if u is None:
        raise InvalidInput("user", f"no user {name!r}")
    if action == "password":
        set_password(wb.db(), name, password, actor=admin.name)
        return message("Password reset", f"{name} signs in with the new password; old sessions end.", color="success")
    if action == "role":
        update_user(wb.db(), name, expected_version=u.version, role=role, actor=admin.name)
        return message("Role changed", f"{name} is now {role}.", color="success")
    if action in ("deactivate", "activate"):
        if name == admin.name and action == "deactivate":
            return message("Not done", "you cannot deactivate your own account.", color="warning")
        update_user(wb.db(), name, expected_version=u.version, active=action == "activate", actor=admin.name)
        return message("Done", f"{name} is {'active' if action == 'activate' else 'deactivated'}.", color="success")
    raise InvalidInput("action", f"{action!r} is not a user change")
