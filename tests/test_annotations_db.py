"""The annotation database: schema and defaults, SQLite WAL/busy timeout/immediate writes under contention, one
initialization when two processes open a fresh file, schema-version refusal, rollback, and PostgreSQL by URL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from store.annotations import (
    DEFAULT_CONCEPTS,
    SCHEMA_VERSION,
    AnnotationDatabaseError,
    Concept,
    ImageMark,
    ReviewSession,
    SchemaVersion,
    SchemaVersionError,
    dump,
    metadata,
    open_database,
)
from store.errors import StoreError

ROOT = Path(__file__).resolve().parent.parent


def test_a_fresh_database_has_the_schema_the_version_and_the_default_concepts(workspace):
    db = open_database(settings=workspace)
    assert db.url == workspace.database_url and Path(workspace.workspace / "annotations.db").is_file()
    assert db.schema_version() == SCHEMA_VERSION == 2
    with db.read() as s:
        assert s.scalars(select(Concept.id).order_by(Concept.position)).all() == [c[0] for c in DEFAULT_CONCEPTS]
        assert {"unit_label", "label_change", "label_action", "region", "image_mark", "concept",
                "schema_version", "user_account", "review_session", "session_member", "comment", "probe_version",
                "audit_log"} <= set(metadata.tables)
        assert s.get(ReviewSession, 1).name == "Workspace"  # the built-in session
        conn = s.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    # opening again changes nothing
    before = dump(db)
    assert dump(open_database(workspace.database_url)) == before


def test_write_commits_and_rolls_back_as_one_transaction(workspace):
    db = open_database(settings=workspace)
    with db.write() as s:
        s.add(ImageMark(image_id="p1", concept="mass", present=True, author="ana"))
    before = dump(db)
    with pytest.raises(RuntimeError, match="boom"):
        with db.write() as s:
            s.add(ImageMark(image_id="p2", concept="mass", present=True, author="ana"))
            s.flush()
            raise RuntimeError("boom")
    assert dump(db) == before
    with pytest.raises(Exception, match="FOREIGN KEY"):  # an unknown concept never enters the table
        with db.write() as s:
            s.add(ImageMark(image_id="p3", concept="tumour", present=True, author="ana"))
    assert dump(db) == before


def test_write_transactions_take_the_write_lock_immediately(workspace):
    db = open_database(settings=workspace)
    path = workspace.workspace / "annotations.db"
    entered, release = threading.Event(), threading.Event()

    def writer():
        with db.write():  # nothing written yet: only BEGIN IMMEDIATE
            entered.set()
            release.wait(5)

    t = threading.Thread(target=writer)
    t.start()
    assert entered.wait(5)
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        assert other.execute("SELECT count(*) FROM concept").fetchone()[0] == 10  # readers are not blocked (WAL)
    finally:
        release.set()
        t.join()
        other.close()
    with db.read():  # and read sessions never take it
        o2 = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        o2.execute("BEGIN IMMEDIATE")
        o2.execute("ROLLBACK")
        o2.close()


_CONTENDER = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {root!r})
    from store.annotations import open_database, ImageMark
    db = open_database({url!r})
    for i in range({n}):
        with db.write() as s:
            s.add(ImageMark(image_id=f"{{sys.argv[1]}}-{{i}}", concept="mass", present=bool(i % 2), author="w"))
    print(json.dumps({{"ok": {n}}}))
""")


def test_two_processes_writing_at_once_never_see_database_is_locked(workspace):
    url = workspace.database_url
    open_database(url)  # create first: this test is about writes (initialization is tested below)
    script = _CONTENDER.format(root=str(ROOT), url=url, n=40)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b", "c")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
    db = open_database(url)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(ImageMark)) == 120


_OPENER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    while time.time() < {start}:
        time.sleep(0.001)
    from store.annotations import open_database
    open_database({url!r})
