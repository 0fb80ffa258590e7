"""Session: who reviews this session, how many units each annotator labeled, how much the readers agree (Cohen's
kappa per layer, Dice of regions), comments on the image open on Review (optimistic concurrency: a stale edit shows
who changed it), and the session's exports (report as HTML or PDF, annotations as JSON). Administrators also add
and remove members, create review sessions and import an annotations export as a new session.

The session is the one chosen in the header (ids.SESSION); every callback checks membership on the server, and the
administrators' callbacks `require_admin` (anyone else: 403, nothing written). The views redraw when the session's
stamp (ids.SESSION_VERSION) changes, i.e. when anyone writes in it; a session created here is selected in the
header's picker at once (other tabs list it within ids.SESSIONS_INTERVAL).
"""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, State, callback, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from vis import collab, ids
from vis.components import labeled, panel, session_choices, shows_errors
from vis.services import current

dash.register_page(__name__, path="/session", name="Session", title="ConceptLens · Session", order=5)


def layout(**_query):
    wb = current()
    is_admin = wb.account().role == "admin"
    comments = panel("Comments on an image", [
        labeled("Image", dcc.Dropdown(id=ids.SESS_IMAGE, options=[], value=None, clearable=False,
                                      placeholder="open a patch on Review first")),
        html.Div(id=ids.SESS_COMMENTS, className="cl-comments mt-2"),
        dcc.Textarea(id=ids.SESS_COMMENT_TEXT, value="", maxLength=4000, className="form-control cl-comment-input mt-2",
                     placeholder="Write a comment on this image…"),
        html.Div([dbc.Button("Save comment", id=ids.SESS_COMMENT_SAVE, color="primary", n_clicks=0),
                  dbc.Button("Cancel edit", id=ids.SESS_COMMENT_CANCEL, color="light", n_clicks=0)],
                 className="cl-actions"),
        html.Div(id=ids.SESS_MESSAGE, className="mt-2"),
    ])
    exports = panel("Export", [
        html.Div(id=ids.SESS_EXPORT),
        html.P("The report is one self-contained file: model, members, images with every reader's regions, "
               "labeled units, concept report, probe metrics and agreement.", className="cl-hint"),
        *([] if is_admin else [html.Div("An administrator can create review sessions, change their members and "
                                        "import an annotations export as a new session.", className="cl-hint")]),
    ])
    members = [html.Div(id=ids.SESS_MEMBERS)]
    right = [comments, exports]
    if is_admin:
        members += [
            html.Div([labeled("Add a member", dcc.Dropdown(id=ids.SESS_ADD_USER, options=[], value=None,
                                                           placeholder="an active user")),
                      dbc.Button("Add", id=ids.SESS_ADD_MEMBER, color="light", n_clicks=0)],
                     className="cl-inline mt-2"),
        ]
        right.append(_new_session_panel(wb))
    members.append(html.Div(id=ids.SESS_MEMBERS_MESSAGE, className="mt-2"))  # for everyone: an input of the views
    return html.Div([
        dcc.Store(id=ids.SESS_EDITING, data=None),
        html.Div(id=ids.SESS_TITLE, className="mb-2"),
        dbc.Row([
            dbc.Col([panel("Members", members),
                     panel("Labels per annotator", html.Div(id=ids.SESS_COUNTS)),
                     panel("Agreement between readers", html.Div(id=ids.SESS_AGREEMENT))], width=7),
            dbc.Col(right, width=5),
        ], className="mt-1"),
    ])


def _new_session_panel(wb):
    """Administrators: a new review session (name, model, store, members), or one imported from an export."""
    upload = dcc.Upload(id=ids.SESS_IMPORT, children=html.Div(["Drop an annotations JSON export here, or ",
                                                               html.A("choose a file")]),
                        accept=".json,application/json", max_size=collab.MAX_IMPORT_BYTES, multiple=False,
                        className="cl-upload")
    return panel("New review session", [
        html.Div([
            labeled("Name", dbc.Input(id=ids.SESS_NEW_NAME, placeholder="e.g. Double reading, March", maxLength=200)),
            labeled("Members", dcc.Dropdown(id=ids.SESS_NEW_MEMBERS, options=collab.active_user_options(wb),
                                            value=[], multi=True, placeholder="active users (you are added)")),
            labeled("Model", dbc.Input(id=ids.SESS_NEW_MODEL, value=wb.config.model or "", maxLength=1000,
                                       placeholder="the store's own model")),
            labeled("Activation store", dbc.Input(id=ids.SESS_NEW_STORE, value=wb.config.store, maxLength=100)),
        ], className="cl-form-grid"),
        html.Div(dbc.Button("Create session", id=ids.SESS_NEW_CREATE, color="primary", n_clicks=0),
                 className="cl-actions"),
        html.Div(id=ids.SESS_NEW_MESSAGE, className="mt-2"),
        html.Div("Or import an annotations export as a new session", className="cl-section-title mt-3"),
        upload,
        html.Div(id=ids.SESS_IMPORT_MESSAGE, className="mt-2"),
    ])


