"""Layout pieces shared by the pages: the shell (navbar, status banner), panels, messages, galleries.

    >>> from vis.components import panel, message, gallery
    >>> panel("Patch", body, tools=[switch])                  # a titled card; tools sit right of the title
    >>> message("No activation store yet", "Run `make extract`.", color="warning")
    >>> gallery([Tile(src=uri, caption="p-12 · 0.93", tile_id=ids.prototype("p-12"))])

`shows_errors(n, at=i)` turns the errors a user can meet (workspace not ready, store of another model, a region
that cannot be used, a conflicting edit) into a message in output `i` of a callback; forged input
(vis.errors.InvalidInput) and refused rights (store.errors.AccessDenied) are left to the app's 400 / 403 handlers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import dash
import dash_bootstrap_components as dbc
from dash import dcc, html

from . import ids

__all__ = ["shell", "install_shell", "session_choices", "panel", "message", "empty_state", "gallery", "Tile",
           "shows_errors", "user_errors", "labeled", "stat"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Error roots whose messages are meant for the user (each package's root; InvalidInput excluded)."""
    from explain.errors import ExplainError
    from store.errors import StoreError
    from training.errors import TrainingError

    from .errors import NotReady, UserInputError

    return (NotReady, UserInputError, StoreError, ExplainError, TrainingError)


def shows_errors(n_outputs: int, *, at: int):
    """Decorator for a callback with `n_outputs` outputs: a user-facing error becomes a message in output `at`.

        >>> @dash.callback(Output(A, "figure"), Output(MSG, "children"), Input(B, "value"))
        ... @shows_errors(2, at=1)
        ... def update(value): ...
    """

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except user_errors() as e:
                if isinstance(e, PermissionError):  # AccessDenied: a 403 for the request, not a message
                    raise
                out = [dash.no_update] * n_outputs
                out[at] = message(_title_of(e), str(e), color="warning")
                return out[0] if n_outputs == 1 else tuple(out)

        return run

    return wrap


def _title_of(err: BaseException) -> str:
    from .errors import NotReady

    if isinstance(err, NotReady):
        return "Not ready"
    return {"StoreMismatchError": "Store from another model", "RegionError": "Region not usable",
            "ConflictError": "Changed by someone else"}.get(
        type(err).__name__, "Cannot do that")


def message(title: str, text: str = "", *, color: str = "info", dismissable: bool = False) -> dbc.Alert:
    """A short, readable message; `color` is info / success / warning / danger."""
    return dbc.Alert([html.Strong(title), html.Span(" " + text if text else "")], color=color,
                     dismissable=dismissable, className="cl-message mb-2")


def empty_state(title: str, text: str, *, command: str | None = None) -> html.Div:
    """What a page shows when the workspace lacks what it needs: what is missing and the command that makes it."""
    children = [html.H4(title, className="cl-empty-title"), html.P(text, className="cl-empty-text")]
    if command:
        children.append(html.Pre(command, className="cl-empty-command"))
    return html.Div(children, className="cl-empty")


def panel(title: str, body, *, tools: Sequence = (), className: str = "", body_class: str = "") -> dbc.Card:
    """A titled card: the title left, optional small controls right, the body below."""
    header = html.Div([html.Span(title, className="cl-panel-title"), html.Div(list(tools), className="cl-panel-tools")],
                      className="cl-panel-header")
    return dbc.Card([header, html.Div(body, className=f"cl-panel-body {body_class}".strip())],
                    className=f"cl-panel {className}".strip())


def labeled(label: str, control, *, className: str = "") -> html.Div:
    """A small caption above a control."""
    return html.Div([html.Label(label, className="cl-label"), control], className=f"cl-field {className}".strip())


def stat(label: str, value, *, tone: str = "") -> html.Div:
    """A large figure with a caption (prediction, probability, IoU)."""
    return html.Div([html.Div(value, className=f"cl-stat-value {tone}".strip()),
                     html.Div(label, className="cl-stat-label")], className="cl-stat")


@dataclass(frozen=True)
class Tile:
    """One image of a gallery: a data URI, a caption and an optional id (clickable when given)."""

    src: str
    caption: str = ""
    tile_id: dict | str | None = None
    selected: bool = False
    title: str = ""


def gallery(tiles: Sequence[Tile], *, size: int = 96, empty: str = "Nothing to show.") -> html.Div:
    """A wrapping grid of image tiles; tiles with an id are buttons (n_clicks)."""
    if not tiles:
        return html.Div(empty, className="cl-muted")
    items = []
    for t in tiles:
        inner = [html.Img(src=t.src, width=size, height=size, alt=t.caption or t.title),
                 html.Div(t.caption, className="cl-tile-caption")]
        cls = "cl-tile" + (" cl-tile-selected" if t.selected else "")
        if t.tile_id is not None:
            items.append(html.Button(inner, id=t.tile_id, n_clicks=0, className=cls, title=t.title or t.caption))
        else:
            items.append(html.Div(inner, className=cls, title=t.title or t.caption))
    return html.Div(items, className="cl-gallery")


# -- the shell: navbar, review session, user, workspace status, page ---------------------------------------------------------
LIVE_INTERVAL_MS = 2000  # how often a tab asks whether anyone wrote in its session (one small query)
SESSIONS_INTERVAL_MS = 15000  # how often a tab refreshes its list of sessions (created, joined, left elsewhere)


