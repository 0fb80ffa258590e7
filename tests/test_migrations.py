"""Alembic migrations of the annotation database: 0001 is the v1 schema exactly, a v1 database holding data is upgraded
with every row kept (into session 1, its authors made users), re-runs change nothing, two processes starting
together migrate once, a newer database is refused, the migrated schema equals the models, and the audit log is
append-only — on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers_dissection import fresh_postgres_database
from sqlalchemy import create_engine, text

from store.annotations import (
    SCHEMA_VERSION,
    Database,
    SchemaVersionError,
    _alembic_config,
    current_revision,
    dump,
    head_revision,
    metadata,
    open_database,
)

ROOT = Path(__file__).resolve().parent.parent
V1_SQL = Path(__file__).with_name("annotations_v1.sql")


def _raw(url: str) -> Database:
    return Database(create_engine(url), url)


def _v1_sqlite(path: Path) -> str:
    """A database made by the v1 code (the SQL fixture generated from it): no alembic_version, rows of 3 authors."""
    con = sqlite3.connect(path)
    con.executescript(V1_SQL.read_text())
    con.close()
    return f"sqlite:///{path}"


def _sqlite_schema(path) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(path)
    rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'alembic%' "
                       "AND name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
    con.close()
    return [(t, n, re.sub(r"\s+", " ", s or "")) for t, n, s in rows]


def _v1_rows(url: str) -> dict[str, list[dict]]:
    """The v1 tables' rows of a database, as dicts (v1 columns only, so v1 and v2 states compare)."""
    eng = create_engine(url)
    v1_columns = {
        "concept": "id, name, description, builtin, position",
        "region": "id, image_id, concept, spec, height, width, area, author, deleted_at",
        "label_action": "id, kind, layer, concept, image_id, region_id, rule, author, n_changed, undoes, undone_by",
        "label_change": "id, action_id, layer, unit, before, after",
        "unit_label": "layer, unit, concept, iou, author, image_id, region_id, action_id, version",
        "image_mark": "id, image_id, concept, present, author",
    }
    out = {}
    with eng.connect() as c:
        for table, cols in v1_columns.items():
            quoted = ", ".join(f'"{x.strip()}"' for x in cols.split(","))
            rows = [dict(r) for r in c.execute(text(f"SELECT {quoted} FROM {table}")).mappings()]
            for r in rows:
                for k in ("spec", "rule", "before", "after"):
                    if isinstance(r.get(k), str):
                        r[k] = json.loads(r[k])  # SQLite hands JSON back as text
                if "present" in r or "builtin" in r:
                    r.update({k: bool(r[k]) for k in ("present", "builtin") if k in r})
            out[table] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    eng.dispose()
    return out


# -- 0001 is v1 --------------------------------------------------------------------------------------------------------
def test_revision_0001_is_exactly_the_v1_schema(tmp_path):
    path = tmp_path / "r1.db"
    eng = create_engine(f"sqlite:///{path}")
    with eng.begin() as c:
        command.upgrade(_alembic_config(c), "0001")
    eng.dispose()
    fixture = tmp_path / "v1.db"
    _v1_sqlite(fixture)
    assert _sqlite_schema(path) == _sqlite_schema(fixture)  # every table, column, constraint and index, as text


# -- from empty --------------------------------------------------------------------------------------------------------
def _check_fresh(db: Database) -> None:
    assert current_revision(db) == head_revision() == "0002" and db.schema_version() == SCHEMA_VERSION
    with db.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), metadata) == []  # migrated schema == the models
    d = dump(db)
    assert [s["name"] for s in d["review_session"]] == ["Workspace"] and d["review_session"][0]["id"] == 1
    assert d["user_account"] == [] and d["unit_label"] == []
    assert len(d["concept"]) == 10


