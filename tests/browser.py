"""Browser-test helpers: the app in a subprocess on a free loopback port, driven by Debian's chromium via Playwright.

    >>> with AppServer(workspace) as app, open_browser() as page:
    ...     page.goto(app.url + "/units")
    ...     wait_idle(page)
    ...     screenshot(page, "units")                 # test-output/screenshots/units.png

Never downloads a browser: Playwright launches /usr/bin/chromium with a fresh temporary profile. The server runs
`python -m vis serve` exactly as a user would (debug off), with one torch thread so tests share the 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TEST_PASSWORD = "correct-horse-battery"  # a test account's password (≥ the accounts module's minimum length)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m vis serve` (or any argv) on 127.0.0.1:<free port>; `.url`; stopped with its process group."""

    def __init__(self, workspace: Path | str, *, args: list[str] = (), env: dict | None = None,
                 argv: list[str] | None = None, timeout: float = 120.0):
        self.workspace = Path(workspace)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        # argv may hold "{port}": e.g. gunicorn's bind address
        self.argv = [a.format(port=self.port) for a in argv] if argv else \
            [sys.executable, "-m", "vis", "serve", "--workspace", str(self.workspace), "--port", str(self.port), *args]
        self.env = {**os.environ, "CONCEPTLENS_WORKSPACE": str(self.workspace), "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="conceptlens-app-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "AppServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError(f"app did not answer on {self.url} within {self.timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()


@contextlib.contextmanager
def open_browser(*, width: int = 1440, height: int = 900):
    """A Playwright page in chromium (fresh profile), viewport width×height; closed on exit."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="conceptlens-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, device_scale_factor=1)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


@contextlib.contextmanager
def open_contexts(n: int, *, width: int = 1440, height: int = 900):
    """`n` pages in `n` separate browser contexts of one chromium (separate cookies: separate users)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pages = []
            for _ in range(n):
                context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1,
                                              accept_downloads=True)
                page = context.new_page()
                page.set_default_timeout(60_000)
                pages.append(page)
            yield pages
        finally:
            browser.close()


def browser_login(page, base: str, name: str, password: str = TEST_PASSWORD, *, next_path: str = "/") -> None:
    """Sign in through the real login form (the page ends on `next_path`, the app loaded)."""
    page.goto(f"{base}/login?next={urllib.parse.quote(next_path)}")
    page.fill("#username", name)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector(".cl-navbar")


# Callbacks Dash's renderer still has in its queues, plus components marked as loading.
_BUSY_JS = """() => {
    const s = window.store && window.store.getState && window.store.getState();
    if (!s || !s.callbacks) return 1;
    const c = s.callbacks;
    const queued = ['requested', 'prioritized', 'blocked', 'executing', 'watched', 'stored']
        .reduce((n, k) => n + ((c[k] || []).length), 0);
    return queued + document.querySelectorAll('[data-dash-is-loading="true"]').length;
}"""


def wait_idle(page, *, quiet_ms: int = 600, timeout_s: float = 90.0) -> None:
    """Wait until Dash has no callback in flight (no loading state) for `quiet_ms`."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        busy = page.evaluate(_BUSY_JS)
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif (time.monotonic() - quiet_since) * 1000 >= quiet_ms:
            return
        page.wait_for_timeout(100)
    raise TimeoutError("the app kept working for more than %.0f s" % timeout_s)


def screenshot(page, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot to test-output/screenshots/<name>.png and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if full_page:  # from the top, or the sticky navbar is drawn where the viewport happened to be
        page.evaluate("() => window.scrollTo(0, 0)")
        page.wait_for_timeout(100)
    page.screenshot(path=str(path), full_page=full_page)
    return path


def graph_box(page, graph_id: str) -> dict:
    """Bounding box (page pixels) of a dcc.Graph's plotting area, for real mouse events on it."""
    return page.locator(f"#{graph_id} .nsewdrag").first.bounding_box()


def data_to_page(page, graph_id: str, x: float, y: float) -> tuple[float, float]:
    """Page pixel coordinates of data point (x, y) on a plotly graph (its first x and y axes)."""
    return tuple(page.evaluate(
        """([id, x, y]) => {
            const gd = document.getElementById(id).querySelector('.js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
            return [r.left + xa.l2p(xa.d2l(x)), r.top + ya.l2p(ya.d2l(y))];
        }""", [graph_id, x, y]))


# -- a real small workspace for the app tests (until / unless conftest provides `demo_workspace`) -----------------------
def build_demo_workspace(root: Path, *, epochs: int = 10) -> Path:
    """demo data (1 variant of the 8 real films) → a small trained model → extracted store → cached maps.
    Ten epochs: with the demo config and the demo data of 2026-11-29 (halo sign, margin bands), six leave the small
    model flagging film labels rather than lesions (test AUROC 0.31; eight 0.66, ten 0.85). Earlier data: three
    epochs flagged no patch at P(lesion) ≥ 0.5, six were enough.

    Runs the project's own commands in subprocesses with one thread each; returns the workspace directory.
    """
    root = Path(root)
    env = {**os.environ, "CONCEPTLENS_WORKSPACE": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    for var in ("MLFLOW_TRACKING_URI", "CONCEPTLENS_DATABASE_URL", "CONCEPTLENS_STORE_ROOT", "CONCEPTLENS_CACHE_URL"):
        env.pop(var, None)
    steps = [
        ["training", "build-demo", "--variants", "1"],
        ["training", "fit", "--config", str(ROOT / "training" / "configs" / "demo.yaml"),
         "--set", f"trainer.max_epochs={epochs}"],
        ["store", "extract", "--model", "models:/conceptlens-demo@champion", "--data", "demo", "--out", "demo",
         "--no-progress", "--threads", "1"],
        ["explain", "maps", "--store", "demo", "--kinds", "unit_pca", "unit_groups", "image_pca"],
    ]
    for step in steps:
        cmd = [sys.executable, "-m", step[0], *step[1:], "--workspace", str(root)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step[:2])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
    return root


@functools.lru_cache(maxsize=1)
def shared_demo_workspace(basetemp: Path) -> Path:
    """One built workspace per test session (under pytest's basetemp), shared by every test module that needs it."""
    return build_demo_workspace(Path(basetemp) / "app-demo-workspace")


def workspace_dir(ws) -> Path:
    """The directory of a workspace given as Settings or a path."""
    return Path(getattr(ws, "workspace", ws))


# -- driving callbacks over HTTP (tests and the benchmark) ----------------------------------------------------------------
# -- accounts and signing in (tests and the benchmark) ---------------------------------------------------------------


def ensure_user(workspace, name: str, role: str = "radiologist", *, password: str = TEST_PASSWORD,
                sessions: tuple[int, ...] = (1,)) -> str:
    """Create (or reset) account `name` in the workspace's review database, a member of `sessions`; returns the
    password. Uses store.accounts exactly as `python -m store users add` does."""
    from store.accounts import add_member, create_user, get_user, set_password
    from store.annotations import open_database
    from store.settings import load_settings

    settings = workspace if hasattr(workspace, "database_url") else load_settings(workspace_dir(workspace))
    db = open_database(settings.database_url)
    try:
        if get_user(db, name) is None:
            create_user(db, name=name, role=role, password=password, actor="tests")
        else:
            set_password(db, name, password, actor="tests")
        for sid in sessions:
            add_member(db, sid, name, actor="tests")
    finally:
        db.dispose()
    return password


def csrf_from(html_text: str) -> str:
    """The CSRF token of the login form in a served page."""
    import re

    m = re.search(r'name="csrf_token" value="([^"]+)"', html_text)
    if not m:
        raise AssertionError(f"no CSRF token in the page: {html_text[:300]}")
    return m.group(1)


def login_client(client, name: str, password: str = TEST_PASSWORD, *, next_path: str = "/"):
    """Sign a Flask test client in through the real form; returns the POST's response (302 on success)."""
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token,
                                       "next": next_path})


