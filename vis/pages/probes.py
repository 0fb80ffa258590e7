"""Probes: each concept probe's versions from mlflow (held-out metrics against the number of annotations), its maps
on sample images, retraining as a background job, and rolling back to an earlier version.

A probe's current version lives in the activation store, so it is shared by every review session of that store: a
retrain or a rollback in one session changes what all of them see. Both are therefore recorded in the session they
were made in (explain.labels.record_probe_version, audited), and the page says which version the store serves
("current") and which one this session last chose ("this session"), with a note when they differ.
"""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, ctx, dcc, html

from vis import figures, ids
from vis.components import empty_state, labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/probes", name="Probes", title="ConceptLens · Probes", order=3)


def layout(**_query):
    wb = current()
    status = wb.status()
    if not status.ok:
        return empty_state(status.title, status.text)
    options = wb.probe_options()
    first = options[0]["value"] if options else None
    controls = html.Div([
        labeled("Probe", dcc.Dropdown(id=ids.PROBES_SELECT, options=options, value=first, clearable=False,
                                      placeholder="no probe yet: label units or mark images first")),
        html.Div([dbc.Button("Retrain", id=ids.PROBES_RETRAIN, color="primary", n_clicks=0,
                                       disabled=not options)], className="cl-field"),
        html.Div(dbc.Progress(id=ids.PROBES_PROGRESS, value=0, striped=True), style={"flex": "1 1 200px"},
                 className="cl-field"),
    ], className="cl-controls")
    rollback = html.Div([
        labeled("Roll back to", dcc.Dropdown(id=ids.PROBES_ROLLBACK_TO, options=[], value=None, clearable=False,
                                             placeholder="an earlier version")),
        html.Div(dbc.Button("Roll back", id=ids.PROBES_ROLLBACK, color="light", n_clicks=0,
                                  disabled=True), className="cl-field"),
    ], className="cl-controls mt-2")
    return html.Div([
        dcc.Store(id=ids.PROBES_VERSION, data=None),
        controls,
        html.Div(id=ids.PROBES_MESSAGE, className="mt-2"),
        dbc.Row([
            dbc.Col([panel("Versions", [dcc.Graph(id=ids.PROBES_VERSIONS, config=figures.MAP_CONFIG,
                                                  style={"height": "300px"},
                                                  figure=figures.empty_figure("", height=300)),
                                        html.Div(id=ids.PROBES_TABLE, className="cl-table-wrap mt-2"), rollback])],
                    width=6),
            dbc.Col(panel("Maps on sample images", html.Div(id=ids.PROBES_MAPS)), width=6),
        ], className="mt-3"),
    ])


@callback(Output(ids.PROBES_VERSIONS, "figure"), Output(ids.PROBES_TABLE, "children"),
          Output(ids.PROBES_ROLLBACK_TO, "options"), Output(ids.PROBES_MAPS, "children"),
          Output(ids.PROBES_MESSAGE, "children", allow_duplicate=True), Output(ids.PROBES_ROLLBACK, "disabled"),
          Input(ids.PROBES_SELECT, "value"), Input(ids.PROBES_VERSION, "data"), Input(ids.SESSION, "data"),
          prevent_initial_call="initial_duplicate")
@shows_errors(6, at=4)
def show_probe(probe, _version, session):
    figure, table, earlier, maps = current().probe_view(probe, session=session)
    return figure, table, earlier, maps, dash.no_update, not earlier  # nothing to roll back to: no button


@callback(Output(ids.PROBES_VERSION, "data", allow_duplicate=True), Output(ids.PROBES_MESSAGE, "children"),
          Input(ids.PROBES_ROLLBACK, "n_clicks"), State(ids.PROBES_SELECT, "value"),
          State(ids.PROBES_ROLLBACK_TO, "value"), State(ids.SESSION, "data"), prevent_initial_call=True)
@shows_errors(2, at=1)
def rollback(_clicks, probe, run_id, session):
    return current().rollback_probe(probe, run_id, session=session)


@callback(Output(ids.PROBES_VERSION, "data"), Output(ids.PROBES_MESSAGE, "children", allow_duplicate=True),
          Input(ids.PROBES_RETRAIN, "n_clicks"), State(ids.PROBES_SELECT, "value"), State(ids.SESSION, "data"),
          background=True, prevent_initial_call=True,
          progress=[Output(ids.PROBES_PROGRESS, "value"), Output(ids.PROBES_PROGRESS, "label")],
          running=[(Output(ids.PROBES_RETRAIN, "disabled"), True, False),
                   (Output(ids.PROBES_PROGRESS, "animated"), True, False)])
def retrain(set_progress, _clicks, probe, session):
    return current().retrain_probe(probe, progress=set_progress, session=session)
