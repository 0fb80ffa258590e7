"""Images: the image map coloured by class, prediction, correctness or a probe's score; a lasso selection is marked
as showing / not showing a concept, the probe retrains as a background job with a progress bar, and the views
update to the new probe version."""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, ctx, dcc, html, no_update

from vis import figures, ids
from vis.components import empty_state, labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/images", name="Images", title="ConceptLens · Images", order=2)

COLORS = [{"label": "class", "value": "class"}, {"label": "prediction", "value": "prediction"},
          {"label": "correct", "value": "correct"}, {"label": "probe score", "value": "probe"}]


def layout(**_query):
    wb = current()
    status = wb.status()
    if not status.ok:
        return empty_state(status.title, status.text)
    layer = wb.layer()
    controls = html.Div([
        labeled("Layer", dcc.Dropdown(id=ids.IMAGES_LAYER, options=wb.store().layers, value=layer, clearable=False)),
        labeled("Colour by", dbc.RadioItems(id=ids.IMAGES_COLOR, options=COLORS, value="class", inline=True)),
        labeled("Concept", dcc.Dropdown(id=ids.IMAGES_CONCEPT, options=wb.concept_options([]), value="mass",
                                        clearable=False), className="cl-wide"),
    ], className="cl-controls")
    actions = html.Div([
        html.Div(id=ids.IMAGES_SELECTION, className="mb-2"),
        html.Div([
            dbc.Button("Shows the concept", id=ids.IMAGES_MARK_POS, color="success", n_clicks=0),
            dbc.Button("Does not show it", id=ids.IMAGES_MARK_NEG, color="danger", n_clicks=0, outline=True),
        ], className="cl-actions"),
        html.Div([
            dbc.Button("Retrain probe", id=ids.IMAGES_RETRAIN, color="primary", n_clicks=0),
            dbc.Button("Cancel", id=ids.IMAGES_CANCEL, color="light", n_clicks=0, disabled=True),
        ], className="cl-actions"),
        dbc.Progress(id=ids.IMAGES_PROGRESS, value=0, label="", className="mt-3", striped=True),
        html.Div(id=ids.IMAGES_MESSAGE, className="mt-2"),
        html.P("Marking images retrains the concept's probe on this layer; each version is an mlflow run.",
               className="cl-hint"),
    ])
    return html.Div([
        dcc.Store(id=ids.IMAGES_STATE, data={"selected": []}),
        dcc.Store(id=ids.IMAGES_VERSION, data=None),
        controls,
        dbc.Row([
            dbc.Col(panel("Image map", dcc.Graph(id=ids.IMAGES_MAP, config=figures.MAP_CONFIG,
                                                 style={"height": "640px"},
                                                 figure=figures.empty_figure("", height=640))), width=8),
            dbc.Col([panel("Selection", actions),
                     panel("Selected images", html.Div(id=ids.IMAGES_GALLERY))], width=4),
        ], className="mt-3"),
    ])


@callback(Output(ids.IMAGES_MAP, "figure"), Output(ids.IMAGES_MESSAGE, "children", allow_duplicate=True),
          Input(ids.IMAGES_LAYER, "value"), Input(ids.IMAGES_COLOR, "value"), Input(ids.IMAGES_CONCEPT, "value"),
          Input(ids.IMAGES_VERSION, "data"), State(ids.IMAGES_STATE, "data"), prevent_initial_call="initial_duplicate")
@shows_errors(2, at=1)
def show_map(layer, color, concept, _version, state):
    return current().image_map(layer, color_by=color, concept=concept, state=state), dash.no_update


@callback(Output(ids.IMAGES_STATE, "data"), Input(ids.IMAGES_MAP, "selectedData"), prevent_initial_call=True)
def select_images(selected):
    rows = current().selected_points(selected, what="images")
    return no_update if rows is None else {"selected": rows}


@callback(Output(ids.IMAGES_SELECTION, "children"), Output(ids.IMAGES_GALLERY, "children"),
          Input(ids.IMAGES_STATE, "data"), Input(ids.IMAGES_VERSION, "data"), State(ids.IMAGES_CONCEPT, "value"),
          State(ids.IMAGES_LAYER, "value"))
@shows_errors(2, at=0)
def show_selection(state, _version, concept, layer):
    return current().selection_view(state, concept=concept, layer=layer)


@callback(Output(ids.IMAGES_VERSION, "data"), Output(ids.IMAGES_MESSAGE, "children"),
          Output(ids.IMAGES_COLOR, "value"), Input(ids.IMAGES_MARK_POS, "n_clicks"), Input(ids.IMAGES_MARK_NEG, "n_clicks"),
          Input(ids.IMAGES_RETRAIN, "n_clicks"),
          State(ids.IMAGES_STATE, "data"), State(ids.IMAGES_CONCEPT, "value"), State(ids.IMAGES_LAYER, "value"),
          State(ids.SESSION, "data"), background=True, prevent_initial_call=True,
          progress=[Output(ids.IMAGES_PROGRESS, "value"), Output(ids.IMAGES_PROGRESS, "label")],
          running=[(Output(ids.IMAGES_RETRAIN, "disabled"), True, False),
                   (Output(ids.IMAGES_MARK_POS, "disabled"), True, False),
                   (Output(ids.IMAGES_MARK_NEG, "disabled"), True, False),
                   (Output(ids.IMAGES_CANCEL, "disabled"), False, True),
                   (Output(ids.IMAGES_PROGRESS, "animated"), True, False)],
          cancel=[Input(ids.IMAGES_CANCEL, "n_clicks")])
def mark_and_retrain(set_progress, pos, neg, retrain, state, concept, layer, session):
    # runs in a job process: the Workbench finds the user from the signed cookie the job carries (vis.auth)
    mark = {ids.IMAGES_MARK_POS: True, ids.IMAGES_MARK_NEG: False}.get(ctx.triggered_id)
    return current().mark_and_retrain(state, concept=concept, layer=layer, present=mark, progress=set_progress,
                                      session=session)
