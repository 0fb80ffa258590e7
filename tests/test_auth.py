"""The login layer (vis.auth): anonymous requests to every route are refused, the form, cookies, rate limit,
redirects, account changes, cross-origin writes and background-job handles bound to their user.

Every test builds the real app on a fresh workspace (real SQLite review database, real argon2 hashes) and talks to it
through Flask's test client, as a browser would.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import TEST_PASSWORD, DashClient, csrf_from, ensure_user, login_client  # noqa: E402


@pytest.fixture
def app(workspace):
    from vis.app import create_app

    app = create_app(workspace)
    ensure_user(workspace, "ana", "radiologist")
    return app


def _sample_path(rule) -> str:
    """A concrete URL for a rule: each converter gets a plausible value."""
    samples = {"path": "units", "filename": "conceptlens.css", "package_name": "dash",
               "fingerprinted_path": "dash-renderer/build/dash_renderer.v3_0_0m1.min.js"}

    def value(m):
        converter, name = m.group(1), m.group(2)
        return "1" if converter in ("int:", "float:") else samples.get(name, "x")

    return re.sub(r"<([a-z_]+:)?([a-z_]+)>", value, rule.rule)


def test_every_rule_refuses_anonymous_requests(app):
    """RELIABILITY #18: enumerate the server's URL map and request every rule with every method, anonymously."""
    server = app.server
    open_paths = {"/login", "/login.css", "/health"}
    pages = {"/", "/<path:path>"}
    seen = 0
    client = server.test_client()
    for rule in server.url_map.iter_rules():
        path = _sample_path(rule)
        for method in sorted(rule.methods):
            seen += 1
            r = client.open(path, method=method)
            where = f"{method} {path} ({rule.rule})"
            if path in open_paths:
                assert r.status_code in (200, 400), where  # 400: a form POST without its CSRF token
                continue
            if rule.rule in pages and method in ("GET", "HEAD"):
                assert r.status_code == 302, where
                location = r.headers["Location"]
                assert urlsplit(location).path == "/login", where
                assert parse_qs(urlsplit(location).query)["next"] == [path], where
            else:
                assert r.status_code == 401, (where, r.status_code, r.get_data(as_text=True)[:200])
                assert b"units" not in r.data and b"callback" not in r.data.lower()
    assert seen > 30
    # the rules a Dash app serves are all in that map: callbacks, layout, dependencies, assets, suites, the API
    rules = {r.rule for r in server.url_map.iter_rules()}
    for needed in ("/_dash-update-component", "/_dash-layout", "/_dash-dependencies", "/assets/<path:filename>",
                   "/_dash-component-suites/<string:package_name>/<path:fingerprinted_path>", "/_reload-hash",
                   "/api/whoami", "/login", "/logout"):
        assert needed in rules


def test_login_sets_a_hardened_cookie_and_opens_the_app(app, monkeypatch):
    client = app.server.test_client()
    page = client.get("/login")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    text = page.get_data(as_text=True)
    assert "ConceptLens" in text and 'name="csrf_token"' in text and 'href="/login.css"' in text
    assert "http://" not in text and "https://" not in text  # nothing external on the login page
    assert client.get("/login.css").status_code == 200
    r = login_client(client, "ana", next_path="/units")
    assert r.status_code == 302 and r.headers["Location"] == "/units"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert client.get("/_dash-layout").status_code == 200
    assert client.get("/api/whoami").get_json() == {"name": "ana", "role": "radiologist", "display_name": "ana"}
    assert client.get("/login").status_code == 302  # signed in: the form sends you on

    monkeypatch.setenv("CONCEPTLENS_SECURE_COOKIES", "1")
    from vis.app import create_app

    secure = create_app(app.server.extensions["conceptlens"].settings)
    r = login_client(secure.server.test_client(), "ana")
    assert "Secure" in r.headers["Set-Cookie"]


def test_bad_credentials_get_one_message_whether_or_not_the_user_exists(app):
    client = app.server.test_client()
    wrong = login_client(client, "ana", "not-the-password")
    nobody = login_client(client, "nobody", "not-the-password")
    assert wrong.status_code == nobody.status_code == 401
    msg = "Unknown user name or wrong password."
    assert msg in wrong.get_data(as_text=True) and msg in nobody.get_data(as_text=True)
    assert client.get("/_dash-layout").status_code == 401


def test_login_form_needs_its_csrf_token(app):
    client = app.server.test_client()
    client.get("/login")
    r = client.post("/login", data={"username": "ana", "password": TEST_PASSWORD, "csrf_token": "forged"})
    assert r.status_code == 400 and "expired" in r.get_data(as_text=True)
    assert client.get("/_dash-layout").status_code == 401