class HttpSession:
    """A cookie-keeping HTTP client for a served app (urllib only): `request(method, path, …)` and `login`."""

    def __init__(self, base: str):
        import http.cookiejar

        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # 302s come back to the caller as they are
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, method: str, path: str, *, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 120):
        """(status, headers, body bytes) of one request; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def login(self, name: str, password: str = TEST_PASSWORD) -> None:
        _status, _h, body = self.request("GET", "/login")
        form = urllib.parse.urlencode({"username": name, "password": password, "csrf_token": csrf_from(body.decode()),
                                       "next": "/"}).encode()
        status, headers, body = self.request("POST", "/login", data=form,
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        if status != 302:
            raise AssertionError(f"login of {name!r} failed: HTTP {status} {body[:300]!r}")


class DashClient:
    """Calls a Dash app's callbacks the way the browser does: POST /_dash-update-component with the exact payload.

        >>> c = DashClient(flask_app.test_client())              # a test client that signed in (login_client)
        >>> c = DashClient("http://127.0.0.1:8050", login=("ana", password))     # or a served app
        >>> status, data = c.call("review-mammogram.figure", {"review-source.value": "img-…", …})

    `inputs` maps "id.property" (pattern-matching ids: the JSON of the dict, sorted keys) to values; declared
    inputs not given are sent without a value, as the browser does for undefined props.
    """

    def __init__(self, target, *, login: tuple[str, str] | None = None):
        import json as _json

        self._json = _json
        self.target = target
        self.http = None
        if isinstance(target, str):
            self.http = HttpSession(target)
            if login:
                self.http.login(*login)
        elif login:
            login_client(target, *login)
        self.deps = self._get("/_dash-dependencies")

    def _get(self, path):
        if isinstance(self.target, str):
            status, _h, body = self.http.request("GET", path, timeout=30)
            if status != 200:
                raise AssertionError(f"GET {path}: HTTP {status} {body[:200]!r}")
            return self._json.loads(body)
        r = self.target.get(path)
        return r.get_json()

    def post(self, body, *, raw: bytes | None = None, content_type: str = "application/json", query: str = ""):
        """(status, parsed JSON or text) of one POST to the callback endpoint (`query`: "?cacheKey=…" for jobs)."""
        data = raw if raw is not None else self._json.dumps(body).encode()
        path = "/_dash-update-component" + query
        if isinstance(self.target, str):
            status, _h, payload = self.http.request("POST", path, data=data, headers={"Content-Type": content_type})
            text = payload.decode()
        else:
            r = self.target.post(path, data=data, content_type=content_type)
            status, text = r.status_code, r.get_data(as_text=True)
        try:
            return status, self._json.loads(text) if text else None
        except ValueError:
            return status, text

    def find(self, output: str) -> dict:
        """The dependency entry whose outputs include `output` ("id.property"): the callback that owns it, else one
        that writes it with allow_duplicate; "id.property@" asks for the allow_duplicate writer."""
        duplicate = output.endswith("@")
        output = output.rstrip("@")
        for exact in ((False,) if duplicate else (True, False)):
            for d in self.deps:
                outs = d["output"].strip(".").split("...")
                if output in (outs if exact else [o.split("@")[0] for o in outs if "@" in o or not duplicate]):
                    return d
        raise KeyError(f"no callback outputs {output!r}")

    @staticmethod
    def _key(dep: dict) -> str:
        return f"{dep['id']}.{dep['property']}"

    def body(self, output: str, inputs: dict, *, changed: list[str] | None = None) -> dict:
        d = self.find(output)
        outs = d["output"].strip(".").split("...")
        outputs = []
        for o in outs:
            cid, _, prop = o.rpartition(".")
            outputs.append({"id": self._json.loads(cid) if cid.startswith("{") else cid, "property": prop})

        def entries(deps):
            out = []
            for dep in deps:
                key = self._key(dep)
                cid = self._json.loads(dep["id"]) if dep["id"].startswith("{") else dep["id"]
                if isinstance(cid, dict) and any(v == ["ALL"] for v in cid.values()):
                    out.append(inputs.get(key, []))  # already a list of {"id", "property", "value"}
                    continue
                e = {"id": cid, "property": dep["property"]}
                if key in inputs:
                    e["value"] = inputs[key]
                out.append(e)
            return out

        ins = entries(d["inputs"])
        changed = changed if changed is not None else [self._key(d["inputs"][0])]
        return {"output": d["output"], "outputs": outputs if d["output"].startswith("..") else outputs[0],
                "inputs": ins, "state": entries(d["state"]), "changedPropIds": changed}

    def call(self, output: str, inputs: dict, *, changed: list[str] | None = None):
        return self.post(self.body(output, inputs, changed=changed))


def _center(page, element_id: str) -> None:
    """Scroll an element to the middle of the viewport (clear of the sticky navbar) before mouse events."""
    page.evaluate("(id) => document.getElementById(id).scrollIntoView({block: 'center', inline: 'center'})",
                  element_id)
    page.wait_for_timeout(50)


def drag(page, graph_id: str, points: list[tuple[float, float]], *, steps: int = 4) -> None:
    """A real mouse drag through data points of a plotly graph (scrolled into view first): press at the first,
    move through the others in `steps` small moves each, release at the last."""
    _center(page, graph_id)
    page.mouse.move(*data_to_page(page, graph_id, *points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*data_to_page(page, graph_id, *p), steps=steps)
    page.mouse.up()


def click_data(page, graph_id: str, x: float, y: float) -> None:
    """A real mouse click at data point (x, y) of a plotly graph (scrolled into view first)."""
    _center(page, graph_id)
    page.mouse.click(*data_to_page(page, graph_id, x, y))


def call_background(dc: DashClient, base: str, output: str, inputs: dict, *, changed: list[str],
                    timeout: float = 300.0):
    """Start a background callback and poll it as the browser does (cacheKey and job in the query string) until
    its result comes; returns (the response JSON, seconds)."""
    body = dc.body(output, inputs, changed=changed)
    t0 = time.perf_counter()
    status, data = dc.post(body)
    if status != 200 or not isinstance(data, dict) or "cacheKey" not in data:
        raise RuntimeError(f"background job did not start: HTTP {status} {str(data)[:300]}")
    query = "?" + urllib.parse.urlencode({"cacheKey": data["cacheKey"], "job": data["job"]})
    while time.perf_counter() - t0 < timeout:
        status, result = dc.post(body, query=query)
        if status != 200:
            raise RuntimeError(f"polling the job: HTTP {status} {str(result)[:300]}")
        if isinstance(result, dict) and "response" in result:
            return result, time.perf_counter() - t0
        time.sleep(0.1)
    raise TimeoutError(f"background job {output} did not finish in {timeout} s")


def labelable_patch(workspace, *, min_pixels: int = 150,
                    min_fill: float = 0.5) -> tuple[str, str, str, int, tuple[int, int, int, int]]:
    """(layer, source, flagged patch, unit, mask bbox x0, y0, x1, y1): a flagged patch whose most active unit of the
    default layer has a clear mask (at least `min_pixels`, filling at least `min_fill` of its bounding box), so a
    rectangle around it labels that unit: its IoU with the rectangle is at least that fill, well above the 0.2 that
    highlights and labels a unit (a mask of two blobs far apart fills little of its box)."""
    from store.settings import load_settings
    from vis.app import AppConfig
    from vis.services import Workbench

    wb = Workbench(load_settings(workspace_dir(workspace)), AppConfig())
    layer = wb.layer()
    candidates = [(src.id, f.image_id) for src in wb.sources() for f in wb.flagged(src.id)]
    candidates += [(r.source_id, r.id) for r in wb.manifest().records]  # a tiny model may flag too few
    for source, image in candidates:
        try:
            row, _ = wb.record(image)
        except Exception:  # noqa: BLE001 — a manifest patch that is not in the store
            continue
        unit = wb.most_active_unit(layer, row)
        mask = wb.unit_mask(layer, row, unit)
        if mask.sum() >= min_pixels:
            ys, xs = mask.nonzero()
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if mask.sum() >= min_fill * (box[2] - box[0]) * (box[3] - box[1]):
                return layer, source, image, unit, box
    raise AssertionError("no patch of the workspace has a unit with a visible mask")


def rect_around(box, *, pad: float = 0.0) -> list[dict]:
    """The drawn-region list (plotly shapes) of one rectangle around a bbox."""
    x0, y0, x1, y1 = box
    return [{"type": "rect", "x0": float(x0 - pad), "y0": float(y0 - pad), "x1": float(x1 + pad),
             "y1": float(y1 + pad)}]
