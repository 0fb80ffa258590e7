"""Every component id of the app, in one place; pages, callbacks, tests and the benchmark import them from here.

    >>> from vis import ids
    >>> dcc.Graph(id=ids.REVIEW_MAMMOGRAM)
    >>> html.Button(id=ids.flagged_patch("p-000123"))        # pattern-matching id of one flagged-patch button

Plain ids are strings `<page>-<what>`. Repeated widgets use pattern-matching ids, a dict `{"type": …, "index": …}`
built by the helpers at the bottom, so one callback serves every copy (`ids.FLAGGED_PATCH` with `ALL`/`MATCH`).
"""

from __future__ import annotations

# -- shell (every page) ----------------------------------------------------------------------------------------------
NAVBAR = "shell-navbar"
STATUS = "shell-status"  # workspace banner: no dataset / no store / store of another model
STATUS_INTERVAL = "shell-status-interval"

# -- review ----------------------------------------------------------------------------------------------------------
REVIEW_STATE = "review-state"  # dcc.Store {"source", "image", "layer", "unit"}: ids only
REVIEW_REGIONS = "review-regions"  # dcc.Store [shape, …]: the regions drawn on the open patch (plotly shapes)
REVIEW_ACTIONS = "review-actions"  # dcc.Store [action id, …]: labeling actions of this session, for undo
REVIEW_CONCEPTS = "review-concepts"  # dcc.Store [concept id, …]: concepts typed by this user
REVIEW_SOURCE = "review-source"  # dropdown of mammograms
REVIEW_PREV = "review-prev"
REVIEW_NEXT = "review-next"
REVIEW_SOURCE_INFO = "review-source-info"
REVIEW_LEVEL = "review-level"  # window centre, display units 0…1
REVIEW_WIDTH = "review-width"  # window width, display units 0…1
REVIEW_OVERLAY = "review-overlay"  # switch: lesion-probability overlay on the mammogram
REVIEW_MAMMOGRAM = "review-mammogram"
REVIEW_SHOWN = "review-shown"  # dcc.Store: the mammogram id the figure currently shows (to redraw only boxes)
REVIEW_FLAGGED = "review-flagged"  # strip of flagged patches
REVIEW_PATCH = "review-patch"
REVIEW_PATCH_INFO = "review-patch-info"
REVIEW_PATCH_OVERLAYS = "review-patch-overlays"  # checklist: gradcam / unit / probe
REVIEW_PROBE = "review-probe"  # which probe's map to overlay
REVIEW_LAYER = "review-layer"
REVIEW_CLEAR = "review-clear"  # erase every region
REVIEW_IOU_INFO = "review-iou-info"
REVIEW_UNIT_MAP = "review-unit-map"
REVIEW_CONCEPT = "review-concept"
REVIEW_NEW_CONCEPT = "review-new-concept"
REVIEW_ADD_CONCEPT = "review-add-concept"
REVIEW_LABEL = "review-label"
REVIEW_UNDO = "review-undo"
REVIEW_MESSAGE = "review-message"
REVIEW_REPORT = "review-report"
REVIEW_UNIT_DETAIL = "review-unit-detail"

# -- units -----------------------------------------------------------------------------------------------------------
UNITS_STATE = "units-state"  # dcc.Store {"layer", "unit", "selected": [unit, …]}
UNITS_LAYER = "units-layer"
UNITS_PROJECTION = "units-projection"  # pca / umap
UNITS_COLOR = "units-color"  # concept / cluster / gt_iou
UNITS_MAP = "units-map"
UNITS_GALLERY = "units-gallery"
UNITS_DETAIL = "units-detail"
UNITS_MESSAGE = "units-message"

# -- images ----------------------------------------------------------------------------------------------------------
IMAGES_STATE = "images-state"  # dcc.Store {"selected": [image id, …]}
IMAGES_VERSION = "images-version"  # dcc.Store: the probe run id the views show; changes after a retrain
IMAGES_LAYER = "images-layer"
IMAGES_COLOR = "images-color"  # class / prediction / correct / probe
IMAGES_PROBE = "images-probe"
IMAGES_MAP = "images-map"
IMAGES_SELECTION = "images-selection"
IMAGES_CONCEPT = "images-concept"
IMAGES_MARK_POS = "images-mark-pos"
IMAGES_MARK_NEG = "images-mark-neg"
IMAGES_RETRAIN = "images-retrain"
IMAGES_CANCEL = "images-cancel"
IMAGES_PROGRESS = "images-progress"
IMAGES_MESSAGE = "images-message"
IMAGES_GALLERY = "images-gallery"

# -- probes ----------------------------------------------------------------------------------------------------------
PROBES_SELECT = "probes-select"
PROBES_VERSION = "probes-version"  # dcc.Store: current run id after a retrain / rollback
PROBES_VERSIONS = "probes-versions"  # graph: metrics against number of annotations
PROBES_TABLE = "probes-table"
PROBES_MAPS = "probes-maps"
PROBES_RETRAIN = "probes-retrain"
PROBES_PROGRESS = "probes-progress"
PROBES_ROLLBACK_TO = "probes-rollback-to"
PROBES_ROLLBACK = "probes-rollback"
PROBES_MESSAGE = "probes-message"

# -- experiments -----------------------------------------------------------------------------------------------------
EXP_RUNS = "exp-runs"
EXP_PARAMS = "exp-params"
EXP_METRIC = "exp-metric"
EXP_CURVES = "exp-curves"
EXP_ROC = "exp-roc"
EXP_MLFLOW_LINK = "exp-mlflow-link"
EXP_MESSAGE = "exp-message"

# -- pattern-matching ids ----------------------------------------------------------------------------------------------
FLAGGED_PATCH = "flagged-patch"  # a button in the review strip; index = image id
PROTOTYPE = "prototype"  # a prototype tile; index = "<image id>"


def flagged_patch(image_id: str) -> dict:
    return {"type": FLAGGED_PATCH, "index": image_id}


def prototype(image_id: str) -> dict:
    return {"type": PROTOTYPE, "index": image_id}
