"""A load client for the labeling API: N threads, each logged in as its own user, label for `duration` seconds.

    >>> from loadclient import LabelTask, run_load
    >>> tasks = [LabelTask(image="p-000012", layer="features.23", concept="mass",
    ...                    region=[{"type": "rect", "x0": 8, "y0": 8, "x1": 40, "y1": 40}])]
    >>> r = run_load("http://127.0.0.1:8050", [("load0", "pw0"), ("load1", "pw1")], tasks, duration=30)
    >>> len(r.acked), r.rate, r.p95_ms, r.n_5xx

Each thread logs in the way a browser does (GET /login for the CSRF token, POST /login with the form), then posts
`POST /api/sessions/<sid>/labels` with a fresh request id per label. A request that fails (connection refused or
reset — e.g. a killed worker —, a timeout, a 5xx, a 401 after which it logs in again) is retried with the SAME
request id until the server acknowledges it (200 replayed or 201 written), so the server's exactly-once promise can
be checked: after the run, `acked` holds every acknowledged request id, and each must be stored exactly once. Any
other 4xx is a bug in the caller's tasks and stops that thread (recorded in `failures`).

Used by tests/test_load.py and tests/benchmarks/bench_load.py: the client is plain `requests`; the set-up helpers
at the end (users, tasks, a gunicorn app, a fresh PostgreSQL database) need the tests directory on sys.path.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

__all__ = ["LabelTask", "LoadResult", "login", "run_load", "LoginError", "make_users", "label_tasks",
           "stored_requests", "gunicorn_app", "fresh_postgres_database"]

_CSRF = re.compile(r"""<input[^>]*name=["']csrf_token["'][^>]*>""", re.I)
_VALUE = re.compile(r"""value=["']([^"']+)["']""", re.I)


class LoginError(RuntimeError):
    """The login page or form did not let the user in; the message says what came back."""


@dataclass(frozen=True)
class LabelTask:
    """One label body (without its request id): what a client posts, round-robin over the tasks."""

    image: str
    layer: str
    concept: str
    region: object  # explain.regions JSON, plotly shapes, or a plotly path string

    def body(self, request_id: str) -> dict:
        return {"image": self.image, "layer": self.layer, "concept": self.concept, "region": self.region,
                "request_id": request_id}


@dataclass
class LoadResult:
    """What the clients saw. `acked`: request id → (user, action id) of every acknowledged label."""

    duration: float = 0.0  # seconds from the first label to the end of the labeling window
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds of each acknowledged HTTP request
    until_ack: list[float] = field(default_factory=list)  # seconds from a label's first attempt to its ack
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or "connection error") → count
    replayed: int = 0  # acknowledgements with "replayed": true (a retry whose first attempt had been stored)
    retries: int = 0
    failures: list[str] = field(default_factory=list)  # unexpected answers (4xx other than 401), login errors
    unacked: list[str] = field(default_factory=list)  # request ids still unacknowledged when retrying gave up

    @property
    def n_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and s >= 500)

    @property
    def rate(self) -> float:
        """Acknowledged labels per second over the labeling window."""
        return len(self.acked) / self.duration if self.duration else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return 1000.0 * xs[min(len(xs) - 1, int(round(q / 100.0 * (len(xs) - 1))))]

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p95_ms(self) -> float:
        return self.percentile_ms(95)

    def summary(self) -> str:
        return (f"{len(self.acked)} labels acknowledged in {self.duration:.1f} s ({self.rate:.1f}/s), "
                f"p50 {self.p50_ms:.0f} ms, p95 {self.p95_ms:.0f} ms, {self.retries} retries, "
                f"{self.replayed} replayed, statuses {dict(self.statuses)}, {len(self.failures)} failures, "
                f"{len(self.unacked)} unacknowledged")


def login(base: str, username: str, password: str, *, timeout: float = 30.0) -> requests.Session:
    """A requests.Session logged in through the login form (GET /login → CSRF token → POST /login)."""
    s = requests.Session()
    page = s.get(f"{base}/login", timeout=timeout)
    if page.status_code != 200:
        raise LoginError(f"GET /login: HTTP {page.status_code}")
    tag = _CSRF.search(page.text)
    value = _VALUE.search(tag.group(0)) if tag else None
    if value is None:
        raise LoginError("GET /login: no csrf_token field in the form")
    r = s.post(f"{base}/login", data={"username": username, "password": password, "csrf_token": value.group(1),
                                      "next": "/"}, timeout=timeout, allow_redirects=False)
    if r.status_code not in (302, 303) or "/login" in r.headers.get("Location", "/login"):
        raise LoginError(f"POST /login as {username!r}: HTTP {r.status_code}, not let in")
    return s


