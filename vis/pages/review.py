"""Review: the whole mammogram, its flagged patches, one patch with overlays and drawn regions, the units that
match the region, labeling with undo, and the concept report of the patch.

Callbacks are a few lines each over `vis.services.Workbench` (`current()`); per-user state lives in dcc.Store as
ids and indices: REVIEW_STATE {"source", "image", "unit"}, REVIEW_REGIONS (the drawn plotly shapes), REVIEW_ACTIONS
(this tab's labeling action ids, for undo), REVIEW_CONCEPTS (concepts this user typed). Every callback that reads or
writes annotations also gets the shell's review session (ids.SESSION), which the Workbench checks on the server;
the views that show annotations also listen to ids.SESSION_VERSION, so another reviewer's regions and labels appear
within a poll interval.
"""

from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, State, callback, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from vis import figures, ids
from vis.components import empty_state, labeled, panel, shows_errors
from vis.services import current

dash.register_page(__name__, path="/", name="Review", title="ConceptLens · Review", order=0)

OVERLAY_OPTIONS = [{"label": " Grad-CAM", "value": "gradcam"}, {"label": " unit mask", "value": "unit"},
                   {"label": " probe map", "value": "probe"}]


def layout(**_query):
    wb = current()
    status = wb.status()
    if not status.ok:
        return empty_state(status.title, status.text)
    sources = wb.source_options()
    first = sources[0]["value"] if sources else None
    layer = wb.layer()
    toolbar = html.Div([
        html.Div(dcc.Dropdown(id=ids.REVIEW_SOURCE, options=sources, value=first, clearable=False,
                              searchable=True), className="cl-source"),
        dbc.ButtonGroup([dbc.Button("‹ Previous", id=ids.REVIEW_PREV, color="light", size="sm", n_clicks=0),
                         dbc.Button("Next ›", id=ids.REVIEW_NEXT, color="light", size="sm", n_clicks=0)]),
        html.Div([
            html.Label("Level", className="cl-label"),
            dcc.Slider(id=ids.REVIEW_LEVEL, min=0, max=1, step=0.01, value=0.5, marks=None,
                       tooltip={"placement": "bottom", "always_visible": False}, updatemode="mouseup"),
            html.Label("Width", className="cl-label"),
            dcc.Slider(id=ids.REVIEW_WIDTH, min=0.05, max=1, step=0.01, value=1.0, marks=None,
                       tooltip={"placement": "bottom", "always_visible": False}, updatemode="mouseup"),
        ], className="cl-window"),
        dbc.Switch(id=ids.REVIEW_OVERLAY, label="P(lesion) overlay", value=True),
        html.Div(id=ids.REVIEW_SOURCE_INFO, className="cl-muted"),
    ], className="cl-toolbar")

    mammogram = panel("Mammogram", [
        dcc.Loading(dcc.Graph(id=ids.REVIEW_MAMMOGRAM, config=figures.MAMMOGRAM_CONFIG,
                              figure=figures.empty_figure("", dark=True, height=720),
                              style={"height": "720px"}), type="circle", delay_show=400,
                    overlay_style={"visibility": "visible"}),  # the image stays while its overlay is computed
    ], body_class="cl-flush cl-image-pane")
    strip = panel("Flagged patches", html.Div(id=ids.REVIEW_FLAGGED, className="cl-strip"))

    patch = panel("Patch", [
        html.Div(id=ids.REVIEW_PATCH_INFO, className="cl-stats mb-2"),
        dcc.Graph(id=ids.REVIEW_PATCH, config=figures.PATCH_CONFIG,
                  figure=figures.empty_figure("Open a flagged patch or click the breast", dark=True, height=440),
                  style={"height": "440px"}),
        html.Div([
            dbc.Checklist(id=ids.REVIEW_PATCH_OVERLAYS, options=OVERLAY_OPTIONS, value=[], inline=True),
            html.Div(dcc.Dropdown(id=ids.REVIEW_PROBE, options=wb.probe_options(combined=True), value=None,
                                  placeholder="probe for the map", clearable=True), style={"minWidth": "180px"}),
        ], className="cl-toolbar mt-2"),
        html.P("Draw on the patch: freehand (default), rectangle or circle from the tool bar; several regions add "
               "up; select one and press the eraser to remove it.", className="cl-hint"),
    ], tools=[dbc.Button("Clear regions", id=ids.REVIEW_CLEAR, color="light", size="sm", n_clicks=0)])

    concepts = panel("Label units", [
        html.Div([
            dcc.Dropdown(id=ids.REVIEW_CONCEPT, options=wb.concept_options([]), value="mass", clearable=False),
            dbc.Button("Label units", id=ids.REVIEW_LABEL, color="primary", n_clicks=0),
        ], className="cl-concept-bar"),
        html.Div([
            dbc.InputGroup([dbc.Input(id=ids.REVIEW_NEW_CONCEPT, placeholder="new concept",
                                      maxLength=60, debounce=False, size="sm"),
                            dbc.Button("Add", id=ids.REVIEW_ADD_CONCEPT, color="light", size="sm", n_clicks=0)]),
            dbc.Button("Suggest a patch", id=ids.REVIEW_SUGGEST, color="light", size="sm", n_clicks=0,
                       title="Open the patch where drawing this concept next helps the labels most"),
            dbc.Button("Undo", id=ids.REVIEW_UNDO, color="light", size="sm", n_clicks=0),
        ], className="cl-actions"),
        html.Div(id=ids.REVIEW_MESSAGE, className="mt-2"),
    ])

    units = panel("Units", [
        html.Div([labeled("Layer", dcc.Dropdown(id=ids.REVIEW_LAYER, options=wb.store().layers, value=layer,
                                                clearable=False))], className="cl-controls mb-2"),
        html.Div(id=ids.REVIEW_IOU_INFO, className="mb-1"),
        dcc.Graph(id=ids.REVIEW_UNIT_MAP, config=figures.MAP_CONFIG, style={"height": "330px"},
                  figure=figures.empty_figure("", height=330)),
    ])
    detail = panel("Unit", html.Div(id=ids.REVIEW_UNIT_DETAIL,
                                    children=html.Div("Click a unit in the map.", className="cl-muted")))
    report = panel("Report", html.Div(id=ids.REVIEW_REPORT))

    return html.Div([
        dcc.Store(id=ids.REVIEW_STATE, data={"source": first, "image": None, "unit": None}),
        dcc.Store(id=ids.REVIEW_REGIONS, data=[]),
        dcc.Store(id=ids.REVIEW_SHOWN, data=None),
        dcc.Store(id=ids.REVIEW_OVERLAY_PENDING, data=None),
        dcc.Store(id=ids.REVIEW_ACTIONS, data=[], storage_type="session"),
        dcc.Store(id=ids.REVIEW_CONCEPTS, data=[], storage_type="local"),
        toolbar,
        dbc.Row([
            dbc.Col([mammogram, strip], width=4),
            dbc.Col([patch, concepts], width=4),
            dbc.Col([units, detail], width=4),
        ], className="mt-3"),
        dbc.Row(dbc.Col(report, width=12), className="mt-3"),
    ])


