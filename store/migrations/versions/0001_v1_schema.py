"""The v1 schema (issue 5): concepts, regions, label actions, unit labels (one per unit), label changes, image marks.

Exactly what store/annotations.py's `metadata.create_all` made before schema v2, with the rows a fresh v1 database
got (its schema_version row and the default concept vocabulary). A database made by that code has no
`alembic_version` table: open_database stamps it `0001` and upgrades it from here.

Revision ID: 0001
Revises:
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

# frozen copy of the v1 vocabulary (a migration never imports the current models' data)
CONCEPTS = (
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


def upgrade() -> None:
    concept = op.create_table(
        "concept",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.String(1000), nullable=False),
        sa.Column("builtin", sa.Boolean(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_concept"),
    )
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("applied_at", TS, nullable=False),
        sa.Column("note", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_schema_version"),
    )
    op.create_table(
        "region",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(128), nullable=False),
        sa.Column("concept", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("area", sa.Integer(), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_region"),
        sa.ForeignKeyConstraint(["concept"], ["concept.id"], name="fk_region_concept_concept"),
    )
    op.create_index("ix_region_image_id", "region", ["image_id"])
    op.create_index("ix_region_concept", "region", ["concept"])
    op.create_table(
        "image_mark",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(128), nullable=False),
        sa.Column("concept", sa.String(64), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_image_mark"),
        sa.UniqueConstraint("image_id", "concept", name="uq_image_mark_image_id_concept"),
        sa.ForeignKeyConstraint(["concept"], ["concept.id"], name="fk_image_mark_concept_concept"),
    )
    op.create_index("ix_image_mark_image_id", "image_mark", ["image_id"])
    op.create_index("ix_image_mark_concept", "image_mark", ["concept"])
    op.create_table(
        "label_action",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("layer", sa.String(200), nullable=False),
        sa.Column("concept", sa.String(64), nullable=True),
        sa.Column("image_id", sa.String(128), nullable=True),
        sa.Column("region_id", sa.Integer(), nullable=True),
        sa.Column("rule", sa.JSON(), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("n_changed", sa.Integer(), nullable=False),
        sa.Column("undoes", sa.Integer(), nullable=True),
        sa.Column("undone_by", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_label_action"),
        sa.ForeignKeyConstraint(["concept"], ["concept.id"], name="fk_label_action_concept_concept"),
        sa.ForeignKeyConstraint(["region_id"], ["region.id"], name="fk_label_action_region_id_region"),
        sa.ForeignKeyConstraint(["undoes"], ["label_action.id"], name="fk_label_action_undoes_label_action"),
        sa.ForeignKeyConstraint(["undone_by"], ["label_action.id"], name="fk_label_action_undone_by_label_action"),
    )
    op.create_index("ix_label_action_layer", "label_action", ["layer"])
    op.create_table(
        "unit_label",
        sa.Column("layer", sa.String(200), nullable=False),
        sa.Column("unit", sa.Integer(), nullable=False),
        sa.Column("concept", sa.String(64), nullable=False),
        sa.Column("iou", sa.Float(), nullable=True),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("image_id", sa.String(128), nullable=True),
        sa.Column("region_id", sa.Integer(), nullable=True),
        sa.Column("action_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("layer", "unit", name="pk_unit_label"),
        sa.ForeignKeyConstraint(["concept"], ["concept.id"], name="fk_unit_label_concept_concept"),
        sa.ForeignKeyConstraint(["region_id"], ["region.id"], name="fk_unit_label_region_id_region"),
        sa.ForeignKeyConstraint(["action_id"], ["label_action.id"], name="fk_unit_label_action_id_label_action"),
    )
    op.create_index("ix_unit_label_concept", "unit_label", ["concept"])
    op.create_table(
        "label_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.String(200), nullable=False),
        sa.Column("unit", sa.Integer(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_label_change"),
        sa.ForeignKeyConstraint(["action_id"], ["label_action.id"], name="fk_label_change_action_id_label_action"),
    )
    op.create_index("ix_label_change_layer_unit", "label_change", ["layer", "unit"])
    op.create_index("ix_label_change_action_id", "label_change", ["action_id"])

    now = dt.datetime.now(dt.timezone.utc)
    op.bulk_insert(schema_version, [{"version": 1, "applied_at": now, "note": "created"}])
    op.bulk_insert(concept, [{"id": cid, "name": name, "description": description, "builtin": True,
                              "position": position, "created_at": now}
                             for position, (cid, name, description) in enumerate(CONCEPTS)])


def downgrade() -> None:
    for table in ("label_change", "unit_label", "label_action", "image_mark", "region", "schema_version", "concept"):
        op.drop_table(table)