def test_repeated_failures_lock_the_name_even_for_the_right_password(app):
    from vis.auth import MAX_FAILURES

    client = app.server.test_client()
    for _ in range(MAX_FAILURES):
        assert login_client(client, "ana", "guess-guess-guess").status_code == 401
    r = login_client(client, "ana")  # the right password, but the name is locked for a while
    assert r.status_code == 429 and "Too many failed sign-ins" in r.get_data(as_text=True)
    assert client.get("/_dash-layout").status_code == 401
    # a name that does not exist locks the same way (nothing tells the two apart)
    for _ in range(MAX_FAILURES):
        login_client(client, "ghost", "guess-guess-guess")
    assert login_client(client, "ghost", "guess-guess-guess").status_code == 429
    # another user is not affected
    ensure_user(app.server.extensions["conceptlens"].settings, "bob", "researcher")
    assert login_client(app.server.test_client(), "bob").status_code == 302


@pytest.mark.parametrize("target", ["https://evil.example/x", "//evil.example/x", "/\\evil.example", "javascript:alert(1)",
                                    "http:/evil", " /units", "/units\r\nSet-Cookie: a=b"])
def test_next_never_leaves_the_site(app, target):
    client = app.server.test_client()
    r = login_client(client, "ana", next_path=target)
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_next_keeps_a_local_path_and_query(app):
    client = app.server.test_client()
    r = client.get("/images?layer=features.9")
    assert r.status_code == 302
    nxt = parse_qs(urlsplit(r.headers["Location"]).query)["next"][0]
    assert nxt == "/images?layer=features.9"
    assert login_client(client, "ana", next_path=nxt).headers["Location"] == "/images?layer=features.9"


def _csrf_in_layout(node):
    if isinstance(node, dict):
        props = node.get("props") if isinstance(node.get("props"), dict) else {}
        if props.get("name") == "csrf_token":
            return props.get("value")
        return next((t for t in map(_csrf_in_layout, node.values()) if t), None)
    if isinstance(node, list):
        return next((t for t in map(_csrf_in_layout, node) if t), None)
    return None


def test_logout_needs_the_token_and_ends_the_session(app):
    client = app.server.test_client()
    login_client(client, "ana")
    assert client.post("/logout", data={"csrf_token": "forged"}).status_code == 403
    assert client.get("/_dash-layout").status_code == 200
    token = _csrf_in_layout(client.get("/_dash-layout").get_json())
    assert token, "the header's sign-out form carries the CSRF token"
    r = client.post("/logout", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    assert client.get("/_dash-layout").status_code == 401


def test_a_new_password_role_or_deactivation_ends_old_sessions(app, workspace):
    from store.accounts import get_user, set_password, update_user

    db = app.server.extensions["conceptlens"].db()
    client = app.server.test_client()
    login_client(client, "ana")
    assert client.get("/_dash-layout").status_code == 200
    set_password(db, "ana", "another-long-password", actor="tests")
    assert client.get("/_dash-layout").status_code == 401
    login_client(client, "ana", "another-long-password")
    assert client.get("/_dash-layout").status_code == 200
    update_user(db, "ana", expected_version=get_user(db, "ana").version, active=False, actor="tests")
    assert client.get("/_dash-layout").status_code == 401
    assert login_client(client, "ana", "another-long-password").status_code == 401


def test_cross_origin_writes_are_refused(app):
    client = app.server.test_client()
    login_client(client, "ana")
    dc = DashClient(client)
    body = dc.body("_pages_content.children", {"_pages_location.pathname": "/", "_pages_location.search": ""},
                   changed=["_pages_location.pathname"])
    r = client.post("/_dash-update-component", json=body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.get_json()["error"]
    r = client.post("/_dash-update-component", json=body, headers={"Origin": "http://localhost"})
    assert r.status_code == 200


def test_background_job_handles_are_bound_to_their_user(app, workspace):
    """RELIABILITY #20: a job handle minted for one user is refused for another (403), and nothing is read."""
    from dash import _callback_signing as signing
    from flask import g

    from store.accounts import get_user

    ensure_user(workspace, "bob", "radiologist")
    db = app.server.extensions["conceptlens"].db()
    with app.server.test_request_context("/"):
        g.user = get_user(db, "ana")
        secret = app._get_signing_secret()
        end = signing.sign(secret, signing.END_SCOPE, "page-load-1")
        handles = {"endId": end, "cacheKey": signing.sign(secret, signing.cache_scope("page-load-1"), "k" * 64),
                   "job": signing.sign(secret, signing.job_scope("page-load-1"), "4242")}
        g.user = get_user(db, "bob")
        assert app._get_signing_secret() != secret  # one secret per user
    query = "?" + "&".join(f"{k}={v}" for k, v in handles.items())

    def call(name):
        client = app.server.test_client()
        login_client(client, name)
        dc = DashClient(client)
        body = dc.body("_pages_content.children", {"_pages_location.pathname": "/", "_pages_location.search": ""},
                       changed=["_pages_location.pathname"])
        return dc.post(body, query=query)

    status, data = call("bob")
    assert status == 403 and "not issued to you" in data["error"]
    status, _data = call("ana")  # its owner passes the check (this callback has no job: Dash simply answers)
    assert status == 200
    forged = app.server.test_client()
    login_client(forged, "ana")
    r = forged.post("/_dash-update-component?cacheKey=abc~def", json={"output": "x"})
    assert r.status_code == 403
