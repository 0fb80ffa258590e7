"""JSON routes under /api/ for scripts, exports and the load test, behind the same login as the app.

    >>> from vis.api import install_api
    >>> install_api(app)                      # create_app does it
    $ curl -b cookies.txt http://127.0.0.1:8050/api/whoami
    {"name": "ana", "role": "radiologist", "display_name": "Ana"}

The login layer (vis.auth) refuses anonymous requests before any of these views runs and sets `flask.g.user`; the
views check the user's rights on the session they name (docs/CONTRACTS.md, "Access").
"""

from __future__ import annotations

from flask import Blueprint, g, jsonify

__all__ = ["install_api", "API_PREFIX"]

API_PREFIX = "/api"


def _user():
    user = g.get("user")
    if user is None:  # only reachable when the login layer is not installed: refuse rather than act as nobody
        from werkzeug.exceptions import Unauthorized

        raise Unauthorized("log in first")
    return user


def install_api(app) -> Blueprint:
    """Register the /api/ blueprint on the Dash app's Flask server; returns it."""
    bp = Blueprint("api", __name__, url_prefix=API_PREFIX)

    @bp.get("/whoami")
    def whoami():
        user = _user()
        return jsonify(name=user.name, role=user.role, display_name=user.display_name)

    app.server.register_blueprint(bp)
    return bp