def _nav_links(user) -> list:
    pages = sorted(dash.page_registry.values(), key=lambda p: p.get("order", 99))
    return [dbc.NavItem(dbc.NavLink(p["name"], href=p["relative_path"], active="exact", className="cl-navlink"))
            for p in pages if not p.get("admin_only") or user.role == "admin"]


def _logout_form():
    from .auth import LOGOUT_PATH, csrf_token

    return html.Form([dcc.Input(type="hidden", name="csrf_token", value=csrf_token()),
                      html.Button("Sign out", type="submit", id=ids.LOGOUT, className="cl-logout")],
                     action=LOGOUT_PATH, method="POST", className="cl-logout-form")


def shell():
    """The app's layout (a function: evaluated at each page load, so the status banner and the user are current)."""
    from .services import current

    from flask import g

    wb = current()
    user = g.get("user")
    if user is None:  # only when Dash validates the layout at start-up: every request has a user
        return html.Div([dcc.Store(id=ids.SESSION), dcc.Store(id=ids.SESSION_VERSION),
                         dcc.Store(id=ids.CURRENT_IMAGE), dcc.Interval(id=ids.LIVE_INTERVAL),
                         dcc.Interval(id=ids.SESSIONS_INTERVAL), dcc.Dropdown(id=ids.SESSION_PICKER),
                         dash.page_container])
    status = wb.status()
    banner = None if status.ok else message(status.title, status.text, color="warning")
    brand = html.A([html.Span("Concept", className="cl-brand-a"), html.Span("Lens", className="cl-brand-b")],
                   href="/", className="cl-brand", title=f"workspace {wb.settings.workspace} · store {wb.config.store}")
    options = wb.session_options()
    default = options[0]["value"] if options else None
    picker = html.Div([
        html.Label("Session", htmlFor=ids.SESSION_PICKER, className="cl-session-label"),
        dcc.Dropdown(id=ids.SESSION_PICKER, options=options, value=default, clearable=False, searchable=False,
                     placeholder="no review session", className="cl-session-picker",
                     # the choice survives reloads in this tab, but not a change of user (persistence key)
                     persistence=f"{user.name}:{user.stamp}", persistence_type="session"),
    ], className="cl-session")
    who = html.Div([html.Span(user.display_name or user.name, className="cl-user-name", title=user.name),
                    html.Span(user.role, className=f"cl-role cl-role-{user.role}")], id=ids.USER_BADGE,
                   className="cl-user")
    navbar = html.Nav([brand, dbc.Nav(_nav_links(user), className="cl-nav"),
                       html.Div([picker, who, _logout_form()], className="cl-context")],
                      id=ids.NAVBAR, className="cl-navbar")
    return html.Div([
        dcc.Store(id=ids.SESSION, data=default),
        dcc.Store(id=ids.SESSION_VERSION, data=None),
        dcc.Store(id=ids.CURRENT_IMAGE, data=None, storage_type="session"),
        dcc.Interval(id=ids.LIVE_INTERVAL, interval=LIVE_INTERVAL_MS, n_intervals=0),
        dcc.Interval(id=ids.SESSIONS_INTERVAL, interval=SESSIONS_INTERVAL_MS, n_intervals=0),
        navbar,
        html.Div(banner, id=ids.STATUS, className="cl-status"),
        html.Main(dash.page_container, className="cl-main"),
    ], className="cl-app")


def session_choices(wb, chosen=None, *, select=None) -> tuple[list[dict], int | None]:
    """(the picker's options: the sessions the user may open now, the value it should show): `select` when
    given, else `chosen` while still listed, else the first session (None: no session at all)."""
    options = wb.session_options()
    values = [o["value"] for o in options]
    if select is not None and select in values:
        return options, select
    if chosen in values:
        return options, chosen
    return options, (values[0] if values else None)


def install_shell(app) -> None:
    """The shell's callbacks, on this app: the chosen session (checked) and the live stamp of its annotations."""
    from dash import Input, Output, State
    from dash.exceptions import PreventUpdate

    from .services import current

    @app.callback(Output(ids.SESSION, "data"), Input(ids.SESSION_PICKER, "value"))
    def choose_session(session):
        if session is None:  # no session left to open (removed from the last one): the pages say so
            return None
        return current().session_id(session)  # AccessDenied (403) for a session the user may not open

    @app.callback(Output(ids.SESSION_PICKER, "options"), Output(ids.SESSION_PICKER, "value"),
                  Input(ids.SESSIONS_INTERVAL, "n_intervals"), State(ids.SESSION_PICKER, "options"),
                  State(ids.SESSION_PICKER, "value"), prevent_initial_call=True)
    def refresh_sessions(_n, shown, chosen):
        """The picker lists the sessions the user may open now: one an admin created or added them to appears,
        one they were removed from goes (and the picker moves to the first they may open)."""
        options, value = session_choices(current(), chosen)
        if options == shown and value == chosen:
            raise PreventUpdate  # nothing changed: nothing redraws
        return options, (value if value != chosen else dash.no_update)

    @app.callback(Output(ids.SESSION_VERSION, "data"), Input(ids.LIVE_INTERVAL, "n_intervals"),
                  Input(ids.SESSION, "data"), State(ids.SESSION_VERSION, "data"))
    def watch_session(_n, session, seen):
        if session is None:
            raise PreventUpdate
        stamp = current().session_version(session)
        if stamp == seen:
            raise PreventUpdate  # nothing new: no view redraws
        return stamp