@dataclass
class _Window:
    give_up_at: float
    stop_at: float = 0.0
    barrier: threading.Barrier | None = None


class _Client(threading.Thread):
    def __init__(self, base, user, password, tasks, offset, *, session_id, window, result, lock, timeout):
        super().__init__(daemon=True, name=f"load-{user}")
        self.base, self.user, self.password, self.tasks, self.i = base, user, password, tasks, offset
        self.url = f"{base}/api/sessions/{session_id}/labels"
        self.window = window  # shared: login_until, then stop_at and give_up_at once everyone is logged in
        self.result, self.lock, self.timeout = result, lock, timeout
        self.http: requests.Session | None = None

    def _count(self, status) -> None:
        with self.lock:
            self.result.statuses[status] += 1

    def _login(self) -> bool:
        while time.monotonic() < self.window.give_up_at:
            try:
                self.http = login(self.base, self.user, self.password, timeout=self.timeout)
                return True
            except (requests.RequestException, LoginError) as e:
                if isinstance(e, LoginError) and "not let in" in str(e):
                    with self.lock:
                        self.result.failures.append(str(e))
                    return False
                time.sleep(0.2)  # a worker restarting: try again
        return False

    def run(self) -> None:
        try:
            ok = self._login()
        finally:
            try:  # every client waits for the others, so the window starts with all of them labeling
                self.window.barrier.wait()
            except threading.BrokenBarrierError:
                ok = False
        if not ok:
            return
        while time.monotonic() < self.window.stop_at:
            task = self.tasks[self.i % len(self.tasks)]
            self.i += 1
            if not self._label(task, uuid.uuid4().hex):
                return

    def _label(self, task: LabelTask, rid: str) -> bool:
        """Post one label until acknowledged; False stops this client (an unexpected answer or giving up)."""
        first = time.monotonic()
        body = task.body(rid)
        attempt = 0
        while True:
            if attempt:
                with self.lock:
                    self.result.retries += 1
                if time.monotonic() > self.window.give_up_at:
                    with self.lock:
                        self.result.unacked.append(rid)
                    return False
                time.sleep(min(0.05 * attempt, 0.5))
            attempt += 1
            t0 = time.monotonic()
            try:
                r = self.http.post(self.url, json=body, timeout=self.timeout)
            except requests.RequestException:
                self._count("connection error")
                continue
            self._count(r.status_code)
            if r.status_code in (200, 201):
                data = r.json()
                now = time.monotonic()
                with self.lock:
                    self.result.acked[rid] = (self.user, int(data["action_id"]))
                    self.result.latencies.append(now - t0)
                    self.result.until_ack.append(now - first)
                    self.result.replayed += bool(data.get("replayed"))
                return True
            if r.status_code == 401:  # the session cookie was refused: log in again, same request id
                if not self._login():
                    with self.lock:
                        self.result.unacked.append(rid)
                    return False
                continue
            if r.status_code >= 500:
                continue
            with self.lock:
                self.result.failures.append(f"{self.user} {rid}: HTTP {r.status_code} {r.text[:300]}")
            return False


