"""JSON routes under /api/ for scripts, exports and the load test, behind the same login as the app.

    >>> from vis.api import install_api
    >>> install_api(app)                      # create_app does it
    $ curl -b cookies.txt http://127.0.0.1:8050/api/whoami
    {"name": "ana", "role": "radiologist", "display_name": "Ana"}
    $ curl -b cookies.txt -H 'Content-Type: application/json' -d @label.json \\
           http://127.0.0.1:8050/api/sessions/1/labels
    {"action_id": 17, "changed": [{"unit": 4, "from": null, "to": "mass"}], "replayed": false, ...}

Routes (docs/CONTRACTS.md, "Access"):
- `GET  /api/whoami`
- `POST /api/sessions/<sid>/labels` `{image, layer, concept, region, request_id}`: the labeling rule of
  `explain.labels.label_region` for the logged-in user in session `sid`. `region` is explain.regions JSON (a list of
  `{"type": "polygon"|"rect"|"ellipse"|"mask", …}`), a list of plotly shapes (`{"type": "path", "path": "M…Z"}`,
  `"rect"`, `"circle"`), or one plotly path string; all in patch pixels. `request_id` (1–64 characters of
  `[A-Za-z0-9._:-]`, e.g. a UUID) makes the call idempotent: a retry with the same id (after a timeout, a dropped
  connection, a killed worker) returns the first result with `"replayed": true` and writes nothing. 201 when
  written, 200 when replayed, 409 when the id was used for a different label.
- `GET  /api/sessions/<sid>/suggestions?concept=C[&layer=L][&limit=N]`: where the logged-in user should draw concept C
  next (`vis.services.Workbench.suggested_images`: `{concept, layer, listed, drawn, images}`, the image ids best
  first; the layer defaults to the app's).
- `GET  /api/sessions/<sid>/annotations.json`: `store.exchange.export_session` as a download.
- `GET  /api/sessions/<sid>/report.html`: `vis.export.session_report_html`, one self-contained file, a download.
- `GET  /api/sessions/<sid>/report.pdf`: the same report printed by headless Chromium (vis.pdf); 501 with a message
  naming what is missing when the server has no Chromium.
- `POST /api/sessions/import[?name=NEW]`: the body is an annotations.json export; a new session (admins only, since
  an import creates the users it names). 201 `{id, name, members}`.

Every POST must be `Content-Type: application/json` (415 otherwise): an HTML form cannot send that cross-site, which
together with the SameSite cookie keeps cross-site requests out without a CSRF token. Bodies are limited (413).
Errors are JSON `{"error": message, "field": name-or-null}`: 400 for bad input (the message names the field; nothing
is written), 403 for a session the user is not a member of, 409 for a conflict, 501 for a PDF without Chromium, 503 while the
workspace is not ready (or the PDF printer failed). The login layer (vis.auth) refuses anonymous requests before any of these views runs and sets `flask.g.user`.
"""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .errors import InvalidInput, NotReady, VisError

__all__ = ["install_api", "API_PREFIX", "LABEL_FIELDS", "MAX_LABEL_BODY", "MAX_IMPORT_BODY", "parse_region"]

API_PREFIX = "/api"
LABEL_FIELDS = ("image", "layer", "concept", "region", "request_id")
MAX_LABEL_BODY = 1 << 20  # a region of 10 000 vertices (the RegionConfig limit) is ~250 kB of JSON
MAX_IMPORT_BODY = 64 << 20  # an export of a large session: every region and label of many readers
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REGION_JSON_TYPES = {"polygon", "rect", "ellipse", "mask"}
_PLOTLY_TYPES = {"path", "rect", "circle", "line"}


def _user():
    user = g.get("user")
    if user is None:  # only reachable when the login layer is not installed: refuse rather than act as nobody
        from werkzeug.exceptions import Unauthorized

        raise Unauthorized("log in first")
    return user


