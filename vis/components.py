"""Layout pieces shared by the pages: the shell (navbar, status banner), panels, messages, galleries.

    >>> from vis.components import panel, message, gallery
    >>> panel("Patch", body, tools=[switch])                  # a titled card; tools sit right of the title
    >>> message("No activation store yet", "Run `make extract`.", color="warning")
    >>> gallery([Tile(src=uri, caption="p-12 · 0.93", tile_id=ids.prototype("p-12"))])

`shows_errors(n, at=i)` turns the errors a user can meet (workspace not ready, store of another model, a region
that cannot be used) into a message in output `i` of a callback; forged input (vis.errors.InvalidInput) is left
to the app's 400 handler.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import dash
import dash_bootstrap_components as dbc
from dash import html

from . import ids

__all__ = ["shell", "panel", "message", "empty_state", "gallery", "Tile", "shows_errors", "user_errors",
           "labeled", "stat"]


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
                out = [dash.no_update] * n_outputs
                out[at] = message(_title_of(e), str(e), color="warning")
                return out[0] if n_outputs == 1 else tuple(out)

        return run

    return wrap


def _title_of(err: BaseException) -> str:
    from .errors import NotReady

    if isinstance(err, NotReady):
        return "Not ready"
    return {"StoreMismatchError": "Store from another model", "RegionError": "Region not usable"}.get(
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


# -- the shell: navbar, workspace status, page ----------------------------------------------------------------------------
def _nav_links() -> list:
    pages = sorted(dash.page_registry.values(), key=lambda p: p.get("order", 99))
    return [dbc.NavItem(dbc.NavLink(p["name"], href=p["relative_path"], active="exact", className="cl-navlink"))
            for p in pages]


def shell():
    """The app's layout (a function: evaluated at each page load, so the status banner is current)."""
    from .services import current

    wb = current()
    status = wb.status()
    banner = None if status.ok else message(status.title, status.text, color="warning")
    brand = html.A([html.Span("Concept", className="cl-brand-a"), html.Span("Lens", className="cl-brand-b")],
                   href="/", className="cl-brand")
    context = html.Div([html.Span(wb.settings.workspace.name, className="cl-context-item", title=str(wb.settings.workspace)),
                        html.Span(f"store {wb.config.store}", className="cl-context-item"),
                        html.Span(f"user {wb.user()}", className="cl-context-item")], className="cl-context")
    navbar = html.Nav([brand, dbc.Nav(_nav_links(), className="cl-nav"), context], id=ids.NAVBAR,
                      className="cl-navbar")
    return html.Div([
        navbar,
        html.Div(banner, id=ids.STATUS, className="cl-status"),
        html.Main(dash.page_container, className="cl-main"),
    ], className="cl-app")