def run_load(base: str, users: list[tuple[str, str]], tasks: list[LabelTask], *, session_id: int = 1,
             duration: float = 30.0, retry_for: float = 120.0, timeout: float = 60.0,
             during: list[tuple[float, Callable[[], object]]] = ()) -> LoadResult:
    """One thread per (user, password); all log in first, then label together for `duration` seconds (the window
    opens when the last one is in, so the rate counts only time where every client labels).

    A label unacknowledged when the window ends is still retried (same request id) for up to `retry_for` seconds,
    so every request id a client sent ends acknowledged or listed in `unacked`. `during`: (seconds into the
    window, function) pairs run while the clients label — e.g. killing a server worker; an exception is a failure.
    """
    if not users or not tasks:
        raise ValueError("run_load needs at least one user and one task")
    result, lock = LoadResult(), threading.Lock()
    window = _Window(give_up_at=time.monotonic() + retry_for)  # for the logins; then reset below

    opened = threading.Event()

    def open_window():  # run by the last client to log in, before any of them is released
        window.stop_at = time.monotonic() + duration
        window.give_up_at = window.stop_at + retry_for
        opened.set()

    window.barrier = threading.Barrier(len(users), action=open_window)
    clients = [_Client(base, u, p, tasks, k * 7, session_id=session_id, window=window, result=result, lock=lock,
                       timeout=timeout) for k, (u, p) in enumerate(users)]
    for c in clients:
        c.start()
    if during and opened.wait(timeout=retry_for + 5):
        t0 = window.stop_at - duration
        for at, fn in sorted(during, key=lambda e: e[0]):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            try:
                fn()
            except Exception as e:  # noqa: BLE001 — reported with the run's other failures
                with lock:
                    result.failures.append(f"during the run, {getattr(fn, '__name__', fn)}: {e!r}")
    for c in clients:
        c.join(timeout=duration + 2 * retry_for + 3 * timeout + 60)
    result.duration = duration
    return result


# -- setting up a run (tests/test_load.py, tests/benchmarks/bench_load.py) ---------------------------------------------
def make_users(db_url: str, n: int, *, prefix: str = "load") -> list[tuple[str, str]]:
    """n radiologists with random passwords, members of session 1 of the database at db_url."""
    import secrets

    from store.accounts import add_member, create_user
    from store.annotations import open_database

    db = open_database(db_url)
    users = []
    try:
        for i in range(n):
            name, password = f"{prefix}{i}", secrets.token_urlsafe(12)
            create_user(db, name=name, role="radiologist", password=password, actor="test")
            add_member(db, 1, name, actor="test")
            users.append((name, password))
    finally:
        db.dispose()
    return users


def label_tasks(workspace: Path, n: int = 24):
    """Label bodies on real store patches: boxes over each patch's centre, alternating two concepts."""
    from explain.dissection import patch_size
    from store.activations import open_store
    from store.settings import load_settings

    settings = load_settings(workspace, env={})
    store = open_store(settings.store_url("demo"))
    h, w = patch_size(store)
    layer = store.layers[-1]
    tasks = []
    for k, image in enumerate(store.image_ids[:n]):
        x0, y0 = 4 + (k % 5) * 3, 6 + (k % 7) * 2
        region = [{"type": "rect", "x0": x0, "y0": y0, "x1": x0 + w // 2, "y1": y0 + h // 2}]
        tasks.append(LabelTask(image=image, layer=layer, concept=("mass", "calcification")[k % 2], region=region))
    return tasks


def stored_requests(db_url: str, authors: list[str]) -> list[tuple[str, int]]:
    """(request_id, action id) of every labeling action of these authors in session 1."""
    from sqlalchemy import select

    from store.annotations import LabelAction, open_database

    db = open_database(db_url)
    try:
        with db.read() as s:
            rows = s.execute(select(LabelAction.request_id, LabelAction.id)
                             .where(LabelAction.session_id == 1, LabelAction.author.in_(authors))).all()
    finally:
        db.dispose()
    return [(r, int(i)) for r, i in rows]


def gunicorn_app(workspace: Path, db_url: str, *, workers: int = 2):
    """`browser.AppServer` running the app under gunicorn (`workers` processes, as `python -m vis team` runs it) on
    a free port, against the annotation database `db_url`; the workspace's other services stay embedded."""
    from browser import AppServer
    from vis.team import gunicorn_command

    argv = gunicorn_command(bind="127.0.0.1:{port}", workers=workers)
    env = {"CONCEPTLENS_DATABASE_URL": db_url, "CONCEPTLENS_SECRET_KEY": uuid.uuid4().hex}
    for var in ("MLFLOW_TRACKING_URI", "CONCEPTLENS_STORE_ROOT", "CONCEPTLENS_CACHE_URL"):
        env[var] = ""  # the workspace's embedded defaults
    return AppServer(workspace, argv=argv, env=env)


def fresh_postgres_database(server_url: str, prefix: str):
    """(URL, drop()) of a new, uniquely named database on the server of `server_url`."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(server_url)
    admin = base.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return base.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False), drop
