"""The login layer: every route, callback, asset and job endpoint of the app refuses anonymous requests.

    >>> from vis.auth import install_auth, current_user
    >>> install_auth(app, db_url=settings.database_url)     # create_app does it, before the API and the guard
    >>> current_user().name, current_user().role             # inside any request or background job
    ('ana', 'radiologist')

What it installs on the Dash app's Flask server (docs/CONTRACTS.md, "Access"):
- `GET /login` — a plain server-rendered form (`username`, `password`, `csrf_token`, `next`); `POST /login` checks
  the CSRF token, then the password (`store.accounts.authenticate`, the same work whether or not the user exists),
  and answers every failure with the same message. Failures are counted per user name in the audit log (so every
  worker sees them): after `MAX_FAILURES` within `LOCK_WINDOW`, that name is locked for the rest of the window,
  whether or not it exists and whether or not the next password is right.
- `POST /logout` (CSRF token required) clears the session.
- The Flask session cookie (HttpOnly, SameSite=Lax, Secure when `CONCEPTLENS_SECURE_COOKIES=1`) holds the user
  name, the account's `stamp` (a new password or role invalidates old cookies) and the CSRF token.
- A `before_request` hook that runs before any other: it sets `flask.g.user` (a `store.accounts.UserInfo`) or
  refuses — an anonymous GET of a page is redirected to `/login?next=<that page>`; everything else (Dash's
  `/_dash-*` routes, assets, component suites, `/api/*`, background-job polls) gets 401. Only `/login`, its
  stylesheet and `/health` are open. A state-changing request whose `Origin` is another site is refused (403).

`next` is only ever a local path (`/units?x=1`): anything with a scheme, a host, `//` or a backslash becomes `/`.
Background jobs run outside the request (a diskcache process, a Celery worker): there `current_user()` reads the
signed session cookie that Dash hands to the job with the callback context, and checks the account again.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import html
import os
import secrets
import threading
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from flask import Response, g, redirect, request, session

__all__ = ["install_auth", "current_user", "safe_next", "user_from_cookies", "MAX_FAILURES", "LOCK_WINDOW",
           "LOGIN_PATH", "LOGOUT_PATH", "CSS_PATH", "COOKIE_NAME"]

LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
CSS_PATH = "/login.css"
COOKIE_NAME = "conceptlens_session"
EXTENSION = "conceptlens.auth"
MAX_FAILURES = 5  # failed sign-ins per user name within LOCK_WINDOW before that name is locked
LOCK_WINDOW = _dt.timedelta(minutes=10)
SESSION_HOURS = 12  # a reading day; then sign in again
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_NAME_MAX = 64
_CSS = Path(__file__).resolve().parent / "assets" / "login.css"  # Dash ignores it (assets_ignore in create_app)
GENERIC_FAILURE = "Unknown user name or wrong password."


# -- who is asking -----------------------------------------------------------------------------------------------------
def current_user():
    """The signed-in `UserInfo` of this request (or of the request that started this background job).

    Raises werkzeug's Unauthorized when there is none: code that acts for a user never acts for nobody.
    """
    from werkzeug.exceptions import Unauthorized

    try:
        user = g.get("user")
    except RuntimeError:  # no application context at all
        user = None
    if user is None:
        user = _job_user()
    if user is None:
        raise Unauthorized("log in first")
    return user


def _job_user():
    """In a background job: the user whose signed session cookie came with the callback context, still valid."""
    try:
        import dash

        cookies = dash.callback_context.cookies
        server = dash.get_app().server
    except Exception:  # noqa: BLE001 — no Dash callback context here: there is no user
        return None
    return user_from_cookies(server, cookies)


def user_from_cookies(server, cookies) -> object | None:
    """The `UserInfo` a session cookie (as a dict of cookies) proves, or None when absent, forged or stale."""
    raw = (cookies or {}).get(server.config.get("SESSION_COOKIE_NAME", COOKIE_NAME))
    if not raw:
        return None
    serializer = server.session_interface.get_signing_serializer(server)
    if serializer is None:
        return None
    try:
        data = serializer.loads(raw, max_age=int(server.permanent_session_lifetime.total_seconds()))
    except Exception:  # noqa: BLE001 — itsdangerous raises several kinds for a bad or expired signature
        return None
    return _state(server).check(data.get("user"), data.get("stamp"))


def safe_next(value) -> str:
    """A local path to go to after signing in; anything that could leave this site becomes "/"."""
    if not isinstance(value, str) or not value or len(value) > 2000:
        return "/"
    if any(c in value for c in "\\\r\n\t") or value.startswith("//") or not value.startswith("/"):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


# -- per-app state -----------------------------------------------------------------------------------------------------
class _AuthState:
    """The database handle (opened on first use, per process) and the app's paths that need no login."""

    def __init__(self, db_url: str, *, demo_accounts: Path | None, open_paths: set[str], page_endpoints: set[str]):
        self.db_url = db_url
        self.demo_accounts = demo_accounts
        self.open_paths = open_paths
        self.page_endpoints = page_endpoints
        self._db = None
        self._lock = threading.Lock()

    def db(self):
        with self._lock:
            if self._db is None:
                from store.annotations import open_database

                self._db = open_database(self.db_url)
            return self._db

    def check(self, name, stamp):
        """The active account `name` when `stamp` is still its stamp; else None."""
        if not isinstance(name, str) or not isinstance(stamp, str) or not name or len(name) > _NAME_MAX:
            return None
        from store.accounts import get_user

        user = get_user(self.db(), name)
        if user is None or not user.active or not hmac.compare_digest(str(user.stamp), stamp):
            return None
        return user


