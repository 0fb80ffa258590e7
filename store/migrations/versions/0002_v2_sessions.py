"""Schema v2: users, review sessions, per-annotator unit labels, request ids, comments, probe versions, audit log.

Data: every v1 row goes into session 1 ("Workspace", created here); every distinct v1 author (of regions, actions,
labels and marks) becomes a user with that exact name, role radiologist and no password (cannot log in until an
admin sets one), and a member of session 1. A v1 unit label becomes the label of its author. The audit log gets a
trigger that refuses UPDATE and DELETE (and TRUNCATE on PostgreSQL).

SQLite alters tables by copying them (Alembic batch mode); store.annotations runs this with foreign keys off and
checks them (PRAGMA foreign_key_check) before it commits.

Revision ID: 0002
Revises: 0001
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
NAMES = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP; END $$",
        "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
    ],
}


def _session_column() -> sa.Column:
    return sa.Column("session_id", sa.Integer(), nullable=False, server_default=sa.text("1"))


def _add_session(batch, table: str) -> None:
    batch.add_column(_session_column())
    batch.create_foreign_key(f"fk_{table}_session_id_review_session", "review_session", ["session_id"], ["id"])


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    now = dt.datetime.now(dt.timezone.utc)

    users = op.create_table(
        "user_account",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(400), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_user_account"),
        sa.UniqueConstraint("name", name="uq_user_account_name"),
    )
    sessions = op.create_table(
        "review_session",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model_uri", sa.String(500), nullable=True),
        sa.Column("store", sa.String(1000), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("archived_at", TS, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_session"),
        sa.UniqueConstraint("name", name="uq_review_session_name"),
    )
    op.create_table(
        "session_member",
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("added_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("session_id", "user_id", name="pk_session_member"),
        sa.ForeignKeyConstraint(["session_id"], ["review_session.id"],
                                name="fk_session_member_session_id_review_session"),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], name="fk_session_member_user_id_user_account"),
    )
    op.create_index("ix_session_member_user_id", "session_member", ["user_id"])
    op.create_table(
        "comment",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(128), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("text", sa.String(10000), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=True),
        sa.Column("deleted_at", TS, nullable=True),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_comment"),
        sa.ForeignKeyConstraint(["session_id"], ["review_session.id"], name="fk_comment_session_id_review_session"),
    )
    op.create_index("ix_comment_session_id_image_id", "comment", ["session_id", "image_id"])
    op.create_table(
        "probe_version",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("concept", sa.String(64), nullable=False),
        sa.Column("layer", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_probe_version"),
        sa.ForeignKeyConstraint(["session_id"], ["review_session.id"],
                                name="fk_probe_version_session_id_review_session"),
        sa.ForeignKeyConstraint(["concept"], ["concept.id"], name="fk_probe_version_concept_concept"),
    )
    op.create_index("ix_probe_version_session_id_concept_layer", "probe_version", ["session_id", "concept", "layer"])
    audit = op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=True),
        sa.Column("target", sa.String(500), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_session_id", "audit_log", ["session_id"])

    op.bulk_insert(sessions, [{"id": 1, "name": "Workspace", "model_uri": None, "store": None, "created_by": None,
                               "created_at": now, "archived_at": None, "version": 1}])
    if dialect == "postgresql":  # an explicit id does not move the sequence
        op.execute("SELECT setval(pg_get_serial_sequence('review_session', 'id'), 1)")

    # every annotation row gains its session (1 for all v1 rows); edited rows gain a version
    with op.batch_alter_table("region", naming_convention=NAMES) as b:
        _add_session(b, "region")
        b.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")))
        b.create_index("ix_region_session_id", ["session_id"])
    with op.batch_alter_table("label_action", naming_convention=NAMES) as b:
        _add_session(b, "label_action")
        b.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        b.create_unique_constraint("uq_label_action_session_id_author_request_id",
                                   ["session_id", "author", "request_id"])
        b.create_index("ix_label_action_session_id", ["session_id"])
    with op.batch_alter_table("label_change", naming_convention=NAMES) as b:
        _add_session(b, "label_change")
        b.create_index("ix_label_change_session_id", ["session_id"])
    with op.batch_alter_table("image_mark", naming_convention=NAMES) as b:
        _add_session(b, "image_mark")
        b.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")))
        b.drop_constraint("uq_image_mark_image_id_concept", type_="unique")
        b.create_unique_constraint("uq_image_mark_session_id_image_id_concept", ["session_id", "image_id", "concept"])
        b.create_index("ix_image_mark_session_id", ["session_id"])
    # labels are kept per annotator: the key becomes (session, author, layer, unit)
    with op.batch_alter_table("unit_label", naming_convention=NAMES, recreate="auto") as b:
        b.add_column(_session_column())
        b.drop_constraint("pk_unit_label", type_="primary")
        b.create_primary_key("pk_unit_label", ["session_id", "author", "layer", "unit"])
        b.create_foreign_key("fk_unit_label_session_id_review_session", "review_session", ["session_id"], ["id"])
        b.create_index("ix_unit_label_session_id_layer", ["session_id", "layer"])

    # every v1 author becomes a user (exact name, no password) and a member of session 1
    authors = sorted({r[0] for r in bind.execute(sa.text(
        "SELECT author FROM region UNION SELECT author FROM label_action UNION SELECT author FROM unit_label "
        "UNION SELECT author FROM image_mark"))})
    if authors:
        op.bulk_insert(users, [{"name": a, "display_name": a, "role": "radiologist", "password_hash": None,
                                "active": True, "created_at": now, "version": 1} for a in authors])
        bind.execute(sa.text("INSERT INTO session_member (session_id, user_id, added_at) "
                             "SELECT 1, id, :now FROM user_account"), {"now": now})

    for stmt in TRIGGERS.get(dialect, []):
        bind.execute(sa.text(stmt))
    op.bulk_insert(sa.table("schema_version", sa.column("version", sa.Integer), sa.column("applied_at", TS),
                            sa.column("note", sa.String)),
                   [{"version": 2, "applied_at": now, "note": "alembic 0002: users, sessions, per-annotator labels"}])
    op.bulk_insert(audit, [{"at": now, "actor": "migration", "action": "schema.upgrade", "session_id": None,
                            "target": "schema:0002", "detail": {"from": "0001", "users_created": authors}}])


def downgrade() -> None:
    raise NotImplementedError("schema v2 cannot be downgraded (labels per annotator do not fit v1's one label per "
                              "unit); restore a backup instead")
