"""Experiments: mlflow runs side by side (training and probe runs): parameter differences, metric curves, ROC
plots, and a link to the mlflow UI (`python -m vis mlflow-ui`, same tracking store)."""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, html

from vis import figures, ids
from vis.components import labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/experiments", name="Experiments", title="ConceptLens · Experiments", order=4)


def layout(**_query):
    wb = current()
    runs = wb.run_options()
    chosen = [r["value"] for r in runs[:2]]
    link = html.A("Open the mlflow UI ↗", id=ids.EXP_MLFLOW_LINK, href=wb.config.mlflow_ui_url, target="_blank",
                  rel="noopener", className="btn btn-outline-primary btn-sm")
    controls = html.Div([
        labeled("Runs", dcc.Dropdown(id=ids.EXP_RUNS, options=runs, value=chosen, multi=True,
                                     placeholder="no runs yet: train a model (make train)"),
                className="cl-grow"),
        labeled("Metric", dcc.Dropdown(id=ids.EXP_METRIC, options=[], value=None, clearable=False)),
        html.Div([link, html.Div("python -m vis mlflow-ui", className="cl-muted")], className="cl-field"),
    ], className="cl-controls")
    return html.Div([
        controls,
        html.Div(id=ids.EXP_MESSAGE, className="mt-2"),
        # the two figures stack beside the parameter table, which may run as tall as the window (a square ROC in a
        # full-width row of its own left most of that row empty)
        dbc.Row([
            dbc.Col(panel("Parameters that differ", html.Div(id=ids.EXP_PARAMS, className="cl-table-tall")), width=5),
            dbc.Col([
                panel("Metric curves", dcc.Graph(id=ids.EXP_CURVES, config=figures.MAP_CONFIG,
                                                 style={"height": "340px"}, figure=figures.empty_figure("", height=340))),
                panel("ROC (test split)", html.Div(id=ids.EXP_ROC), className="mt-3"),
            ], width=7),
        ], className="mt-3"),
    ])


@callback(Output(ids.EXP_PARAMS, "children"), Output(ids.EXP_METRIC, "options"), Output(ids.EXP_METRIC, "value"),
          Output(ids.EXP_ROC, "children"), Output(ids.EXP_MESSAGE, "children"),
          Input(ids.EXP_RUNS, "value"), dash.State(ids.EXP_METRIC, "value"))
@shows_errors(5, at=4)
def show_runs(run_ids, metric):
    return current().runs_view(run_ids, metric)


@callback(Output(ids.EXP_CURVES, "figure"), Input(ids.EXP_RUNS, "value"), Input(ids.EXP_METRIC, "value"))
def show_curves(run_ids, metric):
    return current().metric_curves(run_ids, metric)