def _error(status: int, message: str, field: str | None = None) -> Response:
    return Response(json.dumps({"error": message, "field": field}), status=status, mimetype="application/json")


def _reject_constant(name: str):
    raise InvalidInput("request body", f"{name} is not a valid JSON number")


def _json_body(limit: int) -> object:
    """The request's JSON body: application/json only (415), at most `limit` bytes (413), no NaN/Infinity (400)."""
    if request.mimetype != "application/json":
        raise _Refused(415, f"send the body as application/json (got {request.mimetype or 'no content type'!r})")
    request.max_content_length = limit  # werkzeug stops reading past it and answers 413
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except InvalidInput:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput("request body", f"not JSON ({e})") from None


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_region(region, shape: tuple[int, int]):
    """The `region` field → explain.regions specs covering at least one pixel of a (height, width) patch.

        >>> parse_region("M2,2L40,2L40,40Z", (64, 64))                       # one plotly path
        >>> parse_region([{"type": "rect", "x0": 2, "y0": 2, "x1": 9, "y1": 9}], (64, 64))

    InvalidInput("region", …) for anything else (NaN, too many vertices, no area, nothing inside the patch).
    """
    from explain.errors import RegionError
    from explain.regions import parse_plotly_shapes, rasterize_regions, regions_from_json

    try:
        if isinstance(region, str):
            specs = parse_plotly_shapes([{"type": "path", "path": region}])
        elif isinstance(region, list) and region:
            if len(region) > 200:
                raise RegionError(f"{len(region)} shapes (at most 200)")
            if not all(isinstance(s, dict) for s in region):
                raise RegionError("every shape must be an object")
            types = {s.get("type") for s in region}
            if types <= _REGION_JSON_TYPES:  # "rect" means the same in both forms
                specs = regions_from_json(region)
            elif types <= (_REGION_JSON_TYPES | _PLOTLY_TYPES) - {"polygon", "ellipse", "mask"}:
                specs = parse_plotly_shapes(region)
            else:
                raise RegionError(f"shape types {sorted(map(str, types))} mix explain.regions JSON "
                                  f"({', '.join(sorted(_REGION_JSON_TYPES))}) and plotly shapes (path, rect, circle)")
        else:
            raise RegionError("expected a non-empty list of shapes or a plotly path string, got "
                              + (repr(region) if region in ([], "", None) else type(region).__name__))
        rasterize_regions(specs, shape)  # RegionError when it covers no pixel of the patch
    except RegionError as e:
        raise InvalidInput("region", str(e)) from None
    return specs


def _field_of(err) -> str | None:
    """The label field an explain error is about, so the 400 names it."""
    from explain import errors as ex

    for cls, name in ((ex.UnknownConceptError, "concept"), (ex.UnknownLayerError, "layer"),
                      (ex.UnknownImageError, "image"), (ex.RegionError, "region")):
        if isinstance(err, cls):
            return name
    return None


def _label_request(body, wb) -> dict:
    """Validate a label body against the served store; returns the keyword arguments of label_region."""
    from .services import check_id

    if not isinstance(body, dict):
        raise InvalidInput("request body", f"expected a JSON object with {', '.join(LABEL_FIELDS)}, "
                                           f"got {type(body).__name__}")
    unknown = sorted(set(body) - set(LABEL_FIELDS))
    if unknown:
        raise InvalidInput(str(unknown[0])[:60], f"unknown field (expected {', '.join(LABEL_FIELDS)})")
    for name in LABEL_FIELDS:
        if name not in body:
            raise InvalidInput(name, "missing")
    rid = body["request_id"]
    if not isinstance(rid, str) or not _REQUEST_ID.fullmatch(rid):
        raise InvalidInput("request_id", f"expected 1-64 characters of letters, digits and . _ : - (e.g. a UUID), "
                                         f"got {repr(rid)[:80]}")
    if not isinstance(body["layer"], str):  # wb.layer(None) would pick the default layer
        raise InvalidInput("layer", f"expected a layer name, got {repr(body['layer'])[:80]}")
    layer = wb.layer(body["layer"])
    check_id(body["image"], "image")
    wb.record(body["image"])  # InvalidInput("image") for an id the store does not hold
    concept = body["concept"]
    if not isinstance(concept, str) or not concept or len(concept) > 64:
        raise InvalidInput("concept", f"expected a concept id, got {repr(concept)[:80]}")
    specs = parse_region(body["region"], wb.patch_size())
    return {"layer": layer, "image": body["image"], "concept": concept, "region": specs, "request_id": rid}