# -- navigation --------------------------------------------------------------------------------------------------------
@callback(Output(ids.REVIEW_SOURCE, "value"), Input(ids.REVIEW_PREV, "n_clicks"), Input(ids.REVIEW_NEXT, "n_clicks"),
          State(ids.REVIEW_SOURCE, "value"), prevent_initial_call=True)
def step_source(_prev, _next, source):
    return current().step_source(source, -1 if ctx.triggered_id == ids.REVIEW_PREV else 1)


@callback(Output(ids.REVIEW_STATE, "data"), Output(ids.REVIEW_REGIONS, "data", allow_duplicate=True),
          Output(ids.REVIEW_MESSAGE, "children", allow_duplicate=True),
          Output(ids.REVIEW_SOURCE, "value", allow_duplicate=True),
          Input(ids.REVIEW_SOURCE, "value"), Input({"type": ids.FLAGGED_PATCH, "index": ALL}, "n_clicks"),
          Input(ids.REVIEW_MAMMOGRAM, "clickData"), Input(ids.REVIEW_UNIT_MAP, "clickData"),
          Input(ids.REVIEW_SUGGEST, "n_clicks"), State(ids.REVIEW_STATE, "data"), State(ids.REVIEW_CONCEPT, "value"),
          State(ids.REVIEW_LAYER, "value"), State(ids.SESSION, "data"), prevent_initial_call="initial_duplicate")
