"""Users (administrators only): every account with its role and state; create a user, change a role, reset a
password, deactivate or reactivate. Each callback checks `require_admin` on the server: anyone else gets 403."""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, ctx, dcc, html

from vis import collab, ids
from vis.components import empty_state, labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/users", name="Users", title="ConceptLens · Users", order=6, admin_only=True)

ROLES = [{"label": r, "value": r} for r in ("radiologist", "researcher", "admin")]


def layout(**_query):
    if current().account().role != "admin":
        return empty_state("Administrators only", "Ask an administrator to create or change accounts.")
    create = panel("New user", [
        html.Div([
            labeled("User name", dbc.Input(id=ids.USERS_NAME, placeholder="e.g. ana.rossi", maxLength=64)),
            labeled("Display name", dbc.Input(id=ids.USERS_DISPLAY, placeholder="Ana Rossi", maxLength=120)),
            labeled("Role", dcc.Dropdown(id=ids.USERS_ROLE, options=ROLES, value="radiologist", clearable=False)),
            labeled("Password", dbc.Input(id=ids.USERS_PASSWORD, type="password", maxLength=1024,
                                          placeholder="at least 12 characters")),
        ], className="cl-form-grid"),
        html.Div(dbc.Button("Create user", id=ids.USERS_CREATE, color="primary", n_clicks=0), className="cl-actions"),
    ])
    change = panel("Change a user", [
        labeled("User", dcc.Dropdown(id=ids.USERS_TARGET, options=[], value=None, placeholder="choose a user")),
        html.Div([labeled("New role", dcc.Dropdown(id=ids.USERS_NEW_ROLE, options=ROLES, value="researcher",
                                                   clearable=False)),
                  dbc.Button("Set role", id=ids.USERS_SET_ROLE, color="light", n_clicks=0)], className="cl-inline mt-2"),
        html.Div([labeled("New password", dbc.Input(id=ids.USERS_NEW_PASSWORD, type="password", maxLength=1024)),
                  dbc.Button("Reset password", id=ids.USERS_RESET, color="light", n_clicks=0)],
                 className="cl-inline mt-2"),
        html.Div([dbc.Button("Deactivate", id=ids.USERS_DEACTIVATE, color="danger", outline=True, n_clicks=0),
                  dbc.Button("Reactivate", id=ids.USERS_ACTIVATE, color="success", outline=True, n_clicks=0)],
                 className="cl-actions"),
    ])
    return html.Div([
        dcc.Store(id=ids.USERS_VERSION, data=0),
        html.Div(id=ids.USERS_MESSAGE, className="mb-2"),
        dbc.Row([
            dbc.Col(panel("Accounts", html.Div(id=ids.USERS_TABLE, className="cl-table-wrap")), width=7),
            dbc.Col([create, change], width=5),
        ]),
    ])


@callback(Output(ids.USERS_TABLE, "children"), Output(ids.USERS_TARGET, "options"),
          Input(ids.USERS_VERSION, "data"))
def show_users(_version):
    wb = current()
    return collab.users_table(wb), collab.user_options(wb)  # AccessDenied (403) unless an admin


@callback(Output(ids.USERS_MESSAGE, "children"), Output(ids.USERS_VERSION, "data"),
          Output(ids.USERS_PASSWORD, "value"), Output(ids.USERS_NEW_PASSWORD, "value"),
          Input(ids.USERS_CREATE, "n_clicks"), Input(ids.USERS_SET_ROLE, "n_clicks"), Input(ids.USERS_RESET, "n_clicks"),
          Input(ids.USERS_DEACTIVATE, "n_clicks"), Input(ids.USERS_ACTIVATE, "n_clicks"),
          State(ids.USERS_NAME, "value"), State(ids.USERS_DISPLAY, "value"), State(ids.USERS_ROLE, "value"),
          State(ids.USERS_PASSWORD, "value"), State(ids.USERS_TARGET, "value"), State(ids.USERS_NEW_ROLE, "value"),
          State(ids.USERS_NEW_PASSWORD, "value"), State(ids.USERS_VERSION, "data"), prevent_initial_call=True)
@shows_errors(4, at=0)
def change_users(_c, _r, _p, _d, _a, name, display, role, password, target, new_role, new_password, version):
    wb, trigger = current(), ctx.triggered_id
    if trigger == ids.USERS_CREATE:
        msg = collab.create_user(wb, name=name, display_name=display, role=role, password=password)
    else:
        action = {ids.USERS_SET_ROLE: "role", ids.USERS_RESET: "password", ids.USERS_DEACTIVATE: "deactivate",
                  ids.USERS_ACTIVATE: "activate"}[trigger]
        msg = collab.change_user(wb, action, name=target, role=new_role, password=new_password)
    return msg, (version or 0) + 1, "", ""
