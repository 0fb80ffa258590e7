"""Refuse forged or malformed callback requests with a 4xx and a clear message before any callback runs.

    >>> from vis.guard import install_guard
    >>> install_guard(app, max_body_bytes=1 << 20)   # after every callback is registered (create_app does it)

Dash itself answers a body that is not JSON, an unknown output or a missing input with a server error (500). The
guard wraps the `_dash-update-component` view and checks, against the callback the request names:
- the body is a JSON object no larger than `max_body_bytes` (larger → 413), without NaN or ±Infinity;
- `output` names a registered callback, and `outputs`, `inputs` and `state` list exactly the components and
  properties that callback declares (pattern-matching ids must fit the declared wildcards);
- `changedPropIds` are among the request's inputs;
- background-job handles (`cacheKey`, `job`, `oldJob` in the query string) were minted for this user and this page
  load (vis.auth binds Dash's handle signatures to the signed-in user): another user's or a forged one → 403.
Values themselves are checked by the callbacks (`vis.errors.InvalidInput` → 400), since only they know the types.
Rights are checked by the callbacks too (`store.accounts.require_member`): `store.errors.AccessDenied` raised anywhere
becomes 403 and `store.errors.ConflictError` (a stale version) 409, each with its message.
"""

from __future__ import annotations

import json
import math

from flask import Response, request

from .errors import InvalidInput

__all__ = ["install_guard", "validate_body", "MAX_WILDCARD_ITEMS"]

# More components than any page renders for one wildcard (the flagged strip has ≤ 24, galleries ≤ 64).
MAX_WILDCARD_ITEMS = 512
_WILDCARDS = ('["ALL"]', '["MATCH"]', '["ALLSMALLER"]')


def _reject_constant(name: str):
    raise InvalidInput("request body", f"{name} is not a valid JSON number")


def _parse_id(declared: str):
    """A declared id string → the id (str) or, for pattern-matching ids, the dict with wildcards as lists."""
    return json.loads(declared) if declared.startswith("{") else declared


def _id_matches(declared, sent) -> bool:
    if isinstance(declared, str):
        return sent == declared
    if not isinstance(sent, dict) or set(sent) != set(declared):
        return False
    for key, want in declared.items():
        got = sent[key]
        if isinstance(want, list):  # a wildcard: any scalar id part
            if not isinstance(got, (str, int, float, bool)) or isinstance(got, float) and not math.isfinite(got):
                return False
        elif got != want:
            return False
    return True


def _is_multi(declared) -> bool:
    return isinstance(declared, dict) and any(v in (["ALL"], ["ALLSMALLER"]) for v in declared.values())


def _base(prop) -> str | None:
    """A property without Dash's allow_duplicate suffix ('data@<hash>' → 'data')."""
    return prop.split("@", 1)[0] if isinstance(prop, str) else None


def _check_deps(kind: str, declared: list[dict], sent) -> list[dict]:
    """Check one list of dependencies; returns the flat list of sent entries (for changedPropIds)."""
    if not isinstance(sent, list):
        raise InvalidInput(kind, f"expected a list, got {type(sent).__name__}")
    if len(sent) != len(declared):
        raise InvalidInput(kind, f"expected {len(declared)} entries for this callback, got {len(sent)}")
    flat: list[dict] = []
    for i, (dep, entry) in enumerate(zip(declared, sent)):
        want_id, prop = _parse_id(dep["id"]), dep["property"]
        entries = entry if _is_multi(want_id) else [entry]
        if _is_multi(want_id):
            if not isinstance(entry, list):
                raise InvalidInput(f"{kind}[{i}]", "expected a list for a pattern-matching (ALL) dependency")
            if len(entry) > MAX_WILDCARD_ITEMS:
                raise InvalidInput(f"{kind}[{i}]", f"{len(entry)} items (at most {MAX_WILDCARD_ITEMS})")
        for e in entries:
            if not isinstance(e, dict):
                raise InvalidInput(f"{kind}[{i}]", f"expected an object, got {type(e).__name__}")
            if _base(e.get("property")) != _base(prop) or not _id_matches(want_id, e.get("id")):
                raise InvalidInput(f"{kind}[{i}]", f"{e.get('id')!r}.{e.get('property')!r} is not "
                                                  f"{dep['id']}.{prop}, which this callback declares")
            flat.append(e)
    return flat