def test_an_empty_sqlite_database_migrates_to_head_and_a_rerun_changes_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    db = open_database(url)
    _check_fresh(db)
    before = dump(db)
    db.dispose()
    assert dump(open_database(url)) == before
    r = subprocess.run([sys.executable, "-m", "store", "db", "upgrade", "--url", url], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "at revision 0002" in r.stdout
    assert dump(_raw(url)) == before
    r = subprocess.run([sys.executable, "-m", "store", "db", "current", "--url", url], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "revision 0002; this ConceptLens: 0002" in r.stdout


# -- from v1 with data -------------------------------------------------------------------------------------------------
def test_a_v1_sqlite_database_keeps_every_row_moves_into_session_1_and_its_authors_become_users(tmp_path):
    url = _v1_sqlite(tmp_path / "v1.db")
    v1 = _v1_rows(url)
    db = open_database(url)
    assert current_revision(db) == "0002"
    assert _v1_rows(url) == v1  # every v1 value kept
    d = dump(db)
    users = {u["name"]: u for u in d["user_account"]}
    assert set(users) == {"ana", "Dr Bob Smith", "carla"}  # exact names, even one that is no login name
    assert all(u["role"] == "radiologist" and u["password_hash"] is None for u in users.values())
    assert len(d["session_member"]) == 3 and {m["session_id"] for m in d["session_member"]} == {1}
    for table in ("region", "label_action", "label_change", "image_mark", "unit_label"):
        assert d[table] and {r["session_id"] for r in d[table]} == {1}, table
    assert [r["version"] for r in d["schema_version"]] == [1, 2]
    assert d["audit_log"][0]["action"] == "schema.upgrade"
    with db.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), metadata) == []
        assert c.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # switched back on after the batch copies

    # the v1 labels read back through explain.labels, and the app can go on labeling
    from explain.labels import current_labels, label_history, undo

    assert current_labels(db, "features.9") == {2: "mass", 3: "mass", 5: "calcification"}
    assert current_labels(db, "features.9", author="ana") == {2: "mass", 3: "mass"}
    assert [h["action"]["id"] for h in label_history(db)] == [4, 3, 2, 1]
    u = undo(db, 2, author="Dr Bob Smith")  # a v1 action undone after the migration
    assert u.restored == {5: None}
    again = dump(db)
    db.dispose()
    assert dump(open_database(url)) == again  # idempotent


def _pg_v1(url: str) -> None:
    """A PostgreSQL database as the v1 code left it: revision 0001's tables and rows, no alembic_version."""
    eng = create_engine(url)
    with eng.begin() as c:
        command.upgrade(_alembic_config(c), "0001")
        c.execute(text("DROP TABLE alembic_version"))
        # the rows of the SQL fixture (the v1 code's own output), minus its DDL; in its (alphabetical) order the
        # foreign keys are satisfied only at the end, so they are checked by the migration, not by these inserts
        c.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for line in V1_SQL.read_text().splitlines():
            if line.startswith("INSERT INTO") and '"concept"' not in line.split("VALUES")[0] \
                    and '"schema_version"' not in line.split("VALUES")[0]:
                c.exec_driver_sql(line.replace(",1,'", ",true,'").replace(",0,'", ",false,'")
                                  if line.startswith('INSERT INTO "image_mark"') else line)
        c.exec_driver_sql("INSERT INTO concept VALUES ('rim_sign', 'rim sign', '', false, 1000, '2025-01-02')")
    eng.dispose()


@pytest.mark.services
def test_postgresql_from_empty_and_from_v1_with_data(postgres_url):
    with fresh_postgres_database(postgres_url) as url:
        db = open_database(url)
        _check_fresh(db)
        before = dump(db)
        db.dispose()
        assert dump(open_database(url)) == before
    with fresh_postgres_database(postgres_url) as url:
        _pg_v1(url)
        v1 = _v1_rows(url)
        assert len(v1["label_action"]) == 4 and len(v1["unit_label"]) == 3
        db = open_database(url)
        assert current_revision(db) == "0002"
        assert _v1_rows(url) == v1
        d = dump(db)
        assert {u["name"] for u in d["user_account"]} == {"ana", "Dr Bob Smith", "carla"}
        assert {r["session_id"] for r in d["unit_label"]} == {1}
        with db.engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), metadata) == []
        from store.accounts import create_session

        assert create_session(db, name="second", actor="ana").id == 2  # the id sequence moved past session 1
        db.dispose()


# -- two processes at once ---------------------------------------------------------------------------------------------
_OPENER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from store.annotations import open_database
    while time.time() < {start}:
        time.sleep(0.001)
    db = open_database({url!r})
    print(db.schema_version())