def _label(db, wb, *, session: int, author: str, args: dict):
    """label_region with the app's rule; a concurrent retry that lost the race for the request id replays."""
    from sqlalchemy.exc import IntegrityError

    from explain.errors import ExplainError
    from explain.labels import label_region

    kwargs = dict(args, session=session, author=author, level=wb.config.mask_level,
                  dissect=wb._unit_iou(args["layer"]), **wb.label_rule_args(args["layer"]))
    for attempt in range(2):
        try:
            return label_region(db, wb.store(), **kwargs)
        except IntegrityError:
            # The same (session, author, request_id) committed in another worker between our check and our insert
            # (a client retrying while its first attempt still ran): the second call finds it and replays.
            if attempt:
                raise
        except ExplainError as e:
            field = _field_of(e)
            if field is None:
                if _request_id_taken(db, session, author, args["request_id"]):
                    # one id reused for another label (a client bug): a conflict with what is stored, not bad input
                    raise _Refused(409, str(e)) from None
                raise
            raise InvalidInput(field, str(e)) from None
    raise AssertionError("unreachable")


def _request_id_taken(db, session: int, author: str, request_id: str) -> bool:
    from sqlalchemy import select

    from store.annotations import LabelAction

    with db.read() as s:
        return s.scalar(select(LabelAction.id).where(LabelAction.session_id == session, LabelAction.author == author,
                                                     LabelAction.request_id == request_id)) is not None


def _result_json(result) -> dict:
    changed = [{"unit": int(u), "from": before, "to": after}
               for u, (before, after) in sorted((result.changed or {}).items())]
    return {"action_id": int(result.action_id), "region_id": result.region_id, "layer": result.layer,
            "concept": result.concept, "image": result.image_id, "changed": changed,
            "replayed": bool(getattr(result, "replayed", False))}


def _member(db, sid: int, user):
    from store.accounts import require_member

    return require_member(db, sid, user)


def _download(body: str | bytes, *, mimetype: str, filename: str) -> Response:
    resp = Response(body, mimetype=mimetype)
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"  # annotations of a review session: never kept by a shared cache
    return resp