def _prop_id(entry: dict) -> str:
    cid = entry["id"]
    if isinstance(cid, dict):
        cid = json.dumps(cid, sort_keys=True, separators=(",", ":"))
    return f"{cid}.{entry['property']}"


def _declared_outputs(callback: dict) -> list[dict]:
    out = callback["output"]
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.to_dict() for o in outs]


def validate_body(callback_map: dict, raw: bytes) -> dict:
    """Parse and check one `_dash-update-component` body; raises InvalidInput naming what is wrong."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except InvalidInput:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput("request body", f"not JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body", f"expected a JSON object, got {type(body).__name__}")
    output = body.get("output")
    if not isinstance(output, str):
        raise InvalidInput("output", f"expected a string, got {type(output).__name__}")
    callback = callback_map.get(output)
    if callback is None:
        raise InvalidInput("output", f"{output[:200]!r} is not a callback of this app")
    if not callback.get("no_output"):
        outputs = body.get("outputs")
        declared = _declared_outputs(callback)
        multi_output = output.startswith("..")
        sent = outputs if multi_output else [outputs]
        _check_deps("outputs", declared, sent)
    inputs = _check_deps("inputs", callback["inputs"], body.get("inputs"))
    _check_deps("state", callback["state"], body.get("state", []))
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        raise InvalidInput("changedPropIds", "expected a list of strings")
    known = {_prop_id(e) for e in inputs}
    unknown = [c for c in changed if c not in known]
    if unknown:
        raise InvalidInput("changedPropIds", f"{unknown[0][:200]!r} is not an input of this request")
    return body


def _json_error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status=status, mimetype="application/json")


def check_job_handles(app, args) -> None:
    """Refuse background-job handles that this user's page load did not receive (InvalidHandle → 403).

    Dash verifies its handles itself and then silently reads nothing; refusing outright tells a forger (and a test)
    that nothing was touched, and keeps such a request from starting a fresh job under the old handle's name.
    """
    from dash import _callback_signing as signing

    names = [n for n in ("cacheKey", "job", "oldJob") if n in args]
    if not names:
        return
    secret = app._get_signing_secret()  # bound to the signed-in user by vis.auth
    end_id = None  # a client that sends no page-load token gets (and must return) handles bound to no page load
    if "endId" in args:
        end_id = signing.unsign(secret, signing.END_SCOPE, args.get("endId"))
        if end_id is None:
            raise InvalidHandle("endId")
    scopes = {"cacheKey": signing.cache_scope(end_id), "job": signing.job_scope(end_id),
              "oldJob": signing.job_scope(end_id)}
    for name in names:
        for value in args.getlist(name):
            if signing.unsign(secret, scopes[name], value) is None:
                raise InvalidHandle(name)


class InvalidHandle(PermissionError):
    """A background-job handle that belongs to another user or page load, or was never issued."""

    def __init__(self, what: str):
        super().__init__(f"background job handle {what!r} was not issued to you for this page; reload the page")


def install_guard(app, *, max_body_bytes: int) -> None:
    """Wrap the app's callback endpoint with `validate_body`; map InvalidInput raised anywhere to a 400,
    AccessDenied to 403 and ConflictError to 409."""
    from store.errors import AccessDenied, ConflictError

    server = app.server
    server.config["MAX_CONTENT_LENGTH"] = max_body_bytes  # werkzeug answers 413 past this, before reading the body
    endpoint = app.config.routes_pathname_prefix + "_dash-update-component"
    dispatch = server.view_functions[endpoint]

    def guarded_dispatch(*args, **kwargs):
        if not request.is_json:
            return _json_error(415, "callback requests must be application/json")
        check_job_handles(app, request.args)
        validate_body(app.callback_map, request.get_data(cache=True))
        return dispatch(*args, **kwargs)

    guarded_dispatch.__name__ = dispatch.__name__
    server.view_functions[endpoint] = guarded_dispatch

    @server.errorhandler(InvalidInput)
    def _invalid(err: InvalidInput):
        return _json_error(400, str(err))

    @server.errorhandler(InvalidHandle)
    def _bad_handle(err: InvalidHandle):
        return _json_error(403, str(err))

    @server.errorhandler(AccessDenied)
    def _denied(err):
        return _json_error(403, str(err))

    @server.errorhandler(ConflictError)
    def _conflict(err):
        return _json_error(409, str(err))

    @server.errorhandler(413)
    def _too_large(_err):
        return _json_error(413, f"request body larger than {max_body_bytes} bytes")