@callback(Output(ids.SESS_TITLE, "children"), Output(ids.SESS_MEMBERS, "children"),
          Output(ids.SESS_COUNTS, "children"), Output(ids.SESS_AGREEMENT, "children"),
          Output(ids.SESS_EXPORT, "children"),
          Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"), Input(ids.SESS_MEMBERS_MESSAGE, "children"))
@shows_errors(5, at=0)
def show_session(session, _version, _changed):  # _changed: redraw right after an admin's member change
    wb = current()
    members, counts, agreement = collab.session_overview(wb, session)
    return collab.session_title(wb, session), members, counts, agreement, collab.export_links(wb, session)


@callback(Output(ids.SESS_IMAGE, "options"), Output(ids.SESS_IMAGE, "value"),
          Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"), State(ids.CURRENT_IMAGE, "data"),
          State(ids.SESS_IMAGE, "value"))
@shows_errors(2, at=0)
def list_images(session, _version, current_image, chosen):
    options = collab.image_options(current(), session, current_image)
    values = [o["value"] for o in options]
    return options, chosen if chosen in values else (values[0] if values else None)


@callback(Output(ids.SESS_COMMENTS, "children"), Input(ids.SESS_IMAGE, "value"), Input(ids.SESSION, "data"),
          Input(ids.SESSION_VERSION, "data"), Input(ids.SESS_MESSAGE, "children"))
@shows_errors(1, at=0)
def show_comments(image, session, _version, _saved):  # _saved: redraw right after this user's own change
    return collab.comments_view(current(), session, image)


@callback(Output(ids.SESS_COMMENT_TEXT, "value"), Output(ids.SESS_EDITING, "data"),
          Output(ids.SESS_MESSAGE, "children"),
          Input(ids.SESS_COMMENT_SAVE, "n_clicks"), Input(ids.SESS_COMMENT_CANCEL, "n_clicks"),
          Input({"type": ids.COMMENT_EDIT, "index": ALL}, "n_clicks"),
          Input({"type": ids.COMMENT_DELETE, "index": ALL}, "n_clicks"),
          State(ids.SESS_COMMENT_TEXT, "value"), State(ids.SESS_EDITING, "data"), State(ids.SESS_IMAGE, "value"),
          State(ids.SESSION, "data"), prevent_initial_call=True)
@shows_errors(3, at=2)
def write_comment(_save, _cancel, edit_clicks, delete_clicks, text, editing, image, session):
    wb, trigger = current(), ctx.triggered_id
    if isinstance(trigger, dict):
        if not ctx.triggered or not ctx.triggered[0].get("value"):
            return no_update, no_update, no_update  # a list redraw, not a click
        if trigger.get("type") == ids.COMMENT_EDIT:
            text, editing = collab.start_edit(wb, session, trigger.get("index"))
            return text, editing, None
        return no_update, no_update, collab.delete_comment(wb, session, trigger.get("index"))
    if trigger == ids.SESS_COMMENT_CANCEL:
        return "", None, None
    msg = collab.save_comment(wb, session, image=image, text=text, editing=editing)
    if msg.color == "success":
        return "", None, msg
    return no_update, no_update, msg


@callback(Output(ids.SESS_ADD_USER, "options"), Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"),
          Input(ids.SESS_MEMBERS_MESSAGE, "children"))
def list_candidates(session, _version, _changed):
    return collab.candidate_options(current(), session)  # AccessDenied (403) unless an admin


@callback(Output(ids.SESS_MEMBERS_MESSAGE, "children"), Output(ids.SESS_ADD_USER, "value"),
          Input(ids.SESS_ADD_MEMBER, "n_clicks"), Input({"type": ids.MEMBER_REMOVE, "index": ALL}, "n_clicks"),
          State(ids.SESS_ADD_USER, "value"), State(ids.SESSION, "data"), prevent_initial_call=True)
@shows_errors(2, at=0)
def change_members(_add, _remove_clicks, user, session):
    wb, trigger = current(), ctx.triggered_id
    if isinstance(trigger, dict):
        if not ctx.triggered or not ctx.triggered[0].get("value"):
            raise PreventUpdate  # the members table redrawn, not a click
        return collab.change_member(wb, session, "remove", trigger.get("index")), no_update
    return collab.change_member(wb, session, "add", user), None


@callback(Output(ids.SESS_NEW_MESSAGE, "children"), Output(ids.SESS_NEW_NAME, "value"),
          Output(ids.SESS_NEW_MEMBERS, "value"), Output(ids.SESSION_PICKER, "options", allow_duplicate=True),
          Output(ids.SESSION_PICKER, "value", allow_duplicate=True),
          Input(ids.SESS_NEW_CREATE, "n_clicks"), State(ids.SESS_NEW_NAME, "value"), State(ids.SESS_NEW_MODEL, "value"),
          State(ids.SESS_NEW_STORE, "value"), State(ids.SESS_NEW_MEMBERS, "value"), prevent_initial_call=True)
@shows_errors(5, at=0)
def create_session(clicks, name, model, store, members):
    if not clicks:  # the form mounting with the page (its outputs include the header's picker, so Dash calls it)
        raise PreventUpdate
    wb = current()
    msg, sid = collab.create_review_session(wb, name=name, model=model, store=store, members=members)
    if sid is None:
        return msg, no_update, no_update, no_update, no_update
    options, value = session_choices(wb, select=sid)  # the header lists it now and opens it
    return msg, "", [], options, value


@callback(Output(ids.SESS_IMPORT_MESSAGE, "children"), Output(ids.SESSION_PICKER, "options", allow_duplicate=True),
          Input(ids.SESS_IMPORT, "contents"), State(ids.SESS_IMPORT, "filename"), prevent_initial_call=True)
@shows_errors(2, at=0)
def import_file(contents, filename):
    if contents is None:  # the upload mounting with the page, not a file
        raise PreventUpdate
    wb = current()
    msg, _sid = collab.import_annotations(wb, contents, filename)
    return msg, wb.session_options()