def install_api(app) -> Blueprint:
    """Register the /api/ blueprint on the Dash app's Flask server; returns it."""
    from .services import current

    bp = Blueprint("api", __name__, url_prefix=API_PREFIX)

    @bp.get("/whoami")
    def whoami():
        user = _user()
        return jsonify(name=user.name, role=user.role, display_name=user.display_name)

    @bp.post("/sessions/<int:sid>/labels")
    def label(sid: int):
        user = _user()
        body = _json_body(MAX_LABEL_BODY)
        wb = current()
        db = wb.db()
        _member(db, sid, user)  # 403 before anything about the store is revealed
        args = _label_request(body, wb)
        result = _label(db, wb, session=sid, author=user.name, args=args)
        out = _result_json(result)
        return jsonify(out), (200 if out["replayed"] else 201)

    @bp.get("/sessions/<int:sid>/suggestions")
    def suggestions(sid: int):
        user = _user()
        wb = current()
        _member(wb.db(), sid, user)
        limit = request.args.get("limit", "10")
        if not limit.isdigit():
            raise InvalidInput("limit", f"expected a whole number of images, got {limit[:40]!r}")
        return jsonify(wb.suggested_images(request.args.get("concept"), layer=request.args.get("layer"), session=sid,
                                           limit=int(limit)))

    @bp.get("/sessions/<int:sid>/annotations.json")
    def annotations(sid: int):
        user = _user()
        db = current().db()
        _member(db, sid, user)
        from store.exchange import export_session

        data = export_session(db, sid)
        return _download(json.dumps(data, ensure_ascii=False, indent=1), mimetype="application/json",
                         filename=f"conceptlens-session-{sid}-annotations.json")

    @bp.get("/sessions/<int:sid>/report.html")
    def report(sid: int):
        user = _user()
        wb = current()
        _member(wb.db(), sid, user)
        from .export import session_report_html

        return _download(session_report_html(wb, sid), mimetype="text/html",
                         filename=f"conceptlens-session-{sid}-report.html")

    @bp.get("/sessions/<int:sid>/report.pdf")
    def report_pdf(sid: int):
        from .export import session_report_html
        from .pdf import PdfUnavailable, find_chromium, html_to_pdf, missing_message

        user = _user()
        wb = current()
        _member(wb.db(), sid, user)  # 403 first: a non-member learns nothing, not even whether PDFs work here
        chromium = find_chromium()
        if chromium is None:
            raise PdfUnavailable(missing_message())
        pdf = html_to_pdf(session_report_html(wb, sid), chromium=chromium)
        return _download(pdf, mimetype="application/pdf", filename=f"conceptlens-session-{sid}-report.pdf")

    @bp.post("/sessions/import")
    def import_():
        from store.accounts import require_admin
        from store.exchange import import_session

        user = _user()
        require_admin(user)  # an import creates the accounts it names: user management is the admins' right
        body = _json_body(MAX_IMPORT_BODY)
        if not isinstance(body, dict):
            raise InvalidInput("request body", f"expected an annotations.json export, got {type(body).__name__}")
        name = request.args.get("name")
        if name is not None and (not name.strip() or len(name) > 200):
            raise InvalidInput("name", "expected a session name of 1-200 characters")
        info = import_session(current().db(), body, actor=user.name, name=name)
        return jsonify(id=info.id, name=info.name, members=list(info.members)), 201

    @bp.errorhandler(_Refused)
    def _refused(err: _Refused):
        return _error(err.status, str(err))

    @bp.errorhandler(InvalidInput)
    def _invalid(err: InvalidInput):
        return _error(400, str(err), err.what)

    @bp.errorhandler(NotReady)
    def _not_ready(err: NotReady):
        return _error(503, str(err))

    from .pdf import PdfError, PdfUnavailable

    @bp.errorhandler(PdfUnavailable)
    def _no_pdf(err: PdfUnavailable):
        return _error(501, str(err))

    @bp.errorhandler(PdfError)
    def _pdf_failed(err: PdfError):
        return _error(503, f"the PDF could not be printed: {err}")

    @bp.errorhandler(HTTPException)
    def _http(err: HTTPException):
        text = f"request body larger than {request.max_content_length} bytes" if err.code == 413 else err.description
        return _error(err.code or 500, text)

    def _domain(err: Exception):
        """store/ and explain/ errors: 403 for access, 409 for conflicts, 400 for bad values; others are bugs."""
        from store.errors import ConflictError

        if isinstance(err, PermissionError):
            return _error(403, str(err))
        if isinstance(err, ConflictError):
            return _error(409, str(err))
        if isinstance(err, (ValueError, KeyError, LookupError)):
            return _error(400, str(err).strip('"'), _field_of(err))
        raise err

    from explain.errors import ExplainError
    from store.errors import StoreError

    bp.register_error_handler(StoreError, _domain)
    bp.register_error_handler(ExplainError, _domain)
    bp.register_error_handler(VisError, _domain)
    app.server.register_blueprint(bp)
    return bp
