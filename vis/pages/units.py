"""Units: the unit map of a layer (PCA or UMAP; coloured by concept, cluster or ground-truth IoU), a lasso
selection's prototype gallery, and one unit's detail (activation histogram, threshold, top-k, label history)."""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, ctx, dcc, html, no_update

from vis import figures, ids
from vis.components import empty_state, labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/units", name="Units", title="ConceptLens · Units", order=1)

PROJECTIONS = [{"label": "PCA", "value": "pca"}, {"label": "UMAP", "value": "umap"}]
COLORS = [{"label": "concept", "value": "concept"}, {"label": "cluster", "value": "cluster"},
          {"label": "ground-truth IoU", "value": "gt_iou"}]


def layout(**_query):
    wb = current()
    status = wb.status()
    if not status.ok:
        return empty_state(status.title, status.text)
    layer = wb.layer()
    controls = html.Div([
        labeled("Layer", dcc.Dropdown(id=ids.UNITS_LAYER, options=wb.store().layers, value=layer, clearable=False)),
        labeled("Projection", dbc.RadioItems(id=ids.UNITS_PROJECTION, options=PROJECTIONS, value="pca", inline=True)),
        labeled("Colour by", dbc.RadioItems(id=ids.UNITS_COLOR, options=wb.unit_color_options(), value="concept",
                                            inline=True)),
        html.Div(id=ids.UNITS_MESSAGE, style={"flex": "1 1 300px"}),
    ], className="cl-controls")
    return html.Div([
        dcc.Store(id=ids.UNITS_STATE, data={"unit": None, "selected": []}),
        controls,
        dbc.Row([
            dbc.Col(panel("Unit map", [dcc.Graph(id=ids.UNITS_MAP, config=figures.MAP_CONFIG,
                                                 style={"height": "600px"},
                                                 figure=figures.empty_figure("", height=600)),
                                       html.P("Lasso or box-select units to see their prototypes; click one for its "
                                              "detail.", className="cl-hint")]), width=7),
            dbc.Col(panel("Unit detail", html.Div(id=ids.UNITS_DETAIL,
                                                  children=html.Div("Click a unit.", className="cl-muted"))),
                    width=5),
        ], className="mt-3"),
        dbc.Row(dbc.Col(panel("Prototypes of the selected units", html.Div(id=ids.UNITS_GALLERY)), width=12),
                className="mt-3"),
    ])


@callback(Output(ids.UNITS_MAP, "figure"), Output(ids.UNITS_MESSAGE, "children"),
          Input(ids.UNITS_LAYER, "value"), Input(ids.UNITS_PROJECTION, "value"), Input(ids.UNITS_COLOR, "value"),
          Input(ids.UNITS_STATE, "data"), Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"))
@shows_errors(2, at=1)
def show_map(layer, projection, color, state, session, _version):
    return current().unit_map(layer, projection=projection, color_by=color, state=state, session=session), None


@callback(Output(ids.UNITS_STATE, "data"), Input(ids.UNITS_MAP, "selectedData"), Input(ids.UNITS_MAP, "clickData"),
          Input(ids.UNITS_LAYER, "value"), State(ids.UNITS_STATE, "data"), prevent_initial_call=True)
def select_units(selected, clicked, _layer, state):
    wb = current()
    if ctx.triggered_id == ids.UNITS_LAYER:
        return {"unit": None, "selected": []}
    if ctx.triggered_prop_ids and f"{ids.UNITS_MAP}.clickData" in ctx.triggered_prop_ids:
        return {**(state or {}), "unit": wb.clicked_unit(clicked)}
    units = wb.selected_points(selected, what="units")
    return no_update if units is None else {**(state or {}), "selected": units}


@callback(Output(ids.UNITS_GALLERY, "children"), Input(ids.UNITS_STATE, "data"), Input(ids.SESSION, "data"),
          State(ids.UNITS_LAYER, "value"))
@shows_errors(1, at=0)
def show_gallery(state, session, layer):
    return current().prototype_gallery(layer, state, session=session)


@callback(Output(ids.UNITS_DETAIL, "children"), Input(ids.UNITS_STATE, "data"), Input(ids.SESSION, "data"),
          Input(ids.SESSION_VERSION, "data"), State(ids.UNITS_LAYER, "value"))
@shows_errors(1, at=0)
def show_detail(state, session, _version, layer):
    return current().unit_detail(layer, state, session=session)
