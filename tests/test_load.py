"""Load (RELIABILITY #29): 8 clients label for 30 s through the API against gunicorn with 2 workers, on SQLite and
on PostgreSQL; every acknowledged label is stored exactly once and no request gets a 5xx — also when a worker is
SIGKILLed in the middle of the run.

The app is the real one (`vis.app:create_server()` under gunicorn, the command `python -m vis team` runs) on a copy
of the shared demo workspace; each test has an annotation database of its own with 8 users made by store.accounts.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

N_CLIENTS = 8
DURATION_S = 30.0


@pytest.fixture(scope="module")
def load_workspace(app_workspace, tmp_path_factory) -> Path:
    """A private copy of the demo workspace (the app writes its secret key and job cache there)."""
    ws = tmp_path_factory.mktemp("load") / "workspace"
    shutil.copytree(app_workspace, ws, ignore=shutil.ignore_patterns("secret_key", "annotations.db*", "cache"))
    return ws


def run_and_check(workspace: Path, db_url: str, *, kill_worker_after: float | None = None):
    """The load run against gunicorn with 2 workers, then the exactly-once check; returns the LoadResult."""
    import psutil

    from loadclient import gunicorn_app, label_tasks, make_users, run_load, stored_requests

    users = make_users(db_url, N_CLIENTS)
    tasks = label_tasks(workspace)
    killed = []
    with gunicorn_app(workspace, db_url) as app:
        master = psutil.Process(app.proc.pid)
        assert len(master.children()) == 2
        port = int(app.url.rsplit(":", 1)[1])

        def kill_a_busy_worker():
            """SIGKILL one worker (never the master), preferably one holding client connections right now."""
            workers = master.children()
            busy = [w for w in workers if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                                              for c in w.net_connections(kind="tcp"))]
            victim = (busy or workers)[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

        during = [(kill_worker_after, kill_a_busy_worker)] if kill_worker_after is not None else []
        result = run_load(app.url, users, tasks, duration=DURATION_S, retry_for=120.0, during=during)
        if during:
            assert killed, result.failures
            deadline = time.monotonic() + 60
            while len(master.children()) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert killed[0] not in [p.pid for p in master.children()]
            assert len(master.children()) == 2, "gunicorn did not replace the killed worker"
        log = app.log()
    print(result.summary())
    assert not result.failures, result.failures[:5]
    assert not result.unacked, f"{len(result.unacked)} labels never acknowledged"
    assert result.n_5xx == 0, f"{result.n_5xx} server errors: {dict(result.statuses)}\n{log[-3000:]}"
    assert len(result.acked) >= N_CLIENTS  # every client got labels through

    stored = stored_requests(db_url, [u for u, _ in users])
    counts = Counter(rid for rid, _ in stored)
    twice = [rid for rid, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} request ids stored more than once"
    missing = set(result.acked) - set(counts)
    assert not missing, f"{len(missing)} acknowledged labels are not in the database"
    extra = set(counts) - set(result.acked)
    assert not extra, f"{len(extra)} stored labels were never acknowledged (a client gave up?)"
    by_rid = dict(stored)
    assert all(by_rid[rid] == action for rid, (_user, action) in result.acked.items())
    return result


def test_load_on_sqlite(load_workspace, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'annotations.db'}"
    run_and_check(load_workspace, db_url)


@pytest.mark.services
def test_load_on_postgres(load_workspace, postgres_db):
    run_and_check(load_workspace, postgres_db)


def test_killed_worker_loses_nothing_acknowledged_sqlite(load_workspace, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'annotations.db'}"
    run_and_check(load_workspace, db_url, kill_worker_after=DURATION_S / 2)


@pytest.mark.services
def test_killed_worker_loses_nothing_acknowledged_postgres(load_workspace, postgres_db):
    run_and_check(load_workspace, postgres_db, kill_worker_after=DURATION_S / 2)


@pytest.fixture
def postgres_db(postgres_url):
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from loadclient import fresh_postgres_database

    url, drop = fresh_postgres_database(postgres_url, "conceptlens_load")
    try:
        yield url
    finally:
        drop()
