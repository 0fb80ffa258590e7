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
SESSION = "shell-session"  # dcc.Store: the review session id every annotation callback sends (checked on the server)
SESSION_PICKER = "shell-session-picker"  # header dropdown of the user's sessions (admins: all)
SESSION_VERSION = "shell-session-version"  # dcc.Store: the session's annotation stamp; changes when anyone writes
LIVE_INTERVAL = "shell-live-interval"  # polls the stamp so reviewers see each other's work within seconds
SESSIONS_INTERVAL = "shell-sessions-interval"  # refreshes the picker's list (a new session, added or removed)
CURRENT_IMAGE = "shell-current-image"  # dcc.Store: the patch last opened on Review (comments on the Session page)
USER_BADGE = "shell-user"
LOGOUT = "shell-logout"

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
REVIEW_OVERLAY_PENDING = "review-overlay-pending"  # dcc.Store: the mammogram whose P(lesion) overlay is computing
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
REVIEW_SUGGEST = "review-suggest"  # opens the patch to draw the chosen concept on next
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

# -- session (members, agreement, comments, export / import) ---------------------------------------------------------------
SESS_TITLE = "sess-title"
SESS_MEMBERS = "sess-members"
SESS_COUNTS = "sess-counts"
SESS_AGREEMENT = "sess-agreement"
SESS_EXPORT = "sess-export"  # links to the report (HTML) and the annotations (JSON)
SESS_IMPORT = "sess-import"  # dcc.Upload of an annotations JSON file
SESS_IMPORT_MESSAGE = "sess-import-message"
SESS_IMAGE = "sess-image"  # which image's comments
SESS_COMMENTS = "sess-comments"
SESS_COMMENT_TEXT = "sess-comment-text"
SESS_COMMENT_SAVE = "sess-comment-save"
SESS_COMMENT_CANCEL = "sess-comment-cancel"
SESS_EDITING = "sess-editing"  # dcc.Store {"id", "version"} of the comment being edited, or None for a new one
SESS_MESSAGE = "sess-message"
SESS_MEMBERS_MESSAGE = "sess-members-message"  # result of adding or removing a member (admins)
SESS_ADD_USER = "sess-add-user"  # dropdown: active users who are not members yet (admins)
SESS_ADD_MEMBER = "sess-add-member"
SESS_NEW_NAME = "sess-new-name"  # the "New review session" form (admins)
SESS_NEW_MODEL = "sess-new-model"
SESS_NEW_STORE = "sess-new-store"
SESS_NEW_MEMBERS = "sess-new-members"  # multi-select of active users
SESS_NEW_CREATE = "sess-new-create"
SESS_NEW_MESSAGE = "sess-new-message"

# -- users (admins) ----------------------------------------------------------------------------------------------------
USERS_TABLE = "users-table"
USERS_VERSION = "users-version"  # dcc.Store: bumped after each change, to redraw the table
USERS_NAME = "users-name"
USERS_DISPLAY = "users-display"
USERS_ROLE = "users-role"
USERS_PASSWORD = "users-password"
USERS_CREATE = "users-create"
USERS_TARGET = "users-target"
USERS_NEW_ROLE = "users-new-role"
USERS_SET_ROLE = "users-set-role"
USERS_NEW_PASSWORD = "users-new-password"
USERS_RESET = "users-reset"
USERS_DEACTIVATE = "users-deactivate"
USERS_ACTIVATE = "users-activate"
USERS_MESSAGE = "users-message"

# -- pattern-matching ids ----------------------------------------------------------------------------------------------
FLAGGED_PATCH = "flagged-patch"  # a button in the review strip; index = image id
PROTOTYPE = "prototype"  # a prototype tile; index = "<image id>"
COMMENT_EDIT = "comment-edit"  # the edit button of one comment; index = comment id
COMMENT_DELETE = "comment-delete"  # its delete button
MEMBER_REMOVE = "member-remove"  # the remove button of one member on the Session page (admins); index = user name


def flagged_patch(image_id: str) -> dict:
    return {"type": FLAGGED_PATCH, "index": image_id}


def prototype(image_id: str) -> dict:
    return {"type": PROTOTYPE, "index": image_id}


def comment_edit(comment_id: int) -> dict:
    return {"type": COMMENT_EDIT, "index": int(comment_id)}


def comment_delete(comment_id: int) -> dict:
    return {"type": COMMENT_DELETE, "index": int(comment_id)}


def member_remove(name: str) -> dict:
    return {"type": MEMBER_REMOVE, "index": str(name)}
