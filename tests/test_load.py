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
import threading
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

        def kill_one():
            time.sleep(kill_worker_after)
            victim = master.children()[0]
            os.kill(victim.pid, signal.SIGKILL)  # one worker, not the master: gunicorn starts a new one
            killed.append(victim.pid)

        killer = threading.Thread(target=kill_one, daemon=True) if kill_worker_after is not None else None
        if killer:
            killer.start()
        result = run_load(app.url, users, tasks, duration=DURATION_S, retry_for=120.0)
        if killer:
            killer.join()
            deadline = time.monotonic() + 60
            while len(master.children()) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert killed and killed[0] not in [p.pid for p in master.children()]
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
    run_and_check(load_workspace, db_url, kill_worker_after=20.0)  # ~13 s into the 30 s window (logins first)


@pytest.mark.services
def test_killed_worker_loses_nothing_acknowledged_postgres(load_workspace, postgres_db):
    run_and_check(load_workspace, postgres_db, kill_worker_after=20.0)  # ~13 s into the 30 s window (logins first)


@pytest.fixture
def postgres_db(postgres_url):
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from loadclient import fresh_postgres_database

    url, drop = fresh_postgres_database(postgres_url, "conceptlens_load")
    try:
        yield url
    finally:
        drop()
