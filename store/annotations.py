"""The annotation database: unit labels with provenance and their history, drawn regions, image marks, concepts.

    >>> from store.annotations import open_database
    >>> db = open_database(settings.database_url)            # SQLite file in the workspace, or postgresql+psycopg://…
    >>> with db.write() as s:                                 # one IMMEDIATE transaction: all or nothing
    ...     s.add(ImageMark(image_id="p0001", concept="mass", present=True, author="ana"))
    >>> with db.read() as s:
    ...     s.scalars(select(UnitLabel).where(UnitLabel.layer == "features.9")).all()

Everything about the schema is in this module: the SQLAlchemy 2 ORM models and their `metadata` (schema v2:
users, review sessions and their members, per-annotator unit labels, comments, probe versions, the append-only audit
log; docs/CONTRACTS.md "Review database, schema v2"). The schema itself is made by the Alembic migrations in
store/migrations/ (`0001` = the v1 schema, `0002` = v2): `open_database` upgrades to the newest revision under a lock
(PostgreSQL advisory lock; SQLite BEGIN IMMEDIATE), so two processes starting together migrate once. A v1 database
(table `schema_version`, no `alembic_version`) is stamped `0001` and upgraded with its rows kept in session 1; a
database newer than this code is refused (SchemaVersionError) and never changed. `schema_version` keeps one row per
schema version so that an older ConceptLens refuses a newer database clearly too.

SQLite (the embedded default, `<workspace>/annotations.db`) runs in WAL mode with a busy timeout, and every write
transaction begins with `BEGIN IMMEDIATE`, so two writers queue instead of failing with "database is locked" on
upgrade from a read lock (RELIABILITY.md #23). Read transactions begin DEFERRED and never block writers. PostgreSQL is
chosen by URL; a fresh database is initialized under an advisory lock (one process creates the tables).

The explain/ functions (explain.labels) are the API the app uses; these models are their storage.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from .errors import StoreError

__all__ = [
    "SCHEMA_VERSION",
    "DEFAULT_CONCEPTS",
    "metadata",
    "Base",
    "WORKSPACE_SESSION",
    "ROLES",
    "SchemaVersion",
    "User",
    "ReviewSession",
    "SessionMember",
    "Comment",
    "ProbeVersion",
    "AuditLog",
    "Concept",
    "Region",
    "LabelAction",
    "UnitLabel",
    "LabelChange",
    "ImageMark",
    "Database",
    "open_database",
    "AnnotationDatabaseError",
    "SchemaVersionError",
    "utcnow",
]

SCHEMA_VERSION = 2
WORKSPACE_SESSION = 1  # the built-in session "Workspace": every database has it
WORKSPACE_SESSION_NAME = "Workspace"
ROLES = ("radiologist", "researcher", "admin")
BUSY_TIMEOUT_S = 30.0
_PG_INIT_LOCK = 0x436C4C6E  # advisory lock key ("ClLn") held while one process creates the schema

# (id, display name, description): the demo's inserted concepts first, then the anatomy and film concepts
DEFAULT_CONCEPTS: tuple[tuple[str, str, str], ...] = (
    ("mass", "mass", "a space-occupying lesion seen in two projections"),
    ("calcification", "calcification", "calcium deposits: bright specks, alone or clustered"),
    ("spiculated_margin", "spiculated margin", "lines radiating from the margin of a mass"),
    ("circumscribed_margin", "circumscribed margin", "a sharply demarcated mass margin"),
    ("architectural_distortion", "architectural distortion", "distorted parenchyma without a visible mass"),
    ("skin", "skin", "the skin line at the breast's edge"),
    ("film_label", "film label", "burned-in text and labels outside the breast"),
    ("normal_tissue", "normal tissue", "fibroglandular and fatty tissue without findings"),
    ("background", "background", "outside the breast"),
    ("pectoral_muscle", "pectoral muscle", "the pectoral muscle in MLO views"),
)


class AnnotationDatabaseError(StoreError):
    """The annotation database cannot be used (bad URL, unreachable, wrong schema); the message names the URL."""


class SchemaVersionError(AnnotationDatabaseError):
    """The database was made by another schema version; it is refused, never silently changed."""


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# -- models ------------------------------------------------------------------------------------------------------------
class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


metadata = Base.metadata
_TS = DateTime(timezone=True)


def _session_fk() -> Any:
    """The `session_id` column of every annotation row: session 1 ("Workspace") unless told otherwise, so v1
    callers that never name a session keep working."""
    return mapped_column(ForeignKey("review_session.id"), index=True, default=WORKSPACE_SESSION,
                         server_default=text(str(WORKSPACE_SESSION)))


class SchemaVersion(Base):
    """One row per schema version applied (the highest is the database's version).

    Kept next to Alembic's `alembic_version` so that a ConceptLens of schema v1 refuses a v2 database clearly.
    """

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    note: Mapped[str] = mapped_column(String(200), default="")


class User(Base):
    """A person (or a script) who logs in and authors annotations; `name` never changes and is the `author` of
    every row they write. `password_hash` NULL: cannot log in (users created by a migration, an import, or a
    labeling script). Table `user_account` ("user" is reserved in PostgreSQL)."""

    __tablename__ = "user_account"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(400), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)


class ReviewSession(Base):
    """A review session: people (SessionMember) reviewing one model version's store together. Session 1
    ("Workspace") always exists; it holds everything written without naming a session."""

    __tablename__ = "review_session"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_uri: Mapped[str | None] = mapped_column(String(500), nullable=True)
    store: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)  # a user name; NULL for session 1
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    archived_at: Mapped[_dt.datetime | None] = mapped_column(_TS, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class SessionMember(Base):
    __tablename__ = "session_member"
    session_id: Mapped[int] = mapped_column(ForeignKey("review_session.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), primary_key=True, index=True)
    added_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)


class Concept(Base):
    """The concept vocabulary (shared by all sessions): ids are snake case (docs/CONTRACTS.md); the UI shows `name`."""

    __tablename__ = "concept"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(1000), default="")
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    position: Mapped[int] = mapped_column(Integer, default=1000)  # display order: the built-in list first
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)


class Region(Base):
    """A region drawn (or given as a mask) on one image for one concept, in patch coordinates.

    `spec` is explain.regions' JSON (a list of shapes applied in order); `height`, `width` the patch size it was
    drawn on; `area` its pixel count. An undone drawing keeps its row with `deleted_at` set.
    """

    __tablename__ = "region"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = _session_fk()
    image_id: Mapped[str] = mapped_column(String(128), index=True)
    concept: Mapped[str] = mapped_column(ForeignKey("concept.id"), index=True)
    spec: Mapped[list] = mapped_column(JSON)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    deleted_at: Mapped[_dt.datetime | None] = mapped_column(_TS, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))


class LabelAction(Base):
    """One labeling act: a drawn region with the rule applied ("region"), a manual name ("manual"), or an undo.

    `request_id`: the client's idempotency key; a (session, author, request_id) is stored once, so a retried
    request finds its first result instead of labeling twice.
    """

    __tablename__ = "label_action"
    __table_args__ = (UniqueConstraint("session_id", "author", "request_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = _session_fk()
    kind: Mapped[str] = mapped_column(String(16))  # region | manual | undo
    layer: Mapped[str] = mapped_column(String(200), index=True)
    concept: Mapped[str | None] = mapped_column(ForeignKey("concept.id"), nullable=True)
    image_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    region_id: Mapped[int | None] = mapped_column(ForeignKey("region.id"), nullable=True)
    rule: Mapped[dict] = mapped_column(JSON, default=dict)  # the rule's parameters (threshold, level, …)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    n_changed: Mapped[int] = mapped_column(Integer, default=0)
    undoes: Mapped[int | None] = mapped_column(ForeignKey("label_action.id"), nullable=True)  # for kind undo
    undone_by: Mapped[int | None] = mapped_column(ForeignKey("label_action.id"), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class UnitLabel(Base):
    """An annotator's current label of a unit (session, author, layer, unit), with the provenance of the act that
    gave it. Labels are kept per annotator; explain.labels merges them for the shared view.

    `iou` is the IoU of the drawn region with the unit's mask that earned the label (NULL for a manual name, which
    the labeling rule never overrides); `version` counts the label's changes (for conflict detection).
    """

    __tablename__ = "unit_label"
    __table_args__ = (Index("ix_unit_label_session_id_layer", "session_id", "layer"),)
    session_id: Mapped[int] = mapped_column(ForeignKey("review_session.id"), primary_key=True,
                                            default=WORKSPACE_SESSION, server_default=text(str(WORKSPACE_SESSION)))
    author: Mapped[str] = mapped_column(String(200), primary_key=True)
    layer: Mapped[str] = mapped_column(String(200), primary_key=True)
    unit: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept: Mapped[str] = mapped_column(ForeignKey("concept.id"), index=True)
    iou: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    image_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    region_id: Mapped[int | None] = mapped_column(ForeignKey("region.id"), nullable=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("label_action.id"))
    version: Mapped[int] = mapped_column(Integer, default=1)

    PROVENANCE = ("concept", "iou", "author", "created_at", "image_id", "region_id", "action_id", "version")

    def snapshot(self) -> dict[str, Any]:
        """The label's fields as JSON-ready values (what LabelChange keeps to undo a change exactly)."""
        out = {k: getattr(self, k) for k in self.PROVENANCE}
        out["created_at"] = _iso(out["created_at"])
        return out