def _state(server) -> _AuthState:
    return server.extensions[EXTENSION]


# -- rate limit (shared by every worker through the audit log) ----------------------------------------------------------
def _norm_name(name) -> str:
    return name.strip().lower()[:_NAME_MAX] if isinstance(name, str) else ""


def _locked_for(db, name: str) -> _dt.timedelta | None:
    """How long `name` stays locked (None when it is not): MAX_FAILURES failures within LOCK_WINDOW."""
    from sqlalchemy import select

    from store.annotations import AuditLog, utcnow

    now = utcnow()
    since = now - LOCK_WINDOW
    with db.read() as s:
        times = s.scalars(select(AuditLog.at).where(AuditLog.actor == name, AuditLog.action == "login.failed",
                                                    AuditLog.at >= since)
                          .order_by(AuditLog.at.desc()).limit(MAX_FAILURES)).all()
    if len(times) < MAX_FAILURES:
        return None
    oldest = times[-1]
    if oldest.tzinfo is None:  # SQLite hands naive datetimes back
        oldest = oldest.replace(tzinfo=_dt.timezone.utc)
    left = oldest + LOCK_WINDOW - now
    return left if left.total_seconds() > 0 else None


def _record(db, name: str, action: str, detail: dict | None = None) -> None:
    from store.accounts import audit

    with db.write() as s:
        audit(s, actor=name or "?", action=action, target="login", detail=detail or {})


# -- pages -------------------------------------------------------------------------------------------------------------
def _csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_token() -> str:
    """This browser session's CSRF token (for forms the app renders, e.g. the logout button)."""
    return _csrf_token()


def _csrf_ok() -> bool:
    sent, kept = request.form.get("csrf_token", ""), session.get("csrf", "")
    return bool(sent) and bool(kept) and hmac.compare_digest(str(sent), str(kept))


def _login_page(*, error: str = "", name: str = "", next_path: str = "/", status: int = 200,
                demo_accounts: Path | None = None) -> Response:
    e = html.escape
    notice = (f'<div class="cl-login-error" role="alert">{e(error)}</div>' if error else "")
    demo = ""
    if demo_accounts is not None and demo_accounts.is_file():
        demo = (f'<p class="cl-login-demo">Demo accounts (radiologist, researcher, admin) and their passwords are in '
                f'<code>{e(str(demo_accounts))}</code> on the server.</p>')
    body = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · ConceptLens</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{CSS_PATH}">
</head>
<body class="cl-login-body">
<main class="cl-login">
  <div class="cl-login-brand"><span class="cl-brand-a">Concept</span><span class="cl-brand-b">Lens</span></div>
  <p class="cl-login-tagline">Concept-level review of the networks that read mammograms</p>
  <form class="cl-login-card" method="post" action="{LOGIN_PATH}" autocomplete="on">
    <h1>Sign in</h1>
    {notice}
    <label for="username">User name</label>
    <input id="username" name="username" type="text" value="{e(name)}" required{"" if name else " autofocus"}
           autocapitalize="none" autocomplete="username" maxlength="{_NAME_MAX}" spellcheck="false">
    <label for="password">Password</label>
    <input id="password" name="password" type="password" required{" autofocus" if name else ""}
           autocomplete="current-password" maxlength="1024">
    <input type="hidden" name="csrf_token" value="{e(_csrf_token())}">
    <input type="hidden" name="next" value="{e(next_path)}">
    <button type="submit">Sign in</button>
  </form>
  {demo}
  <p class="cl-login-foot">Accounts are made by an administrator (<code>python -m store users add NAME --role R</code>).</p>