""")


def _race(url: str, n: int = 2) -> None:
    start = time.time() + 4  # all import first, then open at the same moment
    script = _OPENER.format(root=str(ROOT), url=url, start=start)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert out.strip() == str(SCHEMA_VERSION)


def _migrated_once(url: str) -> None:
    d = dump(_raw(url))
    assert [r["version"] for r in d["schema_version"]] == [1, 2]
    assert len(d["review_session"]) == 1 and len(d["concept"]) >= 10
    assert [a["action"] for a in d["audit_log"]] == ["schema.upgrade"]


def test_two_processes_upgrading_a_v1_sqlite_database_at_once_migrate_it_once(tmp_path):
    url = _v1_sqlite(tmp_path / "v1.db")
    v1 = _v1_rows(url)
    _race(url, 3)
    _migrated_once(url)
    assert _v1_rows(url) == v1
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    _race(fresh, 3)
    _migrated_once(fresh)


@pytest.mark.services
def test_two_processes_upgrading_postgresql_at_once_migrate_it_once(postgres_url):
    with fresh_postgres_database(postgres_url) as url:
        _race(url, 3)
        _migrated_once(url)
    with fresh_postgres_database(postgres_url) as url:
        _pg_v1(url)
        v1 = _v1_rows(url)
        _race(url, 3)
        _migrated_once(url)
        assert _v1_rows(url) == v1


# -- refusals ----------------------------------------------------------------------------------------------------------
def test_a_database_newer_than_the_code_is_refused_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    open_database(url).dispose()
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    eng.dispose()
    before = dump(_raw(url))
    with pytest.raises(SchemaVersionError, match="revision '0099' is newer than this ConceptLens"):
        open_database(url)
    with pytest.raises(SchemaVersionError, match="0099"):
        open_database(url, create=False)
    assert dump(_raw(url)) == before


def test_create_false_refuses_a_database_that_needs_migrating(tmp_path):
    url = _v1_sqlite(tmp_path / "v1.db")
    before = _sqlite_schema(tmp_path / "v1.db")
    with pytest.raises(SchemaVersionError, match="python -m store db upgrade"):
        open_database(url, create=False)
    assert _sqlite_schema(tmp_path / "v1.db") == before


def test_a_failing_migration_leaves_the_v1_database_as_it_was(tmp_path):
    url = _v1_sqlite(tmp_path / "v1.db")
    # a unit label pointing at an action that does not exist: the v2 foreign-key check refuses the copy
    con = sqlite3.connect(tmp_path / "v1.db")
    con.execute("INSERT INTO unit_label VALUES ('features.9', 7, 'mass', 0.5, 'ana', '2025-01-02', NULL, NULL, 99, 1)")
    con.commit()
    con.close()
    before = _sqlite_schema(tmp_path / "v1.db")
    rows = _v1_rows(url)
    with pytest.raises(Exception, match="broken references"):
        open_database(url)
    assert _sqlite_schema(tmp_path / "v1.db") == before and _v1_rows(url) == rows
    assert current_revision(_raw(url)) is None


# -- the audit log is append-only --------------------------------------------------------------------------------------
def _audit_refuses_changes(db: Database) -> None:
    from store.accounts import audit

    with db.write() as s:
        audit(s, actor="ana", action="test.entry", target="x", detail={"n": 1})
    before = dump(db)["audit_log"]
    for stmt in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            with db.write() as s:
                s.execute(text(stmt))
    assert dump(db)["audit_log"] == before


def test_the_audit_log_refuses_update_and_delete_on_sqlite(tmp_path):
    _audit_refuses_changes(open_database(f"sqlite:///{tmp_path / 'a.db'}"))


@pytest.mark.services
def test_the_audit_log_refuses_update_delete_and_truncate_on_postgresql(pg_database):
    db = open_database(pg_database)
    _audit_refuses_changes(db)
    with pytest.raises(Exception, match="append-only"):
        with db.write() as s:
            s.execute(text("TRUNCATE audit_log"))
    db.dispose()


def test_db_current_on_a_missing_sqlite_file_creates_nothing(tmp_path, capsys):
    from store.cli import db_main

    missing = tmp_path / "nowhere" / "annotations.db"
    assert db_main(["current", "--url", f"sqlite:///{missing}"]) == 1
    assert "no annotation database there" in capsys.readouterr().err
    assert not missing.exists() and not missing.parent.exists()
