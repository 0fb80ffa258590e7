"""Alembic migrations of the annotation database (store.annotations.open_database runs them; `python -m store db`).

Revisions: `0001` the v1 schema (issue 5), `0002` schema v2 (users, review sessions, per-annotator labels, audit log).
"""