</main>
</body>
</html>"""
    resp = Response(body, status=status, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _unauthorized() -> Response:
    resp = Response('{"error": "log in first"}', status=401, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _forbidden(message: str) -> Response:
    import json

    return Response(json.dumps({"error": message}), status=403, mimetype="application/json")


# -- installation ------------------------------------------------------------------------------------------------------
def install_auth(app, *, db_url: str, demo_accounts: Path | str | None = None) -> None:
    """Install the login layer on a Dash app (see the module docstring). Call before any other route is added."""
    server = app.server
    server.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=os.environ.get("CONCEPTLENS_SECURE_COOKIES") == "1",
        PERMANENT_SESSION_LIFETIME=_dt.timedelta(hours=SESSION_HOURS),
    )
    prefix = app.config.routes_pathname_prefix
    state = _AuthState(db_url, demo_accounts=Path(demo_accounts) if demo_accounts else None,
                       open_paths={LOGIN_PATH, CSS_PATH, prefix + "health"},
                       page_endpoints={prefix, prefix + "<path:path>"})
    server.extensions[EXTENSION] = state
    _bind_background_handles(app)

    def login():
        next_path = safe_next(request.values.get("next", "/"))
        if request.method == "GET":
            if g.get("user") is not None:
                return redirect(next_path)
            return _login_page(next_path=next_path, demo_accounts=state.demo_accounts)
        if not _csrf_ok():
            return _login_page(error="This form has expired; please sign in again.", next_path=next_path,
                               status=400, demo_accounts=state.demo_accounts)
        name = _norm_name(request.form.get("username", ""))
        password = request.form.get("password", "")
        db = state.db()
        locked = _locked_for(db, name) if name else None
        if locked is not None:
            minutes = max(1, round(locked.total_seconds() / 60))
            _record(db, name, "login.locked")
            return _login_page(error=f"Too many failed sign-ins for this user name. Try again in {minutes} "
                                     f"minute{'s' if minutes != 1 else ''}.", name=name, next_path=next_path,
                               status=429, demo_accounts=state.demo_accounts)
        from store.accounts import authenticate

        user = authenticate(db, name, password) if name and password else None
        if user is None or not user.active:
            _record(db, name, "login.failed")
            return _login_page(error=GENERIC_FAILURE, name=name, next_path=next_path, status=401,
                               demo_accounts=state.demo_accounts)
        _record(db, user.name, "login")
        session.clear()  # a new session id and a new CSRF token: nothing from before the sign-in survives
        session.permanent = True
        session["user"], session["stamp"] = user.name, str(user.stamp)
        session["csrf"] = secrets.token_urlsafe(32)
        return redirect(next_path)

    def logout():
        user = g.get("user")
        if not _csrf_ok():
            return _forbidden("the sign-out form expired; reload the page")
        if user is not None:
            _record(state.db(), user.name, "logout")
        session.clear()
        return redirect(LOGIN_PATH)

    def login_css():
        resp = Response(_CSS.read_text(encoding="utf-8"), mimetype="text/css")
        resp.headers["Cache-Control"] = "public, max-age=3600"
        return resp

    server.add_url_rule(LOGIN_PATH, "conceptlens_login", login, methods=["GET", "POST"])
    server.add_url_rule(LOGOUT_PATH, "conceptlens_logout", logout, methods=["POST"])
    server.add_url_rule(CSS_PATH, "conceptlens_login_css", login_css, methods=["GET"])

    def require_login():
        g.user = None
        if request.method not in _SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.host:
                return _forbidden(f"cross-origin request from {origin[:100]} refused")
        name, stamp = session.get("user"), session.get("stamp")
        if name is not None:
            g.user = state.check(name, stamp)
            if g.user is None:
                session.clear()  # deactivated, password or role changed: the old cookie no longer counts
        if g.user is not None or request.path in state.open_paths:
            return None
        rule = request.url_rule
        if request.method in ("GET", "HEAD") and rule is not None and rule.endpoint in state.page_endpoints:
            target = request.full_path.rstrip("?") if request.query_string else request.path
            return redirect(f"{LOGIN_PATH}?{urlencode({'next': safe_next(target)})}")
        return _unauthorized()

    # First of all hooks: nothing else (Dash's own setup included) runs for an anonymous request.
    server.before_request_funcs.setdefault(None, []).insert(0, require_login)


def _bind_background_handles(app) -> None:
    """Bind Dash's signed background-job handles (end id, cacheKey, job) to the signed-in user.

    Dash signs each handle with the server's secret; folding the user name and account stamp into that secret makes
    a handle minted for one user fail verification for any other (or after a password/role change): Dash then reads
    no cached result and kills no process. The guard also refuses such a request outright (vis.guard).
    """
    base = app._get_signing_secret  # the bound method: the server's secret key

    def per_user_secret() -> bytes:
        key = base()
        try:
            user = g.get("user")
        except RuntimeError:
            user = None
        if user is None:
            return key
        return key + b"\x00user\x00" + f"{user.name}\x00{user.stamp}".encode()

    app._get_signing_secret = per_user_secret