@shows_errors(4, at=2)
def open_patch(source, _flag_clicks, mammogram_click, unit_click, _suggest, state, concept, layer, session):
    wb, trigger = current(), ctx.triggered_id
    if isinstance(trigger, dict) and trigger.get("type") == ids.FLAGGED_PATCH:
        if not any(_flag_clicks or []):
            return no_update, no_update, no_update, no_update
        return wb.open_state(state, image=trigger["index"]), [], None, no_update
    if trigger == ids.REVIEW_MAMMOGRAM:
        return wb.open_state(state, image=wb.patch_at(state, mammogram_click)), [], None, no_update
    if trigger == ids.REVIEW_UNIT_MAP:
        return wb.open_state(state, unit=wb.clicked_unit(unit_click)), no_update, no_update, no_update
    if trigger == ids.REVIEW_SUGGEST:  # the patch may lie on another mammogram: the source follows it
        new, note = wb.suggest_patch(state, concept=concept, layer=layer, session=session)
        if new is None:
            return no_update, no_update, note, no_update
        return new, [], note, new["source"]
    if isinstance(state, dict) and state.get("image") and state.get("source") == source:
        return no_update, no_update, no_update, no_update  # the source followed an opened patch: keep that patch
    return wb.open_state(state, source=source, image=wb.default_patch(source)), [], None, no_update


# -- views -------------------------------------------------------------------------------------------------------------
@callback(Output(ids.REVIEW_MAMMOGRAM, "figure"), Output(ids.REVIEW_SHOWN, "data"),
          Output(ids.REVIEW_SOURCE_INFO, "children"), Output(ids.REVIEW_OVERLAY_PENDING, "data"),
          Input(ids.REVIEW_SOURCE, "value"), Input(ids.REVIEW_LEVEL, "value"), Input(ids.REVIEW_WIDTH, "value"),
          Input(ids.REVIEW_OVERLAY, "value"), Input(ids.REVIEW_STATE, "data"), State(ids.REVIEW_SHOWN, "data"))
@shows_errors(4, at=2)
def show_mammogram(source, level, width, overlay, state, shown):
    wb = current()
    if shown == source and set(ctx.triggered_prop_ids) == {f"{ids.REVIEW_STATE}.data"}:
        return wb.mammogram_boxes(source, state), no_update, no_update, no_update  # only the open patch moved
    # a mammogram never viewed shows at once; its P(lesion) overlay (a second or two of the model) follows
    pending = bool(overlay) and not wb.overlay_ready(source)
    figure = wb.mammogram_figure(source, state, level=level, width=width, overlay=overlay, placeholder=pending)
    info = wb.source_info(source)
    if pending:
        return figure, source, f"{info} · computing the P(lesion) overlay…", source
    return figure, source, info, None


@callback(Output(ids.REVIEW_MAMMOGRAM, "figure", allow_duplicate=True),
          Output(ids.REVIEW_SOURCE_INFO, "children", allow_duplicate=True),
          Output(ids.REVIEW_OVERLAY_PENDING, "data", allow_duplicate=True),
          Input(ids.REVIEW_OVERLAY_PENDING, "data"), State(ids.REVIEW_SHOWN, "data"),
          State(ids.REVIEW_OVERLAY, "value"), prevent_initial_call=True)
@shows_errors(3, at=1)
def fill_overlay(pending, shown, overlay):
    if not pending or pending != shown or overlay is not True:  # another mammogram is shown now, or no overlay
        return no_update, no_update, no_update
    wb = current()
    return wb.overlay_patch(pending), wb.source_info(pending), None


@callback(Output(ids.REVIEW_FLAGGED, "children"), Input(ids.REVIEW_SOURCE, "value"), Input(ids.REVIEW_STATE, "data"))
@shows_errors(1, at=0)
def show_flagged(source, state):
    return current().flagged_strip(source, state)


@callback(Output(ids.REVIEW_PROBE, "options"), Input(ids.SESSION_VERSION, "data"), State(ids.REVIEW_PROBE, "options"),
          prevent_initial_call=True)
def refresh_probe_options(_version, shown):
    """A probe fitted in the session since the page opened (a labeling, a marking, another reviewer) joins the menu,
    and with a second layer its map across layers."""
    options = current().probe_options(combined=True)
    if options == shown:
        raise PreventUpdate  # nothing new: the menu stays as it is
    return options


@callback(Output(ids.REVIEW_PATCH, "figure"), Output(ids.REVIEW_PATCH_INFO, "children"),
          Input(ids.REVIEW_STATE, "data"), Input(ids.REVIEW_PATCH_OVERLAYS, "value"), Input(ids.REVIEW_PROBE, "value"),
          Input(ids.REVIEW_REGIONS, "data"), Input(ids.REVIEW_LAYER, "value"), Input(ids.SESSION, "data"),
          Input(ids.SESSION_VERSION, "data"))
@shows_errors(2, at=1)
def show_patch(state, overlays, probe, regions, layer, session, _version):
    return current().patch_view(state, overlays=overlays, probe=probe, regions=regions, layer=layer, session=session)