""")


def test_two_processes_opening_a_fresh_database_initialize_it_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = time.time() + 3  # both import first, then open at the same moment
    script = _OPENER.format(root=str(ROOT), url=url, start=start)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    db = open_database(url, create=False)
    with db.read() as s:
        assert s.scalars(select(SchemaVersion.version).order_by(SchemaVersion.version)).all() == [1, 2]
        assert s.scalar(select(func.count()).select_from(Concept)) == len(DEFAULT_CONCEPTS)
        assert s.scalar(select(func.count()).select_from(ReviewSession)) == 1


def test_a_database_of_another_schema_version_is_refused_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = open_database(url)
    with db.write() as s:
        s.add(SchemaVersion(version=SCHEMA_VERSION + 1, note="from the future"))
    before = dump(db)
    db.dispose()
    with pytest.raises(SchemaVersionError, match="schema version 3, this ConceptLens expects 2; upgrade"):
        open_database(url)
    with pytest.raises(SchemaVersionError):
        open_database(url, create=False)
    assert dump(_raw(url)) == before


def _raw(url):
    """The database without the version check (to compare its rows)."""
    from store.annotations import Database

    return Database(create_engine(url), url)


def test_bad_and_unreachable_urls_are_clear_errors():
    with pytest.raises(AnnotationDatabaseError, match="'nonsense' is not a database URL"):
        open_database("nonsense")
    with pytest.raises(AnnotationDatabaseError, match=r"postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x") as err:
        open_database("postgresql+psycopg://u:secret@127.0.0.1:1/x")
    assert "secret" not in str(err.value) and isinstance(err.value, StoreError)
    with pytest.raises(AnnotationDatabaseError, match="give a URL"):
        open_database()


def test_an_in_memory_database_keeps_its_data_across_sessions():
    db = open_database("sqlite://")
    with db.write() as s:
        s.add(ImageMark(image_id="p1", concept="mass", present=True, author="ana"))
    with db.read() as s:
        assert s.scalar(select(ImageMark.image_id)) == "p1"


# -- PostgreSQL --------------------------------------------------------------------------------------------------------
@pytest.mark.services
def test_postgresql_by_url_schema_labels_and_rollback(pg_database):
    db = open_database(pg_database)
    assert db.engine.dialect.name == "postgresql" and db.schema_version() == SCHEMA_VERSION
    with db.write() as s:
        s.add(ImageMark(image_id="p1", concept="mass", present=True, author="ana"))
    before = dump(db)
    with pytest.raises(RuntimeError):
        with db.write() as s:
            s.add(ImageMark(image_id="p2", concept="mass", present=False, author="ana"))
            s.flush()
            raise RuntimeError("boom")
    assert dump(db) == before
    assert dump(open_database(pg_database)) == before  # a second open initializes nothing again
    assert [c["id"] for c in sorted(before["concept"], key=lambda c: c["position"])] == [c[0] for c in DEFAULT_CONCEPTS]


def test_a_lock_sqlite_refuses_at_once_while_opening_is_waited_out(tmp_path, monkeypatch):
    """SQLite can answer "database is locked" at once, without waiting its busy timeout (switching a fresh file to WAL
    while another process migrates it): opening tries again until the timeout, then names the lock."""
    from sqlalchemy.exc import OperationalError

    import store.annotations as annotations

    real, calls = annotations.upgrade_database, []

    def locked_twice(db):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("PRAGMA journal_mode = WAL", {}, sqlite3.OperationalError("database is locked"))
        return real(db)

    monkeypatch.setattr(annotations, "upgrade_database", locked_twice)
    db = open_database(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(calls) == 3
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Concept)) == len(DEFAULT_CONCEPTS)

    def always_locked(db):
        raise OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(annotations, "upgrade_database", always_locked)
    monkeypatch.setattr(annotations, "BUSY_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    with pytest.raises(AnnotationDatabaseError, match=r"b\.db: cannot open the annotation database \(database is "
                                                     r"locked\)"):
        open_database(f"sqlite:///{tmp_path / 'b.db'}")
    assert 0.3 <= time.monotonic() - t0 < 5