class LabelChange(Base):
    """One unit's label before and after an action (JSON snapshots; `before` NULL = the unit had no label)."""

    __tablename__ = "label_change"
    __table_args__ = (Index("ix_label_change_layer_unit", "layer", "unit"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = _session_fk()
    action_id: Mapped[int] = mapped_column(ForeignKey("label_action.id"), index=True)
    layer: Mapped[str] = mapped_column(String(200))
    unit: Mapped[int] = mapped_column(Integer)
    before: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ImageMark(Base):
    """A reviewer's statement that an image shows (present) or does not show a concept — for concept probes.
    One mark per (session, image, concept): a newer mark replaces it (`version` counts the replacements)."""

    __tablename__ = "image_mark"
    __table_args__ = (UniqueConstraint("session_id", "image_id", "concept"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = _session_fk()
    image_id: Mapped[str] = mapped_column(String(128), index=True)
    concept: Mapped[str] = mapped_column(ForeignKey("concept.id"), index=True)
    present: Mapped[bool] = mapped_column(Boolean)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))


class Comment(Base):
    """A comment on an image in a session; a deleted comment keeps its row with `deleted_at` set."""

    __tablename__ = "comment"
    __table_args__ = (Index("ix_comment_session_id_image_id", "session_id", "image_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("review_session.id"))
    image_id: Mapped[str] = mapped_column(String(128))
    author: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(String(10000))
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    updated_at: Mapped[_dt.datetime | None] = mapped_column(_TS, nullable=True)
    deleted_at: Mapped[_dt.datetime | None] = mapped_column(_TS, nullable=True)
    updated_by: Mapped[str | None] = mapped_column(String(200), nullable=True)  # who made the last change
    version: Mapped[int] = mapped_column(Integer, default=1)


class ProbeVersion(Base):
    """A fitted probe (concept, layer) of a session: its mlflow run id and held-out metrics; one `active` per
    (session, concept, layer) — the version whose scores the store holds."""

    __tablename__ = "probe_version"
    __table_args__ = (Index("ix_probe_version_session_id_concept_layer", "session_id", "concept", "layer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("review_session.id"))
    concept: Mapped[str] = mapped_column(ForeignKey("concept.id"))
    layer: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[str] = mapped_column(String(64))
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class AuditLog(Base):
    """Who did what, when: append-only (a database trigger refuses UPDATE and DELETE on this table).

    `session_id` is a plain number (no foreign key) so the log never blocks or follows changes elsewhere.
    """

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[_dt.datetime] = mapped_column(_TS, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    target: Mapped[str] = mapped_column(String(500), default="")
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)


def _iso(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.isoformat()
    return str(value)


def parse_time(value: str | None) -> _dt.datetime | None:
    """The inverse of the snapshots' ISO timestamps."""
    return None if value is None else _dt.datetime.fromisoformat(value)


# -- the database ------------------------------------------------------------------------------------------------------
class Database:
    """An opened annotation database (use `open_database`). Sessions come from `read()` and `write()`."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(bind=engine.execution_options(conceptlens_write=True), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; its transaction is rolled back at the end (nothing it does is kept)."""
        with self._read() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction (BEGIN IMMEDIATE on SQLite): committed when the block ends,
        rolled back entirely if it raises."""
        with self._write() as session:
            with session.begin():
                session.connection()  # BEGIN (IMMEDIATE) now, not at the first statement
                yield session

    def schema_version(self) -> int:
        with self.read() as s:
            return int(s.scalar(select(SchemaVersion.version).order_by(SchemaVersion.version.desc())) or 0)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_events(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below), sqlite3 must not
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # writers take the write lock up front: no deadlock-prone upgrade from a shared lock later
        immediate = conn.get_execution_options().get("conceptlens_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# -- migrations --------------------------------------------------------------------------------------------------------
MIGRATIONS = Path(__file__).resolve().with_name("migrations")
_SCRIPT: list = []


def _alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _script():
    """Alembic's view of store/migrations (parsed once per process)."""
    if not _SCRIPT:
        from alembic.script import ScriptDirectory

        _SCRIPT.append(ScriptDirectory.from_config(_alembic_config()))
    return _SCRIPT[0]


def head_revision() -> str:
    """The newest migration this code knows ("0002")."""
    return _script().get_current_head()


def _state(conn) -> tuple[str | None, int | None, bool]:
    """(Alembic revision or None, highest schema_version or None, has the v2 user table) of a database."""
    insp = sa_inspect(conn)
    tables = set(insp.get_table_names())
    rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar() \
        if "alembic_version" in tables else None
    sv = conn.execute(text("SELECT max(version) FROM schema_version")).scalar() \
        if "schema_version" in tables else None
    return rev, sv, "user_account" in tables


def _refuse_newer(db: Database, rev: str | None, sv: int | None) -> None:
    known = {s.revision for s in _script().walk_revisions()}
    if rev is not None and rev not in known:
        raise SchemaVersionError(f"{db!r}: database revision {rev!r} is newer than this ConceptLens (it knows up to "
                                 f"{head_revision()!r}); upgrade ConceptLens first")
    if sv is not None and sv > SCHEMA_VERSION:
        raise SchemaVersionError(f"{db!r}: schema version {sv}, this ConceptLens expects {SCHEMA_VERSION}; upgrade "
                                 f"ConceptLens first")


def _run_migrations(db: Database, conn, rev: str | None, sv: int | None, v2_tables: bool) -> None:
    from alembic import command

    _refuse_newer(db, rev, sv)
    cfg = _alembic_config(conn)
    if rev is None and sv is not None:
        if sv == 1:  # made by the v1 code (create_all, no Alembic): it is revision 0001
            command.stamp(cfg, "0001")
        elif v2_tables:  # made by the v2 pre-release that used create_all
            command.stamp(cfg, "head")
            return
    command.upgrade(cfg, "head")


def upgrade_database(db: Database) -> tuple[str | None, str]:
    """Bring the database to the newest revision under a lock, so that of two processes starting together one
    migrates and the other finds it done; returns (revision before, revision after).

    The lock: PostgreSQL, a transaction-scoped advisory lock; SQLite, the write lock (BEGIN IMMEDIATE), with foreign
    keys off for Alembic's batch copies and PRAGMA foreign_key_check before commit. All migrations run in one
    transaction: a failure leaves the database as it was.
    """
    head = head_revision()
    with db.engine.connect() as conn:
        rev, sv, _ = _state(conn)
        conn.rollback()
    if rev == head:
        _refuse_newer(db, rev, sv)
        return rev, rev
    with db.engine.connect() as conn:
        if db.is_sqlite:
            raw = conn.connection.dbapi_connection  # PRAGMA foreign_keys is ignored inside a transaction
            raw.execute("PRAGMA foreign_keys = OFF")
            try:
                with conn.execution_options(conceptlens_write=True).begin():
                    rev, sv, v2 = _state(conn)
                    if rev != head:
                        _run_migrations(db, conn, rev, sv, v2)
                        bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if bad:
                            raise AnnotationDatabaseError(f"{db!r}: the migration left broken references {bad[:5]}; "
                                                          f"nothing was changed")
            finally:
                raw.execute("PRAGMA foreign_keys = ON")
        else:
            with conn.begin():
                if db.engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_INIT_LOCK})
                rev, sv, v2 = _state(conn)
                if rev != head:
                    _run_migrations(db, conn, rev, sv, v2)
    return rev, head


def current_revision(db: Database) -> str | None:
    """The database's Alembic revision (None: empty, or a v1 database not yet stamped)."""
    with db.engine.connect() as conn:
        rev, _, _ = _state(conn)
        conn.rollback()
    return rev


def open_database(url: str | None = None, *, settings=None, create: bool = True, echo: bool = False) -> Database:
    """Open (and, with create, initialize) the annotation database at `url` (default: settings.database_url).

        >>> db = open_database("sqlite:///" + str(tmp_path / "a.db"))
        >>> db = open_database("postgresql+psycopg://user@127.0.0.1/conceptlens")
        >>> db = open_database("sqlite://")                    # in memory (tests, simulations)

    Raises AnnotationDatabaseError naming the URL (password hidden) when it is malformed or unreachable, and
    SchemaVersionError for a database of another schema version.
    """
    if url is None:
        if settings is None:
            raise AnnotationDatabaseError("open_database: give a URL or a Settings object")
        url = settings.database_url
    url = str(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise AnnotationDatabaseError(f"{url!r} is not a database URL (sqlite:///path.db, postgresql+psycopg://…)") \
            from None
    shown = parsed.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    memory = False
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        if memory:  # one shared connection, or every connection would see its own empty database
            kwargs["poolclass"] = StaticPool
        else:
            from pathlib import Path

            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as e:
        raise AnnotationDatabaseError(f"{shown}: cannot create an engine ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        _sqlite_events(engine, memory=memory)
    db = Database(engine, url)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if create:
                upgrade_database(db)
            else:
                rev = current_revision(db)
                version = db.schema_version() if rev is not None else 0
                _refuse_newer(db, rev, version)
                if rev != head_revision() or version != SCHEMA_VERSION:
                    raise SchemaVersionError(f"{shown}: revision {rev}, schema version {version}; expected revision "
                                             f"{head_revision()} (schema version {SCHEMA_VERSION}): run `python -m "
                                             f"store db upgrade` first")
            return db
        except AnnotationDatabaseError:
            engine.dispose()
            raise
        except DBAPIError as e:
            # SQLite refuses some locks at once, without waiting out its busy timeout (switching a fresh file to
            # WAL while another process migrates it, say): the migration is idempotent under its lock, so try again
            if db.is_sqlite and "locked" in str(e.orig) and time.monotonic() < deadline:
                engine.dispose()
                time.sleep(0.05)
                continue
            engine.dispose()
            raise AnnotationDatabaseError(f"{shown}: cannot open the annotation database ({e.orig})") from None


def dump(db: Database) -> dict[str, list[dict]]:
    """Every row of every table as plain dicts, sorted (for tests and exports: compare two states of a database)."""
    out = {}
    with db.read() as s:
        for table in metadata.sorted_tables:
            rows = s.execute(select(table)).mappings().all()
            out[table.name] = sorted((json.loads(json.dumps(dict(r), default=_iso)) for r in rows),
                                     key=lambda r: json.dumps(r, sort_keys=True))
    return out