@callback(Output(ids.CURRENT_IMAGE, "data"), Input(ids.REVIEW_STATE, "data"), prevent_initial_call=True)
def remember_image(state):
    image = state.get("image") if isinstance(state, dict) else None
    if not image:
        return no_update
    current().record(image)  # an image of the store, or 400
    return image


@callback(Output(ids.REVIEW_REGIONS, "data"), Input(ids.REVIEW_PATCH, "relayoutData"),
          Input(ids.REVIEW_CLEAR, "n_clicks"), State(ids.REVIEW_REGIONS, "data"), prevent_initial_call=True)
def track_regions(relayout, _clear, regions):
    if ctx.triggered_id == ids.REVIEW_CLEAR:
        return []
    return current().update_regions(regions, relayout)


@callback(Output(ids.REVIEW_UNIT_MAP, "figure"), Output(ids.REVIEW_IOU_INFO, "children"),
          Input(ids.REVIEW_STATE, "data"), Input(ids.REVIEW_REGIONS, "data"), Input(ids.REVIEW_LAYER, "value"),
          Input(ids.REVIEW_ACTIONS, "data"), Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"))
@shows_errors(2, at=1)
def show_units(state, regions, layer, _actions, session, _version):
    return current().review_unit_map(state, regions=regions, layer=layer, session=session)


@callback(Output(ids.REVIEW_UNIT_DETAIL, "children"), Input(ids.REVIEW_STATE, "data"),
          Input(ids.REVIEW_LAYER, "value"), Input(ids.SESSION, "data"))
@shows_errors(1, at=0)
def show_unit_detail(state, layer, session):
    return current().review_unit_detail(state, layer=layer, session=session)


@callback(Output(ids.REVIEW_REPORT, "children"), Input(ids.REVIEW_STATE, "data"), Input(ids.REVIEW_ACTIONS, "data"),
          Input(ids.REVIEW_LAYER, "value"), Input(ids.SESSION, "data"), Input(ids.SESSION_VERSION, "data"))
@shows_errors(1, at=0)
def show_report(state, _actions, layer, session, _version):
    return current().report_view(state, layer=layer, session=session)


# -- concepts and labeling -----------------------------------------------------------------------------------------------
@callback(Output(ids.REVIEW_CONCEPTS, "data"), Output(ids.REVIEW_CONCEPT, "options"),
          Output(ids.REVIEW_CONCEPT, "value"), Output(ids.REVIEW_NEW_CONCEPT, "value"),
          Input(ids.REVIEW_ADD_CONCEPT, "n_clicks"), Input(ids.REVIEW_NEW_CONCEPT, "n_submit"),
          Input(ids.REVIEW_CONCEPTS, "data"), State(ids.REVIEW_NEW_CONCEPT, "value"),
          State(ids.REVIEW_CONCEPT, "value"))
def add_concept(_clicks, _submit, concepts, typed, chosen):
    wb = current()
    if ctx.triggered_id in (ids.REVIEW_ADD_CONCEPT, ids.REVIEW_NEW_CONCEPT) and typed:
        concepts, chosen = wb.add_concept(concepts, typed)
        return concepts, wb.concept_options(concepts), chosen, ""
    return no_update, wb.concept_options(concepts), no_update, no_update


@callback(Output(ids.REVIEW_ACTIONS, "data"), Output(ids.REVIEW_MESSAGE, "children"),
          Input(ids.REVIEW_LABEL, "n_clicks"), Input(ids.REVIEW_UNDO, "n_clicks"),
          State(ids.REVIEW_STATE, "data"), State(ids.REVIEW_REGIONS, "data"), State(ids.REVIEW_CONCEPT, "value"),
          State(ids.REVIEW_LAYER, "value"), State(ids.REVIEW_ACTIONS, "data"), State(ids.SESSION, "data"),
          prevent_initial_call=True)
@shows_errors(2, at=1)
def label_or_undo(_label, _undo, state, regions, concept, layer, actions, session):
    wb = current()
    if ctx.triggered_id == ids.REVIEW_UNDO:
        return wb.undo_last(actions, session=session)
    return wb.label_units(state, regions=regions, concept=concept, layer=layer, actions=actions, session=session)


@callback(Output(ids.REVIEW_ACTIONS, "data", allow_duplicate=True), Input(ids.SESSION, "data"),
          prevent_initial_call=True)
def forget_actions_of_another_session(_session):
    return []  # undo works on this tab's actions in the session they were made in
